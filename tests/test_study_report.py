"""Regimes (You et al. 2020) and the study report against hand-computed values on synthetic trial records.

The main study (dataset 60,000, budget 30 epochs, 3 seeds, rungs "sgd" untuned and "+lars"):

    B      sgd untuned (baseline rung)        +lars best point            regime
    256    .990 .992 .994   A = .992          untuned .985 .986 .987      large (B0)
    1024   .991 .990 .992   keeps                                         large
    4096   .989 .990 .991   keeps (+1 stopped)                            large  -> B_L
    8192   .960 .962 .964   first failure     tuned .989 .990 .991        large-with-tuning
    16384  .990 .989 .991   passes again      tuned .989 .990 .991        large-with-tuning -> B_H
    32768  all diverged                       tuned .950 .955 .960        huge
    60000  all diverged                       tuned .900 .910 .920        full

0.995 A = 0.98704, xi = mean val loss at 256 = 0.032.
"""

import json
import math
from dataclasses import replace

import pytest

from largebatch.study.record import FIELDS, TrialRecord
from largebatch.study.regimes import (FULL, HUGE, LARGE, RECOVERABLE, NoBaselineError, aggregate, choose_loss_metric,
                                      choose_split, identify_regimes, perfect_scaling, steps_to_target)
from largebatch.study.report import write_report
from largebatch.study.stats import seed_stats, t_quantile

T2 = 4.302652729911275  # Student t 0.975 quantile, df = 2
PNG = b"\x89PNG\r\n\x1a\n"


def rec(rung, b, seed, acc, loss=0.035, tuned=False, lr=0.1, wu=0.0, status="completed", epochs=30.0, steps=None):
    """One classification trial record; acc=None with status diverged."""
    done = status == "completed"
    return TrialRecord(study="synthetic", rung=rung, batch_size=b, seed=seed, tuned=tuned, base_lr=lr * 256 / b,
                       reference_batch=256, peak_lr=lr, warmup_epochs=wu, epochs=epochs, status=status,
                       test_metric=acc if done else None, val_metric=acc if done else None,
                       test_accuracy=acc if done else None, val_accuracy=acc if done else None,
                       val_loss=loss if done else None, test_loss=loss if done else None, train_loss=0.01,
                       steps=100, steps_to_target=steps, target=0.98, wall_seconds=1.0,
                       run_dir=f"runs/{rung}/b{b}/s{seed}")


def seeds(rung, b, accs, losses=None, steps=None, **kw):
    """Three seeds; an acc of None is a diverged seed."""
    losses = losses or [0.035] * len(accs)
    steps = steps or [None] * len(accs)
    return [rec(rung, b, s, a, loss, steps=st, status="diverged" if a is None else "completed", **kw)
            for s, (a, loss, st) in enumerate(zip(accs, losses, steps))]


def study_records():
    r = []
    r += seeds("sgd", 256, [0.990, 0.992, 0.994], [0.030, 0.032, 0.034], [3000, 3100, 3200])
    r += seeds("sgd", 1024, [0.991, 0.990, 0.992], [0.033, 0.034, 0.035], [800, 820, 840])
    r += seeds("sgd", 4096, [0.989, 0.990, 0.991], [0.034, 0.035, 0.036], [220, 230, 240])
    r += [rec("sgd", 4096, 3, None, status="stopped")]
    r += seeds("sgd", 8192, [0.960, 0.962, 0.964])
    r += seeds("sgd", 16384, [0.990, 0.989, 0.991], steps=[150, 160, None])
    r += seeds("sgd", 32768, [None, None, None])
    r += seeds("sgd", 60000, [None, None, None])
    r += seeds("+lars", 256, [0.985, 0.986, 0.987])
    lars = dict(tuned=True)
    r += seeds("+lars", 8192, [0.989, 0.990, 0.991], steps=[100, 110, 120], lr=2.0, wu=1.0, **lars)
    r += seeds("+lars", 8192, [0.5, None, None], lr=8.0, wu=5.0, **lars)
    r += seeds("+lars", 16384, [0.989, 0.990, 0.991], steps=[60, 70, 80], lr=4.0, wu=2.0, **lars)
    r += seeds("+lars", 16384, [None, None, None], lr=16.0, wu=2.0, **lars)
    r += seeds("+lars", 32768, [0.950, 0.955, 0.960], lr=8.0, wu=5.0, **lars)
    r += seeds("+lars", 32768, [0.940, 0.950, None], lr=4.0, wu=5.0, **lars)
    r += seeds("+lars", 60000, [0.900, 0.910, 0.920], lr=8.0, wu=10.0, **lars)
    r += seeds("+lars", 8192, [0.992, 0.993, 0.994], lr=2.0, wu=1.0, epochs=60.0, **lars)  # trained longer
    return r


