"""What the trainer needs from a data set: training micro-batches by step, evaluation batches by rank.

Two kinds of source implement these protocols:

- device-resident (`largebatch.data.device`): MNIST, CIFAR-10, synthetic data, a user's tensors; the whole
  split is one tensor on the device and a batch is an index gather (no DataLoader);
- streamed (`largebatch.data.stream`): ImageNet-style folders (`largebatch.data.imagefolder`) and a user's
  map-style Dataset (`largebatch.data.user`), read by DataLoader workers.

Both make the batch of optimizer step s a pure function of (seed, s): every rank draws the same
global batch and keeps its contiguous share (`rank_share`), and random augmentation is drawn per
example from the seed, the step and the example's position in the global batch, so a resumed run and
a run on any number of ranks see exactly the images a single uninterrupted process sees.

Images of the built-in sets come out normalised float32 on the device (channels_last when asked), labels
int64; a user's inputs and targets come out as `largebatch.data.user` describes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

import torch
from torch import Tensor


class TrainSource(Protocol):
    """A training split."""

    def __len__(self) -> int:
        """Number of training examples (one epoch)."""
        ...

    def micro_batches(self, step: int, global_batch: int, rank: int, world_size: int,
                      micro_batch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's share of the global batch of optimizer step `step`, in micro-batches of at most
        `micro_batch` examples (images, labels), in the order of the single-process micro-batches."""
        ...

    def example(self) -> tuple[Tensor, Tensor]:
        """One training example as a batch of 1 on the device (for the memory probe)."""
        ...

    @property
    def resident_bytes(self) -> int:
        """Device memory the source holds for the whole run (0 for streamed data)."""
        ...


class EvalSource(Protocol):
    """An evaluation split (validation or test)."""

    def __len__(self) -> int:
        ...

    def batches(self, rank: int, world_size: int, batch_size: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Rank `rank`'s shard (`eval_shard`: padded to ceil(N / world_size), padding masked) in batches of
        at most `batch_size`: (images, labels, mask of real examples)."""
        ...


@dataclass
class Data:
    """A loaded data set: its training source, evaluation sources by name (`val`, `test`), the keyword
    arguments describing it that a model factory is called with (`num_classes`, `in_channels`, `image_size`
    for images; see `largebatch.models.registry`), the task `task = auto` picks for it, and files that belong in
    the run directory (name -> text, e.g. a text corpus's vocabulary), which rank 0 writes there at the start."""

    train: TrainSource
    evals: dict[str, EvalSource]
    keywords: dict[str, Any]
    task: str = "classification"
    files: dict[str, str] = field(default_factory=dict)


def augment_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of step `step`'s augmentation draws (the same on every rank and after a resume)."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) * 16 + 5)
    return g
