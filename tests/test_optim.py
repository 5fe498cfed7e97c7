"""Every optimizer on the same problems (optax's table-driven habit), exact resume, the factory and the audit.

The equation-level checks against float64 references are in test_optim_lars.py, test_optim_lamb.py and
test_optim_layerwise.py.
"""

import ast
import copy
import io
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from largebatch.config import OPTIMIZERS as OPTIMIZER_NAMES
from largebatch.config import ConfigError, OptimizerConfig, from_dict
from largebatch.optim import LAMB, LARS, LayerwiseAdaptive, audit, build_optimizer, param_groups

# name -> factory(params, lr); every one must honour group["lr"] set before each step (cosine decay below)
OPTIMIZERS = {
    "sgd": lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9),
    "adam": lambda ps, lr: torch.optim.Adam(ps, lr=lr),
    "adamw": lambda ps, lr: torch.optim.AdamW(ps, lr=lr, weight_decay=1e-4),
    "adagrad": lambda ps, lr: torch.optim.Adagrad(ps, lr=lr),
    "rmsprop": lambda ps, lr: torch.optim.RMSprop(ps, lr=lr, momentum=0.5),
    "lars": lambda ps, lr: LARS(ps, lr=lr, momentum=0.9, trust_coefficient=0.01),
    "lars_inside_nesterov": lambda ps, lr: LARS(ps, lr=lr, momentum=0.9, trust_coefficient=0.01, nesterov=True,
                                                form="unscaled"),
    "lamb": lambda ps, lr: LAMB(ps, lr=lr),
    "layerwise_sgd": lambda ps, lr: LayerwiseAdaptive(torch.optim.SGD(ps, lr=lr, momentum=0.9)),
    "layerwise_adam": lambda ps, lr: LayerwiseAdaptive(torch.optim.Adam(ps, lr=lr)),
    "layerwise_adamw": lambda ps, lr: LayerwiseAdaptive(torch.optim.AdamW(ps, lr=lr, weight_decay=1e-4)),
    "layerwise_adagrad": lambda ps, lr: LayerwiseAdaptive(torch.optim.Adagrad(ps, lr=lr)),
    "layerwise_rmsprop": lambda ps, lr: LayerwiseAdaptive(torch.optim.RMSprop(ps, lr=lr, momentum=0.5)),
}


def quadratic():
    """0.5 * sum a * (W - W*)^2 + 0.5 * sum c * (b - b*)^2, condition number 10; initial loss ~360."""
    g = torch.Generator().manual_seed(0)
    w_star = torch.randn(8, 8, generator=g, dtype=torch.float64)
    b_star = torch.randn(8, generator=g, dtype=torch.float64)
    a = torch.linspace(1, 10, 64, dtype=torch.float64).view(8, 8)
    c = torch.linspace(1, 5, 8, dtype=torch.float64)
    w = torch.randn(8, 8, generator=g, dtype=torch.float64).requires_grad_(True)
    b = torch.zeros(8, dtype=torch.float64, requires_grad=True)  # zero-initialised: ratio 1 at the first step
    return [w, b], lambda: 0.5 * (a * (w - w_star) ** 2).sum() + 0.5 * (c * (b - b_star) ** 2).sum()


