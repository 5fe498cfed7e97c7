"""MLPerf logs: simulated runs through the installed compliance checker, time-to-train, logger isolation."""

import inspect
import json
import logging
import re
import time

import pytest
from mlperf_logging import mllog

from largebatch import mlperf

LINE = re.compile(r"^:::MLLOG (\{.*\})$")
LARS = dict(global_batch_size=3264, opt_name="lars", base_lr=10.5, end_lr=1e-4, decay_steps=14523, warmup_epochs=2,
            momentum=0.9, weight_decay=5e-5, train_samples=1281167, eval_samples=50000, seed=7, model_bn_span=204)
SGD = dict(LARS, opt_name="sgd", base_lr=5.1, weight_decay=1e-4)


class Clock:
    """A fake time.time: advances only when told."""

    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def simulate(path, accuracies=(0.52, 0.71, 0.7612), hyper=LARS, every=4, clock=None, **kw):
    """init (60 s), hyperparameters, one block of `every` epochs + eval per accuracy, run_stop success.

    Returns the (run_start, run_stop) times the fake clock gave."""
    clock = clock or Clock()
    log = mlperf.MLPerfLog(path, platform="1xCPU-test", clock=clock, **kw)
    log.init_start()
    log.hyperparameters(**hyper)
    clock.t += 60.0
    log.init_stop()
    log.run_start()
    t0 = clock.t
    for b, acc in enumerate(accuracies):
        first, last = b * every + 1, (b + 1) * every
        log.block_start(first, every)
        clock.t += 123.456
        log.block_stop(first)
        log.eval_start(last)
        clock.t += 7.5
        log.eval_accuracy(acc, last)
        log.eval_stop(last)
    log.run_stop(True)
    log.close()
    return t0, clock.t


def records(path):
    lines = path.read_text().splitlines()
    return [json.loads(LINE.match(line).group(1)) for line in lines]


def drop(path, out, key):
    out.write_text("".join(line + "\n" for line in path.read_text().splitlines() if f'"key": "{key}"' not in line))
    return out


def test_complete_lars_run_is_compliant_and_well_formed(tmp_path):
    path = tmp_path / "run.log"
    simulate(path)
    assert mlperf.check(path) == []
    recs = records(path)  # every line is ":::MLLOG {json}"
    assert all(set(r) == {"namespace", "time_ms", "event_type", "key", "value", "metadata"} for r in recs)
    keys = [r["key"] for r in recs]
    once = [k for k in keys if k not in {"block_start", "block_stop", "eval_start", "eval_stop", "eval_accuracy"}]
    assert len(once) == len(set(once)) and keys.count("eval_accuracy") == 3
    assert keys.index("submission_division") < keys.index("init_stop") < keys.index("run_start")
    evals = [r for r in recs if r["key"] == "eval_accuracy"]
    assert [e["metadata"]["epoch_num"] for e in evals] == [4, 8, 12]
    block = next(r for r in recs if r["key"] == "block_start")
    assert block["metadata"]["first_epoch_num"] == 1 and block["metadata"]["epoch_count"] == 4
    assert next(r for r in recs if r["key"] == "run_stop")["metadata"]["status"] == "success"
    # mllog's call site is the trainer's line, not this module's
    assert {r["metadata"]["file"] for r in recs} == {inspect.getsourcefile(simulate)}


def test_sgd_and_open_division_runs_are_compliant(tmp_path):
    simulate(tmp_path / "sgd.log", hyper=SGD)
    assert mlperf.check(tmp_path / "sgd.log") == []
    keys = {r["key"] for r in records(tmp_path / "sgd.log")}
    assert {"sgd_opt_base_learning_rate", "opt_learning_rate_warmup_epochs", "model_bn_span"} <= keys
    assert not any(k.startswith("lars_") for k in keys)
    # open division: no accuracy target, other optimizers allowed
    simulate(tmp_path / "open.log", accuracies=(0.3, 0.5), division="open",
             hyper=dict(LARS, opt_name="lamb"))
    assert mlperf.check(tmp_path / "open.log") == []
    assert "opt_base_learning_rate" in {r["key"] for r in records(tmp_path / "open.log")}


