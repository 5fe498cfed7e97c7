"""Map-style datasets streamed through DataLoader workers, in batches that depend only on (seed, step).

The pieces every streamed source shares (ImageNet-style folders in `largebatch.data.imagefolder`, a user's
`torch.utils.data.Dataset` in `largebatch.data.user`):

- `StepSampler`, the batch sampler: the global batch of step s is `EpochStream(n, seed).batch(s, B)`, each rank
  keeps its `rank_share`, and each example comes with a seed drawn from (seed, s, its position in the global
  batch), so random augmentation is the same for any number of ranks, workers, and after a resume;
- `StepStream`, the training half: one DataLoader iterator lives across steps (its sampler yields the micro-batches
  of steps s, s+1, ... forever, so workers prepare the next step's examples while the model trains on this one);
  a call for another step than the one it holds next (first call, resume, seek, changed shape) starts a fresh one;
- `ShardStream`, the evaluation half: each rank's padded `eval_shard`, its DataLoader kept for its workers;
- `SeededExamples`: a user's dataset read as `dataset[i]` with the global generators (torch, numpy, random)
  seeded by the example's seed and restored afterwards, so random transforms in `__getitem__` are deterministic;
- `DatasetTrain` / `DatasetEval`: a user's dataset as a TrainSource / EvalSource.

Workers: `num_workers` processes (0: in the training process); None means `default_workers()`. Each runs with one
torch thread (torch's worker loop sets it; no `worker_init_fn` here changes it), and `--threads auto` leaves a core
to each of them (`largebatch.threads`).
"""

from __future__ import annotations

import random
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate, get_worker_info

from largebatch import threads as cpu
from largebatch.config import ConfigError
from largebatch.data.device import EpochStream, eval_shard, model_dtypes, rank_share
from largebatch.data.mnist import DataError
from largebatch.data.source import augment_generator

Call = tuple[int, int, int, int, int]
"""(step, global_batch, rank, world_size, micro_batch): what `TrainSource.micro_batches` is asked for."""


