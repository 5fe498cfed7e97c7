"""Swap the batch norms of a model for another kind, keeping their tensors (as torch's
`nn.SyncBatchNorm.convert_sync_batchnorm` does): state_dict keys and values are unchanged."""

from __future__ import annotations

from typing import Callable

from torch import nn


def replace_batch_norms(module: nn.Module, types: tuple[type, ...],
                        make: Callable[[nn.modules.batchnorm._BatchNorm], nn.Module]) -> nn.Module:
    """Every submodule that is an instance of `types` becomes `make(bn)`, sharing bn's parameters and
    buffers and its train/eval mode. Returns the converted module (a new object if `module` itself is one)."""
    out = module
    if isinstance(module, types):
        out = make(module)
        out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, replace_batch_norms(child, types, make))
    return out
