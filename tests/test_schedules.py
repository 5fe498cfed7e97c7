"""LR schedules against hand-computed values."""

import math

import pytest

from largebatch.config import ConfigError, RunConfig, ScheduleConfig, from_dict, to_dict
from largebatch.schedules import (build_schedule, cosine_decay, cyclic, epoch_starts, lr_multiplier, poly_decay,
                                  step_decay, warmup)


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


# --- cosine warmup ---------------------------------------------------------------------------

R2 = math.sqrt(2) / 2  # cos(pi/4)


def test_cosine_warmup_hand_values_and_boundaries():
    # W = 4: t = 1/4, 2/4, 3/4, 1 -> (1 - cos(pi t))/2 = (1 - R2)/2, 1/2, (1 + R2)/2, 1
    got = [warmup(s, 4, shape="cosine") for s in range(6)]
    assert got == pytest.approx([(1 - R2) / 2, 0.5, (1 + R2) / 2, 1.0, 1.0, 1.0])
    assert got[3] == 1.0  # last warmup step reaches the peak exactly
    # from 0.2: 0.2 + 0.8 x the above
    got = [warmup(s, 4, start=0.2, shape="cosine") for s in range(4)]
    assert got == pytest.approx([0.2 + 0.4 * (1 - R2), 0.6, 0.2 + 0.4 * (1 + R2), 1.0])
    assert warmup(0, 1, start=0.3, shape="cosine") == pytest.approx(1.0)  # W = 1: the only warmup step is the peak


def test_cosine_warmup_is_increasing_and_below_then_above_linear():
    cos = [warmup(s, 10, start=0.1, shape="cosine") for s in range(10)]
    lin = [warmup(s, 10, start=0.1) for s in range(10)]
    assert all(a < b for a, b in zip(cos, cos[1:]))
    assert all(c < x for c, x in zip(cos[:4], lin[:4]))  # t <= 0.4: slower start
    assert cos[4] == pytest.approx(lin[4])  # t = 0.5: both halfway
    assert all(c > x for c, x in zip(cos[5:9], lin[5:9]))  # 0.5 < t < 1: faster finish
    with pytest.raises(ValueError, match="warmup shape"):
        warmup(0, 4, shape="quadratic")


def test_cosine_warmup_then_cosine_decay():
    got = [lr_multiplier(s, 6, 2, warmup_shape="cosine", decay="cosine") for s in range(6)]
    assert got == pytest.approx([0.5, 1.0, 1.0, (1 + R2) / 2, 0.5, (1 - R2) / 2])


# --- cyclical LR -----------------------------------------------------------------------------

def test_cyclic_triangle_hand_values():
    # C = 4, low 0.2: peak 1 at cycle starts, 0.2 at mid-cycle, halfway 0.6 in between
    assert [cyclic(k, 4, low=0.2) for k in range(9)] == pytest.approx([1, 0.6, 0.2, 0.6, 1, 0.6, 0.2, 0.6, 1])
    # amplitude x 0.5 per cycle (Smith's triangular2), low 0: peaks 1, 0.5, 0.25 at k = 0, 4, 8
    assert [cyclic(k, 4, decay=0.5) for k in range(9)] == pytest.approx([1, 0.5, 0, 0.25, 0.5, 0.25, 0, 0.125, 0.25])
    # low 0.2, decay 0.5: peaks 0.2 + 0.8 x (1, 0.5, 0.25) = 1, 0.6, 0.4
    assert [cyclic(k, 4, low=0.2, decay=0.5) for k in range(9)] == pytest.approx(
        [1, 0.6, 0.2, 0.4, 0.6, 0.4, 0.2, 0.3, 0.4])
    # odd C = 3: the trough falls between steps, so the lowest value is 1/3, not 0
    assert [cyclic(k, 3) for k in range(4)] == pytest.approx([1, 1 / 3, 1 / 3, 1])


def test_cyclic_is_continuous_and_monotone_within_half_cycles():
    for low, decay in ((0.0, 1.0), (0.1, 0.5), (0.3, 0.9)):
        m = [cyclic(k, 10, low, decay) for k in range(41)]
        assert max(abs(b - a) for a, b in zip(m, m[1:])) <= (1 - low) * 2 / 10 + 1e-12  # no jump at the peaks
        assert min(m) == pytest.approx(low) and max(m) == 1.0
        for c in range(4):
            fall, rise = m[10 * c:10 * c + 6], m[10 * c + 5:10 * c + 11]
            assert all(a > b for a, b in zip(fall, fall[1:])) and all(a < b for a, b in zip(rise, rise[1:]))


def test_build_cyclic_after_warmup_epochs_to_steps():
    # 100 examples at batch 30: warmup 0.6 epoch = 2 steps, cycle 1.2 epochs = 4 steps from step 2 on
    cfg = ScheduleConfig(warmup_epochs=0.6, decay="cyclic", cycle_epochs=1.2, cycle_min=0.2)
    f = build_schedule(cfg, total_steps=14, dataset_size=100, global_batch=30)
    want = [0.5, 1.0, 1.0, 0.6, 0.2, 0.6, 1.0, 0.6, 0.2, 0.6, 1.0, 0.6, 0.2, 0.6]
    assert [f(s) for s in range(14)] == pytest.approx(want)
    assert f(1) == f(2) == f(6) == f(10) == 1.0  # last warmup step and the cycle boundaries hit the peak


