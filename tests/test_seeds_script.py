"""benchmarks/seeds.py reads any task's final metric: accuracy in percent, a loss as the run reports it."""

import importlib.util
import math
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("seeds", Path(__file__).resolve().parents[1] / "benchmarks" / "seeds.py")
seeds = importlib.util.module_from_spec(spec)
spec.loader.exec_module(seeds)


def test_final_value_of_a_classifier_and_of_a_language_model():
    assert seeds.final_value({"metric": "accuracy", "test_accuracy": 0.9925}, "test") == pytest.approx(
        ("test accuracy (%)", 99.25, 2))
    assert seeds.final_value({"metric": "accuracy", "test_accuracy": None}, "test")[1] == 0.0  # diverged early
    assert seeds.final_value({"metric": "loss", "val_loss": 1.667, "test_loss": 1.65}, "val") == (
        "val loss", 1.667, 4)
    assert seeds.final_value({"metric": "loss"}, "val")[1] == math.inf


def test_describe_matches_the_t_interval():
    d = seeds.describe([1.0, 2.0, 3.0])
    assert (d["n"], d["mean"], d["sd"]) == (3, 2.0, 1.0)
    assert d["ci95"] == pytest.approx(4.303 / math.sqrt(3))