def rosenbrock():
    """(1 - x)^2 + 100 (y - x^2)^2 from (-1.2, 1); initial loss 24.2, minimum 0 at (1, 1)."""
    p = torch.tensor([-1.2, 1.0], dtype=torch.float64, requires_grad=True)
    return [p], lambda: (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2


# (optimizer, problem, peak lr, steps, final-loss threshold)
TABLE = [
    ("sgd", quadratic, 0.1, 200, 1e-3), ("sgd", rosenbrock, 0.003, 1000, 1e-3),
    ("adam", quadratic, 1.0, 200, 1e-3), ("adam", rosenbrock, 0.3, 1000, 1e-2),
    ("adamw", quadratic, 1.0, 200, 1e-3), ("adamw", rosenbrock, 0.3, 1000, 1e-2),
    ("adagrad", quadratic, 1.0, 200, 1e-3), ("adagrad", rosenbrock, 1.0, 1000, 1.0),  # Adagrad crawls the valley
    ("rmsprop", quadratic, 0.1, 200, 1e-3), ("rmsprop", rosenbrock, 0.03, 1000, 1e-2),
    ("lars", quadratic, 1.0, 200, 1e-3), ("lars", rosenbrock, 3.0, 1000, 1e-3),
    ("lars_inside_nesterov", quadratic, 0.3, 200, 1e-3), ("lars_inside_nesterov", rosenbrock, 3.0, 1000, 1e-3),
    # no form="scaled" rows: it multiplies the whole buffer by this step's ratio ~ 1/||g||, which grows without
    # bound as a noise-free gradient vanishes (best seen: quadratic 3e-3, rosenbrock ~1; or divergence)
    ("lamb", quadratic, 0.1, 200, 1e-3), ("lamb", rosenbrock, 0.1, 1000, 1e-2),
    ("layerwise_sgd", quadratic, 0.03, 200, 1e-3), ("layerwise_sgd", rosenbrock, 0.1, 1000, 1e-2),
    ("layerwise_adam", quadratic, 0.1, 200, 1e-3), ("layerwise_adam", rosenbrock, 0.1, 1000, 1e-2),
    ("layerwise_adamw", quadratic, 0.1, 200, 1e-3), ("layerwise_adamw", rosenbrock, 0.1, 1000, 1e-2),
    ("layerwise_adagrad", quadratic, 0.1, 200, 1e-3), ("layerwise_adagrad", rosenbrock, 0.3, 1000, 1e-2),
    ("layerwise_rmsprop", quadratic, 0.03, 200, 1e-3), ("layerwise_rmsprop", rosenbrock, 0.1, 1000, 1e-2),
]


@pytest.mark.parametrize("name,problem,lr,steps,threshold", TABLE,
                         ids=[f"{t[0]}-{t[1].__name__}" for t in TABLE])
def test_converges(name, problem, lr, steps, threshold):
    params, loss_fn = problem()
    opt = OPTIMIZERS[name](params, lr)
    initial = loss_fn().item()
    for t in range(steps):
        for group in opt.param_groups:  # the trainer's contract: group["lr"] is rewritten every step
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * t / steps))
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    final = loss_fn().item()
    assert final < threshold < initial, (name, initial, final)


# --- exact resume ----------------------------------------------------------------------------------------


class Tiny(nn.Module):
    """Two layers written with broadcasting instead of matmul: on a loaded 2-core machine every BLAS call
    pays an OpenMP wake-up, and this test is about the optimizer, not the layers."""

    def __init__(self):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(16, 6) / 6 ** 0.5), nn.Parameter(torch.zeros(16))
        self.scale = nn.Parameter(torch.ones(16))
        self.w2, self.b2 = nn.Parameter(torch.randn(3, 16) / 4), nn.Parameter(torch.zeros(3))

    def forward(self, x):
        h = torch.tanh((x[:, None, :] * self.w1).sum(-1) + self.b1) * self.scale
        return (h[:, None, :] * self.w2).sum(-1) + self.b2


def small_model(seed=0):
    torch.manual_seed(seed)
    return Tiny()


def train(model, opt, steps, start=0):
    g = torch.Generator().manual_seed(123)
    data = [(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)) for _ in range(start + steps)]
    for t in range(start, start + steps):
        for group in opt.param_groups:
            group["lr"] = 0.05 * (1 - t / 40)
        x, y = data[t]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


RESUMABLE = {
    "lars": lambda m: LARS(param_groups(m, 1e-4, "weights", "weights"), lr=0.05, trust_coefficient=0.02),
    "lars_inside": lambda m: LARS(param_groups(m, 1e-4, "weights", "all"), lr=0.05, form="unscaled",
                                  nesterov=True),
    "lars_scaled": lambda m: LARS(param_groups(m, 1e-4, "weights", "weights"), lr=0.05, form="scaled",
                                  nesterov=True),
    "lamb": lambda m: LAMB(param_groups(m, 1e-2, "weights", "all"), lr=0.05, min_ratio=0.01, max_ratio=10),
    "layerwise_sgd": lambda m: LayerwiseAdaptive(torch.optim.SGD(param_groups(m, 1e-4, "weights", "weights"),
                                                                 lr=0.05, momentum=0.9), trust_coefficient=0.02),
    "layerwise_adam": lambda m: LayerwiseAdaptive(torch.optim.Adam(param_groups(m, 0.0, "weights", "all"), lr=0.05)),
}