@pytest.fixture(scope="module")
def reg():
    return identify_regimes(study_records(), dataset_size=60000)


def test_t_quantile_closed_forms_and_table():
    assert t_quantile(0.975, 2) == pytest.approx(T2, rel=1e-9)  # scipy's value, itself ~4e-11 off
    assert t_quantile(0.975, 2) == pytest.approx(math.sqrt(722 / 39), rel=1e-12)  # t^2 = 2 * .95^2 / (1 - .95^2)
    assert t_quantile(0.975, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-10)  # Cauchy
    a = 4 * 0.975 * 0.025  # df = 4 closed form (Hill 1970)
    exact = 2 * math.sqrt(math.cos(math.acos(math.sqrt(a)) / 3) / math.sqrt(a) - 1)
    assert t_quantile(0.975, 4) == pytest.approx(exact)
    assert t_quantile(0.975, 10) == pytest.approx(2.228139, abs=1e-6)
    assert t_quantile(0.975, 30) == pytest.approx(2.042272, abs=1e-6)
    assert t_quantile(0.975, 5000) == pytest.approx(1.959964, abs=1e-3)
    assert t_quantile(0.025, 3) == pytest.approx(-t_quantile(0.975, 3))
    with pytest.raises(ValueError):
        t_quantile(0.975, 0)


def test_seed_stats_hand_values():
    s = seed_stats([0.990, 0.992, 0.994])
    assert (s.n, s.mean, s.std) == (3, pytest.approx(0.992), pytest.approx(0.002))
    assert s.ci == pytest.approx(T2 * 0.002 / math.sqrt(3))
    assert s.inside_noise(0.992 + 0.004) and not s.inside_noise(0.992 + 0.006)
    one = seed_stats([0.5])
    assert one.ci is None and one.inside_noise(0.5) is None
    loss = seed_stats([0.1, math.inf])
    assert loss.mean == math.inf and loss.ci is None


def test_baseline_and_boundaries(reg):
    assert (reg.baseline_batch, reg.baseline_rung, reg.baseline_tuned) == (256, "sgd", False)
    assert reg.baseline_value == pytest.approx(0.992)
    assert reg.baseline_ci == pytest.approx(T2 * 0.002 / math.sqrt(3))
    assert reg.loss_metric == "val_loss" and reg.baseline_loss == pytest.approx(0.032)
    assert reg.epochs == 30.0
    assert reg.threshold == pytest.approx(0.995 * 0.992)
    assert reg.threshold_loss == pytest.approx(1.2 * 0.032)
    # the large regime ends at the first failure (8192), although 16384 passes again
    assert (reg.b_l, reg.b_l_first_failure, reg.b_h, reg.b_f) == (4096, 8192, 16384, 60000)
    assert not reg.b_l_uncertain and not reg.b_h_uncertain
    regimes = {row.batch_size: row.regime for row in reg.per_batch}
    assert regimes == {256: LARGE, 1024: LARGE, 4096: LARGE, 8192: RECOVERABLE, 16384: RECOVERABLE, 32768: HUGE,
                       60000: FULL}


