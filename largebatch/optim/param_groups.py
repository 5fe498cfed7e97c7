"""Parameter groups with two separate masks: which tensors get weight decay, which get a trust ratio.

The two are independent on purpose. Libraries that derive one from the other (TensorFlow Addons' LAMB
defaults `exclude_from_layer_adaptation` to the weight-decay exclusions; a single skip list such as the TF
MLPerf LARS `skip_list` drives both) make "no weight decay on biases" silently mean "no trust ratio on
biases" too, and a run with weight_decay=0 may lose adaptation altogether. Here each group carries
`weight_decay` (0 where not decayed) and `adapt` (bool), chosen by separate masks, and `audit` prints what
every tensor gets and the kind of tensor the masks read.

A mask (`MASKS`) is one of

    weights    tensors with ndim > 1: conv and linear weights and embeddings; not biases or norm scales/shifts
               (MLPerf's LARS skip list; BERT's optimizer excludes LayerNorm and bias alike)
    matrices   the weights of Linear, Bilinear and Conv layers (and MultiheadAttention's input projections)
               only: also skips embeddings (an nn.Embedding's table, and an output head tied to it) and any
               other tensor no such layer holds, e.g. a bare positional-embedding Parameter (minGPT's
               `configure_optimizers`, Karpathy; for GPT-2, Radford et al. 2019, this leaves the token and
               position embeddings, LayerNorms and biases undecayed and unadapted)
    all        every tensor

`tensor_kinds` names the kind of every tensor (`matrix`, `embedding`, `norm`, `bias`, `other`), from the modules
that hold it; a tensor that several modules hold (tied weights) is one parameter, listed once in the groups.
"""

from __future__ import annotations

import re
import typing
from typing import Any, Literal

import torch
from torch import nn

__all__ = ["MASKS", "audit", "param_groups", "tensor_kinds"]

Mask = Literal["weights", "matrices", "all"]
MASKS: tuple[str, ...] = typing.get_args(Mask)
"""The mask names (`largebatch.config.OptimizerConfig` restates them: its module imports no torch)."""

_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
_MATRICES = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd)
_MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def _kind(holders: list[tuple[nn.Module, str]]) -> str:
    """The kind of a tensor held by `holders` (module, attribute name); an embedding wins over a tied head."""
    if any(isinstance(m, _EMBEDDINGS) for m, _ in holders):
        return "embedding"
    if any(isinstance(m, _NORMS) or re.search(r"Norm(\d*d)?$", type(m).__name__) for m, _ in holders):
        return "norm"
    if any(a == "bias" or a.endswith("_bias") for _, a in holders):
        return "bias"
    if any((isinstance(m, _MATRICES) and a == "weight") or (isinstance(m, nn.MultiheadAttention) and a in _MHA_WEIGHTS)
           for m, a in holders):
        return "matrix"
    return "other"


def tensor_kinds(model: nn.Module) -> dict[int, tuple[str, str]]:
    """`id(p)` -> (kind, the class of the first module holding `p`) for every parameter of `model`: kind is
    `embedding` (held by an nn.Embedding/EmbeddingBag, even if a tied Linear head holds it too), `norm` (a
    BatchNorm, LayerNorm, GroupNorm, RMSNorm or other `*Norm`/`*Norm2d` class's), `bias`, `matrix` (a Linear,
    Bilinear or Conv weight, MultiheadAttention's input projections) or `other`."""
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for m in model.modules():
        for attr, p in m.named_parameters(recurse=False):
            holders.setdefault(id(p), []).append((m, attr))
    return {k: (_kind(h), type(h[0][0]).__name__) for k, h in holders.items()}


def _check_mask(on: str) -> None:
    if on not in MASKS:
        raise ValueError(f"mask = {on!r} is invalid: must be 'weights' (ndim > 1 only), 'matrices' (Linear/Conv "
                         "weights only: no embeddings, norms or biases) or 'all'")


def _selected(p: torch.Tensor, on: Mask, kind: str) -> bool:
    return on == "all" or (on == "weights" and p.ndim > 1) or (on == "matrices" and kind == "matrix")


