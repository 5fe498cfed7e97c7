"""Pruned batch-size studies (`largebatch study --pruner`): the trainer's on_eval hook, Optuna's pruners within a
(rung, batch) cell, pruned records in storage, trials.csv, regimes and the report.

Real runs are tiny (512 MNIST images, batch 128: 4 steps, an evaluation every quarter epoch, so evaluations 1-4
at steps 1-4); the pruners' decisions are checked on hand-made curves of a stand-in for train().
"""

import json
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from largebatch import checkpoint
from largebatch.config import ConfigError
from largebatch.metrics import read_metrics
from largebatch.study import runs, sweep
from largebatch.study.record import TrialRecord, read_csv, write_csv
from largebatch.study.regimes import aggregate, identify_regimes
from largebatch.study.report import write_report
from largebatch.study.spec import cell_config, run_config
from largebatch.study.sweep import load_records, make_pruner, open_storage, run_study
from largebatch.trainer import train as real_train
from test_study_sweep import TINY, db, needs_mnist, tiny_spec

QUARTERS = {**TINY, "eval.every_epochs": 0.25}  # evaluations 1, 2, 3, 4 at steps 1, 2, 3, 4 (batch 128)


def quarter_spec(tmp_path, **kw):
    return tiny_spec(tmp_path, extra=dict(QUARTERS), **kw)


@pytest.fixture
def train_calls(monkeypatch):
    """Every real train() call the sweep makes, as the run directory's name."""
    calls = []

    def spy(cfg, resume=False, **kw):
        calls.append(cfg.output.name)
        return real_train(cfg, resume, **kw)

    monkeypatch.setattr(runs, "train", spy)
    return calls


# ---------------------------------------------------------------------------------------------
# the trainer's hook


@needs_mnist
def test_on_eval_sees_every_evaluation_and_a_stop_ends_the_run_cleanly(tmp_path):
    """on_eval gets (step, epoch, the logged record) at each evaluation; a truthy answer at evaluation 2 ends the
    run there as "stopped", with its checkpoint and metrics written; resuming goes on from step 2."""
    run_dir = tmp_path / "run"
    cfg = run_config(cell_config(quarter_spec(tmp_path), "sgd", 128), 1.0, None, 0, run_dir)
    calls = []

    def hook(step, epoch, metrics):
        calls.append((step, epoch, metrics["test_accuracy"]))
        return "enough" if step == 2 else None

    summary = real_train(cfg, on_eval=hook)
    assert summary["status"] == "stopped" and summary["steps"] == 2
    assert "stopped at step 2 of 4 by on_eval (enough)" in summary["message"]
    logged = [r for r in read_metrics(run_dir) if "test_accuracy" in r]
    assert [(c[0], c[1]) for c in calls] == [(1, 0.25), (2, 0.5)]
    assert [(r["step"], r["test_accuracy"]) for r in logged] == [(c[0], c[2]) for c in calls]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "stopped"
    assert checkpoint.latest(run_dir) is not None

    rest = []
    resumed = real_train(cfg, resume=True, on_eval=lambda step, epoch, m: rest.append(step))  # None: go on
    assert resumed["status"] == "completed" and resumed["steps"] == 4 and rest == [3, 4]
    # the last evaluation is reported too, but a stop asked there changes nothing; a hook changes no number
    again = real_train(replace(cfg, output=replace(cfg.output, name="last")), on_eval=lambda s, e, m: s == 4)
    plain = real_train(replace(cfg, output=replace(cfg.output, name="plain")))
    assert again["status"] == "completed" and again["steps"] == 4
    assert again["test_accuracy"] == plain["test_accuracy"] and again["test_loss"] == plain["test_loss"]
    evals = [[(r["step"], r["test_accuracy"], r["test_loss"]) for r in read_metrics(tmp_path / name)
              if "test_accuracy" in r] for name in ("last", "plain")]
    assert evals[0] == evals[1] and len(evals[0]) == 4


