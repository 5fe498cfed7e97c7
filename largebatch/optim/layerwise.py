"""Layer-wise trust ratios: the shared primitive, and a wrapper that adds them to any torch optimizer.

The trust ratio of one tensor w with proposed update direction u is (You et al. 2017, eq. 6; optax
`scale_by_trust_ratio`)

    ratio = tc * ||w|| / (||u|| + wd * ||w|| + eps)    where ||w|| > 0 and ||u|| > 0, else 1,
    then clamped to [min_ratio, max_ratio] when given (the fallback 1 too: a zero-initialised tensor at a
    LARS LR of 10-30 would otherwise take a full lr * g step whatever max_ratio says).

Everything here stays on the tensors' device: norms come from one `torch._foreach_norm` pass and the
ratios are a 1-D tensor (fp32, fp64 for fp64 tensors); the zero-norm case is a `torch.where`, so no
step ever calls `.item()` or otherwise waits for the device.

`LayerwiseAdaptive(base)` makes any optimizer layer-wise: per tensor it rescales the update the base
proposes, Δ = w_after - w_before, so that with u = Δ / lr (the base's unit-LR update) the step is

    w <- w + lr * ratio * u = w + ratio * Δ,   ratio = tc * ||w|| / (||u|| + eps)   (1 at zero norms, bounded)

i.e. LAMB's rule (You et al. 2019, Algorithm 2 with φ = clamp) around an arbitrary base update. The
learning rate still matters: the step length is lr * tc * ||w|| per tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["LayerwiseAdaptive", "norms", "trust_ratio"]


def norms(tensors: Sequence[Tensor]) -> Tensor:
    """L2 norm of each tensor as one 1-D tensor on their (common) device, in one foreach pass.

    Accumulates in fp32 (fp64 for fp64 tensors) whatever the storage dtype, so bf16 weights get exact-ish
    norms without an fp32 copy.
    """
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    return torch.stack(torch._foreach_norm(list(tensors), 2, dtype=dtype))


def trust_ratio(w_norm: Tensor, u_norm: Tensor, coefficient: float = 1.0, *, weight_decay: float = 0.0,
                eps: float = 0.0, min_ratio: Optional[float] = None, max_ratio: Optional[float] = None) -> Tensor:
    """Per-tensor trust ratio `coefficient * ||w|| / (||u|| + weight_decay * ||w|| + eps)` (1-D, elementwise).

    LARS (You, Gitman & Ginsburg 2017, eq. 6) passes the gradient norm as `u_norm` and its weight decay;
    LAMB (You et al. 2019, Algorithm 2) passes the norm of the full update and coefficient 1. Where either
    norm is 0 (a zero-initialised tensor, or one that got no gradient signal) the ratio falls back to 1 (optax's
    rule); then the ratio, fallback included, is clamped to [min_ratio, max_ratio] where a bound is given, so
    the bounds hold for every tensor.
    """
    den = u_norm
    if weight_decay:
        den = den + weight_decay * w_norm
    if eps:
        den = den + eps
    # 0/0 and x/0 (eps = 0) give NaN or inf here; `where` selects 1 there, so nothing non-finite leaks out.
    ratio = torch.where((w_norm > 0) & (u_norm > 0), (w_norm * coefficient) / den, 1.0)
    if min_ratio is not None or max_ratio is not None:
        ratio = ratio.clamp(min_ratio, max_ratio)
    return ratio


def buckets(tensors: Sequence[Tensor], key: Callable[[int, Tensor], Hashable] | None = None) -> list[list[int]]:
    """Indices of `tensors` grouped by (device, dtype) (or by `key(i, t)`), in first-appearance order.

    Foreach ops need one device and dtype per call; one group of a single-device model is one bucket.
    """
    out: dict[Hashable, list[int]] = {}
    for i, t in enumerate(tensors):
        k = key(i, t) if key is not None else (t.device, t.dtype)
        out.setdefault(k, []).append(i)
    return list(out.values())


def in_order(pieces: list[tuple[list[int], Tensor]], n: int) -> Tensor:
    """Reassemble per-bucket 1-D ratio vectors into one fp32 vector in the original tensor order."""
    if len(pieces) == 1:
        return pieces[0][1].float()
    device = pieces[0][1].device
    slots: list[Any] = [None] * n
    for idx, vec in pieces:
        for i, r in zip(idx, vec.float().to(device, non_blocking=True).unbind()):
            slots[i] = r
    return torch.stack(slots)


def concat(ratios: list[Tensor]) -> Optional[Tensor]:
    """Concatenate per-group ratio vectors (fp32, on the first group's device); None if no tensor stepped."""
    if not ratios:
        return None
    if len(ratios) == 1:
        return ratios[0]
    device = ratios[0].device
    return torch.cat([r.to(device, non_blocking=True) for r in ratios])


class TrustRatioOptimizer(Optimizer):
    """Shared step loop of LARS and LAMB: per group, the parameters with a gradient are updated by
    `_step_group`, which returns their trust ratios; these are concatenated in param-group order into
    `last_trust_ratios` (a device tensor, no host sync)."""

    last_trust_ratios: Optional[Tensor] = None

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        ratios = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                ratios.append(self._step_group(group, params))
        self.last_trust_ratios = concat(ratios)
        return loss

    def _step_group(self, group: dict, params: list[Tensor]) -> Tensor:
        raise NotImplementedError


class LayerwiseAdaptive(Optimizer):
    """Wrap any torch optimizer so that each adapted tensor's step is `lr * tc * (||w|| / ||u||) * u`.

    `u = (w_after - w_before) / lr` is the base optimizer's update at unit LR, including its own weight
    decay (coupled or decoupled). Only tensors whose param group has `adapt=True` (the default when the key
    is missing) are rescaled; the others take the base step unchanged. Groups with lr == 0 are left as the
    base left them. The ratio uses ||w|| before the step, `eps` is added to ||u||, and the bounds apply after
    the zero-norm fallback (see `trust_ratio`).

    The wrapper *is* the base optimizer for bookkeeping: `param_groups`, `state` and `defaults` are the
    base's own objects (so `group["lr"] = ...` and LR schedulers act on the base), and `state_dict`,
    `load_state_dict`, `zero_grad`, `add_param_group` delegate to it; checkpoints are interchangeable with
    the bare base's. Cost per step: one weight snapshot (kept between steps, one copy of the adapted
    weights), two norm passes and two elementwise passes.

    With bf16/fp16 weights, Δ is the change the base actually made after rounding to the weight dtype; when
    lr * |u| is near the dtype's resolution (2^-8 relative for bf16), ||Δ|| and hence the ratio are coarse.

    After each step `last_trust_ratios` is a 1-D fp32 device tensor with one entry per parameter that had
    a gradient, in param-group order (1.0 for non-adapted tensors and lr == 0 groups).
    """

    def __init__(self, base: Optimizer, trust_coefficient: float = 1.0, min_ratio: Optional[float] = None,
                 max_ratio: Optional[float] = None, eps: float = 0.0) -> None:
        if not isinstance(base, Optimizer):
            raise TypeError(f"base must be a torch.optim.Optimizer, got {type(base).__name__}")
        _check_ratio_args(trust_coefficient, min_ratio, max_ratio, eps)
        self.base = base
        self.trust_coefficient = trust_coefficient
        self.min_ratio, self.max_ratio, self.eps = min_ratio, max_ratio, eps
        self.last_trust_ratios: Optional[Tensor] = None
        self._snapshot: dict[Tensor, Tensor] = {}
        # Optimizer.__init__ would build its own param groups; __setstate__ only sets up the step/state-dict
        # hook machinery (what unpickling relies on), which is all the wrapper needs from the base class.
        Optimizer.__setstate__(self, {})

    # --- the base optimizer's bookkeeping, shared rather than copied ---------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.base.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.base.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.base.state

    @state.setter
    def state(self, value: Any) -> None:
        self.base.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.base.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.base.defaults = value

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (the wrapper itself keeps no state worth saving)."""
        return self.base.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into the base optimizer."""
        self.base.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.base.add_param_group(param_group)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_snapshot"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._snapshot = {}
        Optimizer.__setstate__(self, {})

    def __repr__(self) -> str:
        return (f"LayerwiseAdaptive(trust_coefficient={self.trust_coefficient}, min_ratio={self.min_ratio}, "
                f"max_ratio={self.max_ratio}, eps={self.eps}, base={self.base!r})")

    # --- the step ------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        """Snapshot the adapted weights, run `base.step(closure)`, rescale each adapted tensor's change."""
        groups: list[tuple[dict[str, Any], list[Tensor], bool]] = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            lr = group["lr"]
            adapted = bool(group.get("adapt", True)) and not (not torch.is_tensor(lr) and lr == 0)
            groups.append((group, params, adapted))
        self._refresh_snapshot([p for _, ps, a in groups if a for p in ps])
        for _, params, adapted in groups:
            if adapted and params:
                torch._foreach_copy_([self._snapshot[p] for p in params], params)

        with torch.enable_grad():  # the closure (if any) recomputes the loss; base.step handles it
            loss = self.base.step(closure) if closure is not None else self.base.step()

        ratios = []
        for group, params, adapted in groups:
            if not params:
                continue
            if not adapted:
                ratios.append(torch.ones(len(params), device=params[0].device))
                continue
            pieces = [(idx, self._rescale(group["lr"], [params[i] for i in idx])) for idx in buckets(params)]
            ratios.append(in_order(pieces, len(params)))
        self.last_trust_ratios = concat(ratios)
        return loss

    def _refresh_snapshot(self, params: list[Tensor]) -> None:
        """Keep one reusable buffer per adapted tensor (allocated on first use, dropped when unused)."""
        live = set(params)
        for p in [p for p in self._snapshot if p not in live]:
            del self._snapshot[p]
        for p in params:
            s = self._snapshot.get(p)
            if s is None or s.shape != p.shape or s.dtype != p.dtype or s.device != p.device:
                self._snapshot[p] = torch.empty_like(p, memory_format=torch.preserve_format)

    def _rescale(self, lr: float | Tensor, params: list[Tensor]) -> Tensor:
        before = [self._snapshot[p] for p in params]
        w_norm = norms(before)
        torch._foreach_sub_(before, params)  # before <- w_before - w_after = -Δ (in place, no allocation)
        u_norm = norms(before) / lr  # ||u|| = ||Δ|| / lr
        ratio = trust_ratio(w_norm, u_norm, self.trust_coefficient, eps=self.eps,
                            min_ratio=self.min_ratio, max_ratio=self.max_ratio)
        # w_before + ratio * Δ = w_after + (1 - ratio) * (-Δ)
        torch._foreach_addcmul_(params, before, (1.0 - ratio).unbind())
        return ratio


def _check_ratio_args(trust_coefficient: float, min_ratio: Optional[float], max_ratio: Optional[float],
                      eps: float) -> None:
    if not trust_coefficient > 0:
        raise ValueError(f"trust_coefficient = {trust_coefficient!r} is invalid: must be > 0")
    for name, v in (("min_ratio", min_ratio), ("max_ratio", max_ratio)):
        if v is not None and not v > 0:
            raise ValueError(f"{name} = {v!r} is invalid: must be > 0 or None (unbounded)")
    if min_ratio is not None and max_ratio is not None and min_ratio > max_ratio:
        raise ValueError(f"min_ratio = {min_ratio!r} is invalid: must be <= max_ratio ({max_ratio!r})")
    if not eps >= 0:
        raise ValueError(f"eps = {eps!r} is invalid: must be >= 0")
