"""What the trainer measures at diagnostic and log steps, across one or many ranks.

The estimators live in `largebatch.diagnostics`; this module decides which gradients feed them (the
micro-batches in one process, each rank's local gradient under DDP) and gathers sharded trust ratios.
"""

from __future__ import annotations

import torch
from torch import nn

from largebatch import distributed
from largebatch.batch import BatchPlan
from largebatch.config import DiagnosticsConfig
from largebatch.diagnostics import GradientProbe, NoiseScale, WeightDistance, ratio_percentiles
from largebatch.distributed import Dist


def start_probe(model: nn.Module, plain: nn.Module, plan: BatchPlan, dg: DiagnosticsConfig) -> GradientProbe | None:
    """A probe for this step's gradients (and the DDP hook's local norm), or None when nothing is measured.

    `model` is what the trainer runs (DDP or plain), `plain` the model inside it."""
    local = distributed.local_grad_norm(model) if dg.noise_scale else None
    if local is not None:
        local.start()
    if not (dg.noise_scale or dg.grad_snr or dg.weight_distance):
        return None
    params = [p for p in plain.parameters() if p.requires_grad]
    return GradientProbe(params, plan.accum_steps, per_micro_batch=dg.noise_scale and local is None,
                         snr=dg.grad_snr)


def measure(probe: GradientProbe, model: nn.Module, plain: nn.Module, scale: NoiseScale,
            w0: WeightDistance | None, plan: BatchPlan, d: Dist, dg: DiagnosticsConfig) -> dict:
    """One diagnostics record: weight distance, noise scale (McCandlish et al. 2018), gradient SNR.

    Small and large batches: one process, the micro-batches vs the accumulated batch; DDP, each rank's
    local gradient (mean of the ranks' |G_local|^2) vs the all-reduced one. A host sync: measured steps only.
    """
    r = probe.result
    local = distributed.local_grad_norm(model)
    small_sq, b_small = r.get("small_sq"), plan.micro_batch
    if local is not None and dg.noise_scale:
        small_sq, b_small = local.stop(), plan.per_rank
        small_sq = distributed.all_reduce_sum(small_sq.clone(), d) / d.world_size if small_sq is not None else None
    record: dict = {}
    if dg.noise_scale and small_sq is not None and b_small < plan.global_batch:
        scale.update(small_sq, b_small, r["big_sq"], plan.global_batch)
        record.update(scale.stats())
        record["noise_scale_batches"] = [b_small, plan.global_batch]
    if dg.grad_snr and "grad_snr_ratio" in r:
        record.update({k: float(v) for k, v in r.items() if k.startswith("grad_snr_")})
    if w0 is not None:
        record.update(w0.distance(plain, per_tensor=dg.per_tensor))
    record["grad_norm"] = float(r["big_sq"].sqrt())
    return record


def trust_ratio_stats(optimizer: torch.optim.Optimizer, d: Dist = Dist(), sharded: bool = False) -> dict:
    """Percentiles of the last step's per-tensor trust ratios of the adapted tensors (layer-wise optimizers).

    Under weight-update sharding each rank holds the ratios of its own tensors: they are gathered.
    """
    local = distributed.local_optimizer(optimizer)
    ratios = getattr(local, "last_trust_ratios", None)
    if ratios is not None:
        adapted = [g.get("adapt", True) for g in local.param_groups for _ in g["params"]]
        if len(adapted) == ratios.numel():  # every parameter had a gradient: keep the adapted tensors only
            ratios = ratios[torch.tensor(adapted, device=ratios.device)]
    if sharded:
        parts = distributed.gather(ratios.cpu() if ratios is not None else None, d)
        parts = [p for p in parts if p is not None]
        ratios = torch.cat(parts) if parts else None
    if ratios is None or ratios.numel() == 0:
        return {}
    return ratio_percentiles(ratios)
