"""Study storage for several machines (`largebatch.study.storage`): URL checks, network filesystems, journal
heartbeats, and three `largebatch study` processes with their own run directories (three machines) sharing one study
in a throw-away PostgreSQL server or a journal file, one of them SIGKILLed mid-run.

"Exactly once", given the kill: every (rung, batch, trial, seed) of the finished study has one record and one
finished run directory, on the machine that ran it; the killed run leaves a second, unfinished directory (no
summary.json) on the killed machine only, and a survivor reruns that trial from the start under the same trial
number (its checkpoint is on the killed machine's disk; with several seeds, the seeds the killed trial had finished
would run again too: a trial is what is re-queued). No other run directory exists anywhere: the trials that
processes claimed at the same moment were failed as surplus before training. The grid is tiny (four 1-epoch runs of
~0.5 s) and `--heartbeat 1` makes the killed trial stale 3 s after its last heartbeat; the machines are forked from
the test process, where torch is loaded already.
"""
import json
import multiprocessing
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from optuna.trial import TrialState

from largebatch.config import ConfigError
from largebatch.study import storage
from largebatch.study.storage import check_storage, filesystem_type, network_filesystem, open_storage
from largebatch.study.sweep import load_records
from test_study_sweep import TINY, needs_mnist

MOUNTS = """\
sysfs /sys sysfs rw,nosuid 0 0
/dev/sda1 / ext4 rw,relatime 0 0
server:/export /mnt/shared nfs4 rw,vers=4.2 0 0
/dev/sdb1 /mnt/shared/scratch xfs rw 0 0
//nas/my\\040share /mnt/my\\040share cifs rw 0 0
user@host:/data /home/me/remote fuse.sshfs rw 0 0
"""


# ---------------------------------------------------------------------------------------------
# URLs and filesystems


@pytest.mark.parametrize("path,kind", [
    ("/mnt/shared/study.db", "nfs4"), ("/mnt/shared/runs/new/study.db", "nfs4"),  # not made yet: its folder's
    ("/mnt/shared/scratch/study.db", "xfs"),  # a local disk mounted inside the NFS export
    ("/mnt/sharedx/study.db", "ext4"),  # a sibling whose name starts the same is not under /mnt/shared
    ("/mnt/my share/study.db", "cifs"), ("/home/me/remote/s.db", "fuse.sshfs"), ("/home/me/s.db", "ext4")])
def test_filesystem_type_is_the_longest_mount_point_above_the_path(path, kind):
    assert filesystem_type(Path(path), MOUNTS) == kind
    assert network_filesystem(Path(path), MOUNTS) == (kind if kind in ("nfs4", "cifs", "fuse.sshfs") else None)


def test_sqlite_on_a_network_filesystem_is_a_one_line_error(tmp_path, monkeypatch):
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/sda1 / ext4 rw 0 0\nserver:/export {tmp_path} nfs rw 0 0\n")
    monkeypatch.setattr(storage, "MOUNTS", mounts)
    with pytest.raises(ConfigError, match=r"lies on a nfs filesystem, .* journal:///.*study\.log") as e:
        check_storage(f"sqlite:///{tmp_path}/runs/study.db", "--storage")
    assert "\n" not in str(e.value)
    check_storage(f"journal:///{tmp_path}/runs/study.log", "--storage")  # a journal is made for it
    (tmp_path / "s.db").touch()
    check_storage(f"sqlite:///{tmp_path}/s.db", "report", existing=True)  # reading one is fine
    monkeypatch.setattr(storage, "MOUNTS", tmp_path / "no-such-table")
    check_storage(f"sqlite:///{tmp_path}/runs/study.db", "--storage")  # no mount table: nothing to say


