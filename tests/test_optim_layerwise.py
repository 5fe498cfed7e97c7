"""LayerwiseAdaptive around torch optimizers, against a second plain copy of the same optimizer whose
update is rescaled here, per tensor, by tc * ||w|| / (||u|| + eps) with u = (w_after - w_before) / lr."""

import itertools

import pytest
import torch

from largebatch.optim import LayerwiseAdaptive
from largebatch.optim.layerwise import trust_ratio
from optim_driver import load_step, make_groups, run
from test_optim_lars import SHAPES, ZERO_GRAD, ZERO_INIT, assert_rel_close, group_spec, problem

BASES = {
    "sgd": lambda groups, **kw: torch.optim.SGD(groups, lr=0.1, momentum=0.9, **kw),
    "sgd_nesterov": lambda groups, **kw: torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True, **kw),
    "adagrad": lambda groups, **kw: torch.optim.Adagrad(groups, lr=0.1, **kw),
    "rmsprop": lambda groups, **kw: torch.optim.RMSprop(groups, lr=0.1, momentum=0.5, **kw),
    "adam": lambda groups, **kw: torch.optim.Adam(groups, lr=0.1, **kw),
    "adamw": lambda groups, **kw: torch.optim.AdamW(groups, lr=0.1, **kw),
}


def run_wrapped(base, w0, grads, lrs, spec, **kw):
    return run(lambda groups: LayerwiseAdaptive(BASES[base](groups, foreach=True), **kw), w0, spec, grads, lrs)[:2]


def reference(base, w0, grads, lrs, spec, *, tc, eps, bounds):
    params = [w.clone().requires_grad_(True) for w in w0]
    plain = BASES[base](make_groups(params, spec), foreach=False)
    adapt = {id(p): a for p, (_, a) in zip(params, spec)}
    all_ratios = []
    for gs, lr in zip(grads, lrs):
        load_step(plain, params, gs, lr)
        before = [p.detach().clone() for p in params]
        plain.step()
        ratios = []
        with torch.no_grad():
            for p, w in zip(params, before):
                u = (p - w) / lr
                wn, un = w.norm().item(), u.norm().item()
                r = 1.0
                if adapt[id(p)]:
                    if wn > 0 and un > 0:
                        r = tc * wn / (un + eps)
                    if bounds is not None:  # the zero-norm fallback 1 is bounded too
                        r = min(max(r, bounds[0]), bounds[1])
                ratios.append(r)
                p.copy_(w + lr * r * u)
        all_ratios.append(ratios)
    return [p.detach() for p in params], all_ratios


OPTIONS = list(itertools.product(BASES, [0.0, 0.01], ["none", "split"], [None, (0.05, 0.3)]))


@pytest.mark.parametrize("base,wd,masks,bounds", OPTIONS)
def test_layerwise_matches_reference(base, wd, masks, bounds):
    w0, grads, lrs = problem()
    lrs = [0.1 * lr for lr in lrs]
    spec = group_spec(masks, wd)
    kw = dict(trust_coefficient=0.5, eps=1e-6, min_ratio=bounds[0] if bounds else None,
              max_ratio=bounds[1] if bounds else None)
    got, got_ratios = run_wrapped(base, w0, grads, lrs, spec, **kw)
    want, want_ratios = reference(base, w0, grads, lrs, spec, tc=0.5, eps=1e-6, bounds=bounds)
    assert_rel_close(got, want, 1e-10)
    torch.testing.assert_close(torch.tensor(got_ratios), torch.tensor(want_ratios), rtol=2e-6, atol=0)
    fallback = 1.0 if bounds is None else bounds[1]  # 1, clamped to the bounds (here: the upper one)
    if spec[ZERO_GRAD][0] == 0:  # no gradient and no decay: the base proposes no change, ratio 1 (bounded)
        assert all(r[ZERO_GRAD] == torch.tensor(fallback, dtype=torch.float32).item() for r in got_ratios)
    assert want_ratios[0][ZERO_INIT] == fallback