def test_per_batch_rows(reg):
    rows = {row.batch_size: row for row in reg.per_batch}
    assert rows[1024].baseline.value.ci == pytest.approx(T2 * 0.001 / math.sqrt(3))
    assert rows[1024].keeps_baseline and rows[1024].inside_noise is False
    assert rows[8192].keeps_baseline is False and rows[8192].reaches
    assert rows[16384].keeps_baseline is True  # passes again, but outside the large regime
    assert (rows[4096].n_runs, rows[4096].n_incomplete, rows[4096].baseline.value.n) == (4, 1, 3)
    # best-of-tuning: the (2.0, 1 warmup) point at 8192, chosen from 2 points, not the 60-epoch one
    best = rows[8192].best
    assert (best.rung, best.tuned, best.peak_lr, best.warmup_epochs, best.n_points) == ("+lars", True, 2.0, 1.0, 2)
    assert best.epochs == 30.0 and best.value.mean == pytest.approx(0.990)
    # all-diverged batches: mean 0, counted, no crash
    assert rows[32768].baseline.value.mean == 0.0 and rows[32768].baseline.loss.mean == math.inf
    assert (rows[32768].n_diverged, rows[16384].n_diverged, rows[60000].n_diverged) == (4, 3, 3)
    assert rows[32768].reaches is False and rows[32768].best.value.mean == pytest.approx(0.955)


def test_to_dict_is_strict_json(reg):
    text = json.dumps(reg.to_dict(), allow_nan=False)  # inf losses of diverged seeds became null
    d = json.loads(text)
    assert (d["b_l"], d["b_h"], d["b_f"]) == (4096, 16384, 60000)
    assert d["per_batch"][5]["baseline"]["loss"]["mean"] is None


def _noisy(second_accs, second_losses=(0.032, 0.032, 0.032)):
    return (seeds("sgd", 256, [0.990, 0.992, 0.994], [0.030, 0.032, 0.034])
            + seeds("sgd", 512, list(second_accs), list(second_losses)))


def test_inside_the_noise_makes_b_l_and_b_h_uncertain():
    # 512 fails (mean .985 < .98704) but its CI .985 +/- t*.005/sqrt(3) = +/- .0124 contains the threshold
    reg = identify_regimes(_noisy([0.980, 0.985, 0.990]), dataset_size=60000)
    row = reg.per_batch[1]
    assert row.baseline.value.ci == pytest.approx(T2 * 0.005 / math.sqrt(3))
    assert row.keeps_baseline is False and row.inside_noise is True
    assert (reg.b_l, reg.b_h) == (256, 256) and reg.b_l_uncertain and reg.b_h_uncertain
    # the same mean with tight seeds is a sure failure
    sure = identify_regimes(_noisy([0.979, 0.980, 0.981]), dataset_size=60000)  # .980 +/- .0025
    assert sure.per_batch[1].inside_noise is False and not sure.b_l_uncertain and not sure.b_h_uncertain


def test_loss_criterion_ends_large_regime_but_not_b_h():
    reg = identify_regimes(_noisy([0.991, 0.991, 0.991], [0.05, 0.05, 0.05]), dataset_size=60000)
    assert (reg.b_l, reg.b_h) == (256, 512)
    assert reg.per_batch[1].keeps_baseline is False and reg.per_batch[1].regime == RECOVERABLE


def test_single_seed_noise_unknown_and_loss_fallback():
    recs = [rec("sgd", 256, 0, 0.99), rec("sgd", 512, 0, 0.97)]
    recs[1] = replace(recs[1], val_loss=None)
    assert choose_loss_metric(recs) == "test_loss"
    reg = identify_regimes(recs, dataset_size=1024)
    assert reg.loss_metric == "test_loss" and reg.per_batch[1].inside_noise is None
    assert reg.b_l == 256 and not reg.b_l_uncertain and any("single seed" in n for n in reg.notes)


def test_baseline_rung_parameter_and_errors():
    recs = study_records()
    lars = identify_regimes(recs, dataset_size=60000, baseline_rung="+lars")
    assert lars.baseline_value == pytest.approx(0.986) and lars.b_l == 256  # +lars untuned tried only at 256
    with pytest.raises(NoBaselineError, match="nope"):
        identify_regimes(recs, dataset_size=60000, baseline_rung="nope")
    with pytest.raises(NoBaselineError):
        identify_regimes(seeds("sgd", 256, [None, None, None]), dataset_size=60000)


