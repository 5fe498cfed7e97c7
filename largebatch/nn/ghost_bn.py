"""Ghost batch normalisation (Hoffer, Hubara & Soudry 2017, "Train longer, generalize better: closing the
generalization gap in large batch training of neural networks", Section 4.2 and Algorithm 1).

In training mode the batch-norm statistics are taken over consecutive chunks ("virtual" or "ghost" batches)
of `ghost_batch` examples instead of over the whole batch, so that a large batch is normalised with the noise
of a small one. The defined behaviour, which the tests check in float64, is

    GhostBatchNorm(x) == cat([bn(c) for c in x.split(ghost_batch)])

for a plain `nn.BatchNorm` `bn` with the same eps/momentum/affine/buffers: each chunk is normalised with its own
biased mean and variance, and the running statistics are updated once per chunk, in order (the chunk's unbiased
variance goes into running_var, num_batches_tracked grows by the number of chunks). When the batch is not a
multiple of ghost_batch the last chunk is smaller and normalised on its own; when ghost_batch >= batch this is
plain batch norm. Where batch statistics are not used (eval mode with running statistics) it is `nn.BatchNorm`.

The forward is vectorised: the k equal chunks are one view (k, g, C, ...) reduced in one call, the smaller
remainder chunk (if any) is reduced separately, and the k (+1) sequential running-stat updates collapse into
their closed form (Algorithm 1's running averages, applied per ghost batch):

    momentum m:         r_K = (1-m)^K r_0 + sum_i m (1-m)^(K-1-i) s_i
    momentum None:      r_K = (n_0 r_0 + sum_i s_i) / (n_0 + K)       (cumulative average, n_0 batches seen)

Statistics are computed in float32 (float64 for float64 input) and the output has the input's dtype, which is
what `nn.BatchNorm2d` returns under `torch.autocast` (a bf16 input gives a bf16 output, a float32 one float32).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from largebatch.nn.convert import replace_batch_norms

__all__ = ["GhostBatchNorm", "convert_ghost_bn"]


class GhostBatchNorm(_BatchNorm):
    """Batch norm whose training statistics come from chunks of `ghost_batch` examples (Hoffer et al. 2017).

    Same parameters, buffers and state_dict keys as `nn.BatchNorm1d`/`nn.BatchNorm2d`; takes (N, C), (N, C, L)
    and (N, C, H, W) inputs in any memory format (channels_last stays channels_last). See the module docstring
    for the exact semantics.
    """

    ghost_batch: int

    def __init__(
        self,
        num_features: int,
        ghost_batch: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        *,
        bias: bool = True,
    ) -> None:
        _check_ghost_batch(ghost_batch)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.ghost_batch = ghost_batch

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 3, 4):
            raise ValueError(f"expected 2D, 3D or 4D input (got {input.dim()}D input)")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ghost_batch={self.ghost_batch}"

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if not batch_stats:
            return super().forward(input)  # eval with running statistics: chunking changes nothing
        _check_chunks(input.shape, self.ghost_batch)
        if input.shape[0] <= self.ghost_batch:
            return super().forward(input)  # a single chunk: plain batch norm
        return self._ghost_forward(input)

    def _ghost_forward(self, x: Tensor) -> Tensor:
        g, n = self.ghost_batch, x.shape[0]
        mean, var, count = chunk_stats(x, g)  # (K, C), (K, C), (K,)
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        per_example = (n, x.shape[1]) + (1,) * (x.dim() - 2)
        mean_n = mean.repeat_interleave(g, dim=0)[:n].view(per_example)  # chunk i's row for its g examples
        scale_n = scale.repeat_interleave(g, dim=0)[:n].view(per_example)
        y = (x.to(mean.dtype) - mean_n) * scale_n  # keeps x's memory format
        if self.bias is not None:
            y = y + self.bias.view((1, -1) + (1,) * (x.dim() - 2))
        if self.training and self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach() * (count / (count - 1)).unsqueeze(1))
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, means: Tensor, unbiased_vars: Tensor) -> None:
        """The K sequential updates F.batch_norm would make, in closed form (no host sync)."""
        k = means.shape[0]
        if self.momentum is None and self.num_batches_tracked is not None:  # cumulative average
            n0 = self.num_batches_tracked.to(means.dtype)
            decay = n0 / (n0 + k)
            weights = (1.0 / (n0 + k)).expand(k)
        else:  # nn.BatchNorm uses factor 0.0 when momentum is None and nothing is counted
            m = 0.0 if self.momentum is None else self.momentum
            decay = torch.tensor((1.0 - m) ** k, dtype=means.dtype, device=means.device)
            powers = torch.arange(k - 1, -1, -1, dtype=means.dtype, device=means.device)
            weights = m * (1.0 - m) ** powers  # newest chunk weighs m, older ones decay
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(k)
        for buf, stats in ((self.running_mean, means), (self.running_var, unbiased_vars)):
            if buf is not None:
                buf.copy_(decay * buf + (weights[:, None] * stats).sum(0))  # not @: autocast would cast it


def chunk_stats(x: Tensor, ghost_batch: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-chunk biased mean and variance (K, C) of `x.split(ghost_batch)`, and values per channel (K,).

    Computed in float32 (float64 for float64 input); the equal chunks in one reduction over a (k, g, C, ...)
    view, the smaller last chunk (if any) in a second one.
    """
    n, spatial = x.shape[0], x[0, 0].numel()
    k, rem = divmod(n, ghost_batch)
    xc = x.to(torch.promote_types(x.dtype, torch.float32))
    main = xc[: k * ghost_batch].view((k, ghost_batch) + tuple(x.shape[1:]))
    var, mean = torch.var_mean(main, dim=(1, *range(3, main.dim())), correction=0)
    counts = [ghost_batch * spatial] * k
    if rem:
        rvar, rmean = torch.var_mean(xc[k * ghost_batch :], dim=(0, *range(2, x.dim())), correction=0)
        var, mean = torch.cat([var, rvar[None]]), torch.cat([mean, rmean[None]])
        counts.append(rem * spatial)
    return mean, var, torch.tensor(counts, dtype=mean.dtype, device=mean.device)


