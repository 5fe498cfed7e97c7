"""Diagnostics against float64 references: numpy.polyfit, flat-vector projections, hand-computed noise-scale
values, and a seeded Monte-Carlo check that the noise-scale estimators are unbiased."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from largebatch.diagnostics import NoiseScale, WeightDistance, fit_log_diffusion, gradient_snr, ratio_percentiles, \
    sq_norm

SHAPES = [(3, 4), (5,), (2, 3, 2), ()]


def random_tensors(gen, dtype=torch.float32, scale=1.0):
    return [(torch.randn(s, generator=gen, dtype=torch.float64) * scale).to(dtype) for s in SHAPES]


def flat(tensors):
    return torch.cat([t.reshape(-1).double() for t in tensors])


# ---- sq_norm ----

def test_sq_norm_matches_flat_reference_and_accumulates_in_fp32_or_fp64():
    gen = torch.Generator().manual_seed(0)
    ts = random_tensors(gen)
    got = sq_norm(ts)
    assert got.dtype == torch.float32 and got.shape == ()
    assert got.item() == pytest.approx(flat(ts).square().sum().item(), rel=1e-6)
    mixed = [ts[0].bfloat16(), ts[1]]
    assert sq_norm(mixed).dtype == torch.float32
    assert sq_norm(mixed).item() == pytest.approx(flat(mixed).square().sum().item(), rel=1e-6)
    ts64 = random_tensors(gen, torch.float64)
    assert sq_norm(ts64).dtype == torch.float64
    assert sq_norm(ts64).item() == pytest.approx(flat(ts64).square().sum().item(), rel=1e-14)
    with pytest.raises(ValueError):
        sq_norm([])


# ---- weight distance ----

def small_model(dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2, bias=False)).to(dtype)
    model[1].bias.requires_grad_(False)  # frozen: not tracked
    return model


def test_weight_distance_global_and_per_tensor():
    model = small_model()
    wd = WeightDistance(model)
    assert wd.names == ["0.weight", "0.bias", "1.weight", "2.weight"]
    assert wd.distance(model) == {"weight_distance": 0.0, **{f"weight_distance/{n}": 0.0 for n in wd.names}}
    gen = torch.Generator().manual_seed(1)
    deltas = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in deltas:
                p.add_(deltas[n])  # in place: the snapshot must be a copy
        model[1].bias.add_(100.0)  # frozen tensor: ignored
    got = wd.distance(model)
    for n, d in deltas.items():
        assert got[f"weight_distance/{n}"] == pytest.approx(d.double().norm().item(), rel=1e-6)
    assert got["weight_distance"] == pytest.approx(flat(deltas.values()).norm().item(), rel=1e-6)
    assert wd.distance(model, per_tensor=False) == {"weight_distance": pytest.approx(got["weight_distance"])}
    assert wd.norms(model).shape == (4,)


def test_weight_distance_through_a_wrapper_and_in_bf16():
    class Wrapper(nn.Module):  # stands in for DDP: parameters named "module.<name>"
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = small_model(torch.bfloat16)
    wd = WeightDistance(Wrapper(model))
    assert wd.names[0] == "0.weight" and all(w.dtype == torch.float32 for w in wd.init)
    before = [p.detach().double() for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    after = [p.detach().double() for p in model.parameters() if p.requires_grad]
    want = (flat(after) - flat(before)).norm().item()
    assert wd.distance(model)["weight_distance"] == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="trainable tensors"):
        wd.norms(nn.Linear(4, 3))


def test_fit_log_diffusion_matches_polyfit():
    rng = np.random.default_rng(0)
    t = np.array([1, 2, 5, 10, 20, 50, 100, 200, 500, 1000], dtype=np.float64)
    y = 0.3 + 1.7 * np.log(t) + rng.normal(0.0, 0.2, t.size)
    got = fit_log_diffusion(t.tolist(), y.tolist())
    b, a = np.polyfit(np.log(t), y, 1)
    residual = y - np.polyval([b, a], np.log(t))
    r2 = 1.0 - residual @ residual / np.sum((y - y.mean()) ** 2)
    assert got["a"] == pytest.approx(a, rel=1e-10) and got["b"] == pytest.approx(b, rel=1e-10)
    assert got["r2"] == pytest.approx(r2, rel=1e-10) and 0.9 < got["r2"] < 1.0
    exact = fit_log_diffusion([1, 10, 100], [2.0, 2.0 + math.log(10), 2.0 + 2 * math.log(10)])
    assert exact == pytest.approx({"a": 2.0, "b": 1.0, "r2": 1.0})
    assert fit_log_diffusion([1, 3], [4.0, 4.0]) == {"a": 4.0, "b": 0.0, "r2": 1.0}
    for steps, dists in [([0, 1, 2], [1, 2, 3]), ([5, 5], [1, 2]), ([1], [1]), ([1, 2], [1])]:
        with pytest.raises(ValueError):
            fit_log_diffusion(steps, dists)


# ---- gradient noise scale ----

def batch_sq_norms(grad_sq, trace, b_small, b_big):
    """Expected |G_B|^2 = |G|^2 + tr(Sigma)/B at both batch sizes: inputs for which the estimators are exact."""
    return torch.tensor(grad_sq + trace / b_small), torch.tensor(grad_sq + trace / b_big)


def test_noise_scale_tiny_exact_case():
    # |G_small|^2 = 5 at B=2, |G_big|^2 = 2 at B=8: |G|^2 = (8*2 - 2*5)/6 = 1, tr = (5-2)/(1/2-1/8) = 8
    scale = NoiseScale()
    assert math.isnan(scale.value()) and scale.stats() == {}
    scale.update(torch.tensor(5.0), 2, torch.tensor(2.0), 8)
    grad_sq, trace = scale.estimates()
    assert grad_sq.item() == pytest.approx(1.0) and trace.item() == pytest.approx(8.0)
    assert scale.value() == pytest.approx(8.0)  # bias correction: exact after a single update
    assert scale.stats() == pytest.approx({"noise_scale": 8.0, "grad_sq": 1.0, "trace_sigma": 8.0})
    with pytest.raises(ValueError, match="b_small=8, b_big=8"):
        scale.update(torch.tensor(5.0), 8, torch.tensor(2.0), 8)


def test_noise_scale_separate_bias_corrected_emas():
    # ema 0.5: estimates (|G|^2, tr) = (1, 8) then (4, 2). Corrected EMAs: (0.25*1 + 0.5*4)/0.75 = 3 and
    # (0.25*8 + 0.5*2)/0.75 = 4, so B_simple = 4/3 (an EMA of the per-step ratios 8 and 0.5 would give 2.5).
    scale = NoiseScale(ema=0.5)
    for grad_sq, trace in [(1.0, 8.0), (4.0, 2.0)]:
        small, big = batch_sq_norms(grad_sq, trace, 2, 8)
        scale.update(small, 2, big, 8)
    grad_sq, trace = scale.estimates()
    assert grad_sq.item() == pytest.approx(3.0) and trace.item() == pytest.approx(4.0)
    assert scale.value() == pytest.approx(4.0 / 3.0)
    assert scale.count == 2 and grad_sq.dtype == torch.float32


def test_noise_scale_estimators_unbiased_monte_carlo():
    """Per-example gradients G + N(0, Sigma) in float64; a step of 32 examples is 8 micro-batches of 4."""
    d, b_small, k, trials = 64, 4, 8, 2000
    b_big = b_small * k
    mean = torch.full((d,), 0.5, dtype=torch.float64)  # |G|^2 = 16
    var = torch.linspace(0.5, 1.5, d, dtype=torch.float64)  # tr(Sigma) = 64, B_simple = 4
    true_grad_sq, true_trace = mean.square().sum().item(), var.sum().item()
    gen = torch.Generator().manual_seed(0)
    x = mean + torch.randn(trials, k, b_small, d, generator=gen, dtype=torch.float64) * var.sqrt()
    small_sq = x.mean(2).square().sum(-1).mean(-1)  # average of |G_small|^2 over the 8 micro-batches
    big_sq = x.mean((1, 2)).square().sum(-1)
    per_trial, smoothed = [], NoiseScale(ema=0.999)
    for s, b in zip(small_sq, big_sq):
        single = NoiseScale(ema=0.0)  # no averaging: the raw estimators of this draw
        single.update(s, b_small, b, b_big)
        per_trial.append(torch.stack(single.estimates()))
        smoothed.update(s, b_small, b, b_big)
    est = torch.stack(per_trial)
    m, se = est.mean(0), est.std(0) / math.sqrt(trials)
    assert abs(m[0].item() - true_grad_sq) < 4 * se[0].item()
    assert abs(m[1].item() - true_trace) < 4 * se[1].item()
    naive_bias = big_sq.mean().item() - true_grad_sq  # |G_big|^2 alone is biased by tr(Sigma)/B_big = 2
    assert naive_bias > 4 * big_sq.std().item() / math.sqrt(trials)
    # the EMA's effective sample size sets the tolerance of its ratio
    w = 0.999 ** torch.arange(trials - 1, -1, -1, dtype=torch.float64)
    ess = (w.sum() ** 2 / w.square().sum()).item()
    rel = 4 * (est[:, 0].std().item() / true_grad_sq + est[:, 1].std().item() / true_trace) / math.sqrt(ess)
    assert smoothed.value() == pytest.approx(true_trace / true_grad_sq, rel=rel)
    assert rel < 0.15


def test_micro_batch_gradients_from_accumulated_grad_differences():
    """The recipe in the module docstring: accum * (grad after - grad before) is each micro-batch's gradient."""
    torch.manual_seed(0)
    model, accum = nn.Linear(5, 3), 4
    x, y = torch.randn(12, 5), torch.randn(12, 3)
    params = list(model.parameters())

    def grad_of(xb, yb):
        return torch.autograd.grad(nn.functional.mse_loss(model(xb), yb), params)

    prev, small, direct = None, [], []
    for xb, yb in zip(x.split(3), y.split(3)):
        (nn.functional.mse_loss(model(xb), yb) / accum).backward()
        grads = [p.grad for p in params]
        delta = grads if prev is None else torch._foreach_sub(grads, prev)
        small.append(sq_norm(delta) * accum ** 2)
        prev = [g.clone() for g in grads]
        direct.append(sq_norm(grad_of(xb, yb)))
    assert torch.allclose(torch.stack(small), torch.stack(direct), rtol=1e-5)
    assert sq_norm(grads).item() == pytest.approx(sq_norm(grad_of(x, y)).item(), rel=1e-5)