def param_groups(model: nn.Module, weight_decay: float, weight_decay_on: Mask = "weights",
                 adapt_on: Mask = "weights") -> list[dict[str, Any]]:
    """Split `model`'s trainable parameters into groups by (decayed?, adapted?).

    The masks are `weights` (ndim > 1), `matrices` (Linear/Conv weights only) or `all` (the module docstring).
    Each group is `{"params", "weight_decay", "adapt"}` with weight_decay 0 for the tensors outside the decay
    mask; groups appear in the order of their first parameter in `model.parameters()` (which lists a tied
    tensor once), parameters keep that order inside a group, and empty groups are omitted. Torch's own
    optimizers keep (and ignore) the extra `adapt` key.
    """
    _check_mask(weight_decay_on)
    _check_mask(adapt_on)
    kinds = tensor_kinds(model)
    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        kind = kinds[id(p)][0]
        wd = float(weight_decay) if _selected(p, weight_decay_on, kind) else 0.0
        key = (wd, _selected(p, adapt_on, kind))
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": key[0], "adapt": key[1]}
        groups[key]["params"].append(p)
    return list(groups.values())


def audit(model: nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """A printable table: every named parameter, its shape, its kind (`tensor_kinds`: what the masks read, so the
    reason a tensor is or is not decayed and adapted), its weight decay and whether it is adapted.

    "adapted" is the group's `adapt` flag for layer-wise optimizers (those exposing `last_trust_ratios`:
    LARS, LAMB, LayerwiseAdaptive) and "no" for every other optimizer. Parameters the optimizer does not
    hold are listed as "not optimized". A tied tensor is one row, under its first name, noted with the others.
    An adapted tensor whose weights are all zero (zero-initialised: a ResNet's last BN scale with
    `adapt_on=all`, a zero-init head) is noted: ||w|| = 0, so its trust ratio falls back to 1, clamped to
    [min_ratio, max_ratio] (`layerwise.trust_ratio`), i.e. a full lr * d step when unbounded. Totals count
    tensors and elements per category. Reads every adapted tensor once (a device sync): call it at setup, not
    in the loop.
    """
    rows, totals = _audit_rows(model, optimizer)
    header = ("parameter", "shape", "numel", "kind", "weight_decay", "adapted", "note")
    left = (0, 1, 3, 6)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:{'<' if i in left else '>'}{w}}}" for i, w in enumerate(widths))
    lines = [f"{type(optimizer).__name__}: {len(optimizer.param_groups)} param groups", fmt.format(*header).rstrip(),
             fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r).rstrip() for r in rows]
    lines.append("")
    for k in ("optimized", "decayed", "adapted", "zero-init"):
        t, e = totals[k]
        lines.append(f"{k:>9}: {t} of {totals['all'][0]} tensors, {e:,} of {totals['all'][1]:,} elements")
    if totals["zero-init"][0]:
        lines[-1] += " are adapted and all zero: their trust ratio falls back to 1 (clamped to bounds)"
    lines.append("masks: weights = ndim > 1; matrices = kind matrix (Linear/Conv weights; no embedding, tied or "
                 "not); all = every tensor")
    return "\n".join(lines)


def _audit_rows(model: nn.Module, optimizer: torch.optim.Optimizer
                ) -> tuple[list[tuple[str, ...]], dict[str, list[int]]]:
    """`audit`'s rows (one per distinct tensor) and its totals {category: [tensors, elements]}."""
    layerwise = hasattr(optimizer, "last_trust_ratios")
    where = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    kinds = tensor_kinds(model)
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    totals = {k: [0, 0] for k in ("decayed", "adapted", "zero-init", "optimized", "all")}
    rows = []
    for name, p in model.named_parameters():
        n, group = p.numel(), where.get(id(p))
        kind, owner = kinds[id(p)]
        tied = [f"tied: also {', '.join(names[id(p)][1:])}"] if len(names[id(p)]) > 1 else []
        wd = float(group.get("weight_decay", 0.0)) if group is not None else 0.0
        adapt = group is not None and layerwise and bool(group.get("adapt", True))
        zero = adapt and not bool(p.detach().any())
        for k, on in (("all", True), ("optimized", group is not None), ("decayed", wd != 0), ("adapted", adapt),
                      ("zero-init", zero)):
            totals[k][0] += on
            totals[k][1] += n * on
        note = "; ".join(tied + (["zero-init: ratio falls back to 1 (clamped to bounds)"] if zero else []))
        row = (f"{wd:g}", "yes" if adapt else "no") if group is not None else ("-", "not optimized")
        rows.append((name, str(tuple(p.shape)), f"{n:,}", f"{kind} ({owner})", *row, note))
    return rows, totals
