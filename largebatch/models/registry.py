"""Model names -> model factories: built-ins, import paths, timm and torchvision, installed plug-ins.

    --model.name resnet20-cifar           a built-in (`BUILTIN`)
    --model.name mypkg.models:build_net   any importable callable: a function or an nn.Module class
    --model.name timm:resnet18            timm.create_model("resnet18", num_classes=..., in_chans=...)
    --model.name torchvision:resnet18     torchvision.models.get_model("resnet18", num_classes=...), RGB only
    --model.name mynet                    a factory an installed package registers in the entry-point group
                                          `largebatch.models` (pyproject.toml:
                                          [project.entry-points."largebatch.models"] mynet = "mypkg.models:build_net")

A built-in name wins over a plug-in of the same name. config.json records the name, so `--resume`, torchrun
restarts and study workers resolve it again; the module must be importable there too (installed, or on
PYTHONPATH: the `largebatch` script does not put the current directory on sys.path, `python -m largebatch` does).

The keyword protocol (`DATA_KEYWORDS`): a factory is called with keyword arguments describing the data
(`largebatch.data.Data.keywords`), those of

    num_classes: int   classes of the data set, the width of the logits it must return (classification)
    in_channels: int   channels of the input images (1 for MNIST, 3 for CIFAR-10 and ImageNet)
    image_size: int    side in pixels of the square training inputs (28 MNIST, 32 CIFAR-10, data.image_size)
    in_features: int   elements of a 1-D input vector (your own data, `largebatch.data.Splits`)
    out_features: int  target elements per example (regression)
    vocab_size: int    token ids are below it (language modelling)
    block_size: int    tokens per input sequence (language modelling)

that the data has (the built-in image sets: the first three), plus any a `Splits` states in its `keywords`. For
images it returns an nn.Module mapping (N, in_channels, H, W) images to (N, num_classes) logits. A factory that takes
`**kwargs` gets every keyword (`def build(**kw)` always works, and keeps working when keywords are added); one
without gets only the keywords its signature names, so `def build(num_classes)` works too. A required parameter
outside the protocol is a one-line error. The built-in residual models also get `zero_init_residual`.

`check_name` (syntax, torch-free, imports no user code) runs in config validation; `resolve` imports the
factory, before the trainer does any work; `build_model` calls it, once the data is loaded. Import paths,
plug-ins and keyword matching are `largebatch.registry`'s, shared with `data.name` and `task`.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any, Callable

from largebatch import registry
from largebatch.config import ConfigError
from largebatch.extras import require

if TYPE_CHECKING:
    from torch import nn

GROUP = "largebatch.models"
"""Entry-point group in which installed packages register model factories by name."""

DATA_KEYWORDS = ("num_classes", "in_channels", "image_size", "in_features", "out_features", "vocab_size",
                 "block_size")
"""The keywords describing the data that the trainer passes to every model factory (see the module docstring)."""

BUILTIN: dict[str, str] = {
    "lenet": "largebatch.models.lenet:LeNet5",
    "lenet-bn": "largebatch.models.lenet:LeNet5BN",
    "resnet50": "largebatch.models.resnet:resnet50",
    "resnet50-v1": "largebatch.models.resnet:resnet50_v1",
    "resnet50-v2": "largebatch.models.resnet:resnet50_v2",
    "resnet50-cifar": "largebatch.models.resnet:resnet50_cifar",
    "resnet20-cifar": "largebatch.models.resnet:resnet20_cifar",
    "alexnet": "largebatch.models.alexnet:alexnet",
    "alexnet-bn": "largebatch.models.alexnet:AlexNetBN",
    "gpt-tiny": "largebatch.models.gpt:gpt_tiny",
    "gpt-mini": "largebatch.models.gpt:gpt_mini",
    "gpt-char": "largebatch.models.gpt:gpt_char",
    "gpt2-small": "largebatch.models.gpt:gpt2_small",
}
"""The built-in models by name: the import path of each one's factory (the one list of built-in names)."""

RESIDUAL: frozenset[str] = frozenset({"resnet50", "resnet50-v1", "resnet50-v2", "resnet50-cifar",
                                      "resnet20-cifar"})
"""Built-in models made of residual blocks: the ones that take `zero_init_residual`."""

LIBRARIES = {"timm": "timm", "torchvision": "vision"}
"""The model libraries a `library:<model>` name may name, each with the pip extra that installs it."""

VISION = ("largebatch.models.resnet", "largebatch.models.alexnet")
"""The built-in models' modules that are made with torchvision (the 'vision' extra)."""

BUILDS = " that builds the model"


def check_name(name: str, field: str = "model.name") -> None:
    """Raise ConfigError unless `name` is one of the accepted forms. Syntax only: imports no torch and no user code
    (a bare name that is not built-in is looked up among the installed entry points, without loading them)."""
    registry.check_name(name, field, builtin=list(BUILTIN), group=GROUP, noun="model", libraries=tuple(LIBRARIES))


