"""Batch arithmetic: splits, divisibility errors, memory-capped derivation, LR scaling, steps."""

import math

import pytest
import torch

from largebatch import batch as b
from largebatch.config import ConfigError
from largebatch.models import build_model

GiB = b.GiB


def test_explicit_micro_batch_split():
    plan = b.plan_batch(8192, world_size=2, micro_batch=1024)
    assert (plan.per_rank, plan.micro_batch, plan.accum_steps) == (4096, 1024, 4)
    assert plan.world_size * plan.accum_steps * plan.micro_batch == 8192
    assert "8192 = 2 rank(s) x 4 accumulation step(s) x micro-batch 1024" in plan.describe()


def test_world_must_divide_global_batch():
    with pytest.raises(ConfigError, match="1000 is not divisible by the world size 3"):
        b.plan_batch(1000, world_size=3)


def test_micro_batch_must_divide_per_rank_batch():
    with pytest.raises(ConfigError, match=r"micro_batch = 300 does not divide the per-rank batch 1000"):
        b.plan_batch(2000, world_size=2, micro_batch=300)


def test_memory_cap_picks_largest_fitting_divisor():
    # 60,000 examples at 1 MiB each under a 8 GiB cap with 1 GiB fixed: at most 7168 per pass.
    plan = b.plan_batch(60000, 1, 0, per_example_bytes=2**20, fixed_bytes=GiB, cap_bytes=8 * GiB)
    assert plan.micro_batch == 6000 and plan.accum_steps == 10  # largest divisor of 60000 <= 7168
    assert plan.est_step_bytes <= 8 * GiB


def test_memory_cap_too_small_and_explicit_micro_over_cap():
    with pytest.raises(ConfigError, match="too small"):
        b.plan_batch(256, 1, 0, per_example_bytes=GiB, fixed_bytes=GiB, cap_bytes=GiB)
    with pytest.raises(ConfigError, match="over batch.memory_cap_gib"):
        b.plan_batch(256, 1, 256, per_example_bytes=2**20, fixed_bytes=0, cap_bytes=2**27)


@pytest.mark.parametrize("n,limit,want", [(60000, 7168, 6000), (256, 1000, 256), (97, 50, 1), (12, 5, 4), (1, 1, 1)])
def test_largest_divisor(n, limit, want):
    assert b.largest_divisor_at_most(n, limit) == want


def test_lr_scaling_rules():
    assert b.scale_lr(0.1, 8192, 256, "linear") == pytest.approx(3.2)
    assert b.scale_lr(0.1, 8192, 256, "sqrt") == pytest.approx(0.1 * math.sqrt(32))
    assert b.scale_lr(0.1, 8192, 256, "none") == 0.1
    with pytest.raises(ConfigError):
        b.scale_lr(0.1, 8192, 256, "cubic")


def test_steps_and_epochs():
    assert b.total_steps(30, 60000, 256) == 7032  # ceil(7031.25): no example dropped
    assert b.total_steps(30, 60000, 60000) == 30  # full batch: one step per epoch
    assert b.total_steps(1, 60000, 8192) == 8
    assert b.epoch_at(7032, 60000, 256) == pytest.approx(30.0032)
    assert b.epochs_to_steps(2.5, 60000, 8192) == 18
    with pytest.raises(ConfigError, match="exceeds the training set"):
        b.total_steps(1, 60000, 65536)


def test_activation_estimate_scales_with_batch_and_is_plausible():
    model = build_model("lenet")
    x = torch.zeros(1, 1, 28, 28)
    per = b.estimate_per_example_bytes(model, x, None)
    # LeNet keeps conv1 output (20x24x24 fp32 = 46 KB) and more per example; well under 1 MB.
    assert 46_080 < per / b.BACKWARD_FACTOR < 1_000_000
    small = b.saved_activation_bytes(model, torch.zeros(8, 1, 28, 28), None)
    large = b.saved_activation_bytes(model, torch.zeros(32, 1, 28, 28), None)
    assert large / small == pytest.approx(4, rel=0.05)