def test_steps_to_target_and_perfect_scaling():
    steps = steps_to_target(study_records())
    assert steps[("sgd", 256)] == 3100 and steps[("sgd", 8192)] is None
    assert steps[("sgd", 16384)] == 160  # median of 150, 160, never
    assert steps[("+lars", 8192)] == 110 and steps[("+lars", 16384)] == 70 and steps[("+lars", 32768)] is None
    # fewest steps over the search (Shallue et al.) vs the best-accuracy point
    recs = (seeds("sgd", 512, [0.99, 0.99, 0.99], steps=[100, 100, 100], tuned=True, lr=0.1)
            + seeds("sgd", 512, [0.98, 0.98, 0.98], steps=[50, 60, 70], tuned=True, lr=0.4))
    assert steps_to_target(recs)[("sgd", 512)] == 60
    assert steps_to_target(recs, select="metric")[("sgd", 512)] == 100
    # the untuned point is part of the search: tuned points that never reach do not hide it
    recs = (seeds("sgd", 512, [0.99, 0.99, 0.99], steps=[80, 90, 85])
            + seeds("sgd", 512, [None, None, None], tuned=True, lr=0.8))
    assert steps_to_target(recs)[("sgd", 512)] == 85 and steps_to_target(recs, select="metric")[("sgd", 512)] == 85
    assert perfect_scaling(3100, 256, [256, 1024, 8192]) == [3100, 775, 96.875]


def test_aggregate_keys_epochs_separately():
    groups = [g for g in aggregate(study_records()) if g.rung == "+lars" and g.batch_size == 8192]
    assert sorted(g.epochs for g in groups) == [30.0, 60.0]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return write_report(study_records(), out / "r", dataset_size=60000)


def test_write_report_files(report):
    out = report.parent
    assert report.name == "report.md"
    for name in ("accuracy_vs_batch.png", "steps_to_target.png", "heatmap_plus_lars.png", "ladder.png",
                 "train_longer.png"):
        data = (out / name).read_bytes()
        assert len(data) > 1000 and data[:8] == PNG, name
    text = report.read_text()
    assert "B_L = 4096" in text and "B_H = 16384" in text and "B_F = 60000" in text
    assert "first failure at B=8192" in text and "large-with-tuning" in text and "[2K, 8K]" in text
    for name in ("accuracy_vs_batch.png", "ladder.png", "heatmap_plus_lars.png"):
        assert f"]({name})" in text
    assert "skipped" not in text
    regimes = json.loads((out / "regimes.json").read_text())
    assert regimes["b_l"] == 4096 and "Infinity" not in (out / "regimes.json").read_text()


def test_trials_csv_schema_order(report):
    lines = (report.parent / "trials.csv").read_text().splitlines()
    assert lines[0].split(",") == list(FIELDS)
    assert len(lines) == 1 + len(study_records())


def test_report_degrades_without_steps_or_baseline(tmp_path):
    recs = _noisy([0.980, 0.985, 0.990])  # no steps_to_target, no tuned records, one rung
    text = write_report(recs, tmp_path / "a", dataset_size=60000).read_text()
    assert "steps_to_target" in text and "skipped" in text and "**uncertain**" in text
    assert (tmp_path / "a" / "accuracy_vs_batch.png").read_bytes()[:8] == PNG
    assert not (tmp_path / "a" / "steps_to_target.png").exists()
    dead = seeds("sgd", 256, [None, None, None]) + [rec("sgd", 512, 0, None, status="stopped")]
    text = write_report(dead, tmp_path / "b", dataset_size=60000).read_text()
    assert "No regimes could be identified" in text
    assert json.loads((tmp_path / "b" / "regimes.json").read_text())["error"]
    assert len((tmp_path / "b" / "trials.csv").read_text().splitlines()) == 5


def test_report_with_none_fields(tmp_path):
    recs = seeds("sgd", 256, [0.99, 0.98, 0.97]) + seeds("sgd", 1024, [0.97, None, 0.96], tuned=True)
    recs = [replace(r, peak_lr=None, base_lr=None, warmup_epochs=None, epochs=None, val_loss=None, test_loss=None,
                    target=None) for r in recs]
    reg = identify_regimes(recs, dataset_size=2048)
    assert reg.epochs is None and math.isnan(reg.threshold_loss) and (reg.b_l, reg.b_h) == (256, 256)
    text = write_report(recs, tmp_path, dataset_size=2048).read_text()
    assert "no tuned records with an LR" in text and "budget unknown" in text
    assert json.loads((tmp_path / "regimes.json").read_text())["threshold_loss"] is None


