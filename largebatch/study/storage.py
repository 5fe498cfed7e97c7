"""Where a study lives: checking and opening its Optuna storage, for one machine or several.

Three kinds of `--storage`, one study shared by every process that names the same one:

- `sqlite:///runs/study.db` (the default; `sqlite:////abs/study.db` for an absolute path): one machine. SQLite
  locks the whole file for each write, so many workers queue on it (each waits up to 60 s, then fails with
  `database is locked`), and its locks are unreliable on a network filesystem, where several hosts can corrupt
  the file: a study whose SQLite file lies on nfs, cifs, sshfs, 9p, lustre, ... (`network_filesystem`) is a
  ConfigError.
- `postgresql://user:password@host/db` (any SQLAlchemy URL with its driver installed; PostgreSQL needs
  `pip install 'largebatch[postgres]'`): a database server that several machines reach over the network.
- `journal:///runs/study.log` (`journal:////shared/study.log` for an absolute path, as SQLite's URLs): Optuna's
  JournalStorage, an append-only log file, for several machines on a shared filesystem without a server; its
  lock is a symlink, which NFS supports.

**Heartbeats.** A running trial records a heartbeat every `heartbeat` seconds (`StudySpec.heartbeat`, `largebatch
study --heartbeat`); one silent for GRACE_BEATS heartbeats belongs to a killed process (or a lost machine): any
process of the study fails it and re-queues its parameters (Optuna's RetryHeartbeatStaleTrialCallback), and
another process reruns it (resuming its checkpoint where its run directory is on this machine). Every process of
a study must use the same heartbeat: the first records it in the storage, and `run_study` refuses another. Optuna
5.0's JournalStorage has no heartbeats (its killed trials would stay RUNNING for ever): `HeartbeatJournalStorage`
adds them, with the writing machine's clock, so the machines' clocks must agree to well within the grace period
(NTP does); RDB storage uses the database server's clock.
"""

from __future__ import annotations

import contextlib
import re
import time
import warnings
from pathlib import Path

from largebatch.config import ConfigError, check_writable_dir
from largebatch.extras import require

optuna = require("study", "optuna", "the study storage (largebatch.study.storage)")
TrialState = optuna.trial.TrialState
BaseHeartbeat = optuna.storages._heartbeat.BaseHeartbeat  # the interface fail_stale_trials() and optimize() check

HEARTBEAT_S = 60  # seconds between a running trial's heartbeats (StudySpec.heartbeat's default)
GRACE_BEATS = 3  # a running trial silent for this many heartbeats belongs to a killed process
CREATE_TRIES = 5  # attempts at opening an RDB storage whose tables other processes are creating at the same time
JOURNAL = "journal:///"
SQLITE_EXAMPLE = "sqlite:///runs/study.db"
EXAMPLES = f"e.g. {SQLITE_EXAMPLE} (one machine), journal:///runs/study.log (a shared filesystem) or " \
           f"postgresql://user:password@host/db (a server)"
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "9p", "lustre", "gpfs", "beegfs", "ceph", "glusterfs",
    "orangefs", "pvfs2", "fuse.sshfs", "sshfs", "fuse.glusterfs", "fuse.ceph", "fuse.cephfs", "fuse.s3fs",
    "fuse.gcsfuse", "fuse.rclone", "fuse.juicefs", "fuse.davfs", "davfs"})
"""Filesystem types (/proc/mounts) shared over a network, where SQLite's file locks cannot be trusted."""
MOUNTS = Path("/proc/mounts")  # the mount table: device, mount point, type, options per line


# ---------------------------------------------------------------------------------------------
# checking a URL (one-line errors before any work)


def check_storage(url: str, flag: str, existing: bool = False) -> None:
    """ConfigError unless `url` is a journal URL or an SQLAlchemy URL whose driver is installed and, for SQLite and
    a journal, names a file: an existing one when `existing` (report), else one that can be created (study), SQLite's
    not on a network filesystem."""
    if url.startswith("journal:"):
        _check_file(url, journal_path(url, flag), flag, existing, "journal")
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        kind = url.partition(":")[0]
        raise ConfigError(f"{flag} {url!r}: SQLAlchemy knows no database {kind!r}; {EXAMPLES}") from None
    except ArgumentError:
        raise ConfigError(f"{flag} {url!r} is not a storage URL: {EXAMPLES}") from None
    try:
        getattr(dialect, "import_dbapi", None) and dialect.import_dbapi()
    except ImportError as e:
        fix = ("pip install 'largebatch[postgres]'" if e.name == "psycopg" else  # postgresql://'s default driver
               f"pip install it, or use SQLite, e.g. {SQLITE_EXAMPLE}")
        raise ConfigError(f"{flag} {url!r}: its database driver ({e.name or parsed.drivername}) is not installed: "
                          f"{fix}") from None
    if parsed.get_backend_name() != "sqlite":
        return
    if parsed.database in (None, "", ":memory:"):
        raise ConfigError(f"{flag} {url!r} is an in-memory database, gone when the command ends: give a file, "
                          f"e.g. {SQLITE_EXAMPLE}")
    path = Path(parsed.database)
    _check_file(url, path, flag, existing, "database")
    fs = None if existing else network_filesystem(path)
    if fs:
        raise ConfigError(f"{flag} {url}: {path} lies on a {fs} filesystem, where SQLite's locks are unreliable and "
                          f"several hosts can corrupt it: share a study with journal:///{path.with_suffix('.log')} "
                          f"or a PostgreSQL URL, or put the SQLite file on a local disk")