@pytest.mark.parametrize("url,existing,msg", [
    ("journal:", False, "is not a journal URL: give journal:///FILE"),
    ("journal://runs/study.log", False, "is not a journal URL"),
    ("journal:///{tmp}", False, "is a directory; name a file in it"),
    ("journal:///{tmp}/missing.log", True, "no such journal file"),
    ("sqlite:///{tmp}/missing.db", True, "no such database file"),
    ("postgresql://u@host/db", False, "driver (psycopg) is not installed: pip install 'largebatch[postgres]'"),
    ("mysql+mysqldb://u@host/db", False, "driver (MySQLdb) is not installed: pip install it, or use SQLite"),
    ("nosuchdb://x", False, "SQLAlchemy knows no database 'nosuchdb'"),
])
def test_bad_storage_urls_are_one_line_errors(tmp_path, monkeypatch, url, existing, msg):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if not installed
    with pytest.raises(ConfigError) as e:
        check_storage(url.format(tmp=tmp_path), "--storage", existing=existing)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_a_file_that_is_no_journal_is_a_one_line_error(tmp_path):
    (tmp_path / "study.db").write_text("SQLite format 3\nnot a journal\n")
    with pytest.raises(ConfigError, match=r"^report journal:///.*: cannot open it as an Optuna journal \(") as e:
        storage.open_checked(f"journal:///{tmp_path}/study.db", "report")
    assert "\n" not in str(e.value)


def test_the_study_command_checks_the_journal_url_first(tmp_path, capsys):
    from largebatch.cli import main

    code = main(["study", "--recipe", "mnist-lenet", "--batch-sizes", "64", "--storage", "journal://x.log"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "is not a journal URL" in err, err
    code = main(["report", f"journal:///{tmp_path}/none.log", "--out", str(tmp_path / "r")])
    assert code == 2 and "no such journal file" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# heartbeats on a journal


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # ask() stands in for optimize()
def test_optunas_journal_has_no_heartbeats_so_ours_adds_them(tmp_path, monkeypatch):
    """Optuna 5.0's JournalStorage is no BaseHeartbeat: a killed process's trial would stay RUNNING. Ours beats
    (a system attribute), fails a trial silent for 3 heartbeats and re-queues it; a re-queued trial carries its
    predecessor's old heartbeat but is judged from its own start."""
    plain = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "plain.log")))
    assert not optuna.storages._heartbeat.is_heartbeat_enabled(plain)
    store = open_storage(f"journal:///{tmp_path}/j/study.log", heartbeat=2)
    assert optuna.storages._heartbeat.is_heartbeat_enabled(store) and (store.heartbeat, store.grace) == (2, 6)
    study = optuna.create_study(storage=store, study_name="j", direction="maximize")
    study.enqueue_trial({"x": 1.0})
    trial = study.ask()
    store.record_heartbeat(trial._trial_id)
    assert store._get_stale_trial_ids(study._study_id) == []
    now = time.time()
    monkeypatch.setattr(storage, "time", SimpleNamespace(time=lambda: now + 7))  # 7 s of silence > 3 x 2 s
    assert store._get_stale_trial_ids(study._study_id) == [trial._trial_id]
    store.set_trial_system_attr(trial._trial_id, "heartbeat", now - 100)  # long silent: its copy inherits this
    with storage.quiet_experimental():
        optuna.storages.fail_stale_trials(study)
    old, new = study.get_trials()
    assert (old.state, new.state, new.system_attrs["failed_trial"]) == (TrialState.FAIL, TrialState.WAITING, 0)
    monkeypatch.setattr(storage, "time", time)
    again = study.ask()  # the re-queued trial, started now, with its predecessor's heartbeat of 100 s ago
    copy = store.get_trial(again._trial_id)
    assert again.number == 1 and copy.system_attrs["fixed_params"] == {"x": 1.0}
    assert copy.system_attrs["heartbeat"] == now - 100 and store._get_stale_trial_ids(study._study_id) == []
    store.record_heartbeat(old._trial_id)  # a heartbeat of a trial failed meanwhile is dropped, not raised


# ---------------------------------------------------------------------------------------------
# three machines, one study


def _runuser() -> list[str] | None:
    """The prefix that runs a command as an unprivileged user (initdb and postgres refuse root); [] when not root,
    None when root has no way to."""
    if os.geteuid() != 0:
        return []
    if shutil.which("runuser"):
        return ["runuser", "-u", "nobody", "--"]
    if shutil.which("setpriv"):
        user = pwd.getpwnam("nobody")
        return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--"]
    return None


def _postgres_bin() -> Path | None:
    """The folder of initdb and pg_ctl: on PATH, or Debian's /usr/lib/postgresql/<version>/bin (newest first)."""
    on_path = shutil.which("initdb")
    for d in [*([Path(on_path).resolve().parent] if on_path else []),
              *sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: p.parent.name, reverse=True)]:
        if (d / "initdb").is_file() and (d / "pg_ctl").is_file():
            return d
    return None


