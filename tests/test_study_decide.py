"""Studies that stop runs once B_L and B_H are decided (`study --stop-when-decided`, largebatch.study.decide).

The runs are a stand-in for train() that follows hand-made curves (evaluations 1-4 at steps 1-4), so each stop and
skip is known in advance; the reference is the same study run to the end, whose B_L and B_H must come out the same.
"""

import json
from pathlib import Path

import pytest

from largebatch.config import ConfigError
from largebatch.study import runs
from largebatch.study.decide import Decisions
from largebatch.study.record import REACHED
from largebatch.study.regimes import identify_regimes
from largebatch.study.sweep import open_storage, run_study
from test_study_sweep import db, needs_mnist, tiny_spec

# test accuracy at evaluations 1-4 by (rung, batch, trial); the test loss is 1 - accuracy; anything else FAILS
CURVES = {
    ("sgd", 128, 0): [0.50, 0.70, 0.80, 0.90],  # the baseline: A = 0.90, threshold 0.8955, xi = 0.10
    ("sgd", 256, 0): [0.60, 0.90, 0.91, 0.92],  # untuned keeps at evaluation 2: B_L >= 256
    ("sgd", 512, 0): [0.30, 0.40, 0.50, 0.60],  # untuned fails: B_L = 256
    ("sgd", 512, 1): [0.50, 0.85, 0.90, 0.95],  # a tuned point reaches at evaluation 3: B_H = 512
    ("lars", 1024, 0): [0.40, 0.50, 0.60, 0.89],  # nothing reaches at 1024: huge
}
FAILS = [0.20, 0.30, 0.40, 0.50]
BATCHES, RUNGS = (128, 256, 512, 1024), ("sgd", "lars")


def curve_train(calls):
    def train(cfg, resume=False, on_eval=None):
        run_dir = Path(cfg.output.dir) / cfg.output.name
        rung, batch, trial = run_dir.parts[-3], int(run_dir.parts[-2][1:]), int(run_dir.name.split("-")[0][1:])
        values = CURVES.get((rung, batch, trial), FAILS)
        calls.append((rung, batch, trial))
        for k, v in enumerate(values, start=1):
            m = {"step": k, "epoch": k / 4, "test_accuracy": v, "test_loss": 1 - v}
            if on_eval is not None and on_eval(k, k / 4, dict(m)) and k < 4:
                return {"status": "stopped", "message": f"stopped at step {k} of 4", "steps": k, "wall_seconds": k,
                        "test_accuracy": v, "test_loss": 1 - v}
        return {"status": "completed", "test_accuracy": values[-1], "test_loss": 1 - values[-1], "steps": 4,
                "wall_seconds": 4.0}
    return train


def study(tmp_path, monkeypatch, decide: bool, pruner: str = "none"):
    calls = []
    monkeypatch.setattr(runs, "train", curve_train(calls))
    spec = tiny_spec(tmp_path, batch_sizes=BATCHES, rungs=RUNGS, trials=2, decide=decide, pruner=pruner)
    return spec, run_study(spec, db(tmp_path), "d"), calls


@pytest.mark.parametrize("pruner", ["none", "halving"])
def test_a_decided_study_stops_and_skips_what_cannot_change_b_l_or_b_h(tmp_path, monkeypatch, pruner):
    _, full, full_calls = study(tmp_path / "full", monkeypatch, decide=False)
    spec, part, calls = study(tmp_path / "part", monkeypatch, decide=True, pruner=pruner)
    assert len(full_calls) == len(BATCHES) * len(RUNGS) * 3
    # B0: only the baseline runs; 256: its untuned run decides both calls, no tuned point runs; 512: the untuned run
    # fails to the end, tuned point 1 decides B_H and point 2 is skipped, as is every lars run there; 1024: undecided
    # the baseline first, then the largest batches (hopeless runs no decision shortens), while A is unknown
    assert calls[0] == ("sgd", 128, 0) and {c[1] for c in calls[1:7]} == {1024}
    assert sorted(c for c in calls if c[1] < 1024) == [("sgd", 128, 0), ("sgd", 256, 0), ("sgd", 512, 0),
                                                       ("sgd", 512, 1)]
    assert sorted(c for c in calls if c[1] == 1024) == sorted((r, 1024, t) for r in RUNGS for t in range(3))
    by = {(r.rung, r.batch_size, r.trial): r for r in part}
    assert by[("sgd", 128, 0)].steps == 4 and by[("sgd", 512, 0)].steps == 4
    for key, steps in ((("sgd", 256, 0), 2), (("sgd", 512, 1), 3)):
        r = by[key]
        assert r.status == "completed" and r.steps == steps and r.message.startswith(REACHED) and r.reached_early, r
        assert r.test_metric == CURVES[key][steps - 1]
    assert "at epoch" in by[("sgd", 256, 0)].message
    a, b = identify_regimes(full, 60000), identify_regimes(part, 60000)
    assert (a.b_l, a.b_h, a.baseline_value) == (b.b_l, b.b_h, b.baseline_value) == (256, 512, 0.90)
    assert sum(r.wall_seconds for r in part) < sum(r.wall_seconds for r in full) / 2

    calls.clear()  # resuming a decided study runs nothing
    again = run_study(spec, db(tmp_path / "part"), "d")
    assert calls == [] and len(again) == len(part)