def journal_path(url: str, flag: str = "--storage") -> Path:
    """The log file of a journal URL: everything after `journal:///` (relative, or absolute with a fourth slash)."""
    if not url.startswith(JOURNAL) or not url[len(JOURNAL):].strip():
        raise ConfigError(f"{flag} {url!r} is not a journal URL: give journal:///FILE, e.g. journal:///runs/study.log "
                          f"(relative) or journal:////shared/study.log (absolute)")
    return Path(url[len(JOURNAL):])


def _check_file(url: str, path: Path, flag: str, existing: bool, kind: str) -> None:
    """The storage file: existing (report), or a new or existing file whose folder can be made and written."""
    if existing:
        if not path.is_file():
            raise ConfigError(f"{flag} {url}: no such {kind} file; pass the --storage of a `largebatch study`")
        return
    if path.is_dir():
        raise ConfigError(f"{flag} {url}: {path} is a directory; name a file in it, e.g. {path}/study{path.suffix}")
    check_writable_dir(path.parent, f"{flag} {url}: its folder")


def filesystem_type(path: Path, mounts: str | None = None) -> str:
    """The type of the filesystem holding `path` (which need not exist yet; symbolic links resolved): the entry of
    the mount table (`mounts`: the text of MOUNTS when None) with the longest mount point above it; "" when the
    table is not readable."""
    if mounts is None:
        try:
            mounts = MOUNTS.read_text()
        except OSError:
            return ""
    where = path.resolve()
    best, kind = -1, ""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = Path(_unescape(fields[1]))
        if (where == point or point in where.parents) and len(point.parts) >= best:  # a later mount hides earlier
            best, kind = len(point.parts), fields[2]
    return kind


def _unescape(field: str) -> str:
    """A /proc/mounts field with its octal escapes (\\040 for a space) decoded."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def network_filesystem(path: Path, mounts: str | None = None) -> str | None:
    """The network filesystem type holding `path` (NETWORK_FILESYSTEMS), None on a local one."""
    kind = filesystem_type(path, mounts)
    return kind if kind in NETWORK_FILESYSTEMS or kind.startswith("nfs") else None


# ---------------------------------------------------------------------------------------------
# opening


def open_storage(url: str, heartbeat: int = HEARTBEAT_S) -> optuna.storages.BaseStorage:
    """The storage at `url` (module doc), with heartbeats every `heartbeat` s: stale trials are re-queued. SQLite
    waits up to 60 s for its lock."""
    grace = GRACE_BEATS * heartbeat
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback
    with quiet_experimental():
        if url.startswith("journal:"):
            path = journal_path(url)
            path.parent.mkdir(parents=True, exist_ok=True)
            return HeartbeatJournalStorage(path, heartbeat, grace, retry())
        kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":  # a new database file's folder
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        from sqlalchemy.exc import IntegrityError, ProgrammingError

        for attempt in range(CREATE_TRIES):
            try:
                return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=heartbeat,
                                                  grace_period=grace, heartbeat_stale_trial_callback=retry())
            except (IntegrityError, ProgrammingError):
                # processes starting together on a new PostgreSQL database race to create Optuna's tables (CREATE
                # TABLE IF NOT EXISTS is not atomic there): the losers fail with a duplicate key, then find them made
                if attempt == CREATE_TRIES - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))


def open_checked(url: str, flag: str, heartbeat: int = HEARTBEAT_S) -> optuna.storages.BaseStorage:
    """`open_storage(url)`, a ConfigError naming `flag` if it cannot be opened (no server, bad password, a file that
    is no journal)."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return open_storage(url, heartbeat)
    except SQLAlchemyError as e:
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
        raise ConfigError(f"{flag} {url}: cannot open it as an Optuna storage ({reason})") from None
    except (OSError, ValueError, KeyError) as e:  # unreadable, or not an Optuna journal
        raise ConfigError(f"{flag} {url}: cannot open it as an Optuna journal ({type(e).__name__}: {e})") from None


@contextlib.contextmanager
def quiet_experimental():
    """Heartbeats and retries have been marked experimental in Optuna since 2.8; do not warn each time."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


class HeartbeatJournalStorage(optuna.storages.JournalStorage, BaseHeartbeat):
    """Optuna's JournalStorage on a log file, with RDBStorage's heartbeats: Optuna's optimize() beats every
    `heartbeat` s from a thread (a trial system attribute "heartbeat": this machine's time.time()), and
    `optuna.storages.fail_stale_trials` fails a RUNNING trial whose last sign of life (its latest heartbeat, or its
    start: a re-queued trial carries its predecessor's) is more than `grace` s old, then calls `callback`."""

    def __init__(self, path: Path, heartbeat: int, grace: float, callback) -> None:
        super().__init__(optuna.storages.journal.JournalFileBackend(str(path)))
        self.heartbeat, self.grace, self.callback = heartbeat, grace, callback

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, "heartbeat", time.time())
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another process failed it as stale meanwhile: its re-queued copy runs elsewhere

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        return [t._trial_id for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
                if now - max(t.system_attrs.get("heartbeat", 0.0), t.datetime_start.timestamp()) > self.grace]

    def get_heartbeat_interval(self) -> int:
        return self.heartbeat

    def get_heartbeat_stale_trial_callback(self):
        return self.callback