def test_accuracy_bars_stay_inside_the_axis():
    """A diverged seed makes the CI of a mean span far past 100%; the plotted bar is cut to [floor, 100]."""
    from largebatch.study.plots import metric_bars

    groups = aggregate([*seeds("sgd", 1024, [0.9928, None, None]), *seeds("sgd", 256, [0.9936, 0.9933, 0.9930]),
                        *seeds("lars", 16384, [0.9889, 0.9904, 0.9898])])
    by = {(g.rung, g.batch_size): g for g in groups}
    gs = [by[("sgd", 1024)], by[("sgd", 256)], by[("lars", 16384)]]
    assert 100 * gs[0].value.ci > 100  # the raw interval: mean 33% +/- > 100 points
    y, (below, above) = metric_bars(gs, 88.0, 100.0)
    assert y[0] == 88.0 and below[0] == above[0] == 0.0  # below the floor: marker only
    g = gs[2]
    mean, ci = 100 * g.value.mean, 100 * g.value.ci
    assert y[2] == pytest.approx(mean) and below[2] == pytest.approx(ci) and above[2] == pytest.approx(ci)
    assert y[1] + above[1] <= 100.0 and y[1] - below[1] >= 88.0
    wide = aggregate(seeds("sgd", 512, [0.999, 0.90, 0.999]))
    y, (below, above) = metric_bars(wide, 90.0, 100.0)
    assert y[0] + above[0] == pytest.approx(100.0) and y[0] - below[0] == pytest.approx(90.0)  # cut at both ends


# ---------------------------------------------------------------------------------------------
# a lower-is-better metric (regression, language models): the study is decided on the loss


def loss_rec(rung, b, seed, loss, tuned=False, lr=0.1, status="completed"):
    """One regression trial record: metric "loss", lower is better; loss=None with status diverged."""
    done = status == "completed"
    return TrialRecord(study="reg", rung=rung, batch_size=b, seed=seed, tuned=tuned, peak_lr=lr, warmup_epochs=0.0,
                       epochs=10.0, status=status, metric="loss", higher_is_better=False,
                       test_metric=loss if done else None, test_loss=loss if done else None, steps=100)


def loss_records():
    """Baseline loss 0.10 at 256; 0.1005 keeps it (<= 1.01 x 0.10), 0.2 does not.

        B      sgd untuned           lars tuned       lower is better        read as accuracy
        256    .100 .100 .100                         large (B0)             large (B0)
        1024   .1005 x3                               large                  large
        4096   .2 x3   (fails)       .1005 x3         large-with-tuning      large (.2 >= .0995)
        8192   diverged x3           .2 x3            huge                   large-with-tuning -> B_H
    """
    r = [loss_rec("sgd", 256, s, 0.100) for s in range(3)]
    r += [loss_rec("sgd", 1024, s, 0.1005) for s in range(3)]
    r += [loss_rec("sgd", 4096, s, 0.2) for s in range(3)]
    r += [loss_rec("lars", 4096, s, 0.1005, tuned=True, lr=2.0) for s in range(3)]
    r += [loss_rec("sgd", 8192, s, None, status="diverged") for s in range(3)]
    r += [loss_rec("lars", 8192, s, 0.2, tuned=True, lr=4.0) for s in range(3)]
    return r


def test_lower_is_better_metric_keeps_within_one_percent():
    reg = identify_regimes(loss_records(), dataset_size=60000)
    assert (reg.metric, reg.higher_is_better, reg.tolerance, reg.loss_criterion) == ("loss", False, 0.01, False)
    assert reg.baseline_value == pytest.approx(0.1) and reg.threshold == pytest.approx(0.101)
    assert math.isnan(reg.threshold_loss)  # the metric is the loss: no separate 1.2 xi criterion
    assert (reg.b_l, reg.b_l_first_failure, reg.b_h, reg.b_f) == (1024, 4096, 4096, 60000)
    rows = {row.batch_size: row for row in reg.per_batch}
    assert rows[1024].keeps_baseline is True and rows[4096].keeps_baseline is False and rows[4096].reaches
    assert rows[4096].best.rung == "lars" and rows[4096].best.value.mean == pytest.approx(0.1005)  # lowest wins
    assert rows[8192].best.value.mean == pytest.approx(0.2) and rows[8192].baseline.value.mean == math.inf
    assert {b: row.regime for b, row in rows.items()} == {256: LARGE, 1024: LARGE, 4096: RECOVERABLE, 8192: HUGE}
    assert json.loads(json.dumps(reg.to_dict(), allow_nan=False))["threshold_loss"] is None