@pytest.mark.parametrize("name", RESUMABLE)
def test_state_dict_round_trip_continues_bit_identically(name):
    make = RESUMABLE[name]
    model_a = small_model()
    opt_a = make(model_a)
    train(model_a, opt_a, 10)
    buf = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "optimizer": opt_a.state_dict()}, buf)
    train(model_a, opt_a, 10, start=10)  # uninterrupted

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model_b = small_model(seed=99)  # different init: everything must come from the checkpoint
    model_b.load_state_dict(ckpt["model"])
    opt_b = make(model_b)
    opt_b.load_state_dict(ckpt["optimizer"])
    train(model_b, opt_b, 10, start=10)
    for (n, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), n
    assert torch.equal(opt_a.last_trust_ratios, opt_b.last_trust_ratios)


# --- precision, syncs ------------------------------------------------------------------------------------


BF16 = {
    "lars": lambda ps: LARS(ps, lr=0.1, weight_decay=1e-4, trust_coefficient=0.01),
    "lamb": lambda ps: LAMB(ps, lr=0.01, weight_decay=0.01),
    # lr 0.1: the base's bf16 step must be well above bf16 resolution (2^-8 relative) for ||Δ|| to mean much
    "layerwise_adamw": lambda ps: LayerwiseAdaptive(torch.optim.AdamW(ps, lr=0.1), trust_coefficient=0.1),
}


@pytest.mark.parametrize("name", BF16)
def test_bf16_params_smoke(name):
    g = torch.Generator().manual_seed(0)
    ref = [torch.randn(32, 16, generator=g), torch.randn(16, generator=g), torch.zeros(8, 4)]
    grads = [[torch.randn(r.shape, generator=g) for r in ref] for _ in range(5)]
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        params = [r.clone().to(dtype).requires_grad_(True) for r in ref]
        opt = BF16[name](params)
        for gs in grads:
            for p, gr in zip(params, gs):
                p.grad = gr.to(dtype)
            opt.step()
        assert all(p.dtype == dtype and torch.isfinite(p).all() for p in params)
        assert opt.last_trust_ratios.dtype == torch.float32
        runs[dtype] = (params, opt.last_trust_ratios)
    torch.testing.assert_close(runs[torch.bfloat16][1], runs[torch.float32][1], rtol=0.05, atol=0)
    for fp32, bf16 in zip(runs[torch.float32][0], runs[torch.bfloat16][0]):
        torch.testing.assert_close(bf16.float(), fp32.detach(), rtol=0.05, atol=0.05)


NO_SYNC = {
    "lars": lambda ps: LARS(ps, lr=0.1, weight_decay=1e-4, nesterov=True, min_ratio=1e-3, max_ratio=10.0),
    "lars_scaled": lambda ps: LARS(ps, lr=0.1, weight_decay=1e-4, form="scaled", eps=0.0, max_ratio=10.0),
    "lamb": lambda ps: LAMB(ps, lr=0.01, weight_decay=0.01, min_ratio=0.01, max_ratio=10.0),
    "lamb_eps0": lambda ps: LAMB(ps, lr=0.01, eps=0.0),  # the 0/0 guard must not sync either
    # SGD: torch's Adam-family read their CPU step counters with .item(), which is not ours to test
    "layerwise_sgd": lambda ps: LayerwiseAdaptive(torch.optim.SGD(ps, lr=0.1, momentum=0.9), min_ratio=0.01),
}


