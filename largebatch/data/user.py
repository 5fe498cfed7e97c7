"""Bring your own data: tensors or any map-style Dataset, with the guarantees of the built-in data sets.

    splits = Splits(train=(x_train, y_train), test=(x_test, y_test))           # tensors, held on the device
    splits = Splits(train=MyDataset("train"), test=MyDataset("test"))          # streamed by DataLoader workers
    data = load_user_data(splits, cfg.data, device, channels_last, seed)       # a `largebatch.data.Data`

or by name, `--data.name mypkg.data:load` (any function returning `Splits`, called with the keywords it accepts
among `dir` = data.dir and `seed`), or `--data.name mydata`, a plug-in an installed package registers in the
entry-point group `largebatch.data` (pyproject.toml: [project.entry-points."largebatch.data"] mydata =
"mypkg.data:load").

A split is a pair of tensors (inputs, targets), first dimension the examples, or a map-style
`torch.utils.data.Dataset` whose `dataset[i]` is an (input, target) sample of any kind (image tensors, token
sequences, feature vectors; `Splits.collate_fn` batches other samples). Tensors and a plain `TensorDataset` are
held on the device and gathered by index (`DeviceTrain`); any other Dataset is streamed (`largebatch.data.stream`):
`data.workers` worker processes (0: in the training process), each example read as `dataset[i]` with the global
generators seeded from (seed, step, its position in the global batch), so random transforms in `__getitem__` are
deterministic. Either way the batch of step s is a pure function of (seed, s), ranks take contiguous shares of it,
a resumed run sees the batches of an uninterrupted one, and evaluation shards are padded and masked.

Inputs keep their dtype (token ids stay integers, uint8 stays uint8) except that float inputs become float32;
integer targets become int64, float targets float32. No normalisation: normalise in the tensors or the Dataset.

The model keywords and the task `task = auto` picks are inferred from the first training example
(`infer`), and `Splits.keywords` / `Splits.task` override them:

    integer scalar targets                    classification   num_classes: max label + 1 (tensors), else the
                                                               Dataset's `classes` (its length) or `num_classes`
    float targets                             regression       out_features: target elements per example
    integer sequences, targets like inputs    language-model   block_size: the length; vocab_size: the Dataset's
                                                               `vocab_size` (or give it in keywords)
    inputs (C, H, W)                          in_channels = C, image_size = H
    1-D float inputs                          in_features

`data.train_limit`, `data.test_limit` and `data.val_size` (the last N training examples held out as `val` when
Splits has no val) apply as to the built-in sets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset, Subset, TensorDataset, default_collate

from largebatch.config import ConfigError, DataConfig
from largebatch.data.device import DeviceEval, DeviceTrain, TensorSplit
from largebatch.data.source import Data, EvalSource, TrainSource
from largebatch.data.stream import DatasetEval, DatasetTrain, SeededExamples, ToModel, resolve_workers
from largebatch.registry import accepted, check_import_path, entry_point, import_path, kind
from largebatch.tasks import TASKS

GROUP = "largebatch.data"
"""Entry-point group in which installed packages register data functions (returning `Splits`) by name."""

Split = Union[tuple[Tensor, Tensor], Dataset]
"""A split as `Splits` holds it: (inputs, targets) tensors, or a map-style Dataset."""


@dataclass
class Splits:
    """A user's data set: the splits, and what inference cannot tell (see the module docstring)."""

    train: Any
    """(inputs, targets) tensors (or numpy arrays) or a map-style Dataset of (input, target) samples."""
    test: Any
    """The held-out split results are reported on; same forms as `train`."""
    val: Any = None
    """An optional validation split; None: none, or the last data.val_size training examples."""
    keywords: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the model factory; they override the inferred ones (`num_classes`, `in_channels`,
    `image_size`, `in_features`, `out_features`, `block_size`, `vocab_size`)."""
    task: str | None = None
    """The task `task = auto` picks: classification, regression, language-model or module.path:callable;
    None: inferred from the targets."""
    collate_fn: Callable[[list], Any] | None = None
    """Batches a list of a Dataset's samples into (inputs, targets) tensors (DataLoader's default_collate if
    None); tensor splits need none."""

    def __post_init__(self) -> None:
        self.train, self.test = _split("train", self.train), _split("test", self.test)
        self.val = None if self.val is None else _split("val", self.val)
        if not isinstance(self.keywords, dict) or not all(isinstance(k, str) for k in self.keywords):
            raise ConfigError(f"Splits.keywords is {kind(self.keywords)}: give a dict of keyword names (str) to the "
                              "values the model factory is called with, e.g. {'num_classes': 10}")
        if self.task is not None and self.task not in TASKS:
            check_import_path(self.task, "Splits.task")
        if self.collate_fn is not None and not callable(self.collate_fn):
            raise ConfigError(f"Splits.collate_fn is {kind(self.collate_fn)}, not a callable: give a function from "
                              "a list of samples to (inputs, targets) tensors, or None")


def _split(name: str, value: Any) -> Split:
    """`value` as a split (a TensorDataset of two tensors and numpy arrays become tensors), checked."""
    where = f"Splits.{name}"
    if type(value) is TensorDataset:  # exactly: a subclass may override __getitem__
        if len(value.tensors) != 2:
            raise ConfigError(f"{where} is a TensorDataset of {len(value.tensors)} tensors: give two, "
                              "TensorDataset(inputs, targets)")
        value = value.tensors
    if isinstance(value, (tuple, list)):
        return _pair(where, value)
    if isinstance(value, IterableDataset):
        raise ConfigError(f"{where} is an IterableDataset: the batch of a step is drawn by index, so give a "
                          "map-style Dataset (__getitem__ and __len__)")
    if isinstance(value, (Tensor, np.ndarray, str, bytes, dict)) or not hasattr(value, "__getitem__"):
        raise ConfigError(f"{where} is {'missing' if value is None else kind(value)}: give (inputs, targets) "
                          "tensors or a map-style torch.utils.data.Dataset of (input, target) samples")
    try:
        n = len(value)
    except TypeError:
        raise ConfigError(f"{where} ({kind(value)}) has no len(): a map-style Dataset needs __len__") from None
    if n == 0:
        raise ConfigError(f"{where} is empty (a Dataset of length 0): give at least one example")
    return value


def _pair(where: str, value: tuple | list) -> tuple[Tensor, Tensor]:
    """(inputs, targets) tensors of equal, non-zero length."""
    if len(value) != 2:
        raise ConfigError(f"{where} is a {type(value).__name__} of {len(value)} items: give a pair "
                          "(inputs, targets) or a map-style Dataset")
    x, y = (torch.from_numpy(v) if isinstance(v, np.ndarray) else v for v in value)
    if not (isinstance(x, Tensor) and isinstance(y, Tensor)):
        raise ConfigError(f"{where} = ({type(x).__name__}, {type(y).__name__}): the pair (inputs, targets) must be "
                          "two tensors (or numpy arrays), one example per row")
    if x.dim() == 0 or y.dim() == 0:
        raise ConfigError(f"{where}: inputs {tuple(x.shape)} and targets {tuple(y.shape)} need a first dimension "
                          "indexing the examples")
    if len(x) != len(y):
        raise ConfigError(f"{where} has {len(x)} inputs but {len(y)} targets: give one target per input "
                          "(the same first dimension)")
    if len(x) == 0:
        raise ConfigError(f"{where} is empty (0 examples): give at least one example")
    return x, y


# ------------------------------------------------------------------ inference of the model keywords and task


def infer(splits: Splits) -> tuple[str, dict[str, Any]]:
    """(task, model keywords) of `splits` (see the module docstring); `Splits.task` and `Splits.keywords` win."""
    x, y = _first(splits)
    task = splits.task or _task(x, y)
    keywords = _input_keywords(x)
    keywords.update(_task_keywords(task, x, y, splits))
    keywords.update(splits.keywords)
    return task, keywords


def _first(splits: Splits) -> tuple[Tensor, Tensor]:
    """The first training example's input and target, as the model sees them (less the batch dimension)."""
    train = splits.train
    if isinstance(train, tuple):
        x, y = train[0][:1], train[1][:1]
    else:
        sample = SeededExamples(train)[(0, 0)]
        try:
            batch = (splits.collate_fn or default_collate)([sample])
        except (TypeError, RuntimeError) as e:
            raise ConfigError(f"Splits.train: batching its first sample ({kind(sample)}) failed ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0]}): return tensors from __getitem__, or give "
                              "Splits(collate_fn=...)") from None
        x, y = ToModel(torch.device("cpu"), False)(batch)
    return x[0], y[0]


