"""`--threads auto` (`largebatch.threads`): the count it derives and fits to the step's work, its parsing, what the
run directory records, the DataLoader workers' single thread, and the CLI's OpenMP wait policy (set before torch
loads, never over a user's)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import largebatch
from largebatch import threads as cpu
from largebatch.cli import _parse
from largebatch.config import (BatchConfig, ConfigError, DataConfig, EvalConfig, OptimizerConfig, OutputConfig,
                               PrecisionConfig, RunConfig, from_dict)
from largebatch.data import Splits
from largebatch.data.stream import DatasetTrain
from largebatch.malloc import keep_freed_memory
from largebatch.runtime import apply_threads, threads_while

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_threads():
    """Tests here set torch's threads and the study share of this process: put both back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
    cpu.share_cores(1)


# --- the rule ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("requested, cores, processes, loader_workers, default, limit, expected", [
    ("auto", 2, 1, 0, 0, None, 2),    # one process on 2 cores: both
    ("auto", 2, 2, 0, 0, None, 1),    # 2 torchrun ranks (or study workers) on 2 cores: one each
    ("auto", 2, 1, 2, 0, None, 1),    # 2 DataLoader workers take both cores: the trainer keeps 1
    ("auto", 1, 1, 0, 0, None, 1),    # an affinity mask of 1 core
    ("auto", 1, 4, 3, 0, None, 1),    # fewer cores than processes: still 1
    ("auto", 16, 2, 3, 0, None, 5),   # 16 / 2 ranks = 8 each, less 3 workers
    ("auto", 16, 3, 0, 0, None, 5),   # 16 // 3
    ("auto", 2, 1, 0, 0, 1, 1),       # OMP_NUM_THREADS=1: at most 1
    ("auto", 16, 2, 0, 0, 12, 8),     # a limit above the share changes nothing
    (3, 2, 1, 0, 0, None, 3),         # an explicit count passes through (even above the cores)
    (4, 2, 1, 0, 0, 1, 4),            # ... and above OMP_NUM_THREADS
    (1, 16, 2, 8, 0, None, 1),
    (0, 2, 1, 0, 7, None, 7),         # 0: torch's default, whatever it is
])
def test_plan_threads(requested, cores, processes, loader_workers, default, limit, expected):
    plan = cpu.plan_threads(requested, cores, processes, loader_workers, default, limit)
    assert plan.threads == expected
    assert (plan.requested, plan.cores, plan.processes, plan.loader_workers) == (requested, cores, processes,
                                                                                 loader_workers)


@pytest.mark.parametrize("plan, line", [
    (cpu.plan_threads("auto", 2), "threads 2 = 2 cores (--threads auto)"),
    (cpu.plan_threads("auto", 2, 2), "threads 1 = max(1, 2 cores / 2 local processes) (--threads auto)"),
    (cpu.plan_threads("auto", 2, 1, 2), "threads 1 = max(1, 2 cores - 2 DataLoader workers) (--threads auto)"),
    (cpu.plan_threads("auto", 16, 2, 3), "threads 5 = max(1, 16 cores / 2 local processes - 3 DataLoader workers) "
                                         "(--threads auto)"),
    (cpu.plan_threads("auto", 2, limit=1), "threads 1 = 2 cores, capped by OMP_NUM_THREADS=1 (--threads auto)"),
    (cpu.plan_threads("auto", 2, limit=2), "threads 2 = 2 cores (--threads auto)"),
    (cpu.plan_threads(2, 16), "threads 2 (--threads 2)"),
    (cpu.plan_threads(0, 16, default=8), "threads 8: torch's default (--threads 0)"),
    (cpu.plan_threads("auto", 2, wait="OMP_WAIT_POLICY=PASSIVE"),
     "threads 2 = 2 cores (--threads auto); idle OpenMP threads: OMP_WAIT_POLICY=PASSIVE"),
    (cpu.plan_threads("auto", 2, wait="OMP_WAIT_POLICY=PASSIVE", malloc="glibc malloc as set: M=1"),
     "threads 2 = 2 cores (--threads auto); idle OpenMP threads: OMP_WAIT_POLICY=PASSIVE; "
     "allocator: glibc malloc as set: M=1"),
])
def test_the_derivation_line(plan, line):
    assert plan.describe() == line