# ---------------------------------------------------------------------------------------------
# pruned trials in the sweep (real runs; a pruner that prunes every trial at its second evaluation)


class PruneAtSecond(optuna.pruners.BasePruner):
    """Prunes any trial that asks at evaluation 2 or later: only the sweep's rules keep a trial running."""

    def prune(self, study, trial):
        return (trial.last_step or 0) >= 2


@needs_mnist
def test_pruned_trials_are_pruned_in_optuna_and_their_records_and_resume_skips_them(tmp_path, monkeypatch,
                                                                                      train_calls):
    monkeypatch.setattr(sweep, "make_pruner", lambda spec, cell: PruneAtSecond())
    spec = quarter_spec(tmp_path, trials=2, seeds=2, pruner="halving")
    records = run_study(spec, db(tmp_path), "p")
    by = {(r.trial, r.seed): r for r in records}
    assert sorted(by) == [(0, 0), (0, 1), (1, 0), (2, 0)]  # a pruned point gets no second seed
    assert [by[(0, s)].status for s in (0, 1)] == ["completed", "completed"]  # the untuned point is never pruned
    assert [by[(0, s)].steps for s in (0, 1)] == [4, 4]
    for t in (1, 2):
        r = by[(t, 0)]
        assert r.tuned and r.status == "pruned" and r.steps == 2 and r.test_metric is None
        assert r.message.startswith("pruned at epoch 0.50 (evaluation 2, accuracy ") and r.wall_seconds > 0
        run_dir = Path(r.run_dir)
        assert [m["step"] for m in read_metrics(run_dir) if "test_accuracy" in m] == [1, 2]
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "stopped"
        assert checkpoint.latest(run_dir) is not None  # it could be resumed by hand
    study = optuna.load_study(study_name="p/sgd/b128", storage=open_storage(db(tmp_path)))
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.PRUNED]
    # the first seed's curve is the trial's: the test accuracy at each evaluation, indexed 1..4
    curve = {m["step"]: m["test_accuracy"] for m in read_metrics(Path(by[(0, 0)].run_dir)) if "test_accuracy" in m}
    assert trials[0].intermediate_values == curve and sorted(curve) == [1, 2, 3, 4]
    assert sorted(trials[1].intermediate_values) == [1, 2]

    train_calls.clear()  # resuming, also with a third seed: only the untuned point's seed 2 runs
    more = run_study(quarter_spec(tmp_path, trials=2, seeds=3, pruner="halving"), db(tmp_path), "p")
    assert train_calls == ["t0-s2"]
    assert len(more) == 5 and all(r in more for r in records)


# ---------------------------------------------------------------------------------------------
# Optuna's pruners on hand-made curves (no training)

CURVES = {0: [0.30, 0.50, 0.60, 0.70],  # trial 0, the untuned point: the worst start, never pruned
          1: [0.60, 0.70, 0.80, 0.90],  # trial 1 (x1/2, first in the grid order): the best at every evaluation
          2: [0.50, 0.55, 0.65, 0.95]}  # trial 2 (x1/4): behind trial 1 early, the best at the end


def curve_train(calls):
    """A stand-in for train(): evaluations 1-4 at steps 1-4 (epochs 0.25 .. 1) follow CURVES by trial number."""
    def train(cfg, resume=False, on_eval=None):
        calls.append((cfg.output.name, on_eval is not None))
        values = CURVES[int(cfg.output.name.split("-")[0][1:])]  # run directory t{trial}-s{seed}
        for k, v in enumerate(values, start=1):
            if on_eval is not None and on_eval(k, k / 4, {"step": k, "epoch": k / 4, "test_accuracy": v}) and k < 4:
                return {"status": "stopped", "message": f"stopped at step {k} of 4", "steps": k, "wall_seconds": k}
        return {"status": "completed", "test_accuracy": values[-1], "steps": 4, "wall_seconds": 4.0}
    return train