@pytest.mark.parametrize("key", ["global_batch_size", "gradient_accumulation_steps", "lars_epsilon", "opt_name",
                                 "submission_platform", "cache_clear", "train_samples", "init_stop", "run_stop",
                                 "eval_accuracy"])
def test_a_missing_key_or_event_is_flagged(tmp_path, key):
    path = tmp_path / "run.log"
    simulate(path)
    problems = mlperf.check(drop(path, tmp_path / "cut.log", key))
    assert problems and any(key in p for p in problems), problems


def test_closed_rules_flag_missed_target_percent_accuracy_and_wrong_lars_values(tmp_path):
    simulate(tmp_path / "short.log", accuracies=(0.52, 0.71, 0.7589))
    assert any("0.7590" in p for p in mlperf.check(tmp_path / "short.log"))
    simulate(tmp_path / "percent.log", accuracies=(52.0, 71.0, 76.12))
    assert mlperf.check(tmp_path / "percent.log")
    simulate(tmp_path / "end_lr.log", hyper=dict(LARS, end_lr=1e-3))
    assert any("lars_opt_end_learning_rate" in p for p in mlperf.check(tmp_path / "end_lr.log"))
    simulate(tmp_path / "sgd_lr.log", hyper=dict(SGD, base_lr=5.1234))
    assert any("sgd_opt_base_learning_rate" in p for p in mlperf.check(tmp_path / "sgd_lr.log"))


def test_division_logged_after_init_stop_fails_the_init_time_limit(tmp_path):
    path = tmp_path / "run.log"
    simulate(path)
    lines = path.read_text().splitlines()
    division = next(line for line in lines if '"submission_division"' in line)
    lines.remove(division)
    lines.insert(next(i for i, line in enumerate(lines) if '"init_stop"' in line) + 1, division)
    (tmp_path / "late.log").write_text("\n".join(lines) + "\n")
    assert any("compile_time_mins" in p for p in mlperf.check(tmp_path / "late.log"))


def test_strict_reports_a_repeated_key_the_checker_only_warns_about(tmp_path):
    path = tmp_path / "run.log"
    simulate(path)
    lines = path.read_text().splitlines()
    lines.insert(10, next(line for line in lines if '"global_batch_size"' in line))
    (tmp_path / "dup.log").write_text("\n".join(lines) + "\n")
    assert mlperf.check(tmp_path / "dup.log") == []
    assert any("global_batch_size" in p for p in mlperf.check(tmp_path / "dup.log", strict=True))


def test_time_to_train_is_run_start_to_run_stop(tmp_path):
    t0, t1 = simulate(tmp_path / "run.log")
    assert t1 - t0 == pytest.approx(3 * (123.456 + 7.5))
    assert mlperf.time_to_train(tmp_path / "run.log") == pytest.approx(t1 - t0, abs=1e-3)  # init's 60 s excluded
    with mlperf.MLPerfLog(tmp_path / "real.log", platform="x") as log:  # the wall clock
        log.run_start()
        time.sleep(0.05)
        log.run_stop(True)
    assert 0.045 <= mlperf.time_to_train(tmp_path / "real.log") < 2.0
    with pytest.raises(ValueError, match="run_stop"):
        mlperf.time_to_train(drop(tmp_path / "run.log", tmp_path / "cut.log", "run_stop"))


def test_disabled_logger_writes_nothing(tmp_path, capsys):
    log = mlperf.MLPerfLog(tmp_path / "sub" / "rank1.log", enabled=False)
    log.init_start()
    log.hyperparameters(**LARS)
    log.hyperparameters(**LARS)  # even the once-only guard is off
    log.init_stop(), log.run_start(), log.block_start(1, 4), log.eval_accuracy(0.8, 4), log.run_stop(True)
    log.event("anything", 1)
    log.close()
    assert not (tmp_path / "sub").exists()
    assert capsys.readouterr().out == ""