@pytest.mark.parametrize("requested, cores, limit, op_flops, expected", [
    ("auto", 2, None, 12e6, 1),     # gpt-mini at batch 2: too small to split
    ("auto", 2, None, 49.9e6, 1),   # under 2 x 25 MFLOP
    ("auto", 2, None, 50e6, 2),     # 25 MFLOP a thread
    ("auto", 2, None, 5e9, 2),      # never above the share
    ("auto", 16, None, 100e6, 4),   # 4 threads' worth on 16 cores
    ("auto", 16, 2, 100e6, 2),      # OMP_NUM_THREADS still caps it
    ("auto", 16, None, 0.0, 1),     # at least 1
    ("auto", 2, None, None, 2),     # nothing counted: the share
    (2, 2, None, 12e6, 2),          # an explicit count is the user's
    (0, 2, None, 12e6, 5),          # and so is torch's default
])
def test_fit_to_work_gives_a_thread_per_grain_of_the_average_op(requested, cores, limit, op_flops, expected):
    plan = cpu.fit_to_work(cpu.plan_threads(requested, cores, default=5, limit=limit), op_flops)
    assert plan.threads == expected
    assert plan.op_flops == (op_flops if requested == "auto" else None)


@pytest.mark.parametrize("op_flops, limit, line", [
    (12e6, None, "threads 1 = 2 cores, at most 1 per 25 MFLOP of the step's average matmul/convolution (12 MFLOP) "
                 "(--threads auto)"),
    (60e6, None, "threads 2 = 2 cores (--threads auto)"),  # the grain does not bind: not named
    (12e6, 1, "threads 1 = 2 cores, capped by OMP_NUM_THREADS=1 (--threads auto)"),  # the user's limit binds first
])
def test_the_line_names_the_grain_where_it_binds(op_flops, limit, line):
    assert cpu.fit_to_work(cpu.plan_threads("auto", 2, limit=limit), op_flops).describe() == line


@pytest.mark.parametrize("requested, cores, limit, op_flops, eval_op_flops, expected", [
    ("auto", 2, None, 12e6, 6e9, (1, 2)),     # gpt-mini: batch 2 on one thread, its evaluation batch on both
    ("auto", 2, None, 60e6, 30e6, (2, 1)),    # an evaluation batch smaller than the step's
    ("auto", 16, None, 12e6, 100e6, (1, 4)),  # the same grain
    ("auto", 16, 3, 12e6, 6e9, (1, 3)),       # OMP_NUM_THREADS caps evaluation too
    ("auto", 2, None, 12e6, None, (1, 1)),    # nothing counted for evaluation: the step's count
    (2, 2, None, 12e6, 6e9, (2, 2)),          # an explicit count is used for both
])
def test_evaluation_gets_its_own_count_by_the_same_rule(requested, cores, limit, op_flops, eval_op_flops, expected):
    plan = cpu.fit_to_work(cpu.plan_threads(requested, cores, limit=limit), op_flops, eval_op_flops)
    assert (plan.threads, plan.to_dict()["eval_threads"]) == expected


def test_the_line_names_the_evaluation_count_where_it_differs():
    assert cpu.fit_to_work(cpu.plan_threads("auto", 2), 12e6, 6e9).describe() == (
        "threads 1 = 2 cores, at most 1 per 25 MFLOP of the step's average matmul/convolution (12 MFLOP); 2 while "
        "evaluating, by the same rule for its batch (--threads auto)")
    assert "evaluating" not in cpu.fit_to_work(cpu.plan_threads("auto", 2), 12e6, 12e6).describe()