def _is_int(t: Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _task(x: Tensor, y: Tensor) -> str:
    """The task the first example's targets (and inputs) imply."""
    if _is_int(y) and y.dim() == 0:
        return "classification"
    if y.is_floating_point():
        return "regression"
    if _is_int(y) and _is_int(x) and y.dim() == 1 and x.shape == y.shape:
        return "language-model"
    raise ConfigError(f"cannot tell the task of targets of shape {tuple(y.shape)} ({y.dtype}) for inputs of shape "
                      f"{tuple(x.shape)} ({x.dtype}): give Splits(task=...) (classification, regression, "
                      "language-model or module.path:callable)")


def _input_keywords(x: Tensor) -> dict[str, Any]:
    """in_channels and image_size of (C, H, W) inputs; in_features of 1-D float inputs."""
    if x.dim() == 3:
        return {"in_channels": x.shape[0], "image_size": x.shape[1]}
    if x.dim() == 1 and x.is_floating_point():
        return {"in_features": x.numel()}
    return {}


def _task_keywords(task: str, x: Tensor, y: Tensor, splits: Splits) -> dict[str, Any]:
    """The keywords the task needs that `Splits.keywords` does not give; one-line ConfigError if unknowable."""
    given = splits.keywords
    if task == "classification" and "num_classes" not in given:
        return {"num_classes": _num_classes(splits)}
    if task == "regression" and "out_features" not in given:
        return {"out_features": y.numel()}
    if task == "language-model":
        found = {"block_size": y.shape[-1] if y.dim() else 1}
        if "vocab_size" not in given:
            vocab = _attribute(splits.train, "vocab_size")
            if vocab is None:
                raise ConfigError("cannot tell the vocabulary size of the language-model data (the training split "
                                  "has no `vocab_size` attribute): give Splits(keywords={\"vocab_size\": ...})")
            found["vocab_size"] = int(vocab)
        return found
    return {}


def _num_classes(splits: Splits) -> int:
    """Max label + 1 over the tensor splits, else the training Dataset's `classes` (length) or `num_classes`."""
    if isinstance(splits.train, tuple):
        pairs = [s for s in (splits.train, splits.val, splits.test) if isinstance(s, tuple)]
        return int(max(int(y.max()) for _, y in pairs)) + 1
    classes = _attribute(splits.train, "classes")
    if classes is not None:
        return len(classes)
    count = _attribute(splits.train, "num_classes")
    if count is not None:
        return int(count)
    raise ConfigError("cannot tell the number of classes of the training Dataset (it has no `classes` or "
                      "`num_classes` attribute): give Splits(keywords={\"num_classes\": ...})")


def _attribute(dataset: Any, name: str) -> Any:
    """`dataset.name`, looked for through wrappers that keep the wrapped one as `.dataset` (Subset); None if none."""
    for _ in range(8):
        if hasattr(dataset, name):
            return getattr(dataset, name)
        dataset = getattr(dataset, "dataset", None)
        if dataset is None:
            return None
    return None


# ------------------------------------------------------------------ limits, sources, Data


def _take(split: Split, start: int, stop: int) -> Split:
    """Examples [start, stop) of a split (a slice of the tensors, a Subset of a Dataset)."""
    if isinstance(split, tuple):
        return split[0][start:stop], split[1][start:stop]
    return Subset(split, range(start, min(stop, len(split))))


def _cut(splits: Splits, cfg: DataConfig) -> dict[str, Split]:
    """train / val / test with data.val_size, data.train_limit and data.test_limit applied."""
    train, val = splits.train, splits.val
    n = len(train[1]) if isinstance(train, tuple) else len(train)
    if cfg.val_size:
        if val is not None:
            raise ConfigError(f"data.val_size = {cfg.val_size} is invalid: the data has its own val split; set "
                              "data.val_size to 0 or drop Splits(val=...)")
        if cfg.val_size >= n:
            raise ConfigError(f"data.val_size = {cfg.val_size} leaves no training examples: the training split has "
                              f"{n}, so give a val_size below {n}")
        train, val = _take(train, 0, n - cfg.val_size), _take(train, n - cfg.val_size, n)
    if cfg.train_limit:
        train = _take(train, 0, cfg.train_limit)
    test = _take(splits.test, 0, cfg.test_limit) if cfg.test_limit else splits.test
    return {"train": train, **({"val": val} if val is not None else {}), "test": test}


def load_user_data(splits: Splits, cfg: DataConfig, device: torch.device, channels_last: bool = False,
                   seed: int = 0) -> Data:
    """`splits` as `Data` on `device`: tensors held there, Datasets streamed by `cfg.workers` workers; the model
    keywords and default task inferred (`infer`); data.train_limit, test_limit and val_size applied."""
    if not isinstance(splits, Splits):
        raise ConfigError(f"the data is {kind(splits)}, not a largebatch.data.Splits: pass "
                          "Splits(train=..., test=...)")
    for name, value in (("crop_padding", cfg.crop_padding), ("flip", cfg.flip)):
        if value:
            raise ConfigError(f"data.{name} = {value!r} is invalid: it augments the built-in device-held data sets "
                              "only; augment in your Dataset's __getitem__ (it is seeded per example)")
    task, keywords = infer(splits)
    parts = _cut(splits, cfg)
    device = torch.device(device)
    train: TrainSource
    if isinstance(parts["train"], tuple):
        train = DeviceTrain(TensorSplit(*parts.pop("train"), device, channels_last), seed)
    else:
        train = DatasetTrain(parts.pop("train"), device, seed, resolve_workers(cfg.workers), channels_last,
                             splits.collate_fn)
    evals: dict[str, EvalSource] = {
        k: DeviceEval(TensorSplit(*v, device, channels_last)) if isinstance(v, tuple)
        else DatasetEval(v, device, resolve_workers(cfg.workers), channels_last, splits.collate_fn)
        for k, v in parts.items()}
    return Data(train, evals, keywords, task)


def splits_by_name(cfg: DataConfig, seed: int = 0) -> Splits:
    """The `Splits` that the function `cfg.name` (module.path:callable or a plug-in name) returns, called with the
    keywords it accepts among `dir` (cfg.dir) and `seed`; one-line ConfigError if it cannot be had."""
    name, purpose = cfg.name, " that returns largebatch.data.Splits"
    if ":" in name:
        fn = import_path(name, "data.name", purpose=purpose)
    else:
        fn = entry_point(name, GROUP, "data.name", purpose=purpose)
    splits = fn(**accepted(name, "data.name", fn, {"dir": cfg.dir, "seed": seed}, role="the data function"))
    if not isinstance(splits, Splits):
        raise ConfigError(f"data.name = {name!r} returned {kind(splits)}, not a largebatch.data.Splits: return "
                          "Splits(train=..., test=...)")
    return splits