def test_verdicts_at_an_evaluation(tmp_path, monkeypatch):
    """Against the finished decided study: the baseline never stops; a run of a decided batch is pruned; the untuned
    run deciding B_L stops at the threshold only with its loss within 1.2 xi; nothing stops before A is known."""
    spec, _, _ = study(tmp_path, monkeypatch, decide=True)
    d = Decisions(spec, open_storage(db(tmp_path)), "d")
    assert d.baseline() == pytest.approx((0.90, 0.10)) and d.threshold() == pytest.approx(0.8955)
    good, lossy = {"test_accuracy": 0.90, "test_loss": 0.10}, {"test_accuracy": 0.90, "test_loss": 0.5}
    assert d.verdict("sgd", 128, False, good) == ("", "")
    kind, why = d.verdict("lars", 512, True, {"test_accuracy": 0.5, "test_loss": 0.5})
    assert kind == "pruned" and why == "batch 512 decided by sgd trial 1"
    assert d.verdict("lars", 512, True, good)[0] == "completed"  # reaching is a result, whatever else decided it
    assert d.verdict("sgd", 256, False, lossy) == ("", "")  # the B_L call at 256 needs the loss too
    assert d.verdict("sgd", 256, False, good)[0] == "completed"
    assert d.verdict("lars", 256, True, lossy)[0] == "completed"  # B_H is decided on the metric alone
    assert not d.b_l_ended_below(512) and d.b_l_ended_below(1024)
    assert d.needed("sgd", 1024, False) and d.needed("lars", 1024, True) and not d.needed("lars", 128, False)

    fresh = Decisions(spec, open_storage(f"sqlite:///{tmp_path / 'empty.db'}"), "d")  # no baseline yet
    assert fresh.baseline() is None and fresh.verdict("sgd", 256, True, good) == ("", "")


def test_the_study_stops_at_its_own_tolerance_and_a_stricter_report_says_so(tmp_path, monkeypatch):
    """`StudySpec.tolerance` 0.02: threshold 0.98 A = 0.882. Tuned point 1 at 512 stops at 0.885, which reaches it
    but not the default 0.995 A = 0.8955; the study gives the B_L and B_H of the same study run to the end, judged
    at 0.02, and a report at the default tolerance notes the run instead of silently using its value at the stop."""
    monkeypatch.setitem(CURVES, ("sgd", 512, 1), [0.50, 0.885, 0.90, 0.95])
    calls = []
    monkeypatch.setattr(runs, "train", curve_train(calls))
    full = run_study(tiny_spec(tmp_path / "full", batch_sizes=BATCHES, rungs=RUNGS, trials=2), db(tmp_path / "full"),
                     "d")
    spec = tiny_spec(tmp_path, batch_sizes=BATCHES, rungs=RUNGS, trials=2, decide=True, tolerance=0.02)
    part = run_study(spec, db(tmp_path), "d")
    assert Decisions(spec, open_storage(db(tmp_path)), "d").threshold() == pytest.approx(0.882)
    stopped = next(r for r in part if (r.rung, r.batch_size, r.trial) == ("sgd", 512, 1))
    assert stopped.reached_early and stopped.steps == 2 and stopped.test_metric == 0.885
    a, b = identify_regimes(full, 60000, tolerance=0.02), identify_regimes(part, 60000, tolerance=0.02)
    assert (a.b_l, a.b_h) == (b.b_l, b.b_h) == (256, 1024)  # lars' untuned 0.89 at 1024 keeps 0.882
    assert not any("stopped where they reached" in n for n in b.notes)
    strict = identify_regimes(part, 60000)
    note = next(n for n in strict.notes if "stopped where they reached" in n)
    assert note.startswith("1 run(s)") and "sgd b512 t1" in note and "0.8955" in note
    assert not any("stopped where they reached" in n for n in identify_regimes(full, 60000).notes)
    with pytest.raises(ConfigError, match=r"tolerance = 1.0 is invalid: give a relative tolerance in \[0, 1\)"):
        tiny_spec(tmp_path, tolerance=1.0)