@pytest.fixture(scope="module")
def postgres_url():
    """A throw-away PostgreSQL cluster on a unix socket in a private folder (trust auth, no fsync), stopped at the
    end; the test skips, saying what is missing, without the server binaries or the Python driver."""
    try:
        import psycopg  # noqa: F401  (SQLAlchemy 2.1's default postgresql:// driver)
    except ImportError:
        pytest.skip("the PostgreSQL driver psycopg is not installed: pip install 'largebatch[postgres]'")
    bin_dir, prefix = _postgres_bin(), _runuser()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not on PATH nor in /usr/lib/postgresql/*/bin: "
                    "apt-get install postgresql")
    if prefix is None:
        pytest.skip("running as root, and neither runuser nor setpriv can run initdb as another user")
    home = Path(tempfile.mkdtemp(prefix="largebatch-pg-"))  # not under pytest's root-only tmp folder
    if os.geteuid() == 0:
        shutil.chown(home, "nobody")  # mkdtemp's 0700: the server's user alone, and root
    data, log = home / "data", home / "server.log"

    def run(*cmd):
        r = subprocess.run([*prefix, *cmd], cwd=home, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}" + (
            log.read_text()[-2000:] if log.exists() else "")

    try:
        run(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-locale", "-E", "UTF8",
            "--no-sync")
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "30", "-o",
            f"-k {home} -p 5432 -c listen_addresses='' -c fsync=off -c full_page_writes=off", "start")
        yield f"postgresql://postgres@/postgres?host={home}&port=5432"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                           cwd=home, capture_output=True, timeout=60)
        shutil.rmtree(home, ignore_errors=True)


def _study_args(storage_url: str, output_dir: Path) -> list[str]:
    """One machine's `largebatch study`: 2 batch sizes x (untuned + 1 tuned point) x 1 seed, 1 epoch of 512 images."""
    return ["study", "--recipe", "mnist-lenet", "--batch-sizes", "64,128", "--epochs", "1", "--trials", "1",
            "--lr-range", "0.25,1", "--warmup-range", "0,0.1", "--name", "s", "--heartbeat", "1",
            "--storage", storage_url, "--output-dir", str(output_dir),
            *[a for k, v in TINY.items() for a in ("--set", f"{k}={json.dumps(v)}")]]


def _report(storage_url: str, out: Path) -> tuple[str, dict, list[dict]]:
    """report.md, regimes.json and trials.csv of the study, what legitimately differs between machines normalised:
    in report.md the training time (the runs' wall-clock seconds added), in trials.csv each run's wall_seconds,
    run_dir (the machine's --output-dir) and trial number (processes claiming a trial at once number surplus
    trials too, which never run)."""
    import csv

    from largebatch.cli import main

    assert main(["report", storage_url, "--out", str(out)]) == 0
    text = "\n".join("- Training time: (normalised)" if line.startswith("- Training time:") else line
                     for line in (out / "report.md").read_text().splitlines())
    with open(out / "trials.csv", newline="") as f:
        trials = [{k: v for k, v in row.items() if k not in ("wall_seconds", "run_dir", "trial")}
                  for row in csv.DictReader(f)]
    trials.sort(key=lambda row: (row["rung"], int(row["batch_size"]), row["tuned"], int(row["seed"])))
    return text, json.loads((out / "regimes.json").read_text()), trials


@pytest.fixture(scope="module")
def sqlite_report(tmp_path_factory):
    """`_report` of the same study run in this process on SQLite."""
    from largebatch.cli import main

    tmp = tmp_path_factory.mktemp("sqlite")
    url = f"sqlite:///{tmp}/study.db"
    assert main(_study_args(url, tmp / "runs")) == 0
    return _report(url, tmp / "report")


def _run_dirs(root: Path) -> dict[str, bool]:
    """Every run directory under one machine's --output-dir: its path relative to it -> finished (summary.json)."""
    return {str(p.parent.relative_to(root)): (p.parent / "summary.json").is_file() for p in root.rglob("config.json")}


def _machine(storage_url: str, out: Path) -> None:
    """One machine: `largebatch study` with its own --output-dir, in a child forked from this process (torch and its
    optimizer's lazy imports are loaded here already, which saves each child ~10 s of CPU); its output goes to
    out.log. The exit code is the command's."""
    log = open(out.with_suffix(".log"), "w", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    from largebatch.cli import main

    sys.exit(main(_study_args(storage_url, out)))


def _kill_one_mid_run(procs: list, outs: list[Path], lock: Path | None) -> int:
    """SIGKILL the first process found in the middle of a run (a run directory without summary.json) once two have
    started runs; SIGSTOP first, so the check and the kill see the same state (and no journal lock is held)."""
    deadline = time.time() + 120
    while time.time() < deadline:
        for p, out in zip(procs, outs):
            assert p.exitcode is None, out.with_suffix(".log").read_text()[-3000:]
        dirs = [_run_dirs(out) for out in outs]
        for i, (p, out) in enumerate(zip(procs, outs)):
            if sum(map(bool, dirs)) < 2 or all(dirs[i].values()):
                continue
            os.kill(p.pid, signal.SIGSTOP)
            if not all(_run_dirs(out).values()) and not (lock and lock.exists()):
                os.kill(p.pid, signal.SIGKILL)
                p.join()
                return i
            os.kill(p.pid, signal.SIGCONT)
        time.sleep(0.05)  # a run takes ~0.5 s
    raise AssertionError("no process was seen in the middle of a run")


@needs_mnist
@pytest.mark.parametrize("kind", ["postgres", "journal"])
def test_three_machines_share_a_study_and_a_killed_ones_trial_is_rerun(kind, tmp_path, request, sqlite_report):
    url = request.getfixturevalue("postgres_url") if kind == "postgres" else f"journal:///{tmp_path}/study.log"
    lock = Path(f"{tmp_path}/study.log.lock") if kind == "journal" else None
    outs = [tmp_path / f"machine{i}" for i in range(3)]
    fork = multiprocessing.get_context("fork")
    procs = [fork.Process(target=_machine, args=(url, out)) for out in outs]
    for p in procs:
        p.start()
    try:
        victim = _kill_one_mid_run(procs, outs, lock)
        for i, p in enumerate(procs):
            p.join(120)
            assert i == victim or p.exitcode == 0, outs[i].with_suffix(".log").read_text()[-3000:]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    assert procs[victim].exitcode == -signal.SIGKILL

    records = load_records(url, "s")
    keys = [(r.rung, r.batch_size, r.trial, r.seed) for r in records]
    assert len(keys) == len(set(keys)) == 4 and {r.status for r in records} == {"completed"}
    dirs = [_run_dirs(out) for out in outs]
    unfinished = [(i, rel) for i, d in enumerate(dirs) for rel, done in d.items() if not done]
    assert len(unfinished) == 1 and unfinished[0][0] == victim, dirs  # the killed run, on the killed machine only
    killed = unfinished[0][1]
    finished = sorted(rel for d in dirs for rel, done in d.items() if done)
    by_record = {str(Path(r.run_dir).relative_to(outs[m])): m for r in records
                 for m in range(3) if Path(r.run_dir).is_relative_to(outs[m])}
    assert finished == sorted(by_record)  # each (rung, batch, trial, seed) finished once, where its record says
    assert by_record[killed] != victim  # ... the killed one by a survivor, under the same trial number
    for r in records:  # each finished directory holds one run from step 1 to its last: none was started twice
        steps = [json.loads(line)["step"] for line in (Path(r.run_dir) / "metrics.jsonl").read_text().splitlines()
                 if "train_loss" in line]
        assert steps == list(range(1, r.steps + 1)), (r.run_dir, steps)

    rung, batch, run = killed.split("/")[1:]
    study = optuna.load_study(study_name=f"s/{rung}/{batch}", storage=open_storage(url))
    number = int(run.split("-")[0][1:])
    retried = [t for t in study.get_trials() if t.system_attrs.get("failed_trial") == number]
    assert [t.state for t in retried] == [TrialState.COMPLETE]  # failed as stale, re-queued, rerun once
    assert study.get_trials()[number].state == TrialState.FAIL

    report, regimes, trials = _report(url, tmp_path / "report")
    assert report == sqlite_report[0] and regimes == sqlite_report[1] and trials == sqlite_report[2]
