"""LAMB against a per-tensor float64 transcription of You et al. 2019, Algorithm 2 (sharing no code)."""

import itertools
import math

import pytest
import torch

from largebatch.optim import LAMB
from optim_driver import run
from test_optim_lars import SHAPES, ZERO_GRAD, ZERO_INIT, assert_rel_close, group_spec, problem


def reference(w0, grads, lrs, spec, *, betas, eps, bias_correction, bounds):
    b1, b2 = betas
    ws = [w.clone() for w in w0]
    ms = [torch.zeros_like(w) for w in w0]
    vs = [torch.zeros_like(w) for w in w0]
    all_ratios = []
    for t, (gs, lr) in enumerate(zip(grads, lrs), start=1):
        ratios = []
        for i, (w, g) in enumerate(zip(ws, gs)):
            wd, adapt = spec[i]
            ms[i] = b1 * ms[i] + (1 - b1) * g
            vs[i] = b2 * vs[i] + (1 - b2) * g * g
            m_hat = ms[i] / (1 - b1 ** t) if bias_correction else ms[i]
            v_hat = vs[i] / (1 - b2 ** t) if bias_correction else vs[i]
            # with eps = 0, an element whose gradients were all 0 (v = 0) has direction 0, not 0/0
            adam = torch.where(v_hat == 0, 0.0, m_hat / (v_hat.sqrt() + eps)) if eps == 0 else \
                m_hat / (v_hat.sqrt() + eps)
            u = adam + wd * w
            wn, un = w.norm().item(), u.norm().item()
            r = 1.0
            if adapt:
                if wn > 0 and un > 0:
                    r = wn / un
                if bounds is not None:  # the zero-norm fallback 1 is bounded too
                    r = min(max(r, bounds[0]), bounds[1])
            ratios.append(r)
            ws[i] = w - lr * r * u
        all_ratios.append(ratios)
    return ws, all_ratios


def run_lamb(w0, grads, lrs, spec, **kw):
    return run(lambda groups: LAMB(groups, lr=lrs[0], **kw), w0, spec, grads, lrs)


OPTIONS = list(itertools.product([0.0, 0.1], ["none", "split", "decay_weights_adapt_all"], [None, (0.5, 2.0)],
                                 [True, False], [1e-6, 1e-2]))


@pytest.mark.parametrize("wd,masks,bounds,bias_correction,eps", OPTIONS)
def test_lamb_matches_reference(wd, masks, bounds, bias_correction, eps):
    w0, grads, lrs = problem()
    lrs = [0.1 * lr for lr in lrs]
    spec = group_spec(masks, wd)
    got, got_ratios, _ = run_lamb(w0, grads, lrs, spec, betas=(0.9, 0.99), eps=eps, bias_correction=bias_correction,
                                  min_ratio=bounds[0] if bounds else None, max_ratio=bounds[1] if bounds else None)
    want, want_ratios = reference(w0, grads, lrs, spec, betas=(0.9, 0.99), eps=eps, bias_correction=bias_correction,
                                  bounds=bounds)
    assert_rel_close(got, want, 1e-10)
    torch.testing.assert_close(torch.tensor(got_ratios), torch.tensor(want_ratios), rtol=2e-6, atol=0)
    if bounds is not None:
        flat = [r for step in want_ratios for r in step]
        assert bounds[0] in flat or bounds[1] in flat


def test_lamb_weight_decay_zero_still_adapts_and_zero_norm_rule():
    w0, grads, lrs = problem(4)
    spec = [(0.0, True)] * len(SHAPES)
    _, ratios, opt = run_lamb(w0, grads, lrs, spec)
    adapted = [i for i in range(len(SHAPES)) if i not in (ZERO_INIT, ZERO_GRAD)]
    assert all(ratios[0][i] != 1.0 for i in adapted)
    assert ratios[0][ZERO_INIT] == 1.0  # ||w|| = 0 at the first step
    assert all(r[ZERO_GRAD] == 1.0 for r in ratios)  # u = 0 throughout (no decay on it)
    assert opt.state[opt.param_groups[0]["params"][0]]["step"] == len(grads)