@pytest.mark.parametrize("name", NO_SYNC)
def test_step_makes_no_host_sync(name, monkeypatch):
    """No .item()/bool()/float() on a tensor inside step(): on CUDA each would stall the device queue."""
    params = [torch.randn(8, 4).requires_grad_(True), torch.zeros(4, requires_grad=True)]
    opt = NO_SYNC[name](params)
    for p in params:
        p.grad = torch.randn_like(p)

    def boom(*args, **kwargs):
        raise AssertionError("host sync inside step()")

    for attr in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, attr, boom)
    opt.step()
    ratios_first = opt.last_trust_ratios
    opt.step()
    monkeypatch.undo()
    assert ratios_first.shape == (2,) and ratios_first[1].item() == 1.0  # ||w|| = 0 at the first step
    assert all(torch.isfinite(p).all() for p in params)


# --- factory, masks, audit -------------------------------------------------------------------------------


def conv_model():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


@pytest.mark.parametrize("name,layerwise", [(n, False) for n in OPTIMIZER_NAMES] +
                         [(n, True) for n in OPTIMIZER_NAMES if n not in ("lars", "lamb")])
def test_build_optimizer_each_name(name, layerwise):
    model = conv_model()
    cfg = OptimizerConfig(name=name, layerwise=layerwise, weight_decay=5e-4, min_ratio=0.01, max_ratio=10.0)
    opt = build_optimizer(model, cfg, lr=0.123)
    expected = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
                "adagrad": torch.optim.Adagrad, "rmsprop": torch.optim.RMSprop, "lars": LARS, "lamb": LAMB}[name]
    inner = opt.base if layerwise else opt
    assert type(inner) is expected and isinstance(opt, torch.optim.Optimizer)
    assert isinstance(opt, LayerwiseAdaptive) == layerwise
    assert all(g["lr"] == 0.123 for g in opt.param_groups)
    # default masks: decay and adaptation on ndim > 1 tensors only, as separate keys
    for group in opt.param_groups:
        for p in group["params"]:
            assert group["weight_decay"] == (5e-4 if p.ndim > 1 else 0.0)
            assert group["adapt"] == (p.ndim > 1)
    x = torch.randn(2, 3, 8, 8)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    table = audit(model, opt)
    for n, _ in model.named_parameters():
        assert n in table


def test_build_optimizer_maps_config_fields():
    model = conv_model()
    opt = build_optimizer(model, OptimizerConfig(name="lars", momentum=0.8, nesterov=True, trust_coefficient=0.02,
                                                 lars_form="scaled", eps=1e-9, min_ratio=0.1), lr=1.0)
    g = opt.param_groups[0]
    assert (g["momentum"], g["nesterov"], g["trust_coefficient"], g["form"], g["eps"], g["min_ratio"]) == \
        (0.8, True, 0.02, "scaled", 1e-9, 0.1)
    assert build_optimizer(model, OptimizerConfig(name="lars"), lr=1.0).param_groups[0]["form"] == "timm"
    opt = build_optimizer(model, OptimizerConfig(name="rmsprop", beta2=0.95, momentum=0.7), lr=1.0)
    assert (opt.param_groups[0]["alpha"], opt.param_groups[0]["momentum"]) == (0.95, 0.7)
    opt = build_optimizer(model, OptimizerConfig(name="adam", layerwise=True, layerwise_trust_coefficient=0.5,
                                                 beta1=0.8, max_ratio=3.0), lr=1.0)
    assert opt.trust_coefficient == 0.5 and opt.max_ratio == 3.0 and opt.param_groups[0]["betas"] == (0.8, 0.999)
    assert isinstance(opt.base, torch.optim.Adam) and not opt.param_groups[0]["decoupled_weight_decay"]
    # LARS's trust_coefficient (default 0.001) does not reach the wrapper, whose own default is 1
    opt = build_optimizer(model, OptimizerConfig(name="sgd", layerwise=True, trust_coefficient=0.02), lr=1.0)
    assert opt.trust_coefficient == 1.0
    opt = build_optimizer(model, OptimizerConfig(name="lamb", adapt_on="all", weight_decay=0.01), lr=1.0)
    assert all(g["adapt"] for g in opt.param_groups)  # adapt_on=all although 1-D tensors are not decayed
    assert {g["weight_decay"] for g in opt.param_groups} == {0.01, 0.0}


