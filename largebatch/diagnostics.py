"""Cheap training diagnostics: distance from init, gradient noise scale, gradient SNR, trust-ratio percentiles.

Everything returns 0-d/1-D device tensors (no host sync) except the functions and methods documented as
returning Python floats: `WeightDistance.distance`, `NoiseScale.value`/`stats`, `ratio_percentiles` (one
sync each, meant for log steps) and `fit_log_diffusion` (host numpy, for the report). Reductions run in
fp32 whatever the storage dtype, fp64 when an input is fp64.

Gradient noise scale with accumulation (McCandlish et al. 2018, Appendix A.1: no extra forward/backward).
Losses are divided by accum_steps, so micro-batch k's own gradient is accum_steps * (p.grad after its
backward - p.grad before it); the accumulated p.grad is the gradient over the rank's batch:

    scale = NoiseScale()                                        # once, next to the model
    prev, small = None, []                                      # measure steps: before the first backward
    for k, chunk in enumerate(chunks):
        ... (loss / accum_steps).backward()
        grads = [p.grad for p in params if p.grad is not None]
        delta = grads if prev is None else torch._foreach_sub(grads, prev)
        small.append(sq_norm(delta) * accum_steps**2)           # |G_small|^2 of micro-batch k
        prev = [g.clone() for g in grads]                        # one gradient-sized buffer
    scale.update(torch.stack(small).mean(), micro_batch, sq_norm(grads), rank_batch)   # before clipping

Without DDP this needs accum_steps >= 2 (B_small = micro_batch, B_big = micro_batch * accum_steps). Under
DDP the last backward leaves the all-reduced mean over ranks in p.grad, so B_big is the global batch and only
micro-batches 0..accum_steps-2 are local small gradients. To take this rank's whole local gradient as the
small one instead (B_small = micro_batch * accum_steps, works with accum_steps == 1), read it before the
all-reduce: a DDP communication hook can add sq_norm([bucket.buffer()]) per bucket, then call the default
all-reduce hook (no extra memory). Cost of a measured step as written above: one gradient copy per
micro-batch, one foreach subtraction and a few foreach norms; measure at log steps only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["GradientProbe", "NoiseScale", "WeightDistance", "fit_log_diffusion", "gradient_snr", "ratio_percentiles",
           "sq_norm"]

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile


def _acc_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """fp64 when any tensor is fp64, else fp32: the dtype reductions accumulate in."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def sq_norm(tensors: Sequence[Tensor]) -> Tensor:
    """Sum of squared L2 norms sum_i ||t_i||^2 of a list of tensors, a 0-d tensor on their device (no sync).

    One `torch._foreach_norm` pass, accumulated in fp32 (fp64 if any tensor is fp64), no flat copy. This is
    |G_B|^2 in McCandlish et al. 2018 (Appendix A.1) when the tensors are a gradient averaged over B examples.
    """
    tensors = list(tensors)
    if not tensors:
        raise ValueError("sq_norm needs at least one tensor")
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=_acc_dtype(tensors))).square().sum()


