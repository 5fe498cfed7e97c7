"""LARS: momentum SGD with a per-tensor trust ratio (You, Gitman & Ginsburg 2017, "Large Batch Training of
Convolutional Networks", Algorithm 1), in the two forms compared by Kumar et al. 2019 ("Scale MLPerf-0.6
models on Google TPU-v3 Pods").

Per tensor w with gradient g, weight decay wd (the group's `weight_decay`, 0 where the decay mask says so),
momentum m and trust coefficient tc:

    d     = g + wd * w
    ratio = tc * ||w|| / (||g|| + wd * ||w|| + eps)    (eq. 6; bounded, 1 where ||w|| or ||g|| is 0,
                                                        1 for tensors whose group has adapt=False)

LR inside the momentum (`lr_in_momentum=True`; You et al. 2017 Alg. 1, the "unscaled momentum" form):

    v <- m * v + lr * ratio * d
    w <- w - v                                   nesterov: w <- w - (lr * ratio * d + m * v)

LR outside the momentum (default; MLPerf-0.6 reference and `torch.optim.SGD` style): the ratio scales the
gradient *before* it enters the momentum buffer, the LR multiplies the buffer:

    v <- m * v + ratio * d
    w <- w - lr * v                              nesterov: w <- w - lr * (ratio * d + m * v)

The two agree at constant lr; they differ when the schedule changes lr (inside: past steps keep the lr they
were taken with). With momentum = 0 both are w <- w - lr * ratio * d and no buffer is kept.

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

__all__ = ["LARS"]


class LARS(TrustRatioOptimizer):
    """Layer-wise Adaptive Rate Scaling; see the module docstring for the exact update equations.

    Param-group keys: lr, momentum, weight_decay, trust_coefficient, eps, nesterov, lr_in_momentum,
    min_ratio, max_ratio, adapt (default True). State per tensor: `momentum_buffer` (as torch SGD), in the
    parameter's dtype. After each step `last_trust_ratios` is a 1-D fp32 device tensor, one entry per
    parameter with a gradient in param-group order (1.0 for non-adapted tensors), computed without a host sync.
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 1e-8, nesterov: bool = False,
                 lr_in_momentum: bool = False, min_ratio: Optional[float] = None,
                 max_ratio: Optional[float] = None) -> None:
        if not lr >= 0:
            raise ValueError(f"lr = {lr!r} is invalid: must be >= 0")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum = {momentum!r} is invalid: must be in [0, 1)")
        if nesterov and momentum == 0:
            raise ValueError("nesterov = True is invalid with momentum = 0")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay = {weight_decay!r} is invalid: must be >= 0")
        _check_ratio_args(trust_coefficient, min_ratio, max_ratio, eps)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                        eps=eps, nesterov=nesterov, lr_in_momentum=lr_in_momentum, min_ratio=min_ratio,
                        max_ratio=max_ratio, adapt=True)
        super().__init__(params, defaults)

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
        inside = group["lr_in_momentum"]

        def add_d(dst: list[Tensor], factor: float) -> None:
            """dst += factor * ratio * (g + wd * w), without materialising d (ratio = 1 when not adapted).

            The w-term goes first: when dst is the weights themselves it is a multiply by
            (1 + factor * ratio * wd) of the weights as they were at the start of the step.
            """
            if wd != 0:
                f = factor * wd
                if dst is params:
                    torch._foreach_mul_(dst, 1.0 + f if ratio is None else (1.0 + f * ratio).unbind())
                elif ratio is None:
                    torch._foreach_add_(dst, params, alpha=f)
                else:
                    torch._foreach_addcmul_(dst, params, (f * ratio).unbind())
            if ratio is None:
                torch._foreach_add_(dst, grads, alpha=factor)
            else:
                torch._foreach_addcmul_(dst, grads, (factor * ratio).unbind())

        d_factor = lr if inside else 1.0  # the scale of d inside the buffer
        if m == 0:
            add_d(params, -lr)
        else:
            state = [self.state[p] for p in params]
            bufs = [s.get("momentum_buffer") for s in state]
            if any(b is None for b in bufs):
                # first step: v = d_factor * ratio * d (zero-initialised buffers, then the regular update)
                for s, p in zip(state, params):
                    if "momentum_buffer" not in s:
                        s["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                bufs = [s["momentum_buffer"] for s in state]
            torch._foreach_mul_(bufs, m)
            add_d(bufs, d_factor)
            step_scale = 1.0 if inside else lr  # w -= step_scale * (v or the nesterov look-ahead)
            if group["nesterov"]:
                # w -= step_scale * (d_factor * ratio * d + m * v): the d terms first (see add_d)
                add_d(params, -step_scale * d_factor)
                torch._foreach_add_(params, bufs, alpha=-step_scale * m)
            else:
                torch._foreach_add_(params, bufs, alpha=-step_scale)
        return ratio if ratio is not None else torch.ones(len(params), device=params[0].device)
