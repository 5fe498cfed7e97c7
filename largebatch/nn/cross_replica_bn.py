"""Batch norm whose statistics are pooled over a group of replicas, given only a differentiable sum.

Group batch norm (Ying et al. 2018, "Image classification at supercomputer scale", section 2.3: the
"BN span"; Goyal et al. 2017's per-worker BN is a span of 1) normalises each replica's micro-batch
with the mean and variance of the micro-batches of all replicas in its group. This module does not
know how replicas talk: it is given `reduce`, a function that sums a tensor over the group and whose
backward sums the incoming gradients over the group (`torch.distributed.nn.functional.all_reduce`
is one; `largebatch.distributed` builds it). With the identity it is plain batch norm.

Per layer in training mode (x: this replica's input, n its examples x positions per channel):

    [S, N] = reduce([sum x, n])          mean = S / N
    Q      = reduce(sum (x - mean)^2)    var  = Q / N   (biased, used to normalise)
    y      = (x - mean) / sqrt(var + eps) * weight + bias
    running_mean <- (1 - m) running_mean + m mean,  running_var <- (1 - m) running_var + m var N / (N - 1)

Two collectives of C + 1 and C numbers; the two-pass variance avoids the cancellation of
E[x^2] - E[x]^2. Statistics are in float32 whatever the input dtype (bf16 under autocast), and the
output has the input's dtype, as `nn.BatchNorm` under autocast. torch's `nn.SyncBatchNorm` does the
same with fused CUDA kernels but refuses CPU tensors; `largebatch.distributed` uses it on CUDA and
this module on CPU (gloo).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from largebatch.nn.convert import replace_batch_norms

__all__ = ["CrossReplicaBatchNorm", "convert_cross_replica_bn"]

Reduce = Callable[[Tensor], Tensor]


class CrossReplicaBatchNorm(_BatchNorm):
    """Batch norm over the union of the micro-batches of a replica group (see the module docstring).

    Same parameters, buffers and state_dict keys as `nn.BatchNorm1d`/`2d`/`3d`; eval mode uses the
    running statistics exactly like `nn.BatchNorm`.
    """

    def __init__(self, num_features: int, reduce: Reduce, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.reduce = reduce

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input with a channel dimension (N, C, ...), got shape {list(input.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if not self.training and self.track_running_stats:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float() if x.dtype != torch.float64 else x
        count = torch.full((1,), x.numel() // x.size(1), dtype=xf.dtype, device=x.device)
        total = self.reduce(torch.cat([xf.sum(dims), count]))
        n = total[-1].detach()
        mean = total[:-1] / n
        centered = xf - mean.view(shape)
        var = self.reduce((centered * centered).sum(dims)) / n
        y = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.training and self.track_running_stats:
            self._update_running(mean.detach(), var.detach(), n)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running(self, mean: Tensor, var: Tensor, n: Tensor) -> None:
        self.num_batches_tracked.add_(1)
        m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        unbiased = var * (n / (n - 1).clamp(min=1))
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)


def convert_cross_replica_bn(module: nn.Module, reduce: Reduce) -> nn.Module:
    """Replace every `nn.BatchNorm1d/2d/3d` (plain, not ghost or sync) in `module` by a
    `CrossReplicaBatchNorm` using `reduce`, keeping the same parameter and buffer tensors."""
    return replace_batch_norms(
        module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
        lambda bn: CrossReplicaBatchNorm(bn.num_features, reduce, bn.eps, bn.momentum, bn.affine,
                                         bn.track_running_stats))
