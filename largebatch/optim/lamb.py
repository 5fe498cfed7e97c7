"""LAMB: Adam moments with a per-tensor trust ratio (You et al. 2019, "Large Batch Optimization for Deep
Learning: Training BERT in 76 minutes", Algorithm 2).

Per tensor w with gradient g at step t (1-based), betas (b1, b2), weight decay wd (the group's
`weight_decay`, 0 where the decay mask says so; decoupled: it never enters the moments):

    m <- b1 * m + (1 - b1) * g                  v <- b2 * v + (1 - b2) * g^2
    m_hat = m / (1 - b1^t)                      v_hat = v / (1 - b2^t)      (no correction if bias_correction=False)
    u = m_hat / (sqrt(v_hat) + eps) + wd * w    (m_hat / sqrt(v_hat) := 0 where v = 0 and eps = 0: an element
                                                 whose gradients were all 0 gets u = wd * w, not 0/0 = NaN)
    ratio = ||w|| / ||u||                       (1 where ||w|| or ||u|| is 0; then bounded to [min_ratio,
                                                 max_ratio] when given; 1 for tensors whose group has adapt=False)
    w <- w - lr * ratio * u

There is no trust coefficient (φ is the identity, or a clamp with bounds: DeepSpeed uses [0.01, 10]) and no
gradient clipping: clip before `step()` if you want it. Like torch's Adam, the bias corrections are folded into
scalars (sqrt(v_hat) + eps = (sqrt(v) + eps * sqrt(1 - b2^t)) / sqrt(1 - b2^t)); u is computed up to a scalar
factor in one buffer, and the factor is applied to the per-tensor norms and step sizes instead of to u.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Optional

import torch
from torch import Tensor

from largebatch.optim.layerwise import TrustRatioOptimizer, _check_ratio_args, buckets, in_order, norms, trust_ratio

__all__ = ["LAMB"]


class LAMB(TrustRatioOptimizer):
    """Layer-wise Adaptive Moments for Batch training; see the module docstring for the exact equations.

    Param-group keys: lr, betas, eps, weight_decay, min_ratio, max_ratio, bias_correction, adapt (default
    True). State per tensor: `step` (int), `exp_avg`, `exp_avg_sq` (parameter dtype). After each step
    `last_trust_ratios` is a 1-D fp32 device tensor, one entry per parameter with a gradient in param-group
    order (1.0 for non-adapted tensors), computed without a host sync.
    """

    def __init__(self, params: Iterable[Any], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, min_ratio: Optional[float] = None,
                 max_ratio: Optional[float] = None, bias_correction: bool = True) -> None:
        if not lr >= 0:
            raise ValueError(f"lr = {lr!r} is invalid: must be >= 0")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas = {betas!r} is invalid: both must be in [0, 1)")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay = {weight_decay!r} is invalid: must be >= 0")
        _check_ratio_args(1.0, min_ratio, max_ratio, eps)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, min_ratio=min_ratio,
                        max_ratio=max_ratio, bias_correction=bias_correction, adapt=True)
        super().__init__(params, defaults)

    def _step_group(self, group: dict[str, Any], params: list[Tensor]) -> Tensor:
        steps = []
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("LAMB does not support sparse gradients")
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            steps.append(state["step"])
        # one bucket per (device, dtype, step): the bias corrections are then plain Python scalars
        idxs = buckets(params, key=lambda i, p: (p.device, p.dtype, steps[i]))
        pieces = [(idx, self._step_bucket(group, [params[i] for i in idx], steps[idx[0]])) for idx in idxs]
        return in_order(pieces, len(params))

    def _step_bucket(self, group: dict[str, Any], params: list[Tensor], t: int) -> Tensor:
        """Update tensors of one device, dtype and step count; return their trust ratios (1-D, on device)."""
        grads = [p.grad for p in params]
        exp_avgs = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]
        (b1, b2), eps, wd, lr = group["betas"], group["eps"], group["weight_decay"], group["lr"]

        torch._foreach_lerp_(exp_avgs, grads, 1 - b1)
        torch._foreach_mul_(exp_avg_sqs, b2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - b2)

        bc1, bc2 = (1 - b1 ** t, 1 - b2 ** t) if group["bias_correction"] else (1.0, 1.0)
        # m_hat / (sqrt(v_hat) + eps) = scale * m / (sqrt(v) + eps * sqrt(bc2)),  scale = sqrt(bc2) / bc1, so
        # u = scale * (m / (sqrt(v) + eps * sqrt(bc2)) + (wd / scale) * w): the bracket is built in place in
        # the one buffer `sqrt` allocates (as torch's Adam does), and `scale` rides on the per-tensor scalars.
        scale = math.sqrt(bc2) / bc1
        u = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(u, eps * math.sqrt(bc2))
        tiny = torch.finfo(params[0].dtype).smallest_normal
        if eps * math.sqrt(bc2) < tiny:
            # eps = 0: where v = 0 (then m = 0 too, unless g^2 underflowed) the denominator is 0 and m / 0 is NaN.
            # A denominator of 1 there gives the direction m instead (sqrt of a nonzero v is never below tiny).
            for den in u:
                den.masked_fill_(den < tiny, 1.0)
        torch._foreach_reciprocal_(u)
        torch._foreach_mul_(u, exp_avgs)
        if wd != 0:
            torch._foreach_add_(u, params, alpha=wd / scale)

        if not group["adapt"]:
            torch._foreach_add_(params, u, alpha=-lr * scale)
            return torch.ones(len(params), device=params[0].device)
        ratio = trust_ratio(norms(params), norms(u) * scale,
                            min_ratio=group["min_ratio"], max_ratio=group["max_ratio"])
        torch._foreach_addcmul_(params, u, (ratio * (-lr * scale)).unbind())
        return ratio
