"""LARS against a per-tensor float64 transcription of the paper equations (written here, sharing no code).

With d = g + wd w and r = tc ||w|| / (||g|| + wd ||w|| + eps) (1 where a norm is 0, then bounded; 1 where the
tensor is not adapted), the three forms of Kumar et al. 2019: "scaled" (Fig. 5, MLPerf: v = m v + d;
w -= lr r v), "unscaled" (Fig. 6, You et al. 2017 Alg. 1: v = m v + lr r d; w -= v) and "timm"
(v = m v + r d; w -= lr v).
"""

import copy
import dataclasses
import itertools
import shlex

import pytest
import torch

from largebatch.optim import LARS
from largebatch.optim.lars import FORMS
from optim_driver import drive, make_groups, run

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


def reference(w0, grads, lrs, spec, *, momentum, tc, eps, nesterov, form, bounds):
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
            if adapt:
                if wn > 0 and gn > 0:
                    r = tc * wn / (gn + wd * wn + eps)
                if bounds is not None:  # the zero-norm fallback 1 is bounded too
                    r = min(max(r, bounds[0]), bounds[1])
            ratios.append(r)
            d = g + wd * w
            if form == "scaled":  # Fig. 5
                vs[i] = momentum * vs[i] + d
                ws[i] = w - lr * r * ((d + momentum * vs[i]) if nesterov else vs[i])
            elif form == "unscaled":  # Fig. 6
                vs[i] = momentum * vs[i] + lr * r * d
                ws[i] = w - ((lr * r * d + momentum * vs[i]) if nesterov else vs[i])
            else:  # timm
                vs[i] = momentum * vs[i] + r * d
                ws[i] = w - lr * ((r * d + momentum * vs[i]) if nesterov else vs[i])
        all_ratios.append(ratios)
    return ws, all_ratios


def run_lars(w0, grads, lrs, spec, **kw):
    return run(lambda groups: LARS(groups, lr=lrs[0], **kw), w0, spec, grads, lrs)


def assert_rel_close(got, want, rtol):
    for a, b in zip(got, want):
        err = (a - b).norm().item()
        assert err <= rtol * b.norm().item() + 1e-300, (err, b.norm().item())


MASKS = ["none", "split", "decay_weights_adapt_all"]
OPTIONS = list(itertools.product(FORMS, [False, True], [0.0, 0.01], MASKS, [None, (0.02, 0.2)]))


@pytest.mark.parametrize("form,nesterov,wd,masks,bounds", OPTIONS)
def test_lars_matches_reference(form, nesterov, wd, masks, bounds):
    w0, grads, lrs = problem()
    spec = group_spec(masks, wd)
    kw = dict(momentum=0.9, trust_coefficient=0.1, eps=1e-8, nesterov=nesterov, form=form,
              min_ratio=bounds[0] if bounds else None, max_ratio=bounds[1] if bounds else None)
    got, got_ratios, _ = run_lars(w0, grads, lrs, spec, **kw)
    ref_kw = dict(momentum=0.9, tc=0.1, eps=1e-8, nesterov=nesterov, form=form, bounds=bounds)
    want, want_ratios = reference(w0, grads, lrs, spec, **ref_kw)
    assert_rel_close(got, want, 1e-10)
    # last_trust_ratios is fp32: compare at fp32 precision, every step
    torch.testing.assert_close(torch.tensor(got_ratios), torch.tensor(want_ratios), rtol=2e-6, atol=0)
    if bounds is not None:  # the bounds do bind somewhere, or this case tests nothing
        flat = [r for step in want_ratios for r in step]
        assert bounds[0] in flat or bounds[1] in flat


def test_lars_without_momentum_is_the_same_scaled_sgd_in_every_form():
    """momentum = 0: w <- w - lr * r * d in all three forms, bit for bit, and no buffer is kept."""
    w0, grads, lrs = problem(1)
    spec = group_spec("split", 0.01)
    finals = []
    for form in FORMS:
        got, _, opt = run_lars(w0, grads, lrs, spec, momentum=0.0, trust_coefficient=0.1, form=form)
        want, _ = reference(w0, grads, lrs, spec, momentum=0.0, tc=0.1, eps=1e-8, nesterov=False, form=form,
                            bounds=None)
        assert_rel_close(got, want, 1e-10)
        assert all("momentum_buffer" not in s for s in opt.state.values())
        finals.append(got)
    assert all(torch.equal(a, b) for other in finals[1:] for a, b in zip(finals[0], other))