def test_lamb_per_tensor_step_counts():
    """A tensor that misses a step keeps its own bias-correction count (as torch's Adam does)."""
    w0, grads, lrs = problem(5)
    params = [w.clone().requires_grad_(True) for w in w0]
    opt = LAMB(params, lr=0.01, weight_decay=0.01)
    for t, gs in enumerate(grads[:6]):
        for i, (p, g) in enumerate(zip(params, gs)):
            p.grad = None if (i == 0 and t % 2 == 0) else g.clone()
        opt.step()
        assert opt.last_trust_ratios.numel() == sum(p.grad is not None for p in params)
    assert opt.state[params[0]]["step"] == 3 and opt.state[params[1]]["step"] == 6
    # tensor 0 must equal a fresh LAMB that only saw its 3 gradients
    p0 = w0[0].clone().requires_grad_(True)
    solo = LAMB([p0], lr=0.01, weight_decay=0.01)
    for t in (1, 3, 5):
        p0.grad = grads[t][0].clone()
        solo.step()
    assert torch.equal(p0, params[0])
    assert math.isfinite(params[0].sum().item())


def test_lamb_never_touches_grads():
    w0, grads, _ = problem(6)
    params = [w.clone().requires_grad_(True) for w in w0]
    opt = LAMB(params, lr=0.01, weight_decay=0.01)
    for gs in grads[:3]:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(params, gs))


@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("bias_correction", [True, False])
def test_lamb_eps_zero_never_nan(wd, bias_correction):
    """eps = 0: m / sqrt(v) is 0/0 wherever the gradients were all 0 (a whole tensor, or some of its elements);
    the direction there must be 0, so the tensor's update is u = wd * w only."""
    w0, grads, lrs = problem(14)
    for gs in grads:
        gs[0][:, 2] = 0.0  # one column of tensor 0 never gets a gradient
    lrs = [0.1 * lr for lr in lrs]
    spec = [(wd, True)] * len(SHAPES)
    got, ratios, _ = run_lamb(w0, grads, lrs, spec, eps=0.0, bias_correction=bias_correction)
    want, want_ratios = reference(w0, grads, lrs, spec, betas=(0.9, 0.999), eps=0.0,
                                  bias_correction=bias_correction, bounds=None)
    assert all(torch.isfinite(w).all() for w in got)
    assert_rel_close(got, want, 1e-10)
    torch.testing.assert_close(torch.tensor(ratios), torch.tensor(want_ratios), rtol=2e-6, atol=0)
    # the zero-gradient tensor: u = wd * w, ratio ||w|| / ||wd w|| = 1 / wd, so w <- (1 - lr) w every step
    expected = w0[ZERO_GRAD] * math.prod(1 - lr for lr in lrs) if wd else w0[ZERO_GRAD]
    torch.testing.assert_close(got[ZERO_GRAD], expected, rtol=len(lrs) * 4 * 2.0 ** -53, atol=0)


def test_lamb_eps_zero_bf16_and_fp32_finite():
    """The same guard in the storage dtypes: no NaN from 0/0 in bf16 or fp32 moments."""
    for dtype in (torch.float32, torch.bfloat16):
        params = [torch.randn(6, 4).to(dtype).requires_grad_(True), torch.zeros(4, dtype=dtype, requires_grad=True)]
        opt = LAMB(params, lr=0.01, eps=0.0, weight_decay=0.01)
        for _ in range(3):
            params[0].grad = torch.zeros(6, 4, dtype=dtype)
            params[0].grad[0] = 1.0
            params[1].grad = torch.zeros(4, dtype=dtype)
            opt.step()
        assert all(torch.isfinite(p).all() for p in params)
        assert torch.isfinite(opt.last_trust_ratios).all()


def test_lamb_zero_init_ratio_is_bounded():
    """||w|| = 0 gives the fallback ratio 1, clamped to [min_ratio, max_ratio] like any other ratio."""
    p = torch.zeros(5, 4, dtype=torch.float64, requires_grad=True)
    opt = LAMB([p], lr=1.0, min_ratio=0.01, max_ratio=0.1)
    p.grad = torch.randn(5, 4, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    opt.step()
    assert opt.last_trust_ratios.tolist() == [torch.tensor(0.1, dtype=torch.float32).item()]
    # first step, bias-corrected: m_hat / sqrt(v_hat) = g / (|g| + eps)
    want = -0.1 * p.grad / (p.grad.abs() + 1e-6)
    torch.testing.assert_close(p.detach(), want, rtol=8 * 2.0 ** -53, atol=0)
