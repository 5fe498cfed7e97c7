"""The plan's plots (matplotlib, Agg backend): time to train vs chips, one line per batch size; the frontier."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from largebatch.extras import require
from largebatch.plan.planner import Row, frontier

# On import, which `largebatch plan --out` does before it writes anything: a missing extra stops it there.
matplotlib = require("study", "matplotlib", "largebatch plan --out (its plots)")


def _pyplot():
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_time_to_train(rows: Sequence[Row], path: Path, title: str = "") -> None:
    """Time to train (hours, log) vs chips (log), one line per global batch size; unknown points left out."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for batch in sorted({r.batch for r in rows}):
        pts = sorted((r.chips, r.time_to_train_s / 3600) for r in rows if r.batch == batch and r.time_to_train_s)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"B = {batch:,}")
    _save(plt, fig, ax, path, xlabel="chips", ylabel="time to train (hours)", title=title)


def plot_frontier(rows: Sequence[Row], path: Path, title: str = "") -> None:
    """Chip-hours vs time to train of every point, the efficient frontier joined and labelled chips x batch."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    known = [r for r in rows if r.time_to_train_s]
    ax.scatter([r.time_to_train_s / 3600 for r in known], [r.chip_hours for r in known], s=12, c="0.6",
               label="plan points")
    front = frontier(rows)
    ax.plot([r.time_to_train_s / 3600 for r in front], [r.chip_hours for r in front], "r-o", ms=4,
            label="efficient frontier")
    for r in front:
        ax.annotate(f"{r.chips}x{r.batch}", (r.time_to_train_s / 3600, r.chip_hours), fontsize=7)
    _save(plt, fig, ax, path, xlabel="time to train (hours)", ylabel="chip-hours", title=title)


def _save(plt, fig, ax, path: Path, **labels: str) -> None:
    """Log-log axes with `labels`, a grid and the legend, written to `path` and closed."""
    ax.set(xscale="log", yscale="log", **labels)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