def test_two_logs_in_one_process_stay_separate(tmp_path, capsys):
    shared = mllog.get_mllogger().logger
    shared_handlers = list(shared.handlers)
    a = mlperf.MLPerfLog(tmp_path / "a.log", org="org-a", platform="A", clock=Clock())
    b = mlperf.MLPerfLog(tmp_path / "b.log", org="org-b", platform="B", clock=Clock())
    for log in (a, b, a, b):  # interleaved
        log.event("marker", log.submission["submission_org"])
    a.close(), b.close()
    simulate(tmp_path / "c.log", org="org-c")  # a later run, same process
    simulate(tmp_path / "d.log", org="org-d")
    a_lines = (tmp_path / "a.log").read_text().splitlines()
    assert [r["value"] for r in records(tmp_path / "a.log")] == ["org-a", "org-a"]
    assert [r["value"] for r in records(tmp_path / "b.log")] == ["org-b", "org-b"]
    for name in "cd":
        lines = (tmp_path / f"{name}.log").read_text().splitlines()
        assert len(lines) == len(set(lines))  # same time, same call site: a duplicated line would be identical
        orgs = [r["value"] for r in records(tmp_path / f"{name}.log") if r["key"] == "submission_org"]
        assert orgs == [f"org-{name}"]
        assert mlperf.check(tmp_path / f"{name}.log") == []
    assert (tmp_path / "a.log").read_text().splitlines() == a_lines  # closed files untouched
    assert shared.handlers == shared_handlers and capsys.readouterr().out == ""


def test_exception_inside_the_context_aborts_the_run_once(tmp_path):
    path = tmp_path / "run.log"
    with pytest.raises(RuntimeError):
        with mlperf.MLPerfLog(path, platform="x") as log:
            log.init_start(), log.init_stop(), log.run_start()
            raise RuntimeError("diverged")
    stops = [r for r in records(path) if r["key"] == "run_stop"]
    assert [s["metadata"]["status"] for s in stops] == ["aborted"]
    log = mlperf.MLPerfLog(tmp_path / "twice.log", platform="x")
    log.run_start(), log.run_stop(True), log.run_stop(False)
    log.hyperparameters(**LARS)
    with pytest.raises(RuntimeError, match="already"):
        log.hyperparameters(**LARS)
    log.close()
    assert [r["metadata"]["status"] for r in records(tmp_path / "twice.log") if r["key"] == "run_stop"] == ["success"]


def test_checker_wrapper_survives_bad_rulesets_and_leaves_logging_alone(tmp_path, capsys):
    path = tmp_path / "run.log"
    simulate(path)
    root = logging.getLogger()
    handlers, filters = list(root.handlers), list(root.filters)
    assert any("closed_resnet.yaml" in p for p in mlperf.check(path, ruleset="4.1.0"))  # resnet rules gone in 4.1
    assert mlperf.check(path, ruleset="9.9.9") == ["mlperf-logging has no training ruleset 9.9.9"]
    assert mlperf.check(path) == []  # the checker's global queue was left clean
    assert root.handlers == handlers and root.filters == filters
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    (tmp_path / "junk.log").write_text(path.read_text() + ':::MLLOG {"not json\n')
    assert any("unparsable" in p for p in mlperf.check(tmp_path / "junk.log"))


def test_ruleset_is_the_newest_with_resnet_rules():
    assert mlperf.latest_ruleset("resnet") == mlperf.RULESET == "4.0.0"
    assert mlperf.latest_ruleset("llama31_8b") >= "5.1.0"
    with pytest.raises(ValueError):
        mlperf.latest_ruleset("no_such_benchmark")


def test_bad_submission_values_are_refused_early(tmp_path):
    with pytest.raises(ValueError, match="division"):
        mlperf.MLPerfLog(tmp_path / "x.log", division="closed-ish")
    with pytest.raises(ValueError, match="status"):
        mlperf.MLPerfLog(tmp_path / "x.log", status="internal")
    assert not (tmp_path / "x.log").exists()
