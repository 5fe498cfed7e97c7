"""MLPerf time-to-train: an `mllog` log the official compliance checker accepts, and reading it back.

The trainer calls a few `MLPerfLog` methods; this module owns every MLPerf-specific name and rule. It needs the
`mlperf` extra (mlperf-logging): without it, importing it is the one-line ConfigError of `largebatch.extras`, and a
time-to-target run goes on without its log (`largebatch.tta`).

Everything below was read off the installed `mlperf-logging` package (4.1.68): the key names from
`mlperf_logging/mllog/constants.py`, the rules from `mlperf_logging/compliance_checker/training_*/`
(`common.yaml`, `{closed,open}_common.yaml`, `{closed,open}_resnet.yaml`, `closed_resnet_{lars,sgd}.yaml`),
the score from `result_summarizer.py` (`_query_run_start_stop`: run_stop - run_start, both the first seen).

Ruleset. ResNet-50 was last an MLPerf Training benchmark in v4.0: `training_4.0.0` is the newest
ruleset in the package with `closed_resnet.yaml` (4.1.0 still lists "resnet" in `closed_common.yaml`
but ships no resnet rules, and from 5.0 on it is gone). So RULESET = "4.0.0"; `latest_ruleset(name)`
finds the newest one for any benchmark. What training_4.0.0 requires of a `resnet` log:

- once each: submission_org, submission_platform (non-empty), submission_division (closed|open),
  submission_status (cloud|onprem|preview|research), submission_benchmark, train_samples, eval_samples,
  init_stop, run_start, run_stop (metadata `status`: success|aborted);
  closed also global_batch_size (> 0), gradient_accumulation_steps (> 0), opt_name (sgd|lars) and
  - lars: lars_opt_base_learning_rate, lars_opt_end_learning_rate (== 0.0001), lars_epsilon (== 0.0),
    lars_opt_learning_rate_decay_poly_power (== 2), lars_opt_learning_rate_decay_steps,
    lars_opt_learning_rate_warmup_epochs, lars_opt_momentum, lars_opt_weight_decay (0.0001 x 2^k);
  - sgd: sgd_opt_{base_learning_rate (a multiple of 0.001), end_learning_rate (== 0.0001),
    learning_rate_decay_poly_power, learning_rate_decay_steps, weight_decay (0.0001 x 2^k), momentum},
    model_bn_span, opt_learning_rate_warmup_epochs.
- at least once: cache_clear (any value), init_start, block_start/block_stop (or epoch_start/epoch_stop),
  eval_start/eval_stop, eval_accuracy with metadata epoch_num; closed needs at least one accuracy in
  [0.759, 1.0), open at least one below 1.0. Accuracy is a fraction: a percentage fails.

Odd things worth knowing:
- Order matters for one rule: init_stop must come less than 30 minutes (open: 240) after the first
  init_start, but that limit is set when the checker reaches the submission_division line and is 0
  before it, so a division logged after init_stop fails the run. `init_start()` therefore logs the
  submission_* keys (and cache_clear) itself, before the init_start event.
- cache_clear only has to be present; MLPerf means "the OS page cache was dropped before the run",
  which needs root and is the launcher's job. It is logged as the `cache_cleared` you pass (default False).
- Not checked for resnet: seed (only unet3d requires it), the evaluation schedule (the rules' "every 4
  epochs" is not enforced), the number of evals (one suffices), model_bn_span under LARS, submission_poc_*.
  They are logged anyway where the loop knows them.
- A repeated EXACTLY_ONE key with the same value is only a warning; `check(strict=True)` reports it.
- The 4.0.0 closed_resnet.yaml loads `training_3.1.0/closed_resnet_{opt}.yaml` (identical text).
- The checker keeps its queue of rule files in a module global and raises (leaving it dirty) when a
  queued file is missing, e.g. resnet under 4.1.0; `check()` empties it and reports that as a problem.
  It also logs through the root logger, which would install a stderr handler (logging.basicConfig) in a
  process with none; `check()` silences it for its duration.

Epoch numbers are MLPerf's: 1-based and counted in epochs trained, so a block of 4 epochs starting the
run is block_start(first_epoch=1, epoch_count=4) and the eval after it eval_accuracy(acc, epoch=4); the
RCP checker reads that last epoch_num as the epochs to converge. Fractional epochs are allowed.

Each `MLPerfLog` writes through its own `mllog.mllog.MLLogger` and an unregistered `logging.Logger`
holding one file handler, never the shared `mllog.get_mllogger()`: runs in one process write only their
own file, nothing is duplicated, and `close()` leaves no handler behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform as _platform
from pathlib import Path
from typing import Any, Callable, Iterator

from largebatch.extras import require

C = require("mlperf", "mlperf_logging.mllog.constants", "the MLPerf log (largebatch.mlperf)")
MLLogger = require("mlperf", "mlperf_logging.mllog.mllog", "the MLPerf log (largebatch.mlperf)").MLLogger

RULESET = "4.0.0"  # newest training ruleset in mlperf-logging 4.1.68 with ResNet-50 rules
TOKEN = ":::MLLOG "
DIVISIONS = (C.CLOSED, C.OPEN)
STATUSES = ("cloud", "onprem", "preview", "research")  # training_4.0.0/common.yaml, submission_status
_STACK_OFFSET = 3  # mllog's call-site frame: caller -> public method -> _emit -> MLLogger.event


def describe_platform() -> str:
    """A default submission_platform: "<world size>x<device name>", e.g. "8xNVIDIA H100 80GB HBM3"."""
    import torch  # heavy; only when no platform is given
    import torch.distributed as dist

    n = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU-{_platform.machine() or 'unknown'}"
    return f"{n}x{device}"


def _num(x: float) -> int | float:
    """Integral values as int (epoch 4, not 4.0), others as float; accepts numpy/torch scalars."""
    x = float(x)
    return int(x) if x.is_integer() else x


class MLPerfLog:
    """The MLPerf log of one run, written by rank 0 only (`enabled=False` makes every method a no-op).

    `clock` (seconds, like time.time) exists for tests; by default mllog stamps the wall time. The file is
    truncated on open: an MLPerf run cannot be resumed, a restarted run is a new run. Usable as a context
    manager; leaving it by an exception after run_start logs run_stop(aborted).
    """

    def __init__(self, path: str | os.PathLike, enabled: bool = True, benchmark: str = C.RESNET,
                 org: str = "largebatch", platform: str | None = None, division: str = C.CLOSED,
                 status: str = "research", cache_cleared: bool = False, echo: bool = False,
                 clock: Callable[[], float] | None = None) -> None:
        if division not in DIVISIONS:
            raise ValueError(f"division must be one of {DIVISIONS}, got {division!r}")
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        if not benchmark or not org or platform == "":
            raise ValueError("benchmark, org and platform must be non-empty")
        self.path = Path(path)
        self.enabled = enabled
        self.benchmark, self.division = benchmark, division
        self.submission = {C.SUBMISSION_BENCHMARK: benchmark, C.SUBMISSION_ORG: org,
                           C.SUBMISSION_DIVISION: division, C.SUBMISSION_STATUS: status}
        self._platform = platform
        self.cache_cleared = cache_cleared
        self._clock = clock
        self._hyper_logged = self.run_started = self.run_stopped = False
        self._logger: logging.Logger | None = None
        self.mllogger: MLLogger | None = None
        if not enabled:
            return
        # An unregistered Logger: no name clash with other runs, no parent, nothing left in logging's registry.
        logger = logging.Logger(f"largebatch.mlperf:{self.path}", logging.INFO)
        logger.propagate = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        logger.addHandler(logging.FileHandler(self.path, mode="w", encoding="utf-8"))
        if echo:
            logger.addHandler(logging.StreamHandler())
        self._logger = logger
        self.mllogger = MLLogger(logger=logger, default_stack_offset=_STACK_OFFSET)

    # -- plumbing ---------------------------------------------------------------------------------------

    def _emit(self, kind: str, key: str, value: Any = None, metadata: dict | None = None) -> None:
        if self.mllogger is None:
            return
        log = {"start": self.mllogger.start, "end": self.mllogger.end, "event": self.mllogger.event}[kind]
        time_ms = None if self._clock is None else int(round(self._clock() * 1000))
        log(key=key, value=value, metadata=metadata, time_ms=time_ms)

    @staticmethod
    def _meta(epoch: float | None = None, samples_count: int | None = None, **extra: Any) -> dict:
        meta = {C.EPOCH_NUM: _num(epoch)} if epoch is not None else {}
        if samples_count is not None:
            meta[C.SAMPLES_COUNT] = int(samples_count)
        meta.update(extra)
        return meta

    def event(self, key: str, value: Any = None, **metadata: Any) -> None:
        """Any other POINT_IN_TIME key (e.g. a benchmark-specific hyperparameter)."""
        self._emit("event", key, value, metadata or None)

    def close(self) -> None:
        """Flush and close the file; further calls are no-ops."""
        if self._logger is not None:
            for h in list(self._logger.handlers):
                self._logger.removeHandler(h)
                if isinstance(h, logging.FileHandler):
                    h.close()
                else:
                    h.flush()
        self._logger = self.mllogger = None

    def __enter__(self) -> MLPerfLog:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.run_started and not self.run_stopped:
            self.run_stop(False)
        self.close()

    # -- the run ----------------------------------------------------------------------------------------

    def init_start(self) -> None:
        """Log the submission_* keys and cache_clear, then init_start (first thing the process does).

        The submission keys come first because the checker's 30-minute init limit is only set once it
        has seen submission_division (training_4.0.0/common.yaml).
        """
        if self.mllogger is None:
            return
        platform = self._platform if self._platform is not None else describe_platform()
        for key, value in {**self.submission, C.SUBMISSION_PLATFORM: platform}.items():
            self._emit("event", key, value)
        self._emit("event", C.CACHE_CLEAR, bool(self.cache_cleared))
        self._emit("start", C.INIT_START)

    def init_stop(self) -> None:
        """End of initialisation (model built, data ready; no training data touched yet)."""
        self._emit("end", C.INIT_STOP)

    def run_start(self) -> None:
        """The clock of time-to-train starts here."""
        self.run_started = True
        self._emit("start", C.RUN_START)

    def run_stop(self, success: bool) -> None:
        """The clock stops; status success (target reached) or aborted. Logged once, later calls ignored."""
        if self.run_stopped:
            return
        self.run_stopped = True
        self._emit("end", C.RUN_STOP, metadata={C.STATUS: C.SUCCESS if success else C.ABORTED})

    def hyperparameters(self, *, global_batch_size: int, opt_name: str, base_lr: float, end_lr: float,
                        decay_steps: int, warmup_epochs: float, momentum: float, weight_decay: float,
                        train_samples: int, eval_samples: int, seed: int, model_bn_span: int,
                        poly_power: float = 2.0, epsilon: float = 0.0, gradient_accumulation_steps: int = 1,
                        extra: dict[str, Any] | None = None) -> None:
        """Log the run's hyperparameters once (the checker wants each key EXACTLY_ONE time).

        opt_name "lars" logs the lars_* keys (closed ResNet: end_lr 1e-4, poly_power 2, epsilon 0,
        weight_decay 1e-4 x 2^k), "sgd" the sgd_opt_* keys plus opt_learning_rate_warmup_epochs (no
        epsilon), anything else (open division) the generic opt_* keys. `extra` adds keys verbatim.
        """
        if self.mllogger is None:
            return
        if self._hyper_logged:
            raise RuntimeError("hyperparameters() already logged; MLPerf wants each key exactly once")
        self._hyper_logged = True
        opt = opt_name.lower()
        keys: dict[str, Any] = {
            C.GLOBAL_BATCH_SIZE: int(global_batch_size),
            C.GRADIENT_ACCUMULATION_STEPS: int(gradient_accumulation_steps),
            C.OPT_NAME: opt,
            C.MODEL_BN_SPAN: int(model_bn_span),
            C.TRAIN_SAMPLES: int(train_samples),
            C.EVAL_SAMPLES: int(eval_samples),
            C.SEED: int(seed),
        }
        if opt == C.LARS:
            keys.update({C.LARS_OPT_BASE_LEARNING_RATE: float(base_lr), C.LARS_OPT_END_LR: float(end_lr),
                         C.LARS_OPT_LR_DECAY_POLY_POWER: _num(poly_power), C.LARS_OPT_LR_DECAY_STEPS: int(decay_steps),
                         C.LARS_OPT_LEARNING_RATE_WARMUP_EPOCHS: _num(warmup_epochs),
                         C.LARS_OPT_MOMENTUM: float(momentum), C.LARS_OPT_WEIGHT_DECAY: float(weight_decay),
                         C.LARS_EPSILON: float(epsilon)})
        else:
            # training_4.0.0/closed_resnet_sgd.yaml spells these sgd_opt_*; constants.py has no names for them.
            p = "sgd_opt_" if opt == C.SGD else "opt_"
            keys.update({p + "base_learning_rate": float(base_lr), p + "end_learning_rate": float(end_lr),
                         p + "learning_rate_decay_poly_power": _num(poly_power),
                         p + "learning_rate_decay_steps": int(decay_steps),
                         p + "momentum": float(momentum), p + "weight_decay": float(weight_decay),
                         C.OPT_LR_WARMUP_EPOCHS: _num(warmup_epochs)})
        keys.update(extra or {})
        for key, value in keys.items():
            self._emit("event", key, value)

    def block_start(self, first_epoch: float, epoch_count: float, samples_count: int | None = None) -> None:
        """A block of `epoch_count` training epochs starting with epoch `first_epoch` (1-based)."""
        meta = self._meta(None, samples_count, first_epoch_num=_num(first_epoch), epoch_count=_num(epoch_count))
        self._emit("start", C.BLOCK_START, metadata=meta)

    def block_stop(self, first_epoch: float, samples_count: int | None = None) -> None:
        """End of the block that block_start(first_epoch, ...) opened."""
        self._emit("end", C.BLOCK_STOP, metadata=self._meta(None, samples_count, first_epoch_num=_num(first_epoch)))

    def epoch_start(self, epoch: float, samples_count: int | None = None) -> None:
        """Optional per-epoch interval (blocks alone satisfy the rules)."""
        self._emit("start", C.EPOCH_START, metadata=self._meta(epoch, samples_count))

    def epoch_stop(self, epoch: float, samples_count: int | None = None) -> None:
        self._emit("end", C.EPOCH_STOP, metadata=self._meta(epoch, samples_count))

    def eval_start(self, epoch: float, samples_count: int | None = None) -> None:
        """Evaluation after `epoch` epochs of training."""
        self._emit("start", C.EVAL_START, metadata=self._meta(epoch, samples_count))

    def eval_accuracy(self, value: float, epoch: float, samples_count: int | None = None) -> None:
        """Top-1 accuracy as a fraction in [0, 1) (closed ResNet target: 0.759), after `epoch` epochs."""
        self._emit("event", C.EVAL_ACCURACY, float(value), metadata=self._meta(epoch, samples_count))

    def eval_stop(self, epoch: float, samples_count: int | None = None) -> None:
        self._emit("end", C.EVAL_STOP, metadata=self._meta(epoch, samples_count))


# -- reading a log back ---------------------------------------------------------------------------------


def read_events(log_path: str | os.PathLike) -> list[dict]:
    """Every `:::MLLOG {json}` record of the file, in order; other lines are skipped (as the checker does)."""
    events = []
    for line in Path(log_path).read_text(encoding="utf-8").splitlines():
        i = line.find(TOKEN)
        if i >= 0:
            events.append(json.loads(line[i + len(TOKEN):]))
    return events


def time_to_train(log_path: str | os.PathLike) -> float:
    """Seconds from run_start to run_stop: MLPerf's score, initialisation excluded.

    Like mlperf_logging/result_summarizer/result_summarizer.py (`_query_run_start_stop`), the first
    run_start and the first run_stop count. Raises ValueError when either is missing.
    """
    start = stop = None
    for e in read_events(log_path):
        if e["key"] == C.RUN_START and start is None:
            start = e["time_ms"]
        elif e["key"] == C.RUN_STOP and stop is None:
            stop = e["time_ms"]
    if start is None or stop is None:
        raise ValueError(f"{log_path}: {'run_start' if start is None else 'run_stop'} not recorded")
    return (float(stop) - float(start)) / 1000.0


def _rules_dir() -> Path:
    from mlperf_logging import compliance_checker

    return Path(compliance_checker.__file__).parent


def latest_ruleset(benchmark: str = C.RESNET, usage: str = "training") -> str:
    """The newest ruleset version in the installed checker that has rules for `benchmark`."""
    versions = [d.name.split("_", 1)[1] for d in _rules_dir().glob(f"{usage}_*")
                if (d / f"closed_{benchmark}.yaml").is_file() and d.name.count("_") == 1]
    if not versions:
        raise ValueError(f"no {usage} ruleset in mlperf-logging has rules for {benchmark!r}")
    return max(versions, key=lambda v: tuple(int(x) for x in v.split(".")))


class _DropFrom(logging.Filter):
    """Drops root-logger records emitted by code under `prefix` (the checker's progress chatter)."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.pathname.startswith(self.prefix)


@contextlib.contextmanager
def _checker_silenced() -> Iterator[None]:
    root = logging.getLogger()
    drop, null = _DropFrom(str(_rules_dir())), logging.NullHandler()  # NullHandler: no basicConfig()
    root.addFilter(drop)
    root.addHandler(null)
    try:
        yield
    finally:
        root.removeHandler(null)
        root.removeFilter(drop)


def check(log_path: str | os.PathLike, ruleset: str = RULESET, usage: str = "training",
          strict: bool = False) -> list[str]:
    """The compliance checker's complaints about the log (empty when compliant).

    Runs `mlperf_logging.compliance_checker` in process, as its __main__ does (parse with the ruleset's
    parser, then the rules from `<usage>_<ruleset>/common.yaml` and the files it queues), but returns the
    messages instead of logging them. `strict` also returns warnings, like `--werror`.
    """
    from mlperf_logging.compliance_checker import mlp_compliance, mlp_parser

    if not (_rules_dir() / f"{usage}_{ruleset}" / "common.yaml").is_file():
        return [f"mlperf-logging has no {usage} ruleset {ruleset}"]
    problems: list[str] = []
    checker = mlp_compliance.make_checker(usage, ruleset, quiet=False, werror=strict)
    mlp_compliance.enqueued_configs.clear()
    try:
        with _checker_silenced():
            loglines, errors = mlp_parser.parse_file(str(log_path), ruleset=ruleset)
            problems += [f"unparsable line ({err}): {line}" for line, err in errors]
            checker.check_loglines(loglines, f"{usage}_{ruleset}/common.yaml")
    except Exception as e:  # a rule file the queue names is missing, or a rule crashed the checker
        problems.append(f"compliance checker failed: {type(e).__name__}: {e}")
    finally:
        mlp_compliance.enqueued_configs.clear()
    problems += list(checker.overwritable.values()) + list(checker.not_overwritable)
    if strict:
        problems += list(checker.warnings.values())
    return problems
