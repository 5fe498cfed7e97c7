"""Parameter groups with two separate masks: which tensors get weight decay, which get a trust ratio.

The two are independent on purpose. Libraries that derive one from the other (TensorFlow Addons' LAMB
defaults `exclude_from_layer_adaptation` to the weight-decay exclusions; a single skip list such as the TF
MLPerf LARS `skip_list` drives both) make "no weight decay on biases" silently mean "no trust ratio on
biases" too, and a run with weight_decay=0 may lose adaptation altogether. Here each group carries
`weight_decay` (0 where not decayed) and `adapt` (bool), chosen by separate masks, and `audit` prints what
every tensor gets.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

__all__ = ["audit", "param_groups"]

Mask = Literal["weights", "all"]


def _selected(p: torch.Tensor, on: Mask) -> bool:
    if on == "all":
        return True
    if on == "weights":
        return p.ndim > 1
    raise ValueError(f"mask = {on!r} is invalid: must be 'weights' (ndim > 1 only) or 'all'")


def param_groups(model: nn.Module, weight_decay: float, weight_decay_on: Mask = "weights",
                 adapt_on: Mask = "weights") -> list[dict[str, Any]]:
    """Split `model`'s trainable parameters into groups by (decayed?, adapted?).

    `weights` selects tensors with ndim > 1 (conv and linear weights; not biases or norm scales/shifts),
    `all` selects every tensor. Each group is `{"params", "weight_decay", "adapt"}` with weight_decay 0
    for the tensors outside the decay mask; groups appear in the order of their first parameter in
    `model.parameters()`, parameters keep that order inside a group, and empty groups are omitted.
    Torch's own optimizers keep (and ignore) the extra `adapt` key.
    """
    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        wd = float(weight_decay) if _selected(p, weight_decay_on) else 0.0
        key = (wd, _selected(p, adapt_on))
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": key[0], "adapt": key[1]}
        groups[key]["params"].append(p)
    return list(groups.values())


def audit(model: nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """A printable table: every named parameter, its shape, its weight decay and whether it is adapted.

    "adapted" is the group's `adapt` flag for layer-wise optimizers (those exposing `last_trust_ratios`:
    LARS, LAMB, LayerwiseAdaptive) and "no" for every other optimizer. Parameters the optimizer does not
    hold are listed as "not optimized". An adapted tensor whose weights are all zero (zero-initialised: a
    ResNet's last BN scale with `adapt_on=all`, a zero-init head) is noted: ||w|| = 0, so its trust ratio
    falls back to 1, clamped to [min_ratio, max_ratio] (`layerwise.trust_ratio`), i.e. a full lr * d step
    when unbounded. Totals count tensors and elements per category. Reads every adapted tensor once (a
    device sync): call it at setup, not in the loop.
    """
    layerwise = hasattr(optimizer, "last_trust_ratios")
    where: dict[int, dict[str, Any]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            where[id(p)] = group
    rows = []
    totals = {"decayed": [0, 0], "adapted": [0, 0], "zero-init": [0, 0], "optimized": [0, 0], "all": [0, 0]}
    zero_note = "zero-init: ratio falls back to 1 (clamped to bounds)"

    def count(k: str, n: int) -> None:
        totals[k][0] += 1
        totals[k][1] += n

    for name, p in model.named_parameters():
        n = p.numel()
        count("all", n)
        group = where.get(id(p))
        if group is None:
            rows.append((name, str(tuple(p.shape)), f"{n:,}", "-", "not optimized", ""))
            continue
        count("optimized", n)
        wd = float(group.get("weight_decay", 0.0))
        adapt = layerwise and bool(group.get("adapt", True))
        if wd:
            count("decayed", n)
        if adapt:
            count("adapted", n)
        zero = adapt and not bool(p.detach().any())
        if zero:
            count("zero-init", n)
        rows.append((name, str(tuple(p.shape)), f"{n:,}", f"{wd:g}", "yes" if adapt else "no",
                     zero_note if zero else ""))

    header = ("parameter", "shape", "numel", "weight_decay", "adapted", "note")
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:{'<' if i < 2 or i == 5 else '>'}{w}}}" for i, w in enumerate(widths))
    lines = [f"{type(optimizer).__name__}: {len(optimizer.param_groups)} param groups", fmt.format(*header).rstrip(),
             fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r).rstrip() for r in rows]
    lines.append("")
    for k in ("optimized", "decayed", "adapted", "zero-init"):
        t, e = totals[k]
        lines.append(f"{k:>9}: {t} of {totals['all'][0]} tensors, {e:,} of {totals['all'][1]:,} elements")
    if totals["zero-init"][0]:
        lines[-1] += " are adapted and all zero: their trust ratio falls back to 1 (clamped to bounds)"
    return "\n".join(lines)
