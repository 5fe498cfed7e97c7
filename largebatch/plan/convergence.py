"""Steps to the target as a function of the global batch B, from a study, a probe, a table or a fixed budget.

Everything is kept as epochs E(B) (steps S = E N / B for N training examples):

- a table of (B, E) points: the MLPerf ResNet-50 reference convergence points (RCPs: the mean epochs to 75.9% top-1
  of the reference runs at each batch, 1,632 ... 67,840), read from the installed `mlperf_logging` package, or the
  steps to target of a `largebatch study` (trials.csv). Between points E is linear in log B; below the smallest
  batch it stays at the smallest batch's E (below the critical batch the epochs no longer fall); above the largest
  it is unknown (no run has shown the target is reached there).
- the gradient noise scale of a probe (McCandlish et al. 2018, "An empirical model of large-batch training"):
  S = S_min (1 + B_noise / B), i.e. E = E_min (1 + B / B_noise) with E_min = S_min B_noise / N; S_min from the steps
  a reference run (the recipe's) takes at its batch.
- a fixed budget (the recipe's epochs at every batch): what a run with a fixed epoch count does, accuracy aside.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from largebatch.config import ConfigError
from largebatch.extras import require


@dataclass(frozen=True)
class Convergence:
    """Epochs to the target at a global batch: `epochs(batch)` (None where unknown). See the module docstring."""

    source: str
    points: tuple[tuple[float, float], ...] = ()
    fixed_epochs: float | None = None
    noise: tuple[float, float] | None = None  # (E_min, B_noise)
    max_batch: float | None = None

    def epochs(self, batch: float) -> float | None:
        if self.max_batch is not None and batch > self.max_batch:
            return None
        if self.fixed_epochs is not None:
            return self.fixed_epochs
        if self.noise is not None:
            e_min, b_noise = self.noise
            return e_min * (1 + batch / b_noise)
        return interpolate(self.points, batch)


def interpolate(points: tuple[tuple[float, float], ...], batch: float) -> float | None:
    """E at `batch` from sorted (B, E) points: linear in log B between points, the first E below, None above."""
    if not points:
        return None
    if batch <= points[0][0]:
        return points[0][1]
    for (b0, e0), (b1, e1) in zip(points, points[1:]):
        if batch <= b1:
            w = math.log(batch / b0) / math.log(b1 / b0)
            return e0 + w * (e1 - e0)
    return None


def fixed(epochs: float) -> Convergence:
    """The same budget of `epochs` at every batch."""
    if not epochs > 0:
        raise ConfigError(f"--epochs {epochs} is invalid: give a training budget in epochs, > 0")
    return Convergence(source=f"fixed {epochs:g} epochs", fixed_epochs=epochs)


def mlperf_resnet() -> Convergence:
    """The MLPerf ResNet-50 reference convergence points of the newest ruleset that has them (mlperf_logging's
    rcp_checker/training_*/rcps_resnet.json): mean epochs to 75.9% top-1 at each reference batch."""
    rcp = require("mlperf", "mlperf_logging.rcp_checker",
                  "the MLPerf ResNet-50 convergence table (--epochs, --study or --probe need no extra)")
    files = sorted(Path(rcp.__file__).parent.glob("training_*/rcps_resnet.json"),
                   key=lambda p: tuple(int(x) for x in p.parent.name.split("_")[1].split(".")))
    if not files:
        raise ConfigError("mlperf_logging has no rcps_resnet.json: upgrade it, or give --epochs, --study or --probe")
    table = json.loads(files[-1].read_text())
    points = sorted((float(r["BS"]), statistics.fmean(r["Epochs to converge"])) for r in table.values())
    return Convergence(source=f"MLPerf ResNet-50 RCPs ({files[-1].parent.name})", points=tuple(points))


def from_records(records: list, dataset_size: int, max_batch: float | None = None) -> Convergence:
    """Epochs to target per batch from a study's TrialRecords: for each (batch, rung, trial) the median over seeds of
    steps_to_target (a seed that missed the target makes the point miss it), then the fewest over rungs and trials."""
    cells: dict[tuple, list] = {}
    for r in records:
        if r.status not in ("completed", "diverged", "failed"):
            continue
        cells.setdefault((r.batch_size, r.rung, r.trial), []).append(
            r.steps_to_target if r.status == "completed" and r.steps_to_target else math.inf)
    best: dict[int, float] = {}
    for (batch, _, _), steps in cells.items():
        best[batch] = min(best.get(batch, math.inf), statistics.median(steps))
    points = tuple(sorted((float(b), s * b / dataset_size) for b, s in best.items() if math.isfinite(s)))
    if not points:
        raise ConfigError("the study has no run that reached its target (steps_to_target): give --epochs or --probe")
    reached = max(b for b, _ in points)
    return Convergence(source=f"study steps to target ({len(points)} batch sizes)", points=points,
                       max_batch=max_batch if max_batch is not None else reached)


def read_study(path: Path, dataset_size: int) -> Convergence:
    """`from_records` of a study report folder (trials.csv, and regimes.json's B_H if present) or a trials.csv."""
    from largebatch.study.record import read_csv

    path = Path(path)
    csv_path = path / "trials.csv" if path.is_dir() else path
    if not csv_path.is_file():
        raise ConfigError(f"--study {path}: no trials.csv there; pass the --out folder of `largebatch report`")
    try:
        records = read_csv(csv_path)
    except UnicodeDecodeError:
        raise ConfigError(f"--study {csv_path} is not UTF-8 text: pass the trials.csv of a report") from None
    regimes = csv_path.parent / "regimes.json"
    b_h = json.loads(regimes.read_text()).get("b_h") if regimes.is_file() else None
    return from_records(records, dataset_size, max_batch=b_h)


def from_noise_scale(b_noise: float, reference_batch: float, reference_epochs: float) -> Convergence:
    """McCandlish et al. 2018: E(B) = E_min (1 + B / B_noise), E_min fixed by the reference run's epochs at its batch
    (S_ref = S_min (1 + B_noise / B_ref) is the same statement in steps)."""
    if not (b_noise > 0 and math.isfinite(b_noise)):
        raise ConfigError(f"the probe's noise scale {b_noise!r} is invalid: it must be a positive number")
    e_min = reference_epochs / (1 + reference_batch / b_noise)
    return Convergence(source=f"noise scale B_noise = {b_noise:,.0f} (McCandlish et al. 2018)",
                       noise=(e_min, b_noise))


def read_probe(path: Path, reference_batch: float, reference_epochs: float, median: bool = True) -> Convergence:
    """`from_noise_scale` of a probe.json (`largebatch probe`): its median B_simple after warmup (else the last)."""
    from largebatch.config import read_json_object

    data = read_json_object(Path(path), f"--probe {path}", "pass the probe.json a `largebatch probe` wrote")
    b = data.get("b_simple_median") if median else None
    b = b if b is not None else data.get("b_simple")
    if b is None:
        raise ConfigError(f"--probe {path}: no b_simple in it; pass the probe.json a `largebatch probe` wrote")
    return from_noise_scale(float(b), reference_batch, reference_epochs)