def test_param_groups_masks_are_independent():
    model = conv_model()
    n_weights = sum(p.ndim > 1 for p in model.parameters())
    n_all = len(list(model.parameters()))
    for wd_on, adapt_on in [("weights", "weights"), ("weights", "all"), ("all", "weights"), ("all", "all")]:
        groups = param_groups(model, 0.1, wd_on, adapt_on)
        decayed = sum(len(g["params"]) for g in groups if g["weight_decay"])
        adapted = sum(len(g["params"]) for g in groups if g["adapt"])
        assert decayed == (n_weights if wd_on == "weights" else n_all)
        assert adapted == (n_weights if adapt_on == "weights" else n_all)
        assert sum(len(g["params"]) for g in groups) == n_all
    # weight decay 0 must not switch adaptation off
    groups = param_groups(model, 0.0, "weights", "all")
    assert len(groups) == 1 and groups[0]["adapt"] and groups[0]["weight_decay"] == 0.0
    with pytest.raises(ValueError):
        param_groups(model, 0.1, "biases", "all")


def test_torch_optimizers_keep_unknown_group_keys():
    p = nn.Parameter(torch.randn(3))
    for cls in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad, torch.optim.RMSprop):
        opt = cls([{"params": [p], "adapt": False, "weight_decay": 0.0}], lr=0.1)
        p.grad = torch.ones(3)
        opt.step()
        assert opt.param_groups[0]["adapt"] is False
        assert opt.state_dict()["param_groups"][0]["adapt"] is False


def test_audit_table():
    model = conv_model()
    frozen = copy.deepcopy(model)
    frozen[0].bias.requires_grad_(False)
    opt = build_optimizer(frozen, OptimizerConfig(name="lars", weight_decay=5e-5), lr=1.0)
    table = audit(frozen, opt)
    lines = {line.split()[0]: line for line in table.splitlines() if line.strip()}
    assert lines["0.weight"].split()[-2:] == ["5e-05", "yes"]
    assert lines["1.weight"].split()[-2:] == ["0", "no"]
    assert "not optimized" in lines["0.bias"]
    assert "adapted: 2 of 6 tensors" in table and "optimized: 5 of 6 tensors" in table
    plain = build_optimizer(model, OptimizerConfig(name="sgd", weight_decay=5e-5), lr=1.0)
    assert "adapted: 0 of 6 tensors" in audit(model, plain)


def test_audit_marks_zero_initialised_adapted_tensors():
    """||w|| = 0: the ratio falls back to 1 (clamped to the bounds); the audit says which tensors that is."""
    model = conv_model()
    with torch.no_grad():
        model[4].weight.zero_()
        model[4].bias.zero_()  # BN's shift (1.bias) is zero too
    note = "zero-init: ratio falls back to 1 (clamped to bounds)"
    for adapt_on, flagged in [("weights", {"4.weight"}), ("all", {"4.weight", "4.bias", "1.bias"})]:
        opt = build_optimizer(model, OptimizerConfig(name="lars", adapt_on=adapt_on), lr=1.0)
        table = audit(model, opt)
        rows = {line.split()[0]: line for line in table.splitlines()[3:] if line.strip() and "." in line.split()[0]}
        assert {n for n, line in rows.items() if line.endswith(note)} == flagged
        assert f"zero-init: {len(flagged)} of 6 tensors" in table and "are adapted and all zero" in table
    plain = audit(model, build_optimizer(model, OptimizerConfig(name="sgd"), lr=1.0))
    assert note not in plain and "zero-init: 0 of 6 tensors" in plain and "all zero" not in plain


@pytest.mark.parametrize("make", [lambda ps: LARS(ps, lr=0.1, trust_coefficient=0.01),
                                  lambda ps: LAMB(ps, lr=0.01),
                                  lambda ps: LayerwiseAdaptive(torch.optim.SGD(ps, lr=0.1, momentum=0.9))],
                         ids=["lars", "lamb", "layerwise_sgd"])