def resolve(name: str) -> Callable[..., nn.Module]:
    """The model factory `name` stands for (see the module docstring for the forms), imported but not called.

    Every way this can fail is a one-line ConfigError: a module that is not found or whose import fails with an
    ImportError, a missing attribute, something not callable, an unknown timm or torchvision model, a missing
    library, a plug-in that fails to load. Other exceptions raised while importing user code keep their traceback.
    """
    check_name(name)
    if name in BUILTIN:
        if BUILTIN[name].partition(":")[0] in VISION:
            require("vision", "torchvision", f"model.name = {name!r}")
        return registry.import_path(name, "model.name", path=BUILTIN[name], purpose=BUILDS)
    library, sep, model = name.partition(":")
    if not sep:
        return registry.entry_point(name, GROUP, "model.name", purpose=BUILDS)
    if library == "timm":
        return _timm(name, model)
    if library == "torchvision":
        return _torchvision(name, model)
    return registry.import_path(name, "model.name", purpose=" (a function or nn.Module class)" + BUILDS)


def build_model(name: str, num_classes: int = 10, in_channels: int | None = None, *,
                zero_init_residual: bool = False, factory: Callable[..., nn.Module] | None = None,
                **data_kw: Any) -> nn.Module:
    """Build model `name` for data with `num_classes` classes and `in_channels` channels (None: the model's own
    default, 1 for the LeNets and 3 for the others); `data_kw` are further data keywords (`image_size`).

    The factory (`factory`, else `resolve(name)`) gets the keywords its signature accepts (all of them if it takes
    `**kwargs`). `zero_init_residual` starts each residual block as its shortcut (Goyal et al. 2017; see
    `largebatch.models.resnet`); asking it of a model that is not a built-in residual one is a ValueError.
    """
    if zero_init_residual and name not in RESIDUAL:
        raise ValueError(f"zero_init_residual needs a built-in model with residual blocks, and {name!r} is not one "
                         f"(residual: {', '.join(sorted(RESIDUAL))})")
    factory = factory if factory is not None else resolve(name)
    offered = {"num_classes": num_classes, **({"in_channels": in_channels} if in_channels is not None else {}),
               **data_kw}
    kwargs = registry.accepted(name, "model.name", factory, offered)
    if zero_init_residual:
        kwargs["zero_init_residual"] = True
    model = factory(**kwargs)
    from torch import nn  # here, not at import: config validation calls check_name without torch

    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.name = {name!r}: the factory returned {registry.kind(model)}, not a torch.nn.Module")
    return model


def _library(name: str, package: str) -> Any:
    return require(LIBRARIES[package], package, f"model.name = {name!r}")


def _unknown(name: str, library: str, what: str, model: str, known: list[str], extra: str = "") -> ConfigError:
    close = difflib.get_close_matches(model, known, n=4, cutoff=0.6)
    hint = f"; close names: {', '.join(close)}" if close else ""
    listing = "timm.list_models()" if library == "timm" else "torchvision.models.list_models(module=torchvision.models)"
    return ConfigError(f"model.name = {name!r}: {library} has no {what} {model!r}{extra}{hint} ({len(known)} {what}s; "
                       f"{listing} lists them)")


def _timm(name: str, model: str) -> Callable[..., nn.Module]:
    timm = _library(name, "timm")
    if not timm.is_model(model):
        raise _unknown(name, "timm", "model", model, timm.list_models())

    def build(num_classes: int, in_channels: int = 3) -> nn.Module:
        return timm.create_model(model, num_classes=num_classes, in_chans=in_channels)

    build.__qualname__ = f"timm.create_model({model!r})"
    return build


def _torchvision(name: str, model: str) -> Callable[..., nn.Module]:
    tv = _library(name, "torchvision")
    known = tv.models.list_models(module=tv.models)  # the image classifiers (not detection, segmentation, video)
    if model not in known:
        other = (" (it is a detection, segmentation, video or optical-flow model)"
                 if model in tv.models.list_models() else "")
        raise _unknown(name, "torchvision", "classifier", model, known, other)

    def build(num_classes: int, in_channels: int = 3) -> nn.Module:
        if in_channels != 3:  # every torchvision classifier's first layer takes RGB
            raise ConfigError(f"model.name = {name!r} takes 3-channel (RGB) images and the data has {in_channels} "
                              f"channel{'s' if in_channels != 1 else ''}: use {_timm_twin(model)}, which adapts the "
                              "first layer to in_chans, or your own factory module.path:callable that takes "
                              "in_channels")
        return tv.models.get_model(model, num_classes=num_classes)

    build.__qualname__ = f"torchvision.models.get_model({model!r})"
    return build


def _timm_twin(model: str) -> str:
    """`timm:<model>` when timm is installed and has a model of that name, else the generic form."""
    try:
        import timm
    except ImportError:
        return "timm:<model> (pip install 'largebatch[timm]')"
    return f"timm:{model}" if timm.is_model(model) else "timm:<model>"