@pytest.mark.parametrize("pruner", ["halving", "median"])
def test_optunas_pruners_prune_within_the_cell_on_its_curves(tmp_path, monkeypatch, pruner):
    """halving (rungs at evaluations 1 and 3, factor 3): x1/2 is the best at each rung; x1/4, second of three at
    evaluation 1 (the best third: 1 of 3), is pruned there although it would end best. median (from evaluation 1):
    x1/4's 0.50 at evaluation 1 beats the finished trials' median (0.30, 0.60: 0.45), but its best 0.55 at 2 does
    not (0.50, 0.70: 0.60). The untuned trial, the worst at evaluation 1, runs to the end in both."""
    calls = []
    monkeypatch.setattr(runs, "train", curve_train(calls))
    records = run_study(quarter_spec(tmp_path, trials=2, pruner=pruner), db(tmp_path), pruner)
    got = {r.trial: (r.lr_multiplier, r.status, r.steps) for r in records}
    pruned_at = {"halving": 1, "median": 2}[pruner]
    assert got == {0: (1.0, "completed", 4), 1: (0.5, "completed", 4), 2: (0.25, "pruned", pruned_at)}
    assert calls == [("t0-s0", True), ("t1-s0", True), ("t2-s0", True)]
    study = optuna.load_study(study_name=f"{pruner}/sgd/b128", storage=open_storage(db(tmp_path)))
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    assert study.best_trial.params["lr_multiplier"] == 0.5


def test_make_pruner_judges_no_trial_before_the_longest_warmup(tmp_path):
    """30 epochs with warmups up to 1/6 of them (5 epochs), evaluating every epoch: the first decision at
    evaluation 5; halving's rungs at 5, 15, 45; Hyperband's brackets from 5 to 30 evaluations."""
    spec = tiny_spec(tmp_path, epochs=30, warmup_range=(0.0, 1 / 6), pruner="halving")
    cell = cell_config(spec, "sgd", 128)
    halving = make_pruner(spec, cell)
    assert isinstance(halving, optuna.pruners.SuccessiveHalvingPruner) and halving._min_resource == 5
    median = make_pruner(replace(spec, pruner="median"), cell)
    assert isinstance(median, optuna.pruners.MedianPruner) and median._n_warmup_steps == 5
    hyperband = make_pruner(replace(spec, pruner="hyperband"), cell)
    assert isinstance(hyperband, optuna.pruners.HyperbandPruner)
    assert (hyperband._min_resource, hyperband._max_resource) == (5, 30)
    assert isinstance(make_pruner(replace(spec, pruner="none"), cell), optuna.pruners.NopPruner)
    quarters = make_pruner(quarter_spec(tmp_path, pruner="halving"), cell_config(quarter_spec(tmp_path), "sgd", 128))
    assert quarters._min_resource == 1  # warmup up to 0.1 epochs, evaluations every 0.25: from the first


