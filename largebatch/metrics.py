"""Run outputs: metrics.jsonl (one JSON object per line), optional TensorBoard, console lines and progress bar."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any

from tqdm import tqdm

from largebatch.checkpoint import atomic_write
from largebatch.extras import require

METRICS = "metrics.jsonl"


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible as strings
    return v


class ProgressBar(tqdm):
    """The run's progress bar: tqdm with a lock of this process alone and no monitor thread.

    tqdm's own lock is also a multiprocessing lock, shared with every process forked after it exists (DataLoader
    workers, a user's fork); one that dies holding it leaves it held for ever, and the next bar of any later run in
    the process waits for it without end (seen once: the test suite hung at a study's next `train()`). Every bar,
    even a disabled one, takes the lock when it is made. Bars of other processes (torchrun ranks, study workers) are
    disabled or write their own lines, so nothing needs a lock across processes.
    """

    _lock = threading.RLock()
    monitor_interval = 0


class MetricsLog:
    """Appends records to <run_dir>/metrics.jsonl and mirrors numbers to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool = False, enabled: bool = True) -> None:
        self.path = Path(run_dir) / METRICS
        self._file = open(self.path, "a", buffering=1) if enabled else None  # only rank 0 writes
        self._tb = None
        if tensorboard and enabled:
            require("tensorboard", "tensorboard", "output.tensorboard")  # torch's writer needs the package
            from torch.utils.tensorboard import SummaryWriter  # imported only when asked for

            self._tb = SummaryWriter(str(Path(run_dir) / "tb"))

    def log(self, record: dict) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        if self._tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: Path) -> list[dict]:
    """All records; a torn last line (the process was killed mid-write) is skipped."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise
    return records


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop records after `step` (work a killed run logged past its last checkpoint)."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return
    keep = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
    atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in keep).encode()))
