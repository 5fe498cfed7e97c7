"""LARS: momentum SGD with a per-tensor trust ratio (You, Gitman & Ginsburg 2017, "Large Batch Training of
Convolutional Networks"), in three forms that differ in where the LR and the ratio meet the momentum buffer.

Per tensor w with gradient g, weight decay wd (the group's `weight_decay`, 0 where the decay mask says so),
momentum m and trust coefficient tc:

    d     = g + wd * w
    ratio = tc * ||w|| / (||g|| + wd * ||w|| + eps)    (eq. 6; 1 where ||w|| or ||g|| is 0, then clamped to
                                                        [min_ratio, max_ratio]; 1 for groups with adapt=False)

`form` (Kumar et al. 2019, "Scale MLPerf-0.6 models on Google TPU-v3 Pods", Figs. 5 and 6):

  "scaled"   Fig. 5, "scaled momentum", the MLPerf-0.6 reference: lr and ratio multiply the whole buffer
                 v <- m * v + d
                 w <- w - lr * ratio * v             nesterov: w <- w - lr * ratio * (d + m * v)
  "unscaled" Fig. 6, "unscaled momentum", You et al. 2017 Alg. 1: lr and ratio scale d before the buffer
                 v <- m * v + lr * ratio * d
                 w <- w - v                          nesterov: w <- w - (lr * ratio * d + m * v)
  "timm"     the default, neither figure (timm's `Lars`; `torch.optim.SGD` around a ratio-scaled d): the
             ratio scales d before the buffer, the lr multiplies the buffer
                 v <- m * v + ratio * d
                 w <- w - lr * v                     nesterov: w <- w - lr * (ratio * d + m * v)

v in a nesterov update is the buffer after this step's update (the look-ahead). "unscaled" and "timm" agree
while lr is constant (in "unscaled" past steps keep the lr they were taken with); "scaled" applies this
step's lr and ratio to the whole history, so it differs from both whenever either moves. With momentum = 0
all three are w <- w - lr * ratio * d and no buffer is kept.

The weight-decay mask (`weight_decay` per group) and the adaptation mask (`adapt` per group) are separate:
a group with weight_decay=0 is still adapted unless it says adapt=False (see `param_groups.param_groups`).
The optimizer never reads or writes anything but `p`, its own state and `p.grad` (read only).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

import torch
from torch import Tensor

from largebatch.optim.layerwise import TrustRatioOptimizer, _check_ratio_args, buckets, in_order, norms, trust_ratio

__all__ = ["LARS", "FORMS"]

FORMS = ("scaled", "unscaled", "timm")  # see the module docstring; config.OptimizerConfig.lars_form mirrors it


class LARS(TrustRatioOptimizer):
    """Layer-wise Adaptive Rate Scaling; see the module docstring for the exact update equations.

    Param-group keys: lr, momentum, weight_decay, trust_coefficient, eps, nesterov, form, min_ratio,
    max_ratio, adapt (default True). State per tensor: `momentum_buffer` (as torch SGD), in the parameter's
    dtype; what it holds depends on `form`, which `load_state_dict` restores with the other group keys (state
    dicts from before `form` existed carry `lr_in_momentum`: True loads as "unscaled", False as "timm").
    After each step `last_trust_ratios` is a 1-D fp32 device tensor, one entry per parameter with a gradient
    in param-group order (1.0 for non-adapted tensors), computed without a host sync.
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 1e-8, nesterov: bool = False,
                 form: str = "timm", min_ratio: Optional[float] = None, max_ratio: Optional[float] = None) -> None:
        if not lr >= 0:
            raise ValueError(f"lr = {lr!r} is invalid: must be >= 0")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum = {momentum!r} is invalid: must be in [0, 1)")
        if nesterov and momentum == 0:
            raise ValueError("nesterov = True is invalid with momentum = 0")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay = {weight_decay!r} is invalid: must be >= 0")
        if form not in FORMS:
            raise ValueError(f"form = {form!r} is invalid: must be one of {', '.join(FORMS)}")
        _check_ratio_args(trust_coefficient, min_ratio, max_ratio, eps)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                        eps=eps, nesterov=nesterov, form=form, min_ratio=min_ratio, max_ratio=max_ratio,
                        adapt=True)
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Also what `load_state_dict` calls: map the former `lr_in_momentum` group key to `form`."""
        super().__setstate__(state)
        for group in self.param_groups:
            if "form" not in group:
                group["form"] = "unscaled" if group.pop("lr_in_momentum", False) else "timm"

    def _step_group(self, group: dict[str, Any], params: list[Tensor]) -> Tensor:
        pieces = [(idx, self._step_bucket(group, [params[i] for i in idx])) for idx in buckets(params)]
        return in_order(pieces, len(params))

    def _step_bucket(self, group: dict[str, Any], params: list[Tensor]) -> Tensor:
        """Update tensors of one device and dtype; return their trust ratios (1-D, on that device)."""
        grads = [p.grad for p in params]
        if any(g.is_sparse for g in grads):
            raise RuntimeError("LARS does not support sparse gradients")
        lr, m, wd = group["lr"], group["momentum"], group["weight_decay"]
        if group["adapt"]:
            ratio = trust_ratio(norms(params), norms(grads), group["trust_coefficient"], weight_decay=wd,
                                eps=group["eps"], min_ratio=group["min_ratio"], max_ratio=group["max_ratio"])
        else:
            ratio = None

        def add_d(dst: list[Tensor], factor: float, r: Optional[Tensor]) -> None:
            """dst += factor * r * (g + wd * w), without materialising d (r: per-tensor ratios, None for 1).

            The w-term goes first: when dst is the weights themselves it is a multiply by
            (1 + factor * r * wd) of the weights as they were at the start of the step.
            """
            if wd != 0:
                f = factor * wd
                if dst is params:
                    torch._foreach_mul_(dst, 1.0 + f if r is None else (1.0 + f * r).unbind())
                elif r is None:
                    torch._foreach_add_(dst, params, alpha=f)
                else:
                    torch._foreach_addcmul_(dst, params, (f * r).unbind())
            if r is None:
                torch._foreach_add_(dst, grads, alpha=factor)
            else:
                torch._foreach_addcmul_(dst, grads, (factor * r).unbind())

        if m == 0:  # every form: w <- w - lr * ratio * d
            add_d(params, -lr, ratio)
        else:
            state = [self.state[p] for p in params]
            if any("momentum_buffer" not in s for s in state):  # first step: zero buffers, then the regular update
                for s, p in zip(state, params):
                    if "momentum_buffer" not in s:
                        s["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs = [s["momentum_buffer"] for s in state]
            form = group["form"]
            torch._foreach_mul_(bufs, m)
            if form == "scaled":  # v <- m v + d
                add_d(bufs, 1.0, None)
            else:  # v <- m v + lr ratio d (unscaled) or m v + ratio d (timm)
                add_d(bufs, lr if form == "unscaled" else 1.0, ratio)
            if group["nesterov"]:  # the look-ahead's d term is lr * ratio * d in all three forms: it goes first
                add_d(params, -lr, ratio)
            k = m if group["nesterov"] else 1.0  # w -= k * (lr ratio, 1 or lr) * v
            if form == "scaled" and ratio is not None:
                torch._foreach_addcmul_(params, bufs, (-k * lr * ratio).unbind())
            else:
                torch._foreach_add_(params, bufs, alpha=-k * (1.0 if form == "unscaled" else lr))
        return ratio if ratio is not None else torch.ones(len(params), device=params[0].device)