def default_workers() -> int:
    """Up to 8 workers per process, sharing the CPUs this process may use with the other local processes (torchrun
    ranks, study workers)."""
    return max(1, min(8, len(cpu.cpus_available()) // cpu.local_processes()))


def resolve_workers(workers: int | None) -> int:
    """`data.workers` as a count: -1 (or None) is `default_workers()`."""
    return default_workers() if workers is None or workers < 0 else workers


def worker_errors(batches: Iterator) -> Iterator:
    """`batches` of a DataLoader, with a DataError raised in a worker re-raised as the worker's one-line message
    (torch puts the worker's traceback into the message it re-raises)."""
    try:
        yield from batches
    except DataError as e:
        text = str(e).strip()
        _, found, message = text.splitlines()[-1].partition("DataError: ")
        if "Original Traceback" not in text or not found:
            raise
        raise DataError(message) from None


def make_loader(dataset: Dataset, batch_sampler: object, device: torch.device, num_workers: int,
                prefetch_factor: int, collate_fn: Callable[[list], Any] | None = None) -> DataLoader:
    """A DataLoader over lists of dataset keys with persistent workers, pinned memory on CUDA. It has its own
    generator: an iterator draws its workers' base seed from it, not from the training process's global one
    (examples are read under their own seeds, so the base seed changes nothing)."""
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers, collate_fn=collate_fn,
                      pin_memory=device.type == "cuda", prefetch_factor=prefetch_factor if num_workers else None,
                      persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(0))


class StepSampler:
    """Batch sampler: the micro-batches of steps start, start+1, ... forever, each a list of
    (index, example seed); `plan` = (start, global_batch, rank, world_size, micro_batch) is read
    when an iterator is made."""

    def __init__(self, n: int, seed: int) -> None:
        self.stream, self.seed = EpochStream(n, seed, torch.device("cpu")), seed
        self.plan: Call = (0, 1, 0, 1, 1)

    def step(self, step: int, global_batch: int, rank: int, world_size: int,
             micro_batch: int) -> list[list[tuple[int, int]]]:
        """This rank's micro-batches of step `step`. The seed of an example is entry p of a vector drawn
        from `augment_generator(seed, step)`, p its position in the global batch."""
        index = rank_share(self.stream.batch(step, global_batch), rank, world_size)
        seeds = torch.randint(0, 2**62, (global_batch,), generator=augment_generator(self.seed, step))
        pairs = list(zip(index.tolist(), rank_share(seeds, rank, world_size).tolist()))
        return [pairs[i: i + micro_batch] for i in range(0, len(pairs), micro_batch)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        start, *shape = self.plan
        return self._forever(start, *shape)

    def _forever(self, step: int, *shape: int) -> Iterator[list[tuple[int, int]]]:
        while True:
            yield from self.step(step, *shape)
            step += 1


class StepStream:
    """Base of streamed TrainSources: `dataset` indexed by (index, example seed), batched by a `StepSampler`
    through one persistent DataLoader iterator (see the module docstring)."""

    def __init__(self, dataset: Dataset, seed: int, device: torch.device | str, num_workers: int | None,
                 prefetch_factor: int = 2, collate_fn: Callable[[list], Any] | None = None) -> None:
        self.device, self.dataset = torch.device(device), dataset
        self.sampler = StepSampler(len(dataset), seed)
        self.num_workers = default_workers() if num_workers is None else num_workers
        self.loader = make_loader(dataset, self.sampler, self.device, self.num_workers, prefetch_factor, collate_fn)
        self._iterator: Iterator | None = None
        self._expected: Call | None = None  # the call whose batches the iterator holds next

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def resident_bytes(self) -> int:
        return 0

    def _step_batches(self, call: Call) -> Iterator[Any]:
        """The collated (CPU) micro-batches of `call`, from the live iterator if it is positioned at this step,
        else from a fresh one started here."""
        step, global_batch, _, world_size, micro_batch = call
        if self._iterator is None or self._expected != call:
            self.sampler.plan = call
            self._iterator = worker_errors(iter(self.loader))
        self._expected = None  # until all of this step's micro-batches have been taken from the iterator
        count = -(-(global_batch // world_size) // micro_batch)
        for i in range(count):
            batch = next(self._iterator)
            if i == count - 1:
                self._expected = (step + 1, *call[1:])
            yield batch


class ShardStream:
    """Base of streamed EvalSources: rank `rank`'s padded `eval_shard` of `dataset` (keys from `key`), through a
    DataLoader kept, with its persistent workers, while ranks, world size and batch size stay the same."""

    def __init__(self, dataset: Dataset, device: torch.device | str, num_workers: int | None,
                 prefetch_factor: int = 2, collate_fn: Callable[[list], Any] | None = None) -> None:
        self.device, self.dataset = torch.device(device), dataset
        self.num_workers = default_workers() if num_workers is None else num_workers
        self.prefetch_factor, self.collate_fn = prefetch_factor, collate_fn
        self._loader: tuple[tuple[int, int, int], DataLoader] | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def key(self, index: int) -> tuple[int, int | None]:
        """The dataset key of example `index`: (index, example seed or None)."""
        return index, None

    def _shard_batches(self, rank: int, world_size: int, batch_size: int) -> Iterator[tuple[Any, Tensor]]:
        """(collated CPU batch, mask of real examples on the device) of rank `rank`'s shard."""
        index, valid = eval_shard(len(self), rank, world_size, torch.device("cpu"))
        shape = (rank, world_size, batch_size)
        if self._loader is None or self._loader[0] != shape:
            chunks = [[self.key(i) for i in part.tolist()] for part in index.split(batch_size)]
            self._loader = shape, make_loader(self.dataset, chunks, self.device, self.num_workers,
                                              self.prefetch_factor, self.collate_fn)
        for batch, mask in zip(worker_errors(iter(self._loader[1])), valid.split(batch_size)):
            yield batch, mask.to(self.device, non_blocking=True)


class SeededExamples(Dataset):
    """A user's map-style dataset indexed by (index, example seed): `dataset[index]`, read with torch's, numpy's
    and Python's global generators seeded by the example seed. In the training process (num_workers = 0) the
    generators are restored afterwards; a worker process owns its generators, so it skips the save and restore,
    which cost about 150 us an example (numpy's state alone ~110 us), three times the seeding."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        if get_worker_info() is not None:
            _seed_all(seed)
            return self.dataset[index]
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                _seed_all(seed)
                return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _seed_all(seed: int) -> None:
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


class ToModel:
    """A collated batch (inputs, targets) to `device` (non-blocking from pinned memory), in the dtypes the model
    takes (`model_dtypes`), 4-D inputs channels_last when asked; a one-line ConfigError for anything else."""

    def __init__(self, device: torch.device, channels_last: bool) -> None:
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, batch: Any) -> tuple[Tensor, Tensor]:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, Tensor) for t in batch)):
            what = (f"({', '.join(type(t).__name__ for t in batch)})" if isinstance(batch, (tuple, list))
                    else f"a {type(batch).__name__}")
            raise ConfigError(f"a collated batch of the Dataset is {what}, not two tensors (inputs, targets): return "
                              "(input, target) samples of tensors, arrays or numbers from __getitem__, or give "
                              "Splits(collate_fn=...) that returns two tensors")
        x, y = model_dtypes(*(t.to(self.device, non_blocking=True) for t in batch))
        return (x.contiguous(memory_format=self.memory_format) if x.dim() == 4 else x), y


class DatasetTrain(StepStream):
    """A user's training Dataset as a TrainSource (see the module docstring)."""

    def __init__(self, dataset: Dataset, device: torch.device | str, seed: int = 0, num_workers: int | None = None,
                 channels_last: bool = False, collate_fn: Callable[[list], Any] | None = None,
                 prefetch_factor: int = 2) -> None:
        super().__init__(SeededExamples(dataset), seed, device, num_workers, prefetch_factor, collate_fn)
        self.collate = collate_fn or default_collate
        self.to_model = ToModel(self.device, channels_last)

    def micro_batches(self, step: int, global_batch: int, rank: int, world_size: int,
                      micro_batch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's share of step `step`'s global batch in micro-batches (inputs, targets) on the device."""
        if not 0 < global_batch <= len(self):
            raise ConfigError(f"a global batch of {global_batch} needs 1 to {len(self)} training examples (the "
                              f"training Dataset holds {len(self)})")
        return (self.to_model(b) for b in self._step_batches((step, global_batch, rank, world_size, micro_batch)))

    def example(self) -> tuple[Tensor, Tensor]:
        """The first training example, read with seed 0, as a batch of one on the device."""
        return self.to_model(self.collate([self.dataset[(0, 0)]]))


class DatasetEval(ShardStream):
    """A user's evaluation Dataset as an EvalSource: example i is read with seed i (whatever the ranks)."""

    def __init__(self, dataset: Dataset, device: torch.device | str, num_workers: int | None = None,
                 channels_last: bool = False, collate_fn: Callable[[list], Any] | None = None,
                 prefetch_factor: int = 2) -> None:
        super().__init__(SeededExamples(dataset), device, num_workers, prefetch_factor, collate_fn)
        self.to_model = ToModel(self.device, channels_last)

    def key(self, index: int) -> tuple[int, int]:
        return index, index

    def batches(self, rank: int, world_size: int, batch_size: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Rank `rank`'s padded shard in batches of at most `batch_size`: (inputs, targets, mask)."""
        for batch, mask in self._shard_batches(rank, world_size, batch_size):
            yield *self.to_model(batch), mask