def test_weight_decay_zero_still_adapts():
    """The trap: turning weight decay off must not turn the trust ratio off."""
    w0, grads, lrs = problem(2)
    spec = [(0.0, True)] * len(SHAPES)
    got, ratios, _ = run_lars(w0, grads, lrs, spec, momentum=0.9, trust_coefficient=0.001)
    assert all(ratios[0][i] < 0.01 for i in range(len(SHAPES)) if i not in (ZERO_INIT, ZERO_GRAD))
    assert ratios[0][ZERO_INIT] == 1.0 and ratios[0][ZERO_GRAD] == 1.0
    want, _ = reference(w0, grads, lrs, spec, momentum=0.9, tc=0.001, eps=1e-8, nesterov=False, form="timm",
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


# --- the three forms under a changing LR ------------------------------------------------------------------

FORM_SHAPES = [(8, 6), (6,), (4, 3, 3)]
FORM_SPEC = [(5e-3, True), (0.0, True), (5e-3, True)]  # (weight_decay, adapt) per tensor
FORM_STEPS, WARMUP = 30, 8
# float64: <= 16 rounded operations per element and step, each off by <= 2^-53, adding up over the steps
FORM_RTOL = FORM_STEPS * 16 * 2.0 ** -53


def form_problem(lr_schedule=True):
    """30 steps of LR 2 x (linear warmup over 8 steps, then (1 - t/T)^2 decay), or constant LR 1."""
    g = torch.Generator().manual_seed(10)
    w0 = [torch.randn(s, generator=g, dtype=torch.float64) for s in FORM_SHAPES]
    grads = [[torch.randn(s, generator=g, dtype=torch.float64) * (1 + i) + 0.3 for i, s in enumerate(FORM_SHAPES)]
             for _ in range(FORM_STEPS)]
    decay = [(1 - (t - WARMUP) / (FORM_STEPS - WARMUP)) ** 2 for t in range(FORM_STEPS)]
    lrs = [2.0 * ((t + 1) / WARMUP if t < WARMUP else decay[t]) if lr_schedule else 1.0 for t in range(FORM_STEPS)]
    return w0, grads, lrs


def run_form(form, nesterov, lr_schedule=True):
    w0, grads, lrs = form_problem(lr_schedule)
    kw = dict(momentum=0.9, eps=1e-9, nesterov=nesterov)
    got, _, _ = run_lars(w0, grads, lrs, FORM_SPEC, trust_coefficient=0.02, form=form, **kw)
    want, _ = reference(w0, grads, lrs, FORM_SPEC, tc=0.02, form=form, bounds=None, **kw)
    return w0, got, want


def fp32(x):
    return torch.tensor(x, dtype=torch.float32).item()


def distance(a, b, w0):
    """The largest per-tensor distance between two final weights, relative to how far b moved from w0."""
    return max(((x - y).norm() / (y - w).norm()).item() for x, y, w in zip(a, b, w0))


@pytest.mark.parametrize("nesterov", [False, True])
def test_forms_match_float64_and_differ_under_warmup_and_decay(nesterov):
    """Each form equals its own float64 transcription; the three end far apart (>= 10% of the distance
    travelled, against a tolerance of ~5e-14), so swapping two forms fails the first assertion."""
    finals = {}
    for form in FORMS:
        w0, got, want = run_form(form, nesterov)
        assert_rel_close(got, want, FORM_RTOL)
        finals[form] = want
    for a, b in itertools.combinations(FORMS, 2):
        assert distance(finals[a], finals[b], w0) > 0.1, (a, b)


def test_unscaled_and_timm_agree_at_constant_lr_and_scaled_does_not():
    """The docstring's claim: lr in or out of the buffer matters only when lr changes; the scaled form applies
    this step's ratio to the whole history, so it differs as soon as the ratios move."""
    w0, unscaled, _ = run_form("unscaled", False, lr_schedule=False)
    _, timm, _ = run_form("timm", False, lr_schedule=False)
    _, scaled, _ = run_form("scaled", False, lr_schedule=False)
    assert distance(unscaled, timm, w0) < FORM_RTOL
    assert distance(scaled, timm, w0) > 1e-3


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bounds", [None, (0.02, 0.2)])
def test_eps_zero_with_zero_gradients_and_zero_weights(form, bounds):
    """eps = 0: ||g|| = 0 (no decay) and ||w|| = 0 give x/0 and 0/0 in the ratio; the fallback 1 (bounded)
    must be taken instead, so every weight stays finite and matches the reference."""
    w0, grads, lrs = problem(11)
    spec = group_spec("decay_weights_adapt_all", 0.01)
    lo, hi = bounds or (None, None)
    got, ratios, _ = run_lars(w0, grads, lrs, spec, momentum=0.9, trust_coefficient=0.1, eps=0.0, form=form,
                              min_ratio=lo, max_ratio=hi)
    want, want_ratios = reference(w0, grads, lrs, spec, momentum=0.9, tc=0.1, eps=0.0, nesterov=False, form=form,
                                  bounds=bounds)
    assert all(torch.isfinite(w).all() for w in got)
    assert_rel_close(got, want, 1e-10)
    fallback = fp32(1.0 if bounds is None else bounds[1])  # last_trust_ratios is fp32
    assert ratios[0][ZERO_INIT] == fallback and all(r[ZERO_GRAD] == fallback for r in ratios)


@pytest.mark.parametrize("form", FORMS)
def test_zero_init_tensor_ratio_is_bounded(form):
    """A zero-initialised adapted tensor takes the fallback ratio 1 clamped to the bounds: its first step is
    lr * max_ratio * g (float64, exact up to one rounding), not a full lr * g."""
    g = torch.Generator().manual_seed(12)
    grad = torch.randn(5, 4, generator=g, dtype=torch.float64)
    for lo, hi, want_ratio in [(None, 0.1, 0.1), (2.0, None, 2.0), (0.5, 1.5, 1.0)]:
        p = torch.zeros(5, 4, dtype=torch.float64, requires_grad=True)
        opt = LARS([p], lr=10.0, momentum=0.9, form=form, min_ratio=lo, max_ratio=hi)
        p.grad = grad.clone()
        opt.step()
        assert opt.last_trust_ratios.tolist() == [fp32(want_ratio)]
        torch.testing.assert_close(p.detach(), -10.0 * want_ratio * grad, rtol=2 * 2.0 ** -53, atol=0)


@pytest.mark.parametrize("old,form", [(True, "unscaled"), (False, "timm")])
def test_state_dict_with_lr_in_momentum_loads_as_its_form(old, form):
    """Checkpoints written before `form` existed carry `lr_in_momentum`; they resume in the form it chose."""
    w0, grads, lrs = problem(13)
    spec = group_spec("split", 0.01)
    params = [w.clone().requires_grad_(True) for w in w0]
    opt = LARS(make_groups(params, spec), lr=lrs[0], trust_coefficient=0.1, nesterov=True, form=form)
    drive(opt, params, grads[:5], lrs[:5])
    sd = copy.deepcopy(opt.state_dict())  # state_dict() shares the buffers
    for group in sd["param_groups"]:
        del group["form"]
        group["lr_in_momentum"] = old
    resumed = [p.detach().clone().requires_grad_(True) for p in params]
    other = LARS(make_groups(resumed, spec), lr=lrs[0], trust_coefficient=0.1, nesterov=True, form="scaled")
    other.load_state_dict(sd)
    assert all(g["form"] == form and "lr_in_momentum" not in g for g in other.param_groups)
    drive(opt, params, grads[5:], lrs[5:])
    drive(other, resumed, grads[5:], lrs[5:])
    assert all(torch.equal(a, b) for a, b in zip(params, resumed))


def test_mlperf_recipe_table1_overrides_parse_as_documented():
    """The seed's Table 1 rows in the imagenet-resnet50-mlperf docstring, parsed by the CLI."""
    from largebatch.cli import _parse
    from largebatch.recipes import RECIPES

    doc = RECIPES["imagenet-resnet50-mlperf"].__doc__
    rows = [line.strip() for line in doc.splitlines() if line.strip().startswith("--")]
    want = [("unscaled", 0.9, 25.0, 72.8), ("unscaled", 0.929, 18.0, 64.0)]
    assert len(rows) == len(want)
    base, _ = _parse("show-config", ["--recipe", "imagenet-resnet50-mlperf"])
    assert (base.optimizer.lars_form, base.optimizer.momentum, base.schedule.warmup_epochs, base.epochs) == \
        ("scaled", 0.9, 25.0, 72.8)
    for row, expected in zip(rows, want):
        cfg, _ = _parse("show-config", ["--recipe", "imagenet-resnet50-mlperf", *shlex.split(row)])
        assert (cfg.optimizer.lars_form, cfg.optimizer.momentum, cfg.schedule.warmup_epochs, cfg.epochs) == expected
        assert cfg.optimizer.base_lr == base.optimizer.base_lr
        assert cfg.schedule == dataclasses.replace(base.schedule, warmup_epochs=expected[2])