class WeightDistance:
    """Euclidean distance of the trainable weights from their initial values, ||w_t - w_0||.

    You et al. 2020 ("The Limit of the Batch Size", Figs. 11-12) plot it against iterations; Hoffer, Hubara
    & Soudry 2017 ("Train longer, generalize better") find it grows like log t ("ultra-slow diffusion"), which
    `fit_log_diffusion` tests. Construct it on the freshly initialised model, before a checkpoint is loaded:
    the trainer seeds the initialisation, so a resumed run rebuilds the same w_0. Memory: one fp32 copy of
    the trainable weights (fp64 for fp64 weights) on their device.
    """

    def __init__(self, model: nn.Module) -> None:
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.names = [_strip_wrappers(name) for name, _ in named]
        self.init = [p.detach().to(_acc_dtype([p]), copy=True) for _, p in named]

    def norms(self, model: nn.Module) -> Tensor:
        """Per-tensor ||w_t - w_0|| as a 1-D device tensor in `self.names` order (no host sync).

        The model may be the constructor's or a wrapper of it (DDP, torch.compile): tensors are matched in
        order and their shapes checked. Cost: a temporary fp32 copy of the weights and one foreach norm.
        """
        params = [p.detach() for p in model.parameters() if p.requires_grad]
        if len(params) != len(self.init) or any(p.shape != w.shape for p, w in zip(params, self.init)):
            raise ValueError(f"model has {len(params)} trainable tensors, the snapshot {len(self.init)} "
                             f"(or their shapes differ): not the model this WeightDistance was built from")
        return torch.stack(torch._foreach_norm(torch._foreach_sub(params, self.init), 2))

    def distance(self, model: nn.Module, per_tensor: bool = True) -> dict[str, float]:
        """{"weight_distance": ||w_t - w_0|| over all trainable tensors, "weight_distance/<name>": per tensor}.

        Python floats: one host sync, so call it at log steps only. `per_tensor=False` keeps the global one.
        """
        per = self.norms(model)
        total = per.square().sum().sqrt()
        values = torch.cat([total[None], per]).tolist() if per_tensor else [total.item()]
        out = {"weight_distance": values[0]}
        out.update({f"weight_distance/{name}": v for name, v in zip(self.names, values[1:])})
        return out


