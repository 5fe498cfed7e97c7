"""LARS against a per-tensor float64 transcription of the paper equations (written here, sharing no code).

You, Gitman & Ginsburg 2017, Algorithm 1 ("inside": v = m v + lr r (g + wd w); w -= v) and the MLPerf-0.6 /
torch-SGD form ("outside": v = m v + r (g + wd w); w -= lr v), r = tc ||w|| / (||g|| + wd ||w|| + eps),
bounded, 1 where a norm is 0 or the tensor is not adapted.
"""

import itertools

import pytest
import torch

from largebatch.optim import LARS
from optim_driver import run

# shapes: a weight, a 1-D bias, a zero-initialised conv weight, a tensor whose gradient is always 0, a 1-D scale
SHAPES = [(6, 5), (5,), (3, 2, 3, 3), (4, 3), (7,)]
ZERO_INIT, ZERO_GRAD = 2, 3
STEPS = 20


def problem(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    w0 = [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]
    w0[ZERO_INIT].zero_()
    grads = [[torch.randn(s, generator=g, dtype=dtype) * (0.1 + i) for i, s in enumerate(SHAPES)] for _ in range(STEPS)]
    for gs in grads:
        gs[ZERO_GRAD].zero_()
    lrs = [0.5 * 0.85 ** t + 0.05 for t in range(STEPS)]  # a changing LR tells "inside" from "outside"
    return w0, grads, lrs


def group_spec(masks, wd):
    """Per tensor (weight_decay, adapt) for the mask variants."""
    if masks == "none":  # one group: everything decayed and adapted
        return [(wd, True)] * len(SHAPES)
    if masks == "split":  # MLPerf style: decay and adapt weights only
        return [(wd, True) if len(s) > 1 else (0.0, False) for s in SHAPES]
    if masks == "decay_weights_adapt_all":  # the trap's correct form: no decay on 1-D, still adapted
        return [(wd, True) if len(s) > 1 else (0.0, True) for s in SHAPES]
    raise ValueError(masks)


def reference(w0, grads, lrs, spec, *, momentum, tc, eps, nesterov, inside, bounds):
    """Plain loop over tensors and steps in float64; returns final weights and the ratios of every step."""
    ws = [w.clone() for w in w0]
    vs = [torch.zeros_like(w) for w in w0]
    all_ratios = []
    for gs, lr in zip(grads, lrs):
        ratios = []
        for i, (w, g) in enumerate(zip(ws, gs)):
            wd, adapt = spec[i]
            wn, gn = w.norm().item(), g.norm().item()
            r = 1.0
            if adapt and wn > 0 and gn > 0:
                r = tc * wn / (gn + wd * wn + eps)
                if bounds is not None:
                    r = min(max(r, bounds[0]), bounds[1])
            ratios.append(r)
            d = g + wd * w
            if inside:
                vs[i] = momentum * vs[i] + lr * r * d
                step = lr * r * d + momentum * vs[i] if nesterov else vs[i]
                ws[i] = w - step
            else:
                vs[i] = momentum * vs[i] + r * d
                step = r * d + momentum * vs[i] if nesterov else vs[i]
                ws[i] = w - lr * step
        all_ratios.append(ratios)
    return ws, all_ratios


def run_lars(w0, grads, lrs, spec, **kw):
    return run(lambda groups: LARS(groups, lr=lrs[0], **kw), w0, spec, grads, lrs)


def assert_rel_close(got, want, rtol):
    for a, b in zip(got, want):
        err = (a - b).norm().item()
        assert err <= rtol * b.norm().item() + 1e-300, (err, b.norm().item())


MASKS = ["none", "split", "decay_weights_adapt_all"]
OPTIONS = list(itertools.product([False, True], [False, True], [0.0, 0.01], MASKS,
                                 [None, (0.02, 0.2)]))


@pytest.mark.parametrize("inside,nesterov,wd,masks,bounds", OPTIONS)
def test_lars_matches_reference(inside, nesterov, wd, masks, bounds):
    w0, grads, lrs = problem()
    spec = group_spec(masks, wd)
    kw = dict(momentum=0.9, trust_coefficient=0.1, eps=1e-8, nesterov=nesterov, lr_in_momentum=inside,
              min_ratio=bounds[0] if bounds else None, max_ratio=bounds[1] if bounds else None)
    got, got_ratios, _ = run_lars(w0, grads, lrs, spec, **kw)
    ref_kw = dict(momentum=0.9, tc=0.1, eps=1e-8, nesterov=nesterov, inside=inside, bounds=bounds)
    want, want_ratios = reference(w0, grads, lrs, spec, **ref_kw)
    assert_rel_close(got, want, 1e-10)
    # last_trust_ratios is fp32: compare at fp32 precision, every step
    torch.testing.assert_close(torch.tensor(got_ratios), torch.tensor(want_ratios), rtol=2e-6, atol=0)
    if bounds is not None:  # the bounds do bind somewhere, or this case tests nothing
        flat = [r for step in want_ratios for r in step]
        assert bounds[0] in flat or bounds[1] in flat


@pytest.mark.parametrize("inside", [False, True])
def test_lars_without_momentum_is_scaled_sgd(inside):
    w0, grads, lrs = problem(1)
    spec = group_spec("split", 0.01)
    got, _, opt = run_lars(w0, grads, lrs, spec, momentum=0.0, trust_coefficient=0.1, lr_in_momentum=inside)
    want, _ = reference(w0, grads, lrs, spec, momentum=0.0, tc=0.1, eps=1e-8, nesterov=False, inside=inside,
                        bounds=None)
    assert_rel_close(got, want, 1e-10)
    assert all("momentum_buffer" not in s for s in opt.state.values())


def test_weight_decay_zero_still_adapts():
    """The trap: turning weight decay off must not turn the trust ratio off."""
    w0, grads, lrs = problem(2)
    spec = [(0.0, True)] * len(SHAPES)
    got, ratios, _ = run_lars(w0, grads, lrs, spec, momentum=0.9, trust_coefficient=0.001)
    assert all(ratios[0][i] < 0.01 for i in range(len(SHAPES)) if i not in (ZERO_INIT, ZERO_GRAD))
    assert ratios[0][ZERO_INIT] == 1.0 and ratios[0][ZERO_GRAD] == 1.0
    want, _ = reference(w0, grads, lrs, spec, momentum=0.9, tc=0.001, eps=1e-8, nesterov=False, inside=False,
                        bounds=None)
    assert_rel_close(got, want, 1e-10)


def test_lars_never_touches_grads():
    w0, grads, lrs = problem(3)
    for nesterov in (False, True):
        params = [w.clone().requires_grad_(True) for w in w0]
        opt = LARS(params, lr=0.1, weight_decay=0.01, nesterov=nesterov)
        for gs in grads[:3]:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
            assert all(torch.equal(p.grad, g) for p, g in zip(params, gs))
