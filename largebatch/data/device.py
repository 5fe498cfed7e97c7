"""Device-resident data: a whole split as one uint8 tensor, batches gathered by index.

For data that fits in memory there is no DataLoader, no worker and no collation: a batch is one
`index_select` on the device and a fused normalisation. The order is a stream of per-epoch
permutations, each drawn from a generator seeded with (seed, epoch); the batch of step s is
positions [s*B, (s+1)*B) of that stream. A batch is therefore a pure function of the step,
which makes resume exact and lets a batch cross an epoch boundary instead of dropping data.

`DeviceSplit` holds the built-in image sets (uint8, normalised per batch); `TensorSplit` holds a user's
tensors of any shapes and dtypes (`largebatch.data.user`). `DeviceTrain` and `DeviceEval` serve both.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from largebatch.data import augment
from largebatch.data.source import augment_generator


class DeviceSplit:
    """Images (uint8, [N, C, H, W]) and labels on `device`, normalised on the fly.

    `mean` and `std` are per channel (or one number for all), for pixel values in [0, 1].
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: float | Sequence[float],
                 std: float | Sequence[float], device: torch.device, channels_last: bool = False) -> None:
        if images.dim() == 3:
            images = images.unsqueeze(1)
        self.images = images.to(device)
        self.labels = labels.to(device)
        mean_t = torch.as_tensor(mean, dtype=torch.float64).reshape(1, -1, 1, 1)
        std_t = torch.as_tensor(std, dtype=torch.float64).reshape(1, -1, 1, 1)
        # computed in float64 and rounded once; one channel stays a Python number (a scalar kernel)
        scale, shift = 1.0 / (255.0 * std_t), -mean_t / std_t
        one = scale.numel() == 1
        self.scale = scale.item() if one else scale.float().to(device)
        self.shift = shift.item() if one else shift.float().to(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def device(self) -> torch.device:
        return self.labels.device

    @property
    def nbytes(self) -> int:
        return self.images.nbytes + self.labels.nbytes

    def get(self, idx: torch.Tensor | slice, aug: torch.Tensor | None = None, pad: int = 0,
            flip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised float32 images and labels at `idx`, translated/flipped by `aug` (`augment.draw` rows)."""
        x = self.images[idx]
        if aug is not None:
            x = augment.apply(x, aug, pad, flip)
        x = x.to(memory_format=self.memory_format).float()
        x.mul_(self.scale).add_(self.shift)
        return x, self.labels[idx]


class TensorSplit:
    """Inputs and targets of any shapes on `device`, as the model takes them: float inputs and targets become
    float32, integer targets int64, other inputs (token ids, uint8 pixels) keep their dtype, and 4-D inputs are
    gathered channels_last when asked. No normalisation: the tensors are the user's (`largebatch.data.user`)."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, device: torch.device,
                 channels_last: bool = False) -> None:
        self.inputs, self.targets = model_dtypes(inputs.to(device), targets.to(device))
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def device(self) -> torch.device:
        return self.targets.device

    @property
    def nbytes(self) -> int:
        return self.inputs.nbytes + self.targets.nbytes

    def get(self, idx: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets at `idx`."""
        x = self.inputs[idx]
        return (x.contiguous(memory_format=self.memory_format) if x.dim() == 4 else x), self.targets[idx]


def model_dtypes(inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float inputs and targets as float32, integer targets as int64; everything else unchanged."""
    if inputs.is_floating_point():
        inputs = inputs.float()
    if targets.is_floating_point():
        targets = targets.float()
    elif not targets.is_complex() and targets.dtype != torch.bool:
        targets = targets.long()
    return inputs, targets


class DeviceTrain:
    """`TrainSource` over a `DeviceSplit` (or a `TensorSplit`, without augmentation): seeded epoch permutations,
    optional batched augmentation.

    Augmentation parameters are drawn for the whole global batch of a step (generator seeded by seed and
    step) and sliced like the indices, so every rank count and every resume sees the same pixels.
    """

    def __init__(self, split: DeviceSplit | TensorSplit, seed: int, pad: int = 0, flip: bool = False) -> None:
        self.split, self.seed, self.pad, self.flip = split, seed, pad, flip
        self.stream = EpochStream(len(split), seed, split.device)

    def __len__(self) -> int:
        return len(self.split)

    @property
    def resident_bytes(self) -> int:
        return self.split.nbytes

    def example(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split.get(slice(0, 1))

    def micro_batches(self, step: int, global_batch: int, rank: int, world_size: int,
                      micro_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = rank_share(self.stream.batch(step, global_batch), rank, world_size)
        if not (self.pad or self.flip):
            for chunk in idx.split(micro_batch):
                yield self.split.get(chunk)
            return
        g = augment_generator(self.seed, step, self.split.device)
        params = rank_share(augment.draw(global_batch, self.pad, self.flip, g), rank, world_size)
        for chunk, p in zip(idx.split(micro_batch), params.split(micro_batch)):
            yield self.split.get(chunk, p, self.pad, self.flip)


class DeviceEval:
    """`EvalSource` over a `DeviceSplit` or `TensorSplit`: each rank's padded, masked shard (`eval_shard`)."""

    def __init__(self, split: DeviceSplit | TensorSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def batches(self, rank: int, world_size: int, batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
        idx, valid = eval_shard(len(self.split), rank, world_size, self.split.device)
        for chunk, mask in zip(idx.split(batch_size), valid.split(batch_size)):
            yield (*self.split.get(chunk), mask)


def rank_share(idx: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank `rank`'s contiguous share of a global batch (len(idx) divisible by world_size).

    Every rank draws the same global batch from the same stream and keeps its slice, so the union of
    the ranks' batches is the single-process batch, in the same order as its micro-batches.
    """
    per = len(idx) // world_size
    return idx[rank * per: (rank + 1) * per]


def eval_shard_size(n: int, world_size: int) -> int:
    """Positions of each rank's share of an evaluation set of `n` (`eval_shard`): ceil(n / world_size)."""
    return -(-n // world_size)


def eval_shard(n: int, rank: int, world_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of rank `rank`'s share of an evaluation set of `n`, and which of them are real.

    Each rank gets `eval_shard_size` positions of a contiguous block; positions past the end are
    padding (index n - 1, masked out), so every rank runs the same number of forward passes and the
    masked sums over ranks equal the single-process sums exactly.
    """
    per = eval_shard_size(n, world_size)
    pos = torch.arange(rank * per, (rank + 1) * per, device=device)
    valid = pos < n
    return pos.clamp(max=n - 1), valid


class EpochStream:
    """Indices into a split of size n: concatenated seeded permutations, one per epoch."""

    def __init__(self, n: int, seed: int, device: torch.device) -> None:
        self.n, self.seed, self.device = n, seed, device
        self._cache: dict[int, torch.Tensor] = {}

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = {k: v for k, v in self._cache.items() if k >= epoch - 1}
            self._cache[epoch] = torch.randperm(self.n, generator=g).to(self.device)
        return self._cache[epoch]

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        """Indices of the `batch_size` examples of optimizer step `step` (batch_size <= n)."""
        start = step * batch_size
        epoch, offset = divmod(start, self.n)
        first = self.permutation(epoch)[offset: offset + batch_size]
        if len(first) == batch_size:
            return first
        rest = self.permutation(epoch + 1)[: batch_size - len(first)]
        return torch.cat([first, rest])