def test_a_loss_study_stops_a_run_at_1_01_a(tmp_path, monkeypatch):
    """A lower-is-better metric (a regression loss): a run stops once its loss is at most 1.01 A; no 1.2 xi rule."""
    losses = {("sgd", 128, 0): [1.0, 0.5, 0.3, 0.2], ("sgd", 256, 0): [0.9, 0.4, 0.201, 0.19]}  # 1.01 A = 0.202
    calls = []

    def train(cfg, resume=False, on_eval=None):
        run_dir = Path(cfg.output.dir) / cfg.output.name
        key = (run_dir.parts[-3], int(run_dir.parts[-2][1:]), int(run_dir.name.split("-")[0][1:]))
        calls.append(key)
        values = losses.get(key, [2.0, 2.0, 2.0, 2.0])
        for k, v in enumerate(values, start=1):
            if on_eval is not None and on_eval(k, k / 4, {"step": k, "epoch": k / 4, "test_loss": v}) and k < 4:
                return {"status": "stopped", "steps": k, "wall_seconds": k, "test_loss": v, "metric": "loss"}
        return {"status": "completed", "test_loss": values[-1], "steps": 4, "wall_seconds": 4.0, "metric": "loss"}

    monkeypatch.setattr(runs, "train", train)
    spec = tiny_spec(tmp_path, batch_sizes=(128, 256), trials=2, decide=True,
                     extra={**tiny_spec(tmp_path).extra, "task": "regression"})
    records = run_study(spec, db(tmp_path), "l")
    assert (spec.metric, spec.higher_is_better) == ("loss", False)
    assert calls == [("sgd", 128, 0), ("sgd", 256, 0)]
    r = next(r for r in records if r.batch_size == 256)
    assert r.status == "completed" and r.steps == 3 and r.test_metric == 0.201 and r.message.startswith(REACHED)
    reg = identify_regimes(records, 60000)
    assert (reg.b_l, reg.b_h, reg.threshold) == (256, 256, pytest.approx(0.202))


def test_a_tuned_trial_at_b0_created_by_a_race_is_failed_as_surplus_before_training(tmp_path, monkeypatch):
    """Two workers at the baseline's cell: one pops the queued untuned trial, the other's optimize() then creates a
    tuned trial. Deciding early, no tuned trial at B0 counts, so it fails as surplus without training."""
    import optuna

    from largebatch.study import sweep

    monkeypatch.setattr(runs, "train", lambda *a, **k: pytest.fail("nothing may train"))
    spec = tiny_spec(tmp_path, batch_sizes=(128, 256), trials=2, decide=True)
    store = open_storage(db(tmp_path))
    study = optuna.create_study(storage=store, study_name="r/sgd/b128", direction="maximize")
    study.sampler = sweep._sampler(spec, 0.0, salt=0)
    objective = sweep._objective(spec, "r", "sgd", 128, {}, Decisions(spec, store, "r"))
    study.optimize(objective, n_trials=1, catch=(sweep._Surplus,))
    (trial,) = study.get_trials()
    assert trial.state == optuna.trial.TrialState.FAIL and trial.params == {}  # no grid point taken either