def test_last_trust_ratios_order_across_dtype_buckets(make):
    """A group mixing dtypes is stepped in per-dtype buckets; the ratios still come back in group order."""
    g = torch.Generator().manual_seed(1)
    shapes = [(4, 3), (5,), (2, 2), (3, 3)]
    dtypes = [torch.float64, torch.float32, torch.float64, torch.float32]
    mixed = [torch.randn(s, generator=g).to(d).requires_grad_(True) for s, d in zip(shapes, dtypes)]
    grads = [torch.randn(s, generator=g).to(d) for s, d in zip(shapes, dtypes)]
    opt = make(mixed)
    for p, gr in zip(mixed, grads):
        p.grad = gr
    opt.step()
    singles = []  # each tensor alone, from the same start
    g = torch.Generator().manual_seed(1)
    starts = [torch.randn(s, generator=g).to(d) for s, d in zip(shapes, dtypes)]
    for w, gr in zip(starts, grads):
        p = w.clone().requires_grad_(True)
        p.grad = gr
        o = make([p])
        o.step()
        singles.append(o.last_trust_ratios)
    torch.testing.assert_close(opt.last_trust_ratios, torch.cat(singles), rtol=1e-6, atol=0)


def test_layerwise_hooks_and_deepcopy():
    p = nn.Parameter(torch.randn(4, 3))
    opt = LayerwiseAdaptive(torch.optim.SGD([p], lr=0.1, momentum=0.9), trust_coefficient=0.1)
    calls = []
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(1))
    p.grad = torch.randn(4, 3)
    opt.step()
    assert calls == [1]
    twin = copy.deepcopy(opt)
    assert twin.base is not opt.base and twin.param_groups[0]["lr"] == 0.1
    assert torch.equal(twin.param_groups[0]["params"][0], p)


# --- config mapping, legacy keys, imports ------------------------------------------------------------------


@pytest.mark.parametrize("old,form", [(False, "timm"), (True, "unscaled")])
def test_old_config_json_with_lr_in_momentum_still_reads(old, form):
    """Run directories written before `lars_form` have optimizer.lr_in_momentum; they must still load."""
    cfg = from_dict({"optimizer": {"name": "lars", "lr_in_momentum": old}})
    assert cfg.optimizer.lars_form == form
    with pytest.raises(ConfigError, match="optimizer.lr_in_momentum = .* must not be given with optimizer.lars_form"):
        from_dict({"optimizer": {"lr_in_momentum": old, "lars_form": "scaled"}})
    with pytest.raises(ConfigError, match="optimizer.lr_in_momentum = 'yes' is invalid: must be true or false"):
        from_dict({"optimizer": {"lr_in_momentum": "yes"}})


def test_config_rejects_what_the_optimizers_cannot_do():
    for name in ("adam", "adamw", "adagrad", "rmsprop"):  # torch's own: 0/0 where a gradient was always 0
        with pytest.raises(ConfigError, match=f"optimizer.eps = 0.0 is invalid: must be > 0 with {name}"):
            OptimizerConfig(name=name, eps=0.0).check("optimizer")
    for name in ("sgd", "lars", "lamb"):  # ours guard the zero norms and LAMB's 0/0
        OptimizerConfig(name=name, eps=0.0).check("optimizer")
    with pytest.raises(ConfigError, match="optimizer.layerwise_trust_coefficient = 0.0 is invalid"):
        OptimizerConfig(layerwise_trust_coefficient=0.0).check("optimizer")
    with pytest.raises(ConfigError, match="optimizer.lars_form = 'inside' is invalid"):
        from_dict({"optimizer": {"lars_form": "inside"}})


def test_config_lars_forms_are_the_optimizers():
    """config cannot import largebatch.optim (that would load torch for `largebatch recipes`), so the CLI's
    choices restate LARS's forms: they must stay the same."""
    import typing

    from largebatch.optim.lars import FORMS

    assert typing.get_args(typing.get_type_hints(OptimizerConfig)["lars_form"]) == FORMS


def test_largebatch_optim_imports_nothing_else_of_ours():
    """STYLE: `from largebatch.optim import LARS` needs torch and nothing else of largebatch (the package's
    __init__ loads its names lazily), as users drop the optimizers into their own loops."""
    code = "import sys, largebatch.optim; print(sorted(m for m in sys.modules if m.startswith('largebatch')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    mods = ast.literal_eval(out)
    assert "largebatch.optim.lars" in mods
    assert [m for m in mods if m != "largebatch" and not m.startswith("largebatch.optim")] == []