def test_pruner_none_calls_train_as_before_and_reports_nothing(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(runs, "train", curve_train(calls))
    records = run_study(quarter_spec(tmp_path, trials=2), db(tmp_path), "n")
    assert [r.status for r in records] == ["completed"] * 3
    assert calls == [("t0-s0", False), ("t1-s0", False), ("t2-s0", False)]  # train(cfg, resume): no on_eval
    study = optuna.load_study(study_name="n/sgd/b128", storage=open_storage(db(tmp_path)))
    assert all(t.intermediate_values == {} for t in study.get_trials())


# ---------------------------------------------------------------------------------------------
# trials.csv, import, regimes and the report


def test_pruned_records_round_trip_csv_and_import_as_pruned(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(runs, "train", curve_train(calls))
    spec = quarter_spec(tmp_path, trials=2, pruner="halving")
    records = run_study(spec, db(tmp_path), "c")
    write_csv(records, tmp_path / "trials.csv")
    back = read_csv(tmp_path / "trials.csv")
    assert back == records and [r.status for r in back] == ["completed", "completed", "pruned"]
    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    assert sweep.import_records(spec, fresh, "c", back) == 3
    study = optuna.load_study(study_name="c/sgd/b128", storage=open_storage(fresh))
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    assert load_records(fresh, "c") == records
    calls.clear()
    assert run_study(spec, fresh, "c") == records and calls == []  # nothing reruns, the pruned trial neither


def rec(b, trial, status, acc=None, steps=8, wall=10.0, tuned=True):
    done = status == "completed"
    return TrialRecord(study="s", rung="sgd", batch_size=b, seed=0, trial=trial, tuned=tuned, lr_multiplier=1.0,
                       peak_lr=0.1 * (trial + 1), warmup_epochs=0.0, epochs=1.0, status=status,
                       test_metric=acc if done else None, test_accuracy=acc if done else None,
                       test_loss=0.1 if done else None, steps=steps, wall_seconds=wall)


def test_regimes_leave_pruned_runs_out_and_the_report_counts_them(tmp_path):
    """At 128 the pruned point (its last accuracy unknown) is not the best-of-tuning choice, nor diverged; the
    table counts it in its own column; the summary adds every run's seconds (10 + 10 + 20 + 5 + 2.5 = 47.5 s) and
    what the pruned ones saved: 2 of 8 steps in 5 s and 1 of 4 in 2.5 s -> 9 steps, 5 * 3 + 2.5 * 3 = 22.5 s."""
    records = [rec(64, 0, "completed", 0.99, tuned=False), rec(64, 1, "completed", 0.98),
               rec(128, 0, "completed", 0.985, steps=4, wall=20.0, tuned=False),
               rec(128, 1, "pruned", steps=1, wall=2.5), rec(64, 2, "pruned", steps=2, wall=5.0)]
    groups = aggregate(records)
    assert [(g.batch_size, g.tuned, g.n_points, g.n_diverged) for g in groups] == [
        (64, False, 1, 0), (64, True, 1, 0), (128, False, 1, 0)]  # no tuned group at 128: its only point was pruned
    reg = identify_regimes(records, dataset_size=512)
    rows = {r.batch_size: r for r in reg.per_batch}
    assert [(rows[b].n_runs, rows[b].n_diverged, rows[b].n_incomplete, rows[b].n_pruned) for b in (64, 128)] == [
        (3, 0, 0, 1), (2, 0, 0, 1)]
    text = write_report(records, tmp_path, dataset_size=512).read_text()
    assert "- Training time: 0.01 h (48 s), the wall-clock seconds of the 5 runs added" in text
    assert "- Pruned: 2 of 5 runs; they ran 3 of their 12 steps, saving 9 steps, about 0.01 h (22 s)" in text
    assert "| incomplete | pruned | baseline keeps |" in text
    assert "| 1 | 0 | 0 | 1 | yes |" in text  # batch 64: seeds, diverged, incomplete, pruned, keeps
    assert "so are pruned runs" in text
    plain = write_report([r for r in records if r.status != "pruned"], tmp_path / "plain", dataset_size=512)
    assert "pruned" not in plain.read_text().lower()  # a study without a pruner reads as before, plus its time


def test_cli_takes_the_pruner_flag(tmp_path, monkeypatch, capsys):
    from largebatch.study.cli import study_main

    calls = []
    monkeypatch.setattr(runs, "train", curve_train(calls))
    argv = ["--recipe", "mnist-lenet", "--batch-sizes", "128", "--trials", "2", "--epochs", "1", "--lr-range",
            "0.25,1", "--warmup-range", "0,0.1", "--storage", db(tmp_path), "--output-dir", str(tmp_path / "runs"),
            *[a for k, v in QUARTERS.items() for a in ("--set", f"{k}={json.dumps(v)}")]]
    with pytest.raises(ConfigError, match="--pruner 'sha' is unknown: choose from none, median, halving, hyperband"):
        study_main([*argv, "--pruner", "sha"])
    assert study_main([*argv, "--pruner", "halving"]) == 0
    assert "3 runs (0 diverged, 1 pruned)" in capsys.readouterr().out
