"""The step driver shared by the equation-level optimizer tests (test_optim_lars/lamb/layerwise.py).

Not a test module: imported as `from optim_driver import ...`, which works because tests/ has no __init__.py
and pytest's default "prepend" import mode puts tests/ on sys.path.
"""


def make_groups(params, spec):
    """One param group per distinct (weight_decay, adapt) in spec (one entry per param), in first-seen order."""
    groups = {}
    for p, (wd, adapt) in zip(params, spec):
        groups.setdefault((wd, adapt), {"params": [], "weight_decay": wd, "adapt": adapt})["params"].append(p)
    return list(groups.values())


def load_step(opt, params, gs, lr):
    """Set each param's gradient (a copy of gs) and every group's lr, ready for opt.step()."""
    for p, g in zip(params, gs):
        p.grad = g.clone()
    for group in opt.param_groups:
        group["lr"] = lr


def drive(opt, params, grads, lrs):
    """Step opt once per (grads, lr) pair; return each step's last_trust_ratios in the order of params."""
    order = [id(p) for group in opt.param_groups for p in group["params"]]  # the order of last_trust_ratios
    ratios = []
    for gs, lr in zip(grads, lrs):
        load_step(opt, params, gs, lr)
        opt.step()
        by_id = dict(zip(order, opt.last_trust_ratios.tolist()))
        ratios.append([by_id[id(p)] for p in params])
    return ratios


def run(make_opt, w0, spec, grads, lrs):
    """Fresh params from w0, grouped by spec, stepped by make_opt(groups) through grads and lrs.

    Returns (final weights, per-step ratios in param order, the optimizer)."""
    params = [w.clone().requires_grad_(True) for w in w0]
    opt = make_opt(make_groups(params, spec))
    ratios = drive(opt, params, grads, lrs)
    return [p.detach() for p in params], ratios, opt
