"""The trial record: one schema (the dataclass), trials.csv round trips, old CSVs and Optuna dicts, the score."""

import dataclasses
import math

import pytest

from largebatch.config import ConfigError
from largebatch.study.record import FIELDS, REQUIRED, TrialRecord, read_csv, score, study_metric, write_csv

OLD_HEADER = ("study,rung,batch_size,seed,tuned,base_lr,reference_batch,peak_lr,warmup_epochs,epochs,status,"
              "test_accuracy,val_accuracy,val_loss,test_loss,train_loss,steps,steps_to_target,target_accuracy,"
              "wall_seconds,run_dir,lr_multiplier,message,trial")


def records():
    """A completed regression run, a diverged one, and a classification run with a validation split."""
    loss = dict(study="s", rung="sgd", batch_size=64, tuned=True, metric="loss", higher_is_better=False, epochs=2.0)
    return [
        TrialRecord(**loss, seed=0, trial=3, status="completed", lr_multiplier=0.5, base_lr=0.05, reference_batch=256,
                    peak_lr=0.0125, warmup_epochs=0.1, test_metric=0.12, val_metric=0.11, test_loss=0.12,
                    val_loss=0.11, train_loss=0.1, steps=40, steps_to_target=30, target=0.15, wall_seconds=2.5,
                    run_dir="runs/s/sgd/b64/t3-s0"),
        TrialRecord(**loss, seed=1, trial=3, status="diverged", message="loss is nan at step 3, epoch 0.1"),
        TrialRecord(study="c", rung="lars", batch_size=128, seed=0, tuned=False, status="completed", test_metric=0.9,
                    val_metric=0.88, test_accuracy=0.9, val_accuracy=0.88, message='a "quoted", comma'),
    ]


def test_fields_are_the_schema():
    assert FIELDS == tuple(f.name for f in dataclasses.fields(TrialRecord))
    assert set(REQUIRED) == {"study", "rung", "batch_size", "seed", "tuned", "status"}
    assert {"metric", "higher_is_better", "test_metric", "val_metric", "test_accuracy", "test_loss", "val_accuracy",
            "val_loss", "target"} <= set(FIELDS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        records()[0].seed = 2


def test_csv_round_trip(tmp_path):
    write_csv(records(), tmp_path / "trials.csv")
    lines = (tmp_path / "trials.csv").read_text().splitlines()
    assert lines[0].split(",") == list(FIELDS)
    back = read_csv(tmp_path / "trials.csv")
    assert back == records()  # types survive: None, bool, int, float, text with quotes and commas
    assert isinstance(back[0].steps, int) and back[1].test_metric is None and back[2].higher_is_better is True


def test_old_csv_reads_as_classification(tmp_path):
    """A trials.csv written before records had a metric: accuracy, higher is better, target_accuracy -> target."""
    row = ("mnist,sgd,256,0,False,0.1,256,0.1,3.0,30.0,completed,0.99,,,0.03,0.01,7032,2110,0.99,11.5,"
           "runs/x/t0-s0,1.0,,0")
    (tmp_path / "old.csv").write_text(f"{OLD_HEADER}\n{row}\n")
    (r,) = read_csv(tmp_path / "old.csv")
    assert (r.metric, r.higher_is_better, r.test_metric, r.val_metric) == ("accuracy", True, 0.99, None)
    assert (r.target, r.steps_to_target, r.trial, r.lr_multiplier, r.message) == (0.99, 2110, 0, 1.0, "")
    assert score(r) == 0.99


def test_old_optuna_dict_and_unknown_keys():
    old = {"study": "s", "rung": "sgd", "batch_size": 64, "seed": 0, "tuned": False, "status": "completed",
           "test_accuracy": 0.9, "val_accuracy": None, "target_accuracy": 0.5, "something_new": 1}
    r = TrialRecord.from_dict(old)
    assert (r.metric, r.test_metric, r.target) == ("accuracy", 0.9, 0.5)
    assert TrialRecord.from_dict(dataclasses.asdict(records()[0])) == records()[0]


def test_bad_csvs_are_one_line(tmp_path):
    write_csv(records(), tmp_path / "trials.csv")
    text = (tmp_path / "trials.csv").read_text()
    (tmp_path / "bad.csv").write_text(text.replace(",True,", ",yes,", 1))
    with pytest.raises(ConfigError, match=r"bad.csv:\d+: column tuned has 'yes', which is not a valid True/False"):
        read_csv(tmp_path / "bad.csv")
    (tmp_path / "int.csv").write_text(text.replace(",64,", ",sixty-four,", 1))
    with pytest.raises(ConfigError, match=r"column batch_size has 'sixty-four', which is not a valid int"):
        read_csv(tmp_path / "int.csv")
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ConfigError, match="not a trials.csv .*no column study"):
        read_csv(tmp_path / "other.csv")
    with pytest.raises(ConfigError, match="no such file"):
        read_csv(tmp_path / "missing.csv")


def test_score_follows_the_direction():
    done, diverged, acc = records()
    assert score(done) == 0.11  # validation metric first
    assert score(diverged) == math.inf  # the worst loss
    assert score(acc) == 0.88
    assert score(dataclasses.replace(acc, status="failed")) == 0.0  # the worst accuracy
    assert study_metric(records()[:2]) == ("loss", False) and study_metric([]) == ("accuracy", True)
    with pytest.raises(ValueError, match="mix metrics"):
        study_metric(records())
