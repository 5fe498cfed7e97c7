"""Recipes of a study from a user's file or import path, their one-line errors, and the task's metric."""

import sys
import textwrap
from dataclasses import replace

import pytest

from largebatch.config import ConfigError
from largebatch.recipes import get_recipe
from largebatch.study.recipe import is_file_ref, load_recipe, recipe_name, task_metric

HEADER = """\
from dataclasses import replace

from largebatch.config import RunConfig
from largebatch.recipes import get_recipe
"""


@pytest.fixture(autouse=True)
def _restore_sys_path(monkeypatch):
    """Loading a recipe file puts its folder on sys.path; each test gets the path back."""
    monkeypatch.setattr(sys, "path", list(sys.path))


def write(tmp_path, name, body, header=HEADER):
    path = tmp_path / name
    path.write_text(header + textwrap.dedent(body))
    return path


def test_reference_forms_and_names():
    assert is_file_ref("my_recipe.py") and is_file_ref("dir/my_recipe.py:regression")
    assert not is_file_ref("mnist-lenet") and not is_file_ref("mypkg.recipes:fn")
    assert recipe_name("mnist-lenet") == "mnist-lenet"
    assert recipe_name("dir/my_recipe.py") == "my_recipe" and recipe_name("dir/my_recipe.py:small") == "small"
    assert recipe_name("mypkg.recipes:fn") == "fn"
    assert load_recipe("mnist-lenet") == get_recipe("mnist-lenet")


def test_file_with_one_recipe_and_a_model_factory(tmp_path):
    path = write(tmp_path, "rf_single.py", """
        def build(num_classes, in_channels):  # a model factory: required arguments, not a recipe
            raise AssertionError

        def small():
            cfg = get_recipe("mnist-lenet")
            return replace(cfg, epochs=2, model=replace(cfg.model, name="rf_single:build"))
        """)
    cfg = load_recipe(str(path))
    assert cfg.epochs == 2 and cfg.model.name == "rf_single:build"
    assert str(tmp_path) in sys.path and "rf_single" in sys.modules  # workers and the trainer can import it


def test_several_recipes_pick_by_name_or_annotation(tmp_path):
    path = write(tmp_path, "rf_two.py", """
        def a():
            return get_recipe("mnist-lenet")

        def b():
            return replace(get_recipe("mnist-lenet"), epochs=3)
        """)
    with pytest.raises(ConfigError, match=r"defines several recipe functions \(a, b\): pick one as .*rf_two.py:a"):
        load_recipe(str(path))
    assert load_recipe(f"{path}:b").epochs == 3
    with pytest.raises(ConfigError, match=r"defines no function 'c' \(it defines a, b\)"):
        load_recipe(f"{path}:c")
    typed = write(tmp_path, "rf_typed.py", """
        def helper(scale=1.0):
            return scale

        def recipe() -> RunConfig:
            return replace(get_recipe("mnist-lenet"), epochs=4)
        """)
    assert load_recipe(str(typed)).epochs == 4


@pytest.mark.parametrize("body,msg", [
    ("def r(:\n    pass\n", r"rf_bad\.py:\d+: invalid syntax"),
    ("x = 1\nraise RuntimeError('boom')\n", r"rf_bad\.py:6: importing it raised RuntimeError: boom"),
    ("import no_such_module_xyz\n", r"importing it raised ModuleNotFoundError: No module named 'no_such_module_xyz'"),
    ("def r():\n    return {'epochs': 2}\n", r"r\(\) returned dict, not a largebatch.config.RunConfig"),
    ("def r():\n    return replace(get_recipe('mnist-lenet'), epochs=-1)\n", r"r\(\) made an invalid config: epochs"),
    ("def r():\n    return 1 / 0\n", r"r\(\) raised ZeroDivisionError at rf_bad.py:6: division by zero"),
    ("def r(size):\n    pass\n", "defines no recipe function"),
])
def test_bad_recipe_files_are_one_line(tmp_path, body, msg):
    path = write(tmp_path, "rf_bad.py", body)
    with pytest.raises(ConfigError, match=msg) as e:
        load_recipe(str(path))
    assert "\n" not in str(e.value)


