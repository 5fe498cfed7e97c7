"""A user's own model, data and task through the public API only: `largebatch.train(cfg, model=, data=, task=)`,
the CLI with import paths (`examples/my_project.py`), torchrun, SIGKILL and resume.

References: an uninterrupted run for resumed ones (bitwise, fp32 CPU), one process with accumulation for two
torchrun ranks (float64, 1e-9: the sums differ only in order), a direct float64 computation for the tasks' metrics.
"""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from procs import kill_after_first_checkpoint
from torch import nn
from torch.utils.data import Dataset

import largebatch
from largebatch import checkpoint
from largebatch.cli import main as cli_main
from largebatch.config import (BatchConfig, ConfigError, DataConfig, DiagnosticsConfig, EvalConfig, ModelConfig,
                               NoiseConfig, OptimizerConfig, OutputConfig, PrecisionConfig, RunConfig, ScheduleConfig)
from largebatch.data import Splits
from largebatch.metrics import read_metrics
from largebatch.tasks import Classification, LanguageModel, Regression, Task

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def templates(n: int, seed: int, channels: int = 1, size: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy copies of 10 fixed random images; label = template."""
    t = torch.randn(10, channels, size, size, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    return t[y] + 1.0 * torch.randn(n, channels, size, size, generator=g), y


class TinyCNN(nn.Module):
    """Takes only the keywords it names; batch norm so ghost BN has something to convert."""

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def config(tmp_path: Path, name: str, **kw) -> RunConfig:
    base = dict(epochs=2, threads=1, device="cpu", precision=PrecisionConfig("fp32"),
                batch=BatchConfig(global_batch=256, micro_batch=64),
                optimizer=OptimizerConfig(name="lars", base_lr=1.0, reference_batch=256, weight_decay=5e-4),
                schedule=ScheduleConfig(warmup_epochs=0.5, decay="poly"),
                output=OutputConfig(dir=str(tmp_path), name=name, progress=False))
    return RunConfig(**{**base, **kw})


def weights(run_dir: Path) -> dict:
    return checkpoint.load(run_dir / "checkpoint.pt")["model"]


def assert_bitwise(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --- Python API: own model, own tensors, every feature ------------------------------------------------------

ALL_FEATURES = dict(
    noise=NoiseConfig(gradient_eta=1e-4, weight_std=1e-3, activation_std=1e-3, label_prob=0.05),
    model=ModelConfig(ghost_batch=32), diagnostics=DiagnosticsConfig(every_steps=2, per_tensor=True),
    grad_clip_norm=5.0, label_smoothing=0.1, eval=EvalConfig(target=0.999))


def test_own_model_and_tensors_with_every_feature_resume_bitwise_and_call_twice(tmp_path):
    """Accumulation (4 x 64), LARS + warmup + poly decay, the four noises, ghost BN, clipping, label smoothing,
    diagnostics and a (not reached) target: a run stopped at step 5 and resumed with the same objects ends on the
    uninterrupted run's weights bit for bit; calling train() again in the same process repeats it exactly."""
    data = Splits(train=templates(1024, 0), test=templates(300, 1))
    whole = largebatch.train(config(tmp_path, "whole", **ALL_FEATURES), model=TinyCNN, data=data)
    assert whole["status"] == "completed" and whole["accum_steps"] == 4 and whole["steps"] == 8
    assert whole["task"] == "classification" and whole["metric"] == "accuracy" and whole["higher_is_better"]
    assert 0 <= whole["test_accuracy"] <= 1 and "test_top5_accuracy" in whole and whole["target_reached"] is False
    recs = read_metrics(tmp_path / "whole")
    assert any("noise_scale" in r and "weight_distance" in r for r in recs)
    assert any("trust_ratio_p50" in r for r in recs) and any("test_accuracy" in r for r in recs)
    stop = config(tmp_path, "split", **ALL_FEATURES)
    stop.checkpoint.stop_at_step = 5
    assert largebatch.train(stop, model=TinyCNN, data=data)["status"] == "stopped"
    resumed = largebatch.train(config(tmp_path, "split", **ALL_FEATURES), resume=True, model=TinyCNN, data=data)
    assert resumed["status"] == "completed"
    assert_bitwise(weights(tmp_path / "split"), weights(tmp_path / "whole"))
    again = largebatch.train(config(tmp_path, "again", **ALL_FEATURES), model=TinyCNN, data=data)
    assert again["test_accuracy"] == whole["test_accuracy"]
    assert_bitwise(weights(tmp_path / "again"), weights(tmp_path / "whole"))


def test_a_module_object_is_copied_and_its_run_resumes_only_from_python(tmp_path, capsys):
    net = TinyCNN(10, 1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    s = largebatch.train(config(tmp_path, "m", epochs=1), model=net, data=Splits(templates(512, 0), templates(100, 1)))
    assert s["status"] == "completed"
    assert_bitwise(net.state_dict(), before)  # the caller's module is untouched
    from largebatch.cli import main

    assert main(["train", "--resume", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "given to largebatch.train() as a Python object" in err, err


def test_bf16_run_of_an_own_model_with_a_layerwise_adam_completes(tmp_path):
    opt = OptimizerConfig(name="adam", layerwise=True, base_lr=0.01, reference_batch=256, max_ratio=10.0)
    s = largebatch.train(config(tmp_path, "bf16", epochs=1, precision=PrecisionConfig("bf16"), optimizer=opt),
                         model=TinyCNN, data=Splits(templates(512, 0), templates(100, 1)))
    assert s["status"] == "completed" and math.isfinite(s["test_loss"])
    assert json.loads((tmp_path / "bf16" / "env.json").read_text())["precision"] == "torch.bfloat16"
    assert any("trust_ratio_p50" in r for r in read_metrics(tmp_path / "bf16"))


# --- tasks: regression and language modelling -------------------------------------------------------------

class Vectors(Dataset):
    """A map-style Dataset of (x [6], y scalar): y = w . x + noise, example i computed from its index."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self.w = torch.linspace(-1, 1, 6)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(self.seed * 100_003 + i)
        x = torch.randn(6, generator=g)
        return x, self.w @ x + 0.1 * torch.randn((), generator=g)


def linear(in_features: int, out_features: int) -> nn.Module:
    return nn.Linear(in_features, out_features)


def test_regression_on_a_streamed_dataset_reports_its_loss_and_reaches_a_loss_target(tmp_path):
    cfg = config(tmp_path, "reg", epochs=20, task="regression", data=DataConfig(workers=2),
                 optimizer=OptimizerConfig(name="sgd", base_lr=0.05, reference_batch=64),
                 schedule=ScheduleConfig(), eval=EvalConfig(target=0.02, every_epochs=1))
    s = largebatch.train(cfg, model=linear, data=Splits(train=Vectors(1024, 0), test=Vectors(256, 1)))
    assert (s["task"], s["metric"], s["higher_is_better"]) == ("regression", "loss", False)
    assert s["target_reached"] and s["test_loss"] <= 0.02 and s["epochs"] < 20  # noise floor 0.01
    assert s["test_rmse"] == pytest.approx(math.sqrt(s["test_loss"]), rel=1e-12)
    assert s["best_test_loss"] == min(r["test_loss"] for r in read_metrics(tmp_path / "reg") if "test_loss" in r)


def test_task_metrics_equal_a_float64_computation():
    torch.manual_seed(0)
    logits, y, mask = torch.randn(7, 10).double(), torch.randint(0, 10, (7,)), torch.tensor([1, 1, 1, 1, 1, 0, 0]) > 0
    t = Classification()
    m = t.metrics({k: v.item() for k, v in t.eval_sums(logits, y, mask).items()})
    ref = torch.nn.functional.cross_entropy(logits[:5], y[:5])
    assert m["loss"] == pytest.approx(ref.item(), rel=1e-12)
    assert m["accuracy"] == (logits[:5].argmax(1) == y[:5]).double().mean().item()
    out, tgt = torch.randn(7, 1).double(), torch.randn(7).double()
    r = Regression()
    m = r.metrics({k: v.item() for k, v in r.eval_sums(out, tgt, mask).items()})
    assert m["loss"] == pytest.approx(((out[:5, 0] - tgt[:5]) ** 2).mean().item(), rel=1e-12)
    lm, tokens = torch.randn(7, 5, 11).double(), torch.randint(0, 11, (7, 5))
    tokens[0, 0] = -100  # ignored
    t = LanguageModel()
    m = t.metrics({k: v.item() for k, v in t.eval_sums(lm, tokens, mask).items()})
    keep = tokens[:5].flatten() != -100
    ref = torch.nn.functional.cross_entropy(lm[:5].flatten(0, 1)[keep], tokens[:5].flatten()[keep])
    assert m["loss"] == pytest.approx(ref.item(), rel=1e-12)
    assert m["perplexity"] == pytest.approx(math.exp(ref.item()), rel=1e-12)
    assert m["bits_per_token"] == pytest.approx(ref.item() / math.log(2), rel=1e-12)
    with pytest.raises(ValueError, match="differ in size"):
        Regression().loss(torch.randn(4, 2), torch.randn(4))


class TinyLM(nn.Module):
    def __init__(self, vocab_size: int, block_size: int) -> None:
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab_size, 16), nn.Parameter(torch.zeros(block_size, 16))
        self.head = nn.Linear(16, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(x) + self.pos))


def test_language_model_task_on_token_sequences(tmp_path):
    """Sequences of a repeating pattern: token t+1 follows token t; the model learns the bigram."""
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, 12, (640, 1), generator=g)
    seq = (start + torch.arange(9)) % 12
    data = Splits(train=(seq[:512, :-1], seq[:512, 1:]), test=(seq[512:, :-1], seq[512:, 1:]),
                  keywords={"vocab_size": 12})
    cfg = config(tmp_path, "lm", epochs=20, optimizer=OptimizerConfig(name="lamb", base_lr=0.1, reference_batch=128),
                 batch=BatchConfig(global_batch=128), model=ModelConfig(channels_last=False))
    s = largebatch.train(cfg, model=TinyLM, data=data)
    assert (s["task"], s["metric"]) == ("language-model", "loss")
    assert s["test_loss"] < 0.5 * math.log(12) and s["test_perplexity"] == pytest.approx(math.exp(s["test_loss"]))
    assert s["tokens_per_example"] == 8 and s["train_tokens"] == s["steps"] * 128 * 8  # batch counts sequences


class Hinge(Task):
    """A user's own task: multi-class hinge loss, scored by accuracy."""

    name, metric, higher_is_better = "hinge", "accuracy", True

    def loss(self, output, target):
        return nn.functional.multi_margin_loss(output.float(), target)

    def eval_sums(self, output, target, mask):
        return {"correct": torch.where(mask, output.argmax(1) == target, False).double().sum(),
                "loss": torch.where(mask, nn.functional.multi_margin_loss(output.float(), target, reduction="none"),
                                    0.0).double().sum(), "count": mask.double().sum()}

    def metrics(self, sums):
        return {"loss": sums["loss"] / sums["count"], "accuracy": sums["correct"] / sums["count"]}


def test_an_own_task_object_decides_the_metric(tmp_path):
    s = largebatch.train(config(tmp_path, "hinge", epochs=4), model=TinyCNN, task=Hinge(),
                         data=Splits(templates(512, 0), templates(200, 1)))
    assert (s["task"], s["metric"], s["higher_is_better"]) == ("hinge", "accuracy", True)
    evals = [r for r in read_metrics(tmp_path / "hinge") if "test_accuracy" in r]
    assert len(evals) == 4 and s["best_test_accuracy"] == max(r["test_accuracy"] for r in evals)


def test_label_noise_needs_class_labels(tmp_path):
    cfg = config(tmp_path, "bad", task="regression", noise=NoiseConfig(label_prob=0.1))
    with pytest.raises(ConfigError, match="flips class labels"):
        largebatch.train(cfg, model=linear, data=Splits(train=Vectors(256, 0), test=Vectors(64, 1)))
    assert not (tmp_path / "bad").exists()


# --- CLI with import paths: SIGKILL and resume, torchrun --------------------------------------------------

PROJECT = ["--recipe", "my_project:recipe", "--epochs", "8", "--batch.global-batch", "512", "--threads", "1",
           "--precision.dtype", "fp32", "--device", "cpu", "--data.train-limit", "2048", "--data.test-limit", "512"]


def test_killed_cli_run_of_an_own_model_and_streamed_dataset_resumes_bitwise(tmp_path, monkeypatch, capsys):
    """`--recipe my_project:recipe` (model and data by import path, a map-style Dataset streamed by a worker):
    SIGKILL after the first checkpoint, `--resume` from config.json alone, and the final weights equal an
    uninterrupted run's bit for bit. The killed run is a `python -m largebatch` process; the resumed and the
    uninterrupted runs go through the same CLI code in this process (`cli.main`, no interpreter start-up)."""
    out = ["--output-dir", str(tmp_path), "--eval-every", "0"]  # evaluate at the end only
    env = {**os.environ, "PYTHONPATH": str(EXAMPLES), "OMP_NUM_THREADS": "1"}
    step = kill_after_first_checkpoint([*PROJECT, *out, "--output.name", "killed"], tmp_path / "killed", env)
    assert step < 8 * 4  # killed before the end
    monkeypatch.syspath_prepend(str(EXAMPLES))
    assert cli_main(["train", "--resume", str(tmp_path / "killed")]) == 0
    assert f"resumed at step {step} " in capsys.readouterr().out
    assert cli_main(["train", *PROJECT, *out, "--output.name", "whole"]) == 0
    assert_bitwise(weights(tmp_path / "killed"), weights(tmp_path / "whole"))


def test_torchrun_two_ranks_of_an_own_model_equal_one_process_with_accumulation(tmp_path, monkeypatch):
    """The same global batch of 512 as 2 ranks x 256 and as 1 process x 2 micro-batches of 256, in float64."""
    args = [*PROJECT, "--epochs", "2", "--precision.dtype", "fp64", "--output-dir", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(EXAMPLES), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                        "largebatch", "train", *args, "--output.name", "ddp"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    monkeypatch.syspath_prepend(str(EXAMPLES))
    assert cli_main(["train", *args, "--batch.micro-batch", "256", "--output.name", "one"]) == 0
    ddp, one = weights(tmp_path / "ddp"), weights(tmp_path / "one")
    for k in one:
        assert ddp[k].dtype == torch.float64
        torch.testing.assert_close(ddp[k], one[k], rtol=1e-9, atol=1e-12)


def test_a_model_path_that_does_not_import_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    assert cli_main(["train", *PROJECT, "--model.name", "my_project:build_nett", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "'my_project' has no attribute 'build_nett'" in err and "build_net" in err
    assert not any(tmp_path.iterdir())


def test_study_of_an_own_regression_problem_is_decided_on_its_loss(tmp_path, monkeypatch):
    """2 batch sizes x 2 optimizers on examples/my_project.py (regression, a streamed Dataset): every record carries
    the loss, lower is better, and the report's regimes are decided on it (`study` and `report` through cli.main)."""
    db = f"sqlite:///{tmp_path}/study.db"
    monkeypatch.syspath_prepend(str(EXAMPLES))
    assert cli_main(["study", "--recipe", "my_project:recipe", "--batch-sizes", "256,1024", "--optimizers", "sgd,lamb",
                     "--epochs", "2", "--trials", "0", "--seeds", "1", "--storage", db,
                     "--output-dir", str(tmp_path / "runs"), "--set", "data.train_limit=2048",
                     "--set", "data.test_limit=512", "--set", "threads=1"]) == 0
    assert cli_main(["report", db, "--out", str(tmp_path / "report")]) == 0
    regimes = json.loads((tmp_path / "report" / "regimes.json").read_text())
    assert (regimes["metric"], regimes["higher_is_better"]) == ("loss", False)
    assert regimes["threshold"] == pytest.approx(regimes["baseline_value"] * 1.01)
    with open(tmp_path / "report" / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {row["metric"] for row in rows} == {"loss"}
    assert {row["rung"] for row in rows} == {"sgd", "lamb"} and {row["batch_size"] for row in rows} == {"256", "1024"}
    assert "loss" in (tmp_path / "report" / "report.md").read_text()