# ---- gradient SNR ----

def snr_reference(g, r):
    g, r = flat(g), flat(r)
    u = r / r.norm()
    par = (g @ u).item()
    perp = (g - par * u).norm().item()
    cosine = (g @ r / (g.norm() * r.norm())).item()
    return {"parallel": par, "perpendicular": perp, "ratio": par / perp, "cosine": cosine}


def as_floats(out):
    return {k: v.item() for k, v in out.items()}


@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-10), (torch.float32, 1e-5), (torch.bfloat16, 1e-5)])
def test_gradient_snr_matches_flat_reference(dtype, rel):
    gen = torch.Generator().manual_seed(2)
    r = random_tensors(gen, dtype)
    g = [(a.double() * 0.7 + b.double()).to(dtype) for a, b in zip(r, random_tensors(gen, dtype))]
    out = gradient_snr(g, r)
    assert {v.dtype for v in out.values()} == {torch.float64 if dtype == torch.float64 else torch.float32}
    assert as_floats(out) == pytest.approx(snr_reference(g, r), rel=rel)


def test_gradient_snr_orthogonal_and_parallel():
    gen = torch.Generator().manual_seed(3)
    r = random_tensors(gen, torch.float64)
    g = random_tensors(gen, torch.float64)
    coef = (flat(g) @ flat(r) / flat(r).square().sum()).item()
    ortho = [a - coef * b for a, b in zip(g, r)]
    got = as_floats(gradient_snr(ortho, r))
    assert got["parallel"] == pytest.approx(0.0, abs=1e-12) and got["cosine"] == pytest.approx(0.0, abs=1e-12)
    assert got["perpendicular"] == pytest.approx(flat(ortho).norm().item(), rel=1e-12)
    assert got["ratio"] == pytest.approx(0.0, abs=1e-12)
    r_norm = flat(r).norm().item()
    got = as_floats(gradient_snr([-2.5 * b for b in r], r))
    assert got["parallel"] == pytest.approx(-2.5 * r_norm, rel=1e-12) and got["cosine"] == pytest.approx(-1.0)
    assert got["perpendicular"] <= 1e-6 * r_norm and got["ratio"] < -1e5
    r32 = [b.float() for b in r]
    got = as_floats(gradient_snr([2.0 * b for b in r32], r32))  # fp32: perpendicular resolved to ~sqrt(eps)
    assert got["cosine"] == pytest.approx(1.0) and got["perpendicular"] <= 1e-3 * r_norm and got["ratio"] > 1e3