def test_import_path_recipes(tmp_path, monkeypatch):
    pkg = tmp_path / "rf_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    write(pkg, "recipes.py", """
        def longer():
            return replace(get_recipe("mnist-lenet"), epochs=5)

        NOT_CALLABLE = 3
        """)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_recipe("rf_pkg.recipes:longer").epochs == 5
    with pytest.raises(ConfigError, match="module 'rf_nope.recipes' not found"):
        load_recipe("rf_nope.recipes:x")
    with pytest.raises(ConfigError, match="has no attribute 'shorter'"):
        load_recipe("rf_pkg.recipes:shorter")
    with pytest.raises(ConfigError, match="not a callable"):
        load_recipe("rf_pkg.recipes:NOT_CALLABLE")
    with pytest.raises(ConfigError, match="invalid"):
        load_recipe("a:b:c")
    with pytest.raises(ConfigError, match="unknown recipe 'nope'"):
        load_recipe("nope")


def test_task_metric_follows_the_task():
    cfg = get_recipe("mnist-lenet")
    assert task_metric(cfg) == ("accuracy", True)  # task auto on MNIST: classification
    assert task_metric(replace(cfg, task="regression")) == ("loss", False)
    assert task_metric(replace(cfg, task="language-model")) == ("loss", False)


def test_study_spec_from_a_recipe_file(tmp_path):
    from largebatch.study.spec import StudySpec, cell_config

    path = write(tmp_path, "rf_spec.py", """
        def reg() -> RunConfig:
            return replace(get_recipe("mnist-lenet"), task="regression")
        """)
    spec = StudySpec(recipe=str(path), batch_sizes=(64,), epochs=1, output_dir=str(tmp_path))
    assert (spec.metric, spec.higher_is_better) == ("loss", False) and spec.base.task == "regression"
    assert cell_config(spec, "sgd", 64).task == "regression"
    explicit = StudySpec(recipe="mnist-lenet", batch_sizes=(64,), extra={"task": "regression"})
    assert (explicit.metric, explicit.higher_is_better) == ("loss", False)


@pytest.mark.parametrize("args,msg", [
    (["study", "--recipe-file", "{tmp}/missing.py", "--batch-sizes", "64"],
     "recipe file {tmp}/missing.py: no such file"),
    (["study", "--recipe-file", "{tmp}/rf_cli.py", "--batch-sizes", "64"], "rf_cli.py:5: invalid syntax"),
    (["study", "--recipe-file", "{tmp}/recipe.txt", "--batch-sizes", "64"], "is not a Python file"),
    (["study", "--recipe", "{tmp}/rf_cli.py", "--batch-sizes", "64"], "rf_cli.py:5: invalid syntax"),
    (["study", "--recipe", "mnist-lenet", "--recipe-file", "{tmp}/rf_cli.py", "--batch-sizes", "64"],
     "not allowed with argument"),
    (["study", "--batch-sizes", "64"], "one of the arguments --recipe --recipe-file is required"),
    (["study", "--recipe", "rf_nope.recipes:fn", "--batch-sizes", "64"], "module 'rf_nope.recipes' not found"),
    (["study", "--recipe", "mnist-lenet", "--batch-sizes", "64", "--target", "2"],
     "--target 2.0 is invalid: give a value of the study's metric (accuracy, a fraction in (0, 1])"),
    (["probe", "--recipe-file", "{tmp}/rf_cli.py"], "rf_cli.py:5: invalid syntax"),
    (["probe", "--recipe", "rf_nope.recipes:fn"], "module 'rf_nope.recipes' not found"),
])
def test_bad_recipe_on_the_command_line_is_one_line(tmp_path, capsys, args, msg):
    from largebatch.cli import main

    write(tmp_path, "rf_cli.py", "def r(:\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code = main([*args, *(["--storage", f"sqlite:///{tmp_path}/s.db"] if args[0] == "study" else []),
                 "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and msg.replace("{tmp}", str(tmp_path)) in lines[0], err


def test_study_command_takes_a_recipe_file(tmp_path, monkeypatch):
    """The spec carries the file's resolved config (what workers get); the study is named after the function;
    a model factory defined in the recipe file resolves before any run."""
    from largebatch.study import cli as study_cli
    from largebatch.study import sweep

    path = write(tmp_path, "rf_cmd.py", """
        import torch.nn as nn

        def build(num_classes, in_channels):
            return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 28 * 28, num_classes))

        def tiny() -> RunConfig:
            cfg = get_recipe("mnist-lenet")
            return replace(cfg, model=replace(cfg.model, name="rf_cmd:build"))
        """)
    seen = {}
    monkeypatch.setattr(sweep, "run_study", lambda spec, storage, name, workers: seen.update(spec=spec, name=name)
                        or [])
    assert study_cli.study_main(["--recipe-file", f"{path}:tiny", "--batch-sizes", "256", "--target", "0.5",
                                 "--storage", f"sqlite:///{tmp_path}/s.db", "--output-dir", str(tmp_path)]) == 0
    spec = seen["spec"]
    assert seen["name"] == "tiny" and spec.recipe == f"{path}:tiny" and spec.base.model.name == "rf_cmd:build"
    assert (spec.metric, spec.higher_is_better, spec.target) == ("accuracy", True, 0.5)
    bad = write(tmp_path, "rf_cmd_bad.py", """
        def tiny() -> RunConfig:
            cfg = get_recipe("mnist-lenet")
            return replace(cfg, model=replace(cfg.model, name="rf_cmd_bad:no_such_factory"))
        """)
    with pytest.raises(ConfigError, match="no_such_factory"):
        study_cli.study_main(["--recipe-file", str(bad), "--batch-sizes", "256",
                              "--storage", f"sqlite:///{tmp_path}/s.db", "--output-dir", str(tmp_path)])


def test_task_auto_asks_the_users_data(tmp_path, monkeypatch):
    """task = auto on a user's data set: the study's metric is the task its Splits imply (float targets:
    regression, the loss, lower is better)."""
    path = write(tmp_path, "rf_data.py", """
        import torch

        from largebatch.data import Splits


        def load(seed=0):
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(64, 3, generator=g)
            return Splits(train=(x, x.sum(1, keepdim=True)), test=(x[:16], x[:16].sum(1, keepdim=True)))


        def recipe() -> RunConfig:
            cfg = get_recipe("mnist-lenet")
            return replace(cfg, data=replace(cfg.data, name="rf_data:load"))
        """)
    cfg = load_recipe(str(path))
    assert cfg.task == "auto" and task_metric(cfg) == ("loss", False)
    bad = replace(cfg, data=replace(cfg.data, name="rf_data:nope"))
    with pytest.raises(ConfigError, match="rf_data:nope"):
        task_metric(bad)