def convert_ghost_bn(module: nn.Module, ghost_batch: int) -> nn.Module:
    """Replace every `nn.BatchNorm1d`/`nn.BatchNorm2d` in `module` by a `GhostBatchNorm` (Hoffer et al. 2017).

    Parameters and buffers are carried over as the same tensors (as `nn.SyncBatchNorm.convert_sync_batchnorm`
    does), so state_dict keys and values and eval-mode outputs are unchanged. SyncBatchNorm and other norms are
    left alone. Returns the converted module (a new object when `module` itself is a batch norm).
    """
    _check_ghost_batch(ghost_batch)
    return replace_batch_norms(
        module, (nn.BatchNorm1d, nn.BatchNorm2d),
        lambda bn: GhostBatchNorm(bn.num_features, ghost_batch, bn.eps, bn.momentum, bn.affine,
                                  bn.track_running_stats, bias=bn.bias is not None))


def _check_ghost_batch(ghost_batch: int) -> None:
    if isinstance(ghost_batch, bool) or not isinstance(ghost_batch, int) or ghost_batch < 2:
        raise ValueError(f"ghost_batch must be an int >= 2, got {ghost_batch!r}")


def _check_chunks(shape: torch.Size, ghost_batch: int) -> None:
    """Raise as F.batch_norm would on a chunk with one value per channel, naming the numbers that made it."""
    n, spatial = shape[0], shape[2:].numel()
    if n % ghost_batch * spatial == 1:  # the last chunk has n % ghost_batch examples (ghost_batch >= 2)
        raise ValueError(
            f"Expected more than 1 value per channel when training, got a ghost batch of 1 example "
            f"(batch size {n}, ghost_batch {ghost_batch}, input size {list(shape)}); "
            f"choose a batch size whose remainder modulo ghost_batch is not 1"
        )