def test_gradient_snr_zero_reference_and_zero_gradient():
    gen = torch.Generator().manual_seed(4)
    g = random_tensors(gen)
    zeros = [torch.zeros_like(t) for t in g]
    got = as_floats(gradient_snr(g, zeros))  # no reference direction: everything is perpendicular
    assert got == pytest.approx({"parallel": 0.0, "perpendicular": flat(g).norm().item(), "ratio": 0.0,
                                 "cosine": 0.0}, rel=1e-6)
    assert as_floats(gradient_snr(zeros, g)) == {"parallel": 0.0, "perpendicular": 0.0, "ratio": 0.0, "cosine": 0.0}
    assert as_floats(gradient_snr(zeros, zeros)) == {"parallel": 0.0, "perpendicular": 0.0, "ratio": 0.0,
                                                     "cosine": 0.0}
    with pytest.raises(ValueError):
        gradient_snr(g, g[:-1])


# ---- trust-ratio percentiles ----

def test_ratio_percentiles_known_values():
    assert ratio_percentiles(torch.arange(11.0)) == {"trust_ratio_p0": 0.0, "trust_ratio_p10": 1.0,
                                                     "trust_ratio_p50": 5.0, "trust_ratio_p90": 9.0,
                                                     "trust_ratio_p100": 10.0}
    # linear interpolation between order statistics, whatever the input order
    got = ratio_percentiles(torch.tensor([4.0, 1.0, 3.0, 2.0]), qs=(0.1, 0.5, 0.025), prefix="r")
    assert got == pytest.approx({"r_p10": 1.3, "r_p50": 2.5, "r_p2.5": 1.075})
    assert ratio_percentiles(torch.tensor([]), qs=(0.5,)) == {}
    with pytest.raises(ValueError):
        ratio_percentiles(torch.ones(3), qs=(1.5,))