@needs_mnist
def test_a_real_run_stopped_where_it_reached_is_a_completed_record_of_that_evaluation(tmp_path, monkeypatch):
    """Through the real trainer: a run told at its second evaluation that it reached the baseline ends there, its
    summary.json "stopped" with a checkpoint (resumable by hand), its record "completed" with that evaluation's
    test accuracy and loss, 2 of its 4 steps."""
    from largebatch.metrics import read_metrics

    monkeypatch.setattr(Decisions, "verdict", lambda self, rung, batch, tuned, m: (
        ("completed", f"{REACHED} 0.5 (accuracy {m['test_accuracy']:.4g})") if batch == 128 and m["step"] == 2
        else ("", "")))
    spec = tiny_spec(tmp_path, batch_sizes=(64, 128), trials=0, decide=True,
                     extra={**tiny_spec(tmp_path).extra, "eval.every_epochs": 0.25})
    records = run_study(spec, db(tmp_path), "real")
    r = next(r for r in records if r.batch_size == 128)
    assert r.status == "completed" and r.steps == 2 and r.message.startswith(REACHED) and "at epoch 0.50" in r.message
    logged = [m for m in read_metrics(Path(r.run_dir)) if "test_accuracy" in m]
    assert [m["step"] for m in logged] == [1, 2]
    assert (r.test_accuracy, r.test_loss) == (logged[-1]["test_accuracy"], logged[-1]["test_loss"])
    assert json.loads((Path(r.run_dir) / "summary.json").read_text())["status"] == "stopped"
    base = next(r for r in records if r.batch_size == 64)
    assert base.status == "completed" and base.steps == 8  # the baseline: 512 images at batch 64, to the end


@pytest.mark.parametrize("tolerance, threshold, n_calls", [
    ([], "0.8955", 10),
    (["--tolerance", "0.02"], "0.882", 8),  # lars' untuned 0.89 at 1024 decides that batch: 2 trials fewer
])
def test_the_cli_flag_decides_the_study_and_says_how_many_runs_stopped(tmp_path, monkeypatch, capsys, tolerance,
                                                                       threshold, n_calls):
    from largebatch.study.cli import study_main
    from largebatch.study.sweep import load_records
    from test_study_sweep import TINY

    calls = []
    monkeypatch.setattr(runs, "train", curve_train(calls))
    argv = ["--recipe", "mnist-lenet", "--batch-sizes", ",".join(map(str, BATCHES)), "--optimizers", ",".join(RUNGS),
            "--trials", "2", "--epochs", "1", "--lr-range", "0.25,1", "--warmup-range", "0,0.1", "--storage",
            db(tmp_path), "--output-dir", str(tmp_path / "runs"), "--stop-when-decided", *tolerance,
            *[a for k, v in TINY.items() for a in ("--set", f"{k}={json.dumps(v)}")]]
    assert study_main(argv) == 0
    assert len(calls) == n_calls  # as in the decided study above: 4 below batch 1024, 6 (or 4) at it
    assert f"{n_calls} runs (0 diverged, 2 stopped where they reached A)" in capsys.readouterr().out
    stops = [r.message for r in load_records(db(tmp_path), "mnist-lenet") if r.reached_early]
    assert len(stops) == 2 and all(m.startswith(f"{REACHED} {threshold} ") for m in stops), stops


def test_a_users_own_model_data_and_task_are_decided_early(tmp_path, monkeypatch):
    """`examples/my_project.py:recipe` (the user's MLP, map-style Dataset and regression task by import path) through
    the public API, real runs: only the baseline trains at B0, every record is scored by the user's loss, and the
    regimes come out of the decided study."""
    import sys

    from largebatch.study.spec import StudySpec

    monkeypatch.setattr(sys, "path", [str(Path(__file__).resolve().parents[1] / "examples"), *sys.path])
    spec = StudySpec(recipe="my_project:recipe", batch_sizes=(64, 256), rungs=("lamb", "adamw"), epochs=2, trials=1,
                     decide=True, output_dir=str(tmp_path / "runs"),
                     extra={"threads": 1, "data.workers": 0, "eval.every_epochs": 0.5, "precision.dtype": "fp32"})
    records = run_study(spec, db(tmp_path), "own")
    assert {(r.metric, r.higher_is_better) for r in records} == {("loss", False)}
    assert [(r.rung, r.tuned) for r in records if r.batch_size == 64] == [("lamb", False)]
    assert all(r.status == "completed" for r in records if r.batch_size == 64)
    assert {r.batch_size for r in records} == {64, 256}
    reg = identify_regimes(records, 8192)
    assert (reg.baseline_rung, reg.baseline_batch, reg.metric) == ("lamb", 64, "loss")
    at_256 = [r for r in records if r.batch_size == 256 and r.status == "completed"]
    assert all(r.test_metric <= reg.threshold for r in at_256 if r.reached_early)  # stopped at 1.01 A or below
    assert (reg.b_h == 256) == any(r.test_metric <= reg.threshold for r in at_256)