def test_op_flops_count_matmuls_and_convolutions_by_their_formula():
    """LeNet-5's four priced ops on the memory probe's forward, against 2 x multiply-adds worked out by hand."""
    n = b.PROBE_BATCH
    conv1 = 2 * n * 20 * 24 * 24 * (1 * 5 * 5)  # output elements x (input channels x kernel)
    conv2 = 2 * n * 50 * 8 * 8 * (20 * 5 * 5)
    fc1, fc2 = 2 * n * 800 * 500, 2 * n * 500 * 10  # bias adds are not priced (addmm: the product alone)
    with b.OpFlops() as ops:
        b.estimate_per_example_bytes(build_model("lenet"), torch.zeros(1, 1, 28, 28), None)
    assert (ops.calls, ops.flops) == (4, conv1 + conv2 + fc1 + fc2)  # max-pool, flatten, ReLU: not counted
    assert ops.mean(256 / n) == (conv1 + conv2 + fc1 + fc2) / 4 * 256 / n  # exact: integers and a power-of-2 scale
    with b.OpFlops() as none:
        torch.relu(torch.ones(3))
    assert none.mean() is None


def test_probe_forward_falls_back_where_a_model_cannot_run_under_the_counter(monkeypatch):
    """A forward that fails under a dispatch mode (FlexAttention's higher-order op does) still gets its memory
    estimate, without an op count; so does a run that does not count (GPU)."""
    model, x = build_model("lenet"), torch.zeros(1, 1, 28, 28)
    per_example = b.estimate_per_example_bytes(model, x, None)
    assert b.probe_forward(model, x, None) == (per_example, (576_000 + 3_200_000 + 800_000 + 10_000) / 4)  # above / 16
    assert b.probe_forward(model, x, None, count_ops=False) == (per_example, None)

    def refuse(self, func, types, args=(), kwargs=None):
        raise NotImplementedError("There was no rule registered for HigherOrderOperator flex_attention")

    monkeypatch.setattr(b.OpFlops, "__torch_dispatch__", refuse)
    assert b.probe_forward(model, x, None) == (per_example, None)


def test_preferred_micro_batch_bound():
    plan = b.plan_batch(8192, 1, 0, per_example_bytes=2**10, cap_bytes=8 * GiB, prefer_at_most=1024)
    assert (plan.micro_batch, plan.accum_steps) == (1024, 8)
    assert b.plan_batch(60000, prefer_at_most=1024).micro_batch == 1000
    assert b.plan_batch(8191, prefer_at_most=1024).micro_batch == 8191  # prime: the bound would force 1
    assert b.plan_batch(512, prefer_at_most=1024).micro_batch == 512


def test_memory_probe_leaves_batch_norm_statistics_alone():
    import torch

    from largebatch.batch import estimate_per_example_bytes
    from largebatch.models import build_model

    model = build_model("lenet-bn")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert estimate_per_example_bytes(model, torch.randn(1, 1, 28, 28), None) > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("dtype, micro_batch", [("fp32", 512), ("bf16", 4096)])
def test_the_cpu_default_bound_follows_the_precision(tmp_path, dtype, micro_batch):
    """A derived micro-batch on CPU is kept at or below 512 in fp32 and 4,096 in bf16 (`CPU_MICRO_BATCH`), through a
    real run of global batch 8192 (one step of a linear model on 8,192 random 1x8x8 images); an explicit
    `micro_batch_limit` overrides it."""
    import json

    from torch import nn

    from largebatch import train
    from largebatch.config import (BatchConfig, EvalConfig, OptimizerConfig, OutputConfig, PrecisionConfig,
                                   RunConfig)
    from largebatch.data import Splits

    assert b.cpu_micro_batch(torch.bfloat16 if dtype == "bf16" else None) == micro_batch
    x, y = torch.randn(8192, 1, 8, 8), torch.randint(0, 4, (8192,))
    for limit, expected in ((-1, micro_batch), (2048, 2048)):
        cfg = RunConfig(epochs=1, device="cpu", precision=PrecisionConfig(dtype),
                        batch=BatchConfig(global_batch=8192, micro_batch_limit=limit), eval=EvalConfig(every_epochs=0),
                        optimizer=OptimizerConfig(name="sgd", base_lr=0.01, reference_batch=8192),
                        output=OutputConfig(dir=str(tmp_path), name=f"{dtype}{limit}", progress=False))
        train(cfg, model=lambda num_classes, in_channels: nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes)),
              data=Splits(train=(x, y), test=(x[:64], y[:64]), keywords={"num_classes": 4, "in_channels": 1}))
        env = json.loads((tmp_path / f"{dtype}{limit}" / "env.json").read_text())
        assert (env["micro_batch"], env["accum_steps"]) == (expected, 8192 // expected)
