"""Ghost batch norm against its definition, in float64: a plain nn.BatchNorm applied to x.split(ghost_batch)
one chunk after another, outputs concatenated (Hoffer, Hubara & Soudry 2017, Algorithm 1).

The reference shares no code with largebatch.nn.ghost_bn: it is torch's own batch norm run chunk by chunk, so
it checks the vectorised statistics, the closed-form running-stat updates and the autograd path.
"""

import pytest
import torch
from torch import nn

from largebatch.models.lenet import LeNet5BN
from largebatch.nn import GhostBatchNorm, convert_ghost_bn

C = 3
STEPS = 3
SHAPES = {"2d": (C,), "3d": (C, 5), "4d": (C, 3, 2), "4d-cl": (C, 3, 2)}
# (batch, ghost_batch): a multiple, a remainder of 2, ghost_batch >= batch, ghost_batch == batch
SIZES = [(12, 4), (14, 4), (6, 8), (6, 6)]


def make_input(kind, n, seed, dtype=torch.float64):
    """Chunks with different means and scales, so that per-chunk and whole-batch statistics differ clearly."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *SHAPES[kind]), generator=g, dtype=dtype)
    offsets = torch.linspace(-2.0, 3.0, n, dtype=dtype).view((n,) + (1,) * (x.dim() - 1))
    x = x * (1.0 + offsets.abs()) + offsets
    if kind == "4d-cl":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_()


def make_pair(kind, ghost_batch, dtype=torch.float64, **kw):
    """A GhostBatchNorm with non-trivial parameters and buffers, and a plain BatchNorm with the same state."""
    ghost = GhostBatchNorm(C, ghost_batch, dtype=dtype, **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if ghost.weight is not None:
            ghost.weight.copy_(1.0 + 0.5 * torch.randn(C, generator=g, dtype=dtype))
        if ghost.bias is not None:
            ghost.bias.copy_(torch.randn(C, generator=g, dtype=dtype))
        if ghost.running_mean is not None:
            ghost.running_mean.copy_(torch.randn(C, generator=g, dtype=dtype))
            ghost.running_var.copy_(torch.rand(C, generator=g, dtype=dtype) + 0.5)
            ghost.num_batches_tracked.fill_(2)
    bn_cls = nn.BatchNorm2d if kind.startswith("4d") else nn.BatchNorm1d
    ref = bn_cls(C, dtype=dtype, **kw)
    ref.load_state_dict(ghost.state_dict())
    return ghost, ref


def reference(bn, x, ghost_batch):
    """The definition: plain batch norm over consecutive chunks, sequential buffer updates."""
    return torch.cat([bn(c) for c in x.split(ghost_batch)])


def grads(module, x):
    return [x.grad] + [p.grad for p in (module.weight, module.bias) if p is not None]


def assert_close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def run_steps(ghost, ref, kind, n, g):
    """STEPS training steps on both; compare outputs and all gradients at each step, then the buffers."""
    for step in range(STEPS):
        x_ghost, x_ref = make_input(kind, n, seed=step), make_input(kind, n, seed=step)
        y_ghost, y_ref = ghost(x_ghost), reference(ref, x_ref, g)
        assert_close(y_ghost, y_ref)
        dy = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(100 + step), dtype=y_ref.dtype)
        (y_ghost * dy).sum().backward()
        (y_ref * dy).sum().backward()
        for a, b in zip(grads(ghost, x_ghost), grads(ref, x_ref)):
            assert_close(a, b)
        for p in ghost.parameters():
            p.grad = None
        for p in ref.parameters():
            p.grad = None
    for key, value in ref.state_dict().items():
        assert_close(ghost.state_dict()[key], value)


@pytest.mark.parametrize("kind", list(SHAPES))
@pytest.mark.parametrize("n,g", SIZES)
@pytest.mark.parametrize("momentum", [0.1, 0.7, None])
def test_training_matches_sequential_reference(kind, n, g, momentum):
    ghost, ref = make_pair(kind, g, momentum=momentum)
    run_steps(ghost, ref, kind, n, g)
    chunks = -(-n // g)
    assert int(ghost.num_batches_tracked) == 2 + STEPS * chunks


@pytest.mark.parametrize("kind", ["4d", "4d-cl"])
def test_remainder_chunk_of_one_example_with_spatial_extent(kind):
    """13 = 3*4 + 1: a last chunk of one example is legal when it has H*W > 1 values per channel."""
    ghost, ref = make_pair(kind, 4)
    run_steps(ghost, ref, kind, 13, 4)


@pytest.mark.parametrize("kw", [{"affine": False}, {"bias": False}, {"track_running_stats": False}])
def test_variants_match_reference(kw):
    ghost, ref = make_pair("4d", 4, **kw)
    run_steps(ghost, ref, "4d", 14, 4)


def test_without_running_stats_eval_uses_ghost_batches_like_reference():
    ghost, ref = make_pair("2d", 4, track_running_stats=False)
    ghost.eval(), ref.eval()
    x = make_input("2d", 14, seed=5)
    assert_close(ghost(x), reference(ref, x, 4))


def test_differs_from_whole_batch_norm():
    """Guards the reference tests against passing vacuously: chunking must change the result."""
    ghost, ref = make_pair("4d", 4)
    x = make_input("4d", 12, seed=0)
    assert (ghost(x) - ref(x)).abs().max() > 0.1
    assert (ghost.running_mean - ref.running_mean).abs().max() > 0.01


@pytest.mark.parametrize("kind", ["2d", "4d", "4d-cl"])
def test_eval_equals_batchnorm_eval(kind):
    ghost, ref = make_pair(kind, 4)
    run_steps(ghost, ref, kind, 14, 4)
    ghost.eval(), ref.eval()
    x = make_input(kind, 9, seed=7)
    assert_close(ghost(x), ref(x))
    assert_close(ghost(x[:1]), ref(x[:1]))  # a single example is fine in eval mode


def test_channels_last_output_stays_channels_last():
    ghost, _ = make_pair("4d-cl", 4)
    y = ghost(make_input("4d-cl", 14, seed=0))
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape,g", [((13, C), 4), ((1, C), 4), ((9, C, 1, 1), 2)])
def test_chunk_of_one_value_raises_like_batchnorm(shape, g):
    ghost, ref = make_pair("4d" if len(shape) == 4 else "2d", g)
    x = torch.randn(shape, dtype=torch.float64)
    with pytest.raises(ValueError):  # the kind of error nn.BatchNorm raises on the last chunk
        reference(ref, x, g)
    with pytest.raises(ValueError, match=rf"batch size {shape[0]}, ghost_batch {g}"):
        ghost(x)
    ghost.eval()
    ghost(x)  # eval mode with running statistics does not care


def test_ghost_batch_must_be_at_least_two():
    for bad in (0, 1, 2.0, True):
        with pytest.raises(ValueError, match="ghost_batch"):
            GhostBatchNorm(C, bad)
        with pytest.raises(ValueError, match="ghost_batch"):
            convert_ghost_bn(LeNet5BN(), bad)


def test_convert_lenet_bn_keeps_state_and_eval_output():
    torch.manual_seed(0)
    model = LeNet5BN()
    x = torch.randn(16, 1, 28, 28)
    model(x).sum().backward()  # one training forward: running statistics move away from their defaults
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    y_before = model(x)
    bn_params = [model.bn1.weight, model.bn3.bias]

    converted = convert_ghost_bn(model, ghost_batch=4)
    assert all(isinstance(getattr(converted, name), GhostBatchNorm) for name in ("bn1", "bn2", "bn3"))
    assert converted.bn3.ghost_batch == 4 and not converted.bn3.training
    assert converted.bn1.weight is bn_params[0] and converted.bn3.bias is bn_params[1]  # same tensors
    after = converted.state_dict()
    assert list(after) == list(before)
    for key in before:
        assert torch.equal(after[key], before[key]), key
    torch.testing.assert_close(converted(x), y_before, rtol=0, atol=0)

    converted.train()  # and in training mode the BN layers now see ghost batches: the output changes
    plain = LeNet5BN()
    plain.load_state_dict(before)
    assert (converted(x) - plain.train()(x)).abs().max() > 1e-3


def test_convert_bare_batchnorm_returns_ghost():
    bn = nn.BatchNorm1d(5, momentum=None, eps=1e-3)
    out = convert_ghost_bn(bn, 8)
    assert isinstance(out, GhostBatchNorm) and out.momentum is None and out.eps == 1e-3 and out.ghost_batch == 8
    sync = nn.SyncBatchNorm(5)
    assert convert_ghost_bn(sync, 8) is sync


def test_bf16_autocast_matches_fp32_and_batchnorm_dtype():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, C, 1)
    ghost32, _ = make_pair("4d", 4, dtype=torch.float32)
    ghost16, _ = make_pair("4d", 4, dtype=torch.float32)
    plain = nn.BatchNorm2d(C)
    x = make_input("4d", 14, seed=0, dtype=torch.float32).detach()
    y32 = ghost32(conv(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        assert h.dtype == torch.bfloat16
        y16 = ghost16(h)
        assert y16.dtype == plain(h).dtype == torch.bfloat16
        assert ghost16(x).dtype == plain(x).dtype == torch.float32  # fp32 in, fp32 out, as nn.BatchNorm2d
    y16.float().sum().backward()  # gradients flow through the bf16 path
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()
    torch.testing.assert_close(y16.float(), y32.detach(), rtol=0.05, atol=0.05)
    assert ghost16.running_mean.dtype == torch.float32
    ghost32(x)  # keep the buffer histories in step: ghost16 also saw x above
    torch.testing.assert_close(ghost16.running_mean, ghost32.running_mean, rtol=0.02, atol=0.02)
    torch.testing.assert_close(ghost16.running_var, ghost32.running_var, rtol=0.02, atol=0.02)
