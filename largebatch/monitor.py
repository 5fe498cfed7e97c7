"""What the trainer measures at diagnostic and log steps, across one or many ranks.

The estimators live in `largebatch.diagnostics`; this module decides which gradients feed them (the
micro-batches in one process, each rank's local gradient under DDP) and gathers sharded trust ratios.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from largebatch import distributed
from largebatch.batch import BatchPlan, RunPlan, epochs_to_steps
from largebatch.config import DiagnosticsConfig
from largebatch.diagnostics import GradientProbe, NoiseScale, WeightDistance, ratio_percentiles
from largebatch.distributed import Dist
from largebatch.metrics import MetricsLog
from largebatch.state import Diverged, TrainState, check_explosion


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


class StepLog:
    """What the loop logs between evaluations: the training loss (one host sync per log interval, not per step),
    images/s over training time, trust-ratio percentiles, the diagnostics of measured steps, and the divergence
    rule on the training loss (NaN/inf, or `divergence_factor` x the first logged training loss)."""

    def __init__(self, model: nn.Module, plain: nn.Module, optimizer: torch.optim.Optimizer, plan: RunPlan,
                 log: MetricsLog, state: TrainState, d: Dist, dg: DiagnosticsConfig, log_every: int,
                 divergence_factor: float, noise_scale: NoiseScale, w0: WeightDistance | None,
                 sharded: bool, bar, start: int = 0) -> None:
        self.model, self.plain, self.optimizer, self.plan, self.log = model, plain, optimizer, plan, log
        self.state, self.d, self.dg, self.factor, self.noise_scale, self.w0 = state, d, dg, divergence_factor, \
            noise_scale, w0
        self.sharded, self.bar = sharded, bar
        self.every = log_every or max(1, epochs_to_steps(0.1, plan.dataset_size, plan.global_batch))
        self.diag_every = dg.every_steps or self.every
        self.running, self.count = torch.zeros((), device=next(plain.parameters()).device), 0
        self.last = (start, state.seconds())  # (step, training seconds) of the last log: the rate's reference

    def probe(self, step: int) -> GradientProbe | None:
        """A gradient probe when step `step` (0-based) is measured, else None."""
        return start_probe(self.model, self.plain, self.plan.batch, self.dg) if (step + 1) % self.diag_every == 0 \
            else None

    def after_step(self, done: int, lr: float, loss: torch.Tensor, probe: GradientProbe | None) -> None:
        """Account the step `done` (1-based count) whose mean loss is `loss` (a device tensor)."""
        self.running += loss
        self.count += 1
        self.bar.update(1)
        if probe is not None:
            self.log.log({"step": done, "epoch": self.plan.epoch(done), **measure(
                probe, self.model, self.plain, self.noise_scale, self.w0, self.plan.batch, self.d, self.dg)})
        if done % self.every and done != self.plan.steps:
            return
        mean = distributed.all_reduce_sum(self.running, self.d).item() / (self.count * self.d.world_size)  # sync
        t = self.state.seconds()
        rate = (done - self.last[0]) * self.plan.global_batch / max(t - self.last[1], 1e-9)
        self.last, self.count = (done, t), 0
        self.running.zero_()
        if not math.isfinite(mean):
            raise Diverged(f"training loss is {mean} at step {done} (epoch {self.plan.epoch(done):.2f}, lr {lr:.4g})")
        self.log.log({"step": done, "epoch": self.plan.epoch(done), "lr": lr, "train_loss": mean,
                      "images_per_second": rate, **trust_ratio_stats(self.optimizer, self.d, self.sharded)})
        if self.state.first_train_loss is None:
            self.state.first_train_loss = mean
        check_explosion("training loss", mean, self.state.first_train_loss, self.factor, done, lr)
        self.bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.3g}", img_s=f"{rate:.0f}")