def _strip_wrappers(name: str) -> str:
    """Parameter name without DDP / torch.compile wrapper prefixes."""
    while name.startswith(_WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


def fit_log_diffusion(steps: Sequence[float], distances: Sequence[float]) -> dict[str, float]:
    """Least-squares fit of distance = a + b * log(t) in float64 (Hoffer et al. 2017: ||w_t - w_0|| ~ log t).

    Returns Python floats {"a", "b", "r2"}, r2 = 1 - SS_res / SS_tot (1.0 when all distances are equal, a
    fit that is exact with b = 0). Steps must be >= 1 (1-based update counts) and not all equal.
    """
    t = np.asarray(steps, dtype=np.float64)
    y = np.asarray(distances, dtype=np.float64)
    if t.shape != y.shape or t.ndim != 1:
        raise ValueError(f"steps and distances must be 1-D of equal length, got {t.shape} and {y.shape}")
    if t.size < 2 or np.any(t < 1) or np.all(t == t[0]):
        raise ValueError(f"need at least two distinct steps, all >= 1, got {t.tolist()}")
    x = np.log(t)
    xc, yc = x - x.mean(), y - y.mean()
    b = float(xc @ yc / (xc @ xc))
    a = float(y.mean() - b * x.mean())
    ss_res, ss_tot = float(np.sum((y - a - b * x) ** 2)), float(yc @ yc)
    return {"a": a, "b": b, "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0}


class NoiseScale:
    """Simple gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, §2), from two
    batch sizes without extra passes (Appendix A.1).

    A gradient averaged over B examples has E|G_B|^2 = |G|^2 + tr(Sigma)/B, so for B_small < B_big

        |G|^2     ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
        tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)

    are unbiased. Each is noisy, so as in the paper they are averaged by separate exponential moving
    averages (Adam-style bias correction: m_n / (1 - ema^n)) and only then divided. The averages are device
    tensors; `update` never syncs. See the module docstring for which gradients the trainer passes.
    """

    def __init__(self, ema: float = 0.95) -> None:
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {ema}")
        self.ema = ema
        self.count = 0
        self._grad_sq: Optional[Tensor] = None
        self._trace: Optional[Tensor] = None

    def update(self, g_small_sq: Tensor, b_small: int, g_big_sq: Tensor, b_big: int) -> None:
        """Add one measurement: |G_small|^2 (mean over the small batches of their squared gradient norms,
        each small gradient averaged over b_small examples) and |G_big|^2 (gradient over b_big examples)."""
        if not 0 < b_small < b_big:
            raise ValueError(f"need 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")
        small = torch.as_tensor(g_small_sq).detach()
        big = torch.as_tensor(g_big_sq, device=small.device).detach()
        dtype = _acc_dtype([small, big])
        small, big = small.to(dtype), big.to(dtype)
        grad_sq = (b_big * big - b_small * small) / (b_big - b_small)
        trace = (small - big) / (1.0 / b_small - 1.0 / b_big)
        if self._grad_sq is None or self._trace is None:
            self._grad_sq, self._trace = torch.zeros_like(grad_sq), torch.zeros_like(trace)
        self._grad_sq = self.ema * self._grad_sq + (1.0 - self.ema) * grad_sq
        self._trace = self.ema * self._trace + (1.0 - self.ema) * trace
        self.count += 1

    def state_dict(self) -> dict:
        """The EMAs and their count, for checkpoints (a resumed run continues the same averages)."""
        return {"count": self.count, "grad_sq": self._grad_sq, "trace": self._trace}

    def load_state_dict(self, state: dict) -> None:
        self.count, self._grad_sq, self._trace = state["count"], state["grad_sq"], state["trace"]

    def estimates(self) -> tuple[Tensor, Tensor]:
        """Bias-corrected EMAs (|G|^2, tr(Sigma)) as 0-d device tensors (no host sync)."""
        if self._grad_sq is None or self._trace is None:
            raise RuntimeError("NoiseScale.estimates() before any update()")
        correction = 1.0 - self.ema ** self.count
        return self._grad_sq / correction, self._trace / correction

    def value(self) -> float:
        """B_simple = EMA[tr(Sigma)] / EMA[|G|^2] as a Python float: a host sync. NaN before any update.

        Not clamped: early on, or when the batch sizes are far below B_simple, the |G|^2 estimate can be
        negative and so the ratio (NaN if it is exactly 0); that says the measurement is still noise."""
        return self.stats()["noise_scale"] if self.count else float("nan")

    def stats(self) -> dict[str, float]:
        """{"noise_scale", "grad_sq", "trace_sigma"} as Python floats, one host sync ({} before any update)."""
        if not self.count:
            return {}
        grad_sq, trace = self.estimates()
        g, s = torch.stack([grad_sq, trace]).tolist()
        return {"noise_scale": s / g if g != 0 else float("nan"), "grad_sq": g, "trace_sigma": s}


def gradient_snr(g: Sequence[Tensor], g_ref: Sequence[Tensor]) -> dict[str, Tensor]:
    """Split a mini-batch gradient g along and across a reference (full- or large-batch) gradient r.

    With u = r / |r| over the concatenation of all tensors (You et al. 2020, appendix):
    "parallel" = <g, u> (signed), "perpendicular" = |g - <g, u> u| = sqrt(|g|^2 - parallel^2),
    "ratio" = parallel / perpendicular (the signal-to-noise ratio), "cosine" = <g, r> / (|g| |r|).
    0-d device tensors (no sync), fp32 (fp64 if an input is fp64); dot products are per-tensor
    torch.dot on flattened views, so no flat copy of the gradient is made (bf16/fp16 tensors are upcast
    one at a time).
    Conventions: r = 0 gives no direction: parallel 0, perpendicular |g|, ratio 0, cosine 0. g = 0 gives 0
    everywhere. perpendicular = 0 with parallel != 0 gives ratio +-inf. The Pythagorean form resolves
    perpendicular only down to about sqrt(eps) |g| (3e-4 |g| in fp32) when g is nearly parallel to r.
    """
    g, g_ref = list(g), list(g_ref)
    if len(g) != len(g_ref) or any(a.shape != b.shape for a, b in zip(g, g_ref)):
        raise ValueError(f"g and g_ref must be lists of tensors of the same shapes ({len(g)} vs {len(g_ref)})")
    dtype = _acc_dtype(g + g_ref)
    dot = torch.stack([torch.dot(a.reshape(-1).to(dtype), b.reshape(-1).to(dtype)) for a, b in zip(g, g_ref)]).sum()
    g_norm, r_norm = sq_norm(g).to(dtype).sqrt(), sq_norm(g_ref).to(dtype).sqrt()
    zero = torch.zeros_like(dot)
    has_ref = r_norm > 0
    parallel = torch.where(has_ref, dot / torch.where(has_ref, r_norm, 1.0), zero)
    perpendicular = (g_norm.square() - parallel.square()).clamp_min(0.0).sqrt()
    ratio = torch.where(perpendicular > 0, parallel / torch.where(perpendicular > 0, perpendicular, 1.0),
                        torch.sign(parallel) * torch.inf)
    ratio = torch.where(parallel == 0, zero, ratio)
    denom = g_norm * r_norm
    cosine = torch.where(denom > 0, dot / torch.where(denom > 0, denom, 1.0), zero)
    return {"parallel": parallel, "perpendicular": perpendicular, "ratio": ratio, "cosine": cosine}


def ratio_percentiles(ratios: Tensor, qs: Sequence[float] = (0.0, 0.1, 0.5, 0.9, 1.0),
                      prefix: str = "trust_ratio") -> dict[str, float]:
    """Percentiles of per-tensor trust ratios (You et al. 2017, eq. 6) as {"trust_ratio_p10": ..., ...}.

    Linear interpolation between order statistics (`torch.quantile`), in fp32 (fp64 for fp64 ratios).
    Python floats: one host sync, for log steps. Empty `ratios` give {}. Keys: p0, p10, p50, p90, p100,
    p2.5 for q = 0.025.
    """
    if any(not 0.0 <= q <= 1.0 for q in qs):
        raise ValueError(f"quantiles must lie in [0, 1], got {tuple(qs)}")
    if ratios.numel() == 0 or not qs:
        return {}
    x = ratios.detach().reshape(-1).to(_acc_dtype([ratios]))
    values = torch.quantile(x, torch.tensor(list(qs), dtype=x.dtype, device=x.device)).tolist()
    return {f"{prefix}_p{round(100 * q, 6):g}": v for q, v in zip(qs, values)}


class GradientProbe:
    """What one measured train step contributes to the noise scale and the gradient SNR.

    The trainer calls `after_micro_batch(k)` after micro-batch k's backward and `finish()` once the
    step's gradient is complete (before clipping). Two ways to get small-batch gradients for free:

    - one process, accum_steps >= 2: each micro-batch's own gradient, accum_steps x (p.grad after its
      backward - p.grad before), B_small = micro-batch, B_big = the accumulated batch;
    - DDP: this rank's whole local gradient, read by `distributed.LocalGradNorm` before the all-reduce,
      B_small = the rank's batch, B_big = the global batch.

    The SNR compares micro-batch 0's gradient with the step's gradient (needs accum_steps >= 2).
    Cost on a measured step: one gradient copy per micro-batch and a few foreach norms; nothing otherwise.
    """

    def __init__(self, params: Sequence[Tensor], accum_steps: int, per_micro_batch: bool, snr: bool) -> None:
        self.params, self.accum = list(params), accum_steps
        self.per_micro_batch = per_micro_batch and accum_steps >= 2
        self.snr = snr and accum_steps >= 2
        self.small_sq: list[Tensor] = []
        self.first: Optional[list[Tensor]] = None
        self._prev: Optional[list[Tensor]] = None

    def _grads(self) -> list[Tensor]:
        return [p.grad for p in self.params if p.grad is not None]

    @torch.no_grad()
    def after_micro_batch(self, k: int, last: bool) -> None:
        if not (self.per_micro_batch or (self.snr and k == 0)):
            return
        grads = self._grads()
        delta = grads if self._prev is None else torch._foreach_sub(grads, self._prev)
        if self.snr and k == 0:
            self.first = torch._foreach_mul(grads, float(self.accum))
        if self.per_micro_batch:
            self.small_sq.append(sq_norm(delta) * self.accum**2)
            self._prev = None if last else [g.clone() for g in grads]

    @torch.no_grad()
    def finish(self) -> dict[str, Tensor]:
        """{"big_sq": |G_step|^2, "small_sq": mean micro-batch |G|^2 (if measured), "snr_*": SNR} as device tensors."""
        grads = self._grads()
        out = {"big_sq": sq_norm(grads)}
        if self.small_sq:
            out["small_sq"] = torch.stack(self.small_sq).mean()
        if self.first is not None:
            out.update({f"grad_snr_{k}": v for k, v in gradient_snr(self.first, grads).items()})
        return out