def test_the_direction_decides_the_regimes():
    """The same values read as an accuracy (higher is better) put B_L and B_H elsewhere."""
    as_acc = [replace(r, metric="accuracy", higher_is_better=True, test_accuracy=r.test_metric, test_loss=None)
              for r in loss_records()]
    reg = identify_regimes(as_acc, dataset_size=60000)
    assert reg.threshold == pytest.approx(0.995 * 0.1)
    assert (reg.b_l, reg.b_l_first_failure, reg.b_h) == (4096, 8192, 8192)
    assert identify_regimes(loss_records(), dataset_size=60000).b_h == 4096
    with pytest.raises(ValueError, match="mix metrics"):
        identify_regimes(as_acc + loss_records(), dataset_size=60000)


def test_a_tuned_point_beating_the_untuned_baseline_is_noted():
    """At B0 a tuned sgd point scoring 0.098 (< 0.99 x 0.10) means the recipe's LR was not tuned there; 0.0995 is
    within the tolerance and says nothing. Read as an accuracy the mirror holds: 0.1006 > 1.005 x 0.10."""
    def with_tuned(value):
        return loss_records() + [loss_rec("sgd", 256, s, value, tuned=True, lr=0.2) for s in range(3)]
    note = identify_regimes(with_tuned(0.098), dataset_size=60000).notes
    assert len(note) == 1 and "a tuned point of sgd at B0=256 (peak LR 0.2) scores 0.098" in note[0]
    assert identify_regimes(with_tuned(0.0995), dataset_size=60000).notes == []
    as_acc = [replace(r, metric="accuracy", higher_is_better=True) for r in with_tuned(0.1006)]
    assert "scores 0.1006" in identify_regimes(as_acc, dataset_size=60000).notes[0]
    as_acc = [replace(r, metric="accuracy", higher_is_better=True) for r in with_tuned(0.1004)]
    assert identify_regimes(as_acc, dataset_size=60000).notes == []


def test_the_untuned_scaling_rule_is_read_from_the_records():
    """peak = base x (B / ref) is linear, x sqrt(B / ref) sqrt, x 1 none; tuned points and records without the
    numbers say nothing; two rules at once are mixed."""
    from largebatch.study.regimes import scaling_rule

    def untuned(b, peak, tuned=False):
        return replace(loss_rec("sgd", b, 0, 0.1, tuned=tuned), base_lr=0.1, reference_batch=256, peak_lr=peak)
    assert scaling_rule([untuned(256, 0.1), untuned(1024, 0.4), untuned(1024, 7.0, tuned=True)]) == "linear"
    assert scaling_rule([untuned(256, 0.1), untuned(1024, 0.2)]) == "sqrt"
    assert scaling_rule([untuned(1024, 0.1)]) == "none"
    assert scaling_rule([untuned(1024, 0.4), untuned(4096, 0.4)]) == "mixed"
    assert scaling_rule(loss_records()) == "linear"  # no base_lr in them: nothing to tell
    assert identify_regimes([untuned(r.batch_size, 0.1 * (r.batch_size / 256) ** 0.5) if not r.tuned else r
                             for r in loss_records()], dataset_size=60000).lr_scaling == "sqrt"


def test_lower_is_better_steps_and_tolerance():
    recs = ([replace(r, steps_to_target=s) for r, s in zip(loss_records()[:3], (300, 310, 320))]
            + [replace(r, tuned=True, peak_lr=0.4, test_metric=0.09, steps_to_target=500) for r in loss_records()[:3]])
    assert steps_to_target(recs)[("sgd", 256)] == 310  # fewest steps
    assert steps_to_target(recs, select="metric")[("sgd", 256)] == 500  # the lowest loss
    strict = identify_regimes(loss_records(), dataset_size=60000, tolerance=0.001)  # 0.1005 > 1.001 x 0.1
    assert (strict.b_l, strict.b_h) == (256, 256)