def test_layerwise_lr_zero_changes_nothing():
    w0, grads, _ = problem(7)
    params = [w.clone().requires_grad_(True) for w in w0]
    opt = LayerwiseAdaptive(torch.optim.SGD(params, lr=0.0, momentum=0.9))
    for p, g in zip(params, grads[0]):
        p.grad = g
    opt.step()
    assert all(torch.equal(p, w) for p, w in zip(params, w0))
    assert torch.equal(opt.last_trust_ratios, torch.ones(len(SHAPES)))


def test_layerwise_is_the_base_for_bookkeeping():
    w0, grads, _ = problem(8)
    params = [w.clone().requires_grad_(True) for w in w0]
    base = torch.optim.SGD(params[:3], lr=0.1, momentum=0.9)
    opt = LayerwiseAdaptive(base, trust_coefficient=0.01)
    assert opt.param_groups is base.param_groups and opt.state is base.state and opt.defaults is base.defaults
    opt.add_param_group({"params": params[3:], "adapt": False})
    assert len(base.param_groups) == 2 and base.param_groups[1]["momentum"] == 0.9
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for gs in grads[:3]:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 3)
    sd, base_sd = opt.state_dict(), base.state_dict()
    assert sd["param_groups"] == base_sd["param_groups"]
    for k, v in base_sd["state"].items():
        assert torch.equal(sd["state"][k]["momentum_buffer"], v["momentum_buffer"])
    other = LayerwiseAdaptive(torch.optim.SGD([{"params": [w.clone() for w in w0[:3]]},
                                               {"params": [w.clone() for w in w0[3:]], "adapt": False}], lr=1.0))
    other.load_state_dict(sd)
    assert other.param_groups[0]["lr"] == base.param_groups[0]["lr"]
    assert other.param_groups[1]["adapt"] is False
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    assert "LayerwiseAdaptive" in repr(opt) and "SGD" in repr(opt)


def test_trust_ratio_zero_norm_fallback_is_bounded():
    """||w|| = 0 or ||u|| = 0: ratio 1, then the same clamp as every other ratio; never NaN or inf (eps = 0)."""
    w = torch.tensor([0.0, 2.0, 0.0, 3.0, 4.0], dtype=torch.float64)
    u = torch.tensor([1.0, 0.0, 0.0, 1.0, 100.0], dtype=torch.float64)
    assert trust_ratio(w, u).tolist() == [1.0, 1.0, 1.0, 3.0, 0.04]
    assert trust_ratio(w, u, max_ratio=0.5).tolist() == [0.5, 0.5, 0.5, 0.5, 0.04]
    assert trust_ratio(w, u, min_ratio=2.0).tolist() == [2.0, 2.0, 2.0, 3.0, 2.0]
    assert trust_ratio(w, u, 0.5, weight_decay=0.1, min_ratio=0.1, max_ratio=0.2).tolist() == \
        [0.2, 0.2, 0.2, 0.2, 0.1]


@pytest.mark.parametrize("base", ["sgd", "adagrad", "rmsprop"])
def test_layerwise_eps_zero_with_zero_gradients_and_zero_weights(base):
    """eps = 0 in the wrapper: ||u|| = 0 (a tensor the base leaves unchanged) and ||w|| = 0 divide by 0 in the
    ratio; the bounded fallback is taken, weights stay finite and match the reference. (The bases keep their
    own eps: torch's adaptive ones divide 0/0 with eps = 0, which OptimizerConfig rejects.)"""
    w0, grads, lrs = problem(16)
    lrs = [0.1 * lr for lr in lrs]
    spec = group_spec("none", 0.0)
    for bounds in (None, (0.05, 0.3)):
        lo, hi = bounds or (None, None)
        got, ratios = run_wrapped(base, w0, grads, lrs, spec, trust_coefficient=0.5, eps=0.0, min_ratio=lo,
                                  max_ratio=hi)
        want, want_ratios = reference(base, w0, grads, lrs, spec, tc=0.5, eps=0.0, bounds=bounds)
        assert all(torch.isfinite(w).all() for w in got) and torch.isfinite(torch.tensor(ratios)).all()
        assert_rel_close(got, want, 1e-10)
        torch.testing.assert_close(torch.tensor(ratios), torch.tensor(want_ratios), rtol=2e-6, atol=0)