def test_threads_while_sets_the_count_inside_and_puts_it_back():
    torch.set_num_threads(1)
    with threads_while(2):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == 1
    with pytest.raises(RuntimeError), threads_while(2):
        raise RuntimeError("an evaluation that fails")
    assert torch.get_num_threads() == 1
    with threads_while(None):
        assert torch.get_num_threads() == 1


def test_local_processes_are_torchrun_ranks_times_study_workers():
    assert cpu.local_processes({}) == 1
    assert cpu.local_processes({"LOCAL_WORLD_SIZE": "2"}) == 2
    assert cpu.local_processes({"LOCAL_WORLD_SIZE": "x"}) == 1
    cpu.share_cores(3)
    assert cpu.local_processes({}) == 3
    assert cpu.local_processes({"LOCAL_WORLD_SIZE": "2"}) == 6


@pytest.mark.parametrize("environ, limit", [
    ({}, None),
    ({"OMP_NUM_THREADS": "1"}, 1),
    ({"OMP_NUM_THREADS": "3,1"}, 3),  # nested levels: the first is the intra-op count
    ({"OMP_NUM_THREADS": "x"}, None),
    ({"OMP_NUM_THREADS": "0"}, None),
    ({"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "2"}, None),  # torchrun's default for its ranks: not followed
    ({"OMP_NUM_THREADS": "2", "LOCAL_WORLD_SIZE": "2"}, 2),  # anything else is the user's
])
def test_user_limit_is_omp_num_threads_but_not_torchruns_default(environ, limit):
    assert cpu.user_limit(environ) == limit


def test_study_workers_declare_their_share(monkeypatch):
    """`_spawn` hands each worker process the number of workers; the worker declares it before any trial."""
    from largebatch.study import sweep

    started = []

    class Process:
        def __init__(self, target, args):
            started.append((target, args))
            self.exitcode = 0

        start = join = lambda self: None

    monkeypatch.setattr(sweep.multiprocessing, "get_context", lambda method: type("Ctx", (), {"Process": Process}))
    sweep._spawn("spec", "storage", "name", 3)
    assert started == [(sweep._work, ("spec", "storage", "name", i, 3)) for i in range(3)]
    monkeypatch.setattr(sweep, "open_storage", lambda url, heartbeat: None)
    monkeypatch.setattr(sweep, "_cells", lambda spec: [])
    sweep._work(type("Spec", (), {"heartbeat": 60, "decide": False}), "storage", "name", 1, 3)
    assert cpu.local_processes({}) == 3


def _topology(root: Path, cpu_id: int, package: int, core: int) -> None:
    d = root / f"cpu{cpu_id}" / "topology"
    d.mkdir(parents=True)
    (d / "physical_package_id").write_text(f"{package}\n")
    (d / "core_id").write_text(f"{core}\n")


def test_physical_cores_count_hyperthread_siblings_once(tmp_path):
    for cpu_id, (package, core) in enumerate([(0, 0), (0, 1), (0, 0), (0, 1), (1, 0), (1, 0)]):
        _topology(tmp_path, cpu_id, package, core)
    assert cpu.physical_cores({0, 1, 2, 3}, tmp_path) == 2  # 0/2 and 1/3 are siblings
    assert cpu.physical_cores({0, 1, 4, 5}, tmp_path) == 3  # core 0 of package 1 is another core
    assert cpu.physical_cores({0, 2}, tmp_path) == 1
    assert cpu.physical_cores({0, 9}, tmp_path) == 2  # cpu9's topology unreadable: count the CPUs


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no affinity masks on this OS")
def test_an_affinity_mask_of_one_core_gives_one_thread():
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from largebatch.runtime import apply_threads; import torch; p = apply_threads('auto'); "
            "print(p.cores, p.threads, torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k != "LOCAL_WORLD_SIZE"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "1", "1"]


def test_apply_threads_sets_torch():
    plan = apply_threads(1)
    assert plan.threads == torch.get_num_threads() == 1
    plan = apply_threads("auto")
    share = max(1, cpu.physical_cores(cpu.cpus_available()) // cpu.local_processes())
    assert plan.threads == torch.get_num_threads() == min(share, cpu.user_limit() or share)
    torch.set_num_threads(1)
    assert apply_threads(0).threads == 1  # 0 leaves torch as it is


# --- parsing -------------------------------------------------------------------------------------------

def test_threads_parse_from_the_cli_and_config_files():
    assert RunConfig().threads == "auto"
    assert _parse("train", [])[0].threads == "auto"
    assert _parse("train", ["--threads", "auto"])[0].threads == "auto"
    assert _parse("train", ["--threads", "3"])[0].threads == 3
    assert _parse("train", ["--threads", "0"])[0].threads == 0
    assert from_dict({"threads": "auto"}).threads == "auto"
    assert from_dict({"threads": 2}).threads == 2


@pytest.mark.parametrize("args, message", [
    (["--threads", "-3"], "threads = -3 is invalid: must be auto or a count >= 0 (0 = torch's default)"),
    (["--threads", "many"], "--threads 'many' is invalid: give an integer or one of auto"),
    (["--threads", "2.5"], "--threads '2.5' is invalid: give an integer or one of auto"),
])
def test_bad_threads_on_the_cli_are_one_line(args, message):
    with pytest.raises(ConfigError) as e:
        _parse("train", args)
    assert str(e.value) == message


@pytest.mark.parametrize("value, message", [
    ("many", "threads = 'many' is invalid: must be an integer or one of auto"),
    (True, "threads = True is invalid: must be an integer or one of auto"),
    (-1, "threads = -1 is invalid: must be auto or a count >= 0 (0 = torch's default)"),
])
def test_bad_threads_in_a_config_file_are_one_line(value, message):
    with pytest.raises(ConfigError) as e:
        from_dict({"threads": value})
    assert str(e.value) == message


# --- a run: what it records, what its DataLoader workers run with ------------------------------------------

class Digits(Dataset):
    """n (image [1, 8, 8], label) samples; the image holds the reading process's torch thread count."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int):
        return torch.full((1, 8, 8), float(torch.get_num_threads())), i % 4


def tiny_net(num_classes: int, in_channels: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 64, num_classes))


def tiny_config(tmp_path: Path, name: str, **kw) -> RunConfig:
    return RunConfig(**{**dict(epochs=1, device="cpu", precision=PrecisionConfig("fp32"),
                               batch=BatchConfig(global_batch=32), eval=EvalConfig(every_epochs=1),
                               optimizer=OptimizerConfig(name="sgd", base_lr=0.01, reference_batch=32),
                               output=OutputConfig(dir=str(tmp_path), name=name, progress=False)), **kw})


@pytest.mark.parametrize("threads, workers", [("auto", 0), ("auto", 2), (1, 2)])
def test_config_json_keeps_what_was_asked_and_env_json_the_count(tmp_path, capsys, threads, workers):
    cfg = tiny_config(tmp_path, "run", threads=threads, data=DataConfig(workers=workers))
    largebatch.train(cfg, model=tiny_net, data=Splits(Digits(), Digits(), keywords={"num_classes": 4}))
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["threads"] == threads
    env = json.loads((run / "env.json").read_text())
    cores, processes, limit = cpu.physical_cores(cpu.cpus_available()), cpu.local_processes(), cpu.user_limit()
    share = max(1, cores // processes - workers)
    op_flops = 2 * 32 * 64 * 4 if threads == "auto" else None  # tiny_net's one Linear at micro-batch 32
    expected = 1 if threads == "auto" else threads  # 16 KFLOP: far below a thread's grain
    assert (env["threads"], env["threads_requested"], env["cpu_cores"], env["local_processes"], env["loader_workers"],
            env["omp_num_threads"], env["op_flops"]) == (expected, threads, cores, processes, workers, limit, op_flops)
    assert torch.get_num_threads() == expected
    assert env["eval_threads"] == expected  # its batch of 64: 32 KFLOP
    assert env["malloc"] == keep_freed_memory()  # what the allocator runs with (tests/test_malloc.py)
    plan = cpu.plan_threads(threads, cores, processes, workers, limit=limit, wait=cpu.openmp_wait(),
                            malloc=env["malloc"])
    line = cpu.fit_to_work(plan, op_flops).describe()
    assert ("at most 1 per 25 MFLOP" in line) == (threads == "auto" and min(share, limit or share) > 1)
    assert capsys.readouterr().out.count(f"[largebatch] {line}\n") == 1  # printed once


class Wide(nn.Module):
    """An average op of 1.1 MFLOP an example (a 64 -> 16,384 -> 4 MLP): 36 MFLOP at the micro-batch of 32, one
    thread; 71 MFLOP at an evaluation batch of 64, two. Records (training?, torch threads) at each forward."""

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 64, 16384), nn.Linear(16384, num_classes))
        self.seen: list[tuple[bool, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((self.training, torch.get_num_threads()))
        return self.body(x)


def test_evaluation_runs_on_its_own_count_and_training_goes_on_with_the_steps(tmp_path, monkeypatch):
    """As on 2 physical cores, whatever this machine has (torch runs 2 threads on 1 core too)."""
    monkeypatch.setattr(cpu, "physical_cores", lambda cpus: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    made: list[Wide] = []

    def wide(num_classes: int, in_channels: int) -> Wide:
        made.append(Wide(num_classes, in_channels))
        return made[-1]

    cfg = tiny_config(tmp_path, "run", epochs=2, threads="auto", data=DataConfig(workers=0))  # both cores ours
    largebatch.train(cfg, model=wide, data=Splits(Digits(), Digits(), keywords={"num_classes": 4}))
    model, = made
    env = json.loads((tmp_path / "run" / "env.json").read_text())
    assert (env["cpu_cores"], env["threads"], env["eval_threads"]) == (2, 1, 2)
    first_eval = model.seen.index((False, env["eval_threads"]))
    after = model.seen[first_eval:]
    assert {t for training, t in after if not training} == {env["eval_threads"]}  # every evaluation forward
    assert {t for training, t in after if training} == {1}  # the steps after an evaluation: back on one
    assert sum(not training for training, _ in after) == 2 and sum(training for training, _ in after) == 2


def test_dataloader_workers_run_one_torch_thread():
    torch.set_num_threads(2)  # the training process's count must not reach the workers
    source = DatasetTrain(Digits(), "cpu", num_workers=2)
    batches = list(source.micro_batches(0, 32, 0, 1, 8))
    assert len(batches) == 4 and all(bool((x == 1).all()) for x, _ in batches)
    inline = DatasetTrain(Digits(), "cpu", num_workers=0)  # the check itself: in-process reads see 2
    assert all(bool((x == 2).all()) for x, _ in inline.micro_batches(0, 32, 0, 1, 8))


# --- OpenMP's wait policy -------------------------------------------------------------------------------

@pytest.mark.parametrize("environ, expected_set, after", [
    ({}, {"OMP_WAIT_POLICY": "PASSIVE"}, {"OMP_WAIT_POLICY": "PASSIVE"}),
    ({"OMP_WAIT_POLICY": "ACTIVE"}, {}, {"OMP_WAIT_POLICY": "ACTIVE"}),
    ({"GOMP_SPINCOUNT": "300000"}, {}, {"GOMP_SPINCOUNT": "300000"}),
])
def test_quiet_openmp_never_overrides_the_user(environ, expected_set, after):
    assert cpu.quiet_openmp(environ) == expected_set
    assert environ == after


def test_the_cli_sets_the_wait_policy_before_torch_loads():
    code = ("import os, sys; from largebatch.cli import main; main(['recipes']); "
            "print('torch' in sys.modules, os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k not in cpu.OPENMP_WAIT_VARIABLES}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == "False PASSIVE"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "active"}, capture_output=True,
                         text=True, check=True)
    assert out.stdout.splitlines()[-1] == "False active"
