"""Batched random translation (pad + random crop) and horizontal flip, on the device, in uint8.

The standard CIFAR-10 training augmentation (He et al. 2015, section 4.2: pad 4, random 32x32 crop,
random horizontal flip) done for a whole batch at once, as airbench does, instead of per image in
DataLoader workers. Zero padding in pixel space followed by a crop is a translation by (dy, dx) in
[-pad, pad]^2 with the uncovered border set to 0 (black), which for MNIST is the background.

The parameters of a batch are drawn separately from their application (`draw`, then `apply`), so the
trainer can draw them for the whole global batch from a generator seeded by the step and hand each rank
and micro-batch its rows: the pixels a rank sees do not depend on the number of ranks or on a resume.
"""

from __future__ import annotations

import torch
from torch import Tensor


def draw(n: int, pad: int, flip: bool, generator: torch.Generator) -> Tensor:
    """Per-example parameters, int64 [n, 3]: vertical shift, horizontal shift (each in [-pad, pad]), flip (0/1)."""
    device = generator.device
    shifts = torch.randint(-pad, pad + 1, (n, 2), generator=generator, device=device)
    flips = torch.randint(0, 2, (n, 1), generator=generator, device=device) if flip else \
        torch.zeros((n, 1), dtype=torch.int64, device=device)
    return torch.cat([shifts, flips], dim=1)


def apply(images: Tensor, params: Tensor, pad: int, flip: bool) -> Tensor:
    """Translate each image [N, C, H, W] by its (dy, dx) with zero fill, then flip it left-right where asked.

    Output pixel (i, j) of image n is input pixel (i - dy, j - dx) when inside the image, else 0; that is
    the crop at offset (pad - dy, pad - dx) of the image zero-padded by `pad` on every side.
    """
    n, c, h, w = images.shape
    if pad:
        padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
        rows = (pad - params[:, 0, None]) + torch.arange(h, device=images.device)  # [N, H] rows of `padded`
        cols = (pad - params[:, 1, None]) + torch.arange(w, device=images.device)  # [N, W]
        padded = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * pad))
        images = padded.gather(3, cols[:, None, None, :].expand(n, c, h, w))
    if flip:
        images = torch.where(params[:, 2, None, None, None].bool(), images.flip(3), images)
    return images
