"""Where a run's, study's or probe's base config comes from, and which metric decides a study.

    largebatch study --recipe mnist-lenet ...                   a named recipe (`largebatch recipes`)
    largebatch study --recipe mypkg.recipes:my_recipe ...       an importable function returning a RunConfig
    largebatch study --recipe-file my_recipe.py ...             the recipe function a Python file defines
    largebatch study --recipe-file my_recipe.py:regression ...  one of several it defines

A recipe reference (`ref`) is one string of these forms (`--recipe` takes each, `--recipe-file` the files):
`StudySpec.recipe` holds it, `load_recipe` turns it into a RunConfig (also for `largebatch train --recipe`), and
every way that can fail is a one-line ConfigError.

A recipe file is imported as a module named after the file, with its folder put first on sys.path (as
`python my_recipe.py` would), so the RunConfig's model.name, data.name and task may be import paths into it
or into a module beside it (`my_recipe:build_model`). Spawned study workers inherit that sys.path and get
the resolved config itself (`StudySpec.base`), so the recipe function runs once and the workers import
only what the config names. In a file defining several functions that take no arguments, the recipe is
the one annotated `-> RunConfig`, or the one named after ':'.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

from largebatch.config import ConfigError, DataConfig, RunConfig
from largebatch.recipes import RECIPES, get_recipe
from largebatch.registry import import_path

def is_file_ref(ref: str) -> bool:
    """Whether `ref` names a recipe file: `path.py` or `path.py:function`."""
    path, _, fn = ref.rpartition(":")
    return ref.endswith(".py") or (path.endswith(".py") and fn.isidentifier())


def recipe_name(ref: str) -> str:
    """A short name for `ref` (the default study name): a named recipe's name, else its function's or file's."""
    if ref.endswith(".py"):
        return Path(ref).stem
    return ref.rpartition(":")[2] if ":" in ref else ref


def load_recipe(ref: str) -> RunConfig:
    """The RunConfig `ref` stands for (forms: the module docstring); one-line ConfigError otherwise."""
    if ref in RECIPES:
        return get_recipe(ref)
    if is_file_ref(ref):
        path, fn = (ref, None) if ref.endswith(".py") else tuple(ref.rsplit(":", 1))
        return _call(f"recipe file {ref}", *_from_file(Path(path), fn))
    if ":" in ref:
        fn = import_path(ref, "recipe", purpose=" returning a RunConfig")  # one-line errors
        return _call(f"recipe {ref}", ref.rpartition(":")[2], fn)
    return get_recipe(ref)  # the unknown-recipe error, listing the named ones


def _from_file(path: Path, fn: str | None) -> tuple[str, Callable[[], Any]]:
    """(name, function) of the recipe in the Python file `path` (`fn`, or its only candidate)."""
    where = f"recipe file {path}"
    if not path.is_file():
        raise ConfigError(f"{where}: no such file")
    module = _exec_file(path.resolve())
    if fn is not None:
        if not callable(getattr(module, fn, None)):
            defined = ", ".join(_functions(module)) or "none"
            raise ConfigError(f"{where} defines no function {fn!r} (it defines {defined})")
        return fn, getattr(module, fn)
    found = _candidates(module)
    if not found:
        raise ConfigError(f"{where} defines no recipe function: define one that takes no arguments and returns a "
                          f"largebatch.config.RunConfig")
    if len(found) > 1:
        raise ConfigError(f"{where} defines several recipe functions ({', '.join(found)}): pick one as "
                          f"{path}:{found[0]}, or annotate the recipe `-> RunConfig`")
    return found[0], getattr(module, found[0])


def _exec_file(path: Path) -> Any:
    """Import the file as the module named by its stem, its folder first on sys.path; errors are one line."""
    name = path.stem if path.stem.isidentifier() else "largebatch_recipe_file"
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"recipe file {path}: cannot be imported as Python (a .py file is needed)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # import paths into the file (`my_recipe:build`) find this module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"recipe file {path}:{e.lineno}: {e.msg}") from None
    except Exception as e:  # user code: its error, where it happened, on one line
        raise ConfigError(f"recipe file {path}{_line(e, path)}: importing it raised {type(e).__name__}: {e}") from None
    return module


def _line(e: BaseException, path: Path) -> str:
    """':N', the line of `path` in the traceback of `e` nearest to where it was raised ('' if none)."""
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if Path(f.filename) == path]
    return f":{lines[-1]}" if lines else ""


def _functions(module: Any) -> list[str]:
    """The public functions the module itself defines, in file order."""
    fns = [(f.__code__.co_firstlineno, n) for n, f in vars(module).items()
           if inspect.isfunction(f) and f.__module__ == module.__name__ and not n.startswith("_")]
    return [n for _, n in sorted(fns)]


def _candidates(module: Any) -> list[str]:
    """Functions that can be recipes (no required arguments); those annotated `-> RunConfig` when any are."""
    def free(fn: Callable) -> bool:
        return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                   for p in inspect.signature(fn).parameters.values())

    names = [n for n in _functions(module) if free(getattr(module, n))]
    typed = [n for n in names if str(getattr(module, n).__annotations__.get("return", "")).endswith("RunConfig")
             or getattr(module, n).__annotations__.get("return") is RunConfig]
    return typed or names


def _call(where: str, name: str, fn: Callable[[], Any]) -> RunConfig:
    """`fn()`, which must return a RunConfig; what it raises becomes one line naming `where`."""
    try:
        cfg = fn()
    except ConfigError as e:
        raise ConfigError(f"{where}: {name}() made an invalid config: {e}") from None
    except Exception as e:
        file = Path(inspect.getsourcefile(fn) or "")
        at = f" at {file.name}{_line(e, file)}" if _line(e, file) else ""
        raise ConfigError(f"{where}: {name}() raised {type(e).__name__}{at}: {e}") from None
    if not isinstance(cfg, RunConfig):
        raise ConfigError(f"{where}: {name}() returned {type(cfg).__name__}, not a largebatch.config.RunConfig")
    return cfg


def task_metric(cfg: RunConfig) -> tuple[str, bool]:
    """(metric, higher_is_better) of the task `cfg` trains, resolved as the trainer resolves `cfg.task`.

    `task = auto` is the data's own task: classification for the built-in image data sets, language-model
    for shakespeare; a user's data set (`data.name` = module.path:callable) is called once here to ask it
    (`Splits.task`, else the task its first example implies), so set `task` in the recipe to skip that.
    """
    from largebatch.tasks import build_task

    name = getattr(cfg, "task", "classification")
    if name == "auto":
        name = (("language-model" if cfg.data.name == "shakespeare" else "classification")
                if cfg.data.name in DataConfig.BUILTIN else _data_task(cfg))
    task = build_task(name)  # label smoothing does not change the metric
    return task.metric, task.higher_is_better


def _data_task(cfg: RunConfig) -> str:
    """The task of the user's data set `cfg.data.name`, from its Splits."""
    from largebatch.data.user import infer, splits_by_name

    try:
        splits = splits_by_name(cfg.data, cfg.seed)
        return splits.task or infer(splits)[0]
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"task = auto: cannot tell the task of data.name = {cfg.data.name!r} ({type(e).__name__}: "
                          f"{e}); set task in the recipe, e.g. task='regression'") from None