def test_build_cyclic_rejects_a_cycle_shorter_than_two_steps():
    f = build_schedule(ScheduleConfig(decay="cyclic", cycle_epochs=0.5), 14, 100, 30)  # round(1.67) = 2 steps: ok
    assert [f(s) for s in range(3)] == [1.0, 0.0, 1.0]
    with pytest.raises(ConfigError) as e:
        build_schedule(ScheduleConfig(decay="cyclic", cycle_epochs=0.4), 14, 100, 30)  # round(1.33) = 1 step
    assert str(e.value).startswith("schedule.cycle_epochs = 0.4 is invalid: it is 1 step(s) at batch 30 of 100")
    assert "\n" not in str(e.value)


# --- fine- vs coarse-grained cosine ----------------------------------------------------------

def cos_at(p: float) -> float:
    return (1 + math.cos(math.pi * p)) / 2


def test_epoch_starts_when_the_batch_does_not_divide_the_data():
    # 100 examples at batch 30: epoch e starts at round(e x 10/3) = 0, 3, 7, 10, 13; 4 epochs = ceil(13.3) = 14 steps
    assert epoch_starts(14, 100, 30) == [0, 3, 7, 10, 13]
    assert epoch_starts(13, 100, 30) == [0, 3, 7, 10]
    assert epoch_starts(5, 100, 25) == [0, 4]


def test_coarse_cosine_holds_each_epoch_at_its_first_step():
    cfg = ScheduleConfig(decay="cosine", cosine_granularity="epoch")
    f = build_schedule(cfg, total_steps=14, dataset_size=100, global_batch=30)
    want = [1.0] * 3 + [cos_at(3 / 14)] * 4 + [0.5] * 3 + [cos_at(10 / 14)] * 3 + [cos_at(13 / 14)]
    assert [f(s) for s in range(14)] == pytest.approx(want)
    fine = build_schedule(ScheduleConfig(decay="cosine"), total_steps=14, dataset_size=100, global_batch=30)
    assert fine(4) == pytest.approx(cos_at(4 / 14)) and f(4) > fine(4)  # coarse lags fine inside an epoch
    assert all(f(s) == fine(s) for s in (0, 3, 7, 10, 13))  # and equals it where an epoch starts


def test_coarse_cosine_after_warmup_that_ends_mid_epoch():
    # warmup 5 steps ends inside epoch 1 (steps 3-6): that epoch holds 1.0; then (1 + cos(pi (start - 5)/9))/2
    cfg = ScheduleConfig(warmup_steps=5, decay="cosine", cosine_granularity="epoch", end_factor=0.1)
    f = build_schedule(cfg, total_steps=14, dataset_size=100, global_batch=30)
    got = [f(s) for s in range(14)]
    decayed = [0.1 + 0.9 * cos_at(p) for p in (2 / 9, 5 / 9, 8 / 9)]
    want = [0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0] + [decayed[0]] * 3 + [decayed[1]] * 3 + [decayed[2]]
    assert got == pytest.approx(want)
    after = got[5:]
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert {s for s in range(6, 14) if got[s] != got[s - 1]} == {7, 10, 13}  # changes only where an epoch starts


# --- config errors ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,field", [
    (dict(decay="poly", cosine_granularity="epoch"), "schedule.cosine_granularity"),
    (dict(cosine_granularity="epoch"), "schedule.cosine_granularity"),
    (dict(decay="cyclic"), "schedule.cycle_epochs"),
    (dict(decay="cyclic", cycle_epochs=-1.0), "schedule.cycle_epochs"),
    (dict(decay="cyclic", cycle_epochs=math.inf), "schedule.cycle_epochs"),
    (dict(decay="cyclic", cycle_epochs=math.nan), "schedule.cycle_epochs"),
    (dict(decay="cyclic", cycle_epochs=2.0, cycle_min=1.5), "schedule.cycle_min"),
    (dict(decay="cyclic", cycle_epochs=2.0, cycle_min=-0.1), "schedule.cycle_min"),
    (dict(decay="cyclic", cycle_epochs=2.0, cycle_decay=0.0), "schedule.cycle_decay"),
    (dict(decay="cyclic", cycle_epochs=2.0, cycle_decay=1.5), "schedule.cycle_decay"),
    (dict(decay="cosine", cycle_epochs=2.0), "schedule.cycle_epochs"),
    (dict(cycle_min=0.1), "schedule.cycle_min"),
    (dict(decay="step", milestones=(1.0,), cycle_decay=0.5), "schedule.cycle_decay"),
])
def test_new_schedule_fields_are_validated(kwargs, field):
    with pytest.raises(ConfigError) as e:
        RunConfig(schedule=ScheduleConfig(**kwargs))
    msg = str(e.value)
    assert msg.startswith(f"{field} = ") and "\n" not in msg and "must" in msg


@pytest.mark.parametrize("key,value", [("warmup_shape", "quadratic"), ("cosine_granularity", "batch"),
                                       ("decay", "triangular")])
def test_unknown_choices_from_a_config_file(key, value):
    with pytest.raises(ConfigError, match=f"^schedule.{key} = '{value}' is invalid: must be one of "):
        from_dict({"schedule": {key: value}})


def test_valid_new_fields_round_trip():
    cfg = RunConfig(schedule=ScheduleConfig(warmup_epochs=1, warmup_shape="cosine", decay="cyclic", cycle_epochs=2.5,
                                            cycle_min=0.1, cycle_decay=0.5))
    assert from_dict(to_dict(cfg)) == cfg
    cfg = RunConfig(schedule=ScheduleConfig(decay="cosine", cosine_granularity="epoch"))
    assert from_dict(to_dict(cfg)) == cfg