def test_report_of_a_loss_study(tmp_path):
    recs = [replace(r, steps_to_target=100 * r.seed + r.batch_size // 64, target=0.11)
            if r.status == "completed" else r for r in loss_records()]
    text = write_report(recs, tmp_path, dataset_size=60000).read_text()
    assert "- Metric: test loss, lower is better; a batch keeps the baseline A when its mean is at most 1.01 A" in text
    assert "A = 0.1 +/- 0" in text and "1.01 A = 0.101" in text and "xi" not in text.split("## Plots")[0]
    assert "B_L = 1024" in text and "B_H = 4096" in text and "mean loss +/- 95% CI" in text
    assert "You et al. 2020 report for MNIST" not in text and "Steps to 0.11 vs batch size" in text
    assert "at most 1.01 A (a relative tolerance of 0.01), which stands in for the 1.2 xi loss criterion" in text
    for name in ("loss_vs_batch.png", "steps_to_target.png", "heatmap_lars.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG, name
    assert not (tmp_path / "accuracy_vs_batch.png").exists()


def test_a_loss_study_is_decided_on_the_validation_loss_when_every_run_has_one(tmp_path):
    """Validation and test disagree at 1024 (val 0.1005 keeps A = 0.10, test 0.2 does not): with a validation value on
    every completed record a loss study follows it; one record without one puts the whole study back on test; an
    accuracy study stays on test."""
    val = [replace(r, val_metric=r.test_metric, val_loss=r.test_loss) for r in loss_records()]
    val = [replace(r, test_metric=0.2, test_loss=0.2) if r.batch_size == 1024 else r for r in val]
    assert choose_split(val) == "val" and choose_split(loss_records()) == "test"
    reg = identify_regimes(val, dataset_size=60000)
    assert (reg.split, reg.b_l, reg.b_l_first_failure, reg.b_h) == ("val", 1024, 4096, 4096)
    on_test = identify_regimes(val[:-1] + [replace(val[-1], val_metric=None)], dataset_size=60000)
    assert (on_test.split, on_test.b_l, on_test.b_l_first_failure) == ("test", 256, 1024)
    as_acc = [replace(r, metric="accuracy", higher_is_better=True) for r in val]
    assert choose_split(as_acc) == "test" and identify_regimes(as_acc, dataset_size=60000).split == "test"
    text = write_report(val, tmp_path, dataset_size=60000).read_text()
    assert "- Metric: validation loss, lower is better" in text and "the final validation (every run has one" in text


# ---------------------------------------------------------------------------------------------
# the committed MNIST study


def test_committed_mnist_study_report_reproduces_from_its_trials_csv(tmp_path):
    """benchmarks/results/mnist-study: its trials.csv (written before records had a metric) gives the same
    report.md, byte for byte, and the same regime numbers as its regimes.json (written under older key names)."""
    from pathlib import Path

    from largebatch.study.record import read_csv

    committed = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "mnist-study"
    records = read_csv(committed / "trials.csv")
    assert len(records) == 85 and {(r.metric, r.higher_is_better) for r in records} == {("accuracy", True)}
    write_report(records, tmp_path, dataset_size=60000, target=0.99)
    assert (tmp_path / "report.md").read_text() == (committed / "report.md").read_text()
    new, old = (json.loads((d / "regimes.json").read_text()) for d in (tmp_path, committed))
    assert (new["b_l"], new["b_h"], new["b_f"], new["b_l_first_failure"]) == (256, 16384, 60000, 1024)
    for k in ("b_l", "b_h", "b_f", "b_l_uncertain", "b_h_uncertain", "b_l_first_failure", "baseline_batch",
              "baseline_rung", "baseline_loss", "threshold_loss", "loss_metric", "epochs", "notes"):
        assert new[k] == old[k], k
    assert (new["baseline_value"], new["threshold"]) == (old["baseline_accuracy"], old["threshold_accuracy"])
    calls = ("batch_size", "regime", "keeps_baseline", "reaches", "inside_noise", "n_runs", "n_diverged")
    assert ([[row[k] for k in calls] for row in new["per_batch"]]
            == [[row[k] for k in calls] for row in old["per_batch"]])
