"""LR schedules against hand-computed values."""

import math

import pytest

from largebatch.config import ScheduleConfig
from largebatch.schedules import build_schedule, cosine_decay, lr_multiplier, poly_decay, step_decay, warmup


def test_warmup_linear_from_zero_and_from_start_factor():
    assert [warmup(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [warmup(s, 4, start=0.2) for s in range(4)] == pytest.approx([0.4, 0.6, 0.8, 1.0])


def test_poly_and_cosine_hand_values():
    assert poly_decay(0.0) == 1.0
    assert poly_decay(0.5, power=2) == 0.25
    assert poly_decay(0.5, power=1, end=0.1) == pytest.approx(0.55)
    assert poly_decay(1.5, power=2) == 0.0  # clamped past the end
    assert cosine_decay(0.5) == pytest.approx(0.5)
    assert cosine_decay(1.0, end=0.01) == pytest.approx(0.01)
    assert cosine_decay(0.25) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)


def test_step_decay_milestones():
    assert [step_decay(s, [3, 6], 0.1) for s in (0, 2, 3, 5, 6, 9)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_warmup_then_poly():
    # 10 steps, 2 warmup: 0.5, 1.0, then (1 - (s-2)/8)^2
    got = [lr_multiplier(s, 10, warmup_steps=2, decay="poly", power=2) for s in range(10)]
    want = [0.5, 1.0] + [(1 - (s - 2) / 8) ** 2 for s in range(2, 10)]
    assert got == pytest.approx(want)
    assert got[2] == 1.0 and got[-1] == pytest.approx(1 / 64)


def test_constant_and_cosine_after_warmup():
    assert [lr_multiplier(s, 6, 1, decay="constant") for s in range(6)] == [1.0] * 6
    got = [lr_multiplier(s, 5, 1, decay="cosine") for s in range(5)]
    assert got == pytest.approx([1.0, 1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2])


def test_build_schedule_converts_epochs_to_steps():
    # 60,000 examples at batch 6,000: 10 steps per epoch; warmup 0.5 epoch = 5 steps; milestone at epoch 2 = step 20
    cfg = ScheduleConfig(warmup_epochs=0.5, decay="step", milestones=(2.0,), gamma=0.5)
    f = build_schedule(cfg, total_steps=30, dataset_size=60000, global_batch=6000)
    assert [f(s) for s in (0, 4, 5, 19, 20, 29)] == pytest.approx([0.2, 1.0, 1.0, 1.0, 0.5, 0.5])
    g = build_schedule(ScheduleConfig(warmup_steps=3, warmup_epochs=9), total_steps=30, dataset_size=60000,
                       global_batch=6000)
    assert g(0) == pytest.approx(1 / 3) and g(2) == 1.0  # warmup_steps wins over warmup_epochs
