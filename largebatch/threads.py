"""CPU threads: how many torch intra-op threads a process gets, and how its idle OpenMP threads wait.

    largebatch train --recipe mnist-lenet-lars-8k                 # --threads auto (the default)
    largebatch train --recipe mnist-lenet-lars-8k --threads 2     # an explicit count, as given
    torchrun --nproc-per-node 2 -m largebatch train --recipe ...  # auto: each rank gets half the cores

`--threads auto` divides the cores this process may run on (its affinity mask, counted in physical cores as
torch's own default counts them) among the local processes that share them -- torchrun's ranks on this machine
(LOCAL_WORLD_SIZE) and the worker processes of a study (`share_cores`) -- and leaves one core to each DataLoader
worker of this rank: threads = max(1, cores // processes - loader workers), at most OMP_NUM_THREADS where the
user set it (`user_limit`: torchrun sets OMP_NUM_THREADS=1 for its ranks when the user did not, and that default is
not followed: auto divides the cores itself). `plan_threads` is that rule, a pure function; the trainer applies it
once the data (and so its DataLoader workers) is known and prints its line. `--threads N` is used as given;
`--threads 0` keeps torch's default (OMP_NUM_THREADS when set, else every physical core of the machine).

A step too small to split: once the model and its micro-batch are known, `fit_to_work` caps that share at one
thread per MIN_FLOPS_PER_THREAD of the step's average matrix multiply or convolution (`op_flops`, counted on the
memory probe's forward, `largebatch.batch.OpFlops`): threads = max(1, min(share, op_flops //
MIN_FLOPS_PER_THREAD)). An op of a few MFLOP is tens of microseconds of work, and each one wakes the sleeping
threads (below) for a slice smaller than the wake-up: gpt-mini at batch 2 (12 MFLOP an op) ran 1.7x faster on 1
thread than on 2. Evaluation, whose batch (`eval.batch_size`) is usually larger and has no backward, gets its own
count by the same rule from its batch's average op (`eval_threads`; the trainer switches to it while it evaluates).
The counts follow from the model and the batches alone, so a run and its resume get the same. Only 1 thread
against 2 was measured: what the grain gives beyond 2 is extrapolated.

Waiting: torch's OpenMP runtime (its bundled GNU libgomp) spins an idle thread for about 300,000 iterations
before it sleeps. Alone on a machine that costs nothing; beside another busy process the spinning threads of both
take the cores the other's working threads need (`make demo` fell from 15K to 2.4K images/s when a second
training process shared its 2 cores). `quiet_openmp` sets OMP_WAIT_POLICY=PASSIVE (idle threads sleep at once)
unless the user set OMP_WAIT_POLICY or GOMP_SPINCOUNT; libgomp reads them once, when torch is imported, so the CLI
calls it first thing, before anything imports torch (a Python caller that imports torch itself keeps its own
setting). `benchmarks/oversubscription.py` measures both policies, alone and beside a second trainer.

Torch-free: the CLI imports it before torch loads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, MutableMapping, Union

MIN_FLOPS_PER_THREAD = 25e6
"""`fit_to_work`'s grain: FLOPs of an average matrix multiply or convolution per thread. Measured on a 2-core
EPYC with AVX512-BF16, sleeping idle threads, bf16 (`benchmarks/threads_by_work.py`, benchmarks/results/threads-
avx512bf16.md), 2 threads against 1: gpt-mini at 12 / 24 / 48 / 96 / 192 MFLOP an op (batch 2 to 32) 0.58x /
0.71x / 0.92x / 1.11x / 1.31x; LeNet-5 at 18 / 73 / 293 MFLOP (batch 16 / 64 / 256) 0.76x / 1.05x / 1.56x."""

Threads = Union[int, Literal["auto"]]
"""`RunConfig.threads`: a count (0: torch's default) or `auto`."""

SYSFS_CPU = Path("/sys/devices/system/cpu")
WAIT_POLICY = {"OMP_WAIT_POLICY": "PASSIVE"}
"""What `quiet_openmp` sets when the user set none of OPENMP_WAIT_VARIABLES."""
OPENMP_WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")

_study_workers = 1  # processes of one study sharing this machine (`share_cores`)


def cpus_available() -> set[int]:
    """The logical CPUs this process may run on (its affinity mask; all of them where the OS has none)."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def physical_cores(cpus: set[int], sysfs: Path = SYSFS_CPU) -> int:
    """How many physical cores `cpus` span (hyperthread siblings count once), from Linux's CPU topology; the
    number of CPUs where the topology cannot be read."""
    cores = set()
    for cpu in cpus:
        topology = sysfs / f"cpu{cpu}" / "topology"
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:
            return len(cpus)
    return max(1, len(cores))


def share_cores(processes: int) -> None:
    """Declare that `processes` processes of one job (a study's workers) share this machine's cores: `auto` then
    gives this process its share. Called in each study worker process before it trains."""
    global _study_workers
    _study_workers = max(1, processes)


def _local_ranks(environ: MutableMapping[str, str]) -> int:
    """torchrun's ranks on this machine (1 without torchrun)."""
    try:
        return max(1, int(environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def local_processes(environ: MutableMapping[str, str] = os.environ) -> int:
    """Processes of this job sharing this machine's cores: torchrun's ranks on it x a study's workers."""
    return _local_ranks(environ) * _study_workers


@dataclass(frozen=True)
class ThreadPlan:
    """The torch intra-op thread count of this process and where it came from."""

    requested: Threads  # as configured: `auto`, 0 (torch's default) or a count
    threads: int  # torch intra-op threads
    cores: int  # physical cores this process may run on
    processes: int  # local processes sharing them
    loader_workers: int  # DataLoader worker processes of this rank
    limit: int | None = None  # the user's OMP_NUM_THREADS (`user_limit`), which auto does not exceed
    wait: str = ""  # how idle OpenMP threads wait (`openmp_wait`)
    malloc: str = ""  # the CPU allocator's setting (`largebatch.malloc.keep_freed_memory`; '' on GPU runs)
    op_flops: float | None = None  # FLOPs of the step's average matmul/convolution (`fit_to_work`; None: not fitted)
    eval_threads: int | None = None  # threads while evaluating, fitted to its batch (`fit_to_work`; None: `threads`)

    def describe(self) -> str:
        """The line the trainer prints once at the start."""
        if self.requested == "auto":
            workers = f" - {self.loader_workers} DataLoader workers" if self.loader_workers else ""
            cores = (f"{self.cores} cores / {self.processes} local processes" if self.processes > 1
                     else f"{self.cores} cores")
            rule = f"max(1, {cores}{workers})" if workers or self.processes > 1 else cores
            share = _share(self.cores, self.processes, self.loader_workers)
            capped = f", capped by OMP_NUM_THREADS={self.limit}" if self.limit and self.limit < share else ""
            binds = self.op_flops is not None and _work_cap(self.op_flops) < min(share, self.limit or share)
            fitted = (f", at most 1 per {MIN_FLOPS_PER_THREAD / 1e6:g} MFLOP of the step's average matmul/convolution "
                      f"({self.op_flops / 1e6:.3g} MFLOP)" if binds else "")
            evaluating = (f"; {self.eval_threads} while evaluating, by the same rule for its batch"
                          if self.eval_threads is not None and self.eval_threads != self.threads else "")
            line = f"threads {self.threads} = {rule}{capped}{fitted}{evaluating} (--threads auto)"
        elif self.requested == 0:
            line = f"threads {self.threads}: torch's default (--threads 0)"
        else:
            line = f"threads {self.threads} (--threads {self.requested})"
        line = f"{line}; idle OpenMP threads: {self.wait}" if self.wait else line
        return f"{line}; allocator: {self.malloc}" if self.malloc else line

    def to_dict(self) -> dict:
        """The plan as JSON-able values (env.json)."""
        return {"threads": self.threads, "threads_requested": self.requested, "cpu_cores": self.cores,
                "local_processes": self.processes, "loader_workers": self.loader_workers,
                "omp_num_threads": self.limit, "op_flops": self.op_flops,
                "eval_threads": self.eval_threads or self.threads, "openmp_wait": self.wait, "malloc": self.malloc}


def plan_threads(requested: Threads, cores: int, processes: int = 1, loader_workers: int = 0,
                 default: int = 0, limit: int | None = None, wait: str = "", malloc: str = "") -> ThreadPlan:
    """Torch intra-op threads for `requested` (see the module docstring): a count passes through, 0 is torch's
    `default`, auto is max(1, cores // processes - loader_workers), at most `limit` (the user's OMP_NUM_THREADS)."""
    if requested == "auto":
        threads = _share(cores, processes, loader_workers)
        threads = min(threads, limit) if limit else threads
    else:
        threads = requested or default
    return ThreadPlan(requested, threads, cores, processes, loader_workers, limit, wait, malloc)


def fit_to_work(plan: ThreadPlan, op_flops: float | None, eval_op_flops: float | None = None) -> ThreadPlan:
    """`plan` with `auto`'s count capped at one thread per MIN_FLOPS_PER_THREAD of `op_flops` (the FLOPs of the
    step's average matrix multiply or convolution; None where none was counted: unchanged), and `eval_threads`
    capped the same way by `eval_op_flops` (the same for an evaluation batch; None: evaluation keeps `threads`).
    An explicit count, or 0, is left as it is."""
    if plan.requested != "auto" or op_flops is None:
        return plan
    evaluation = min(plan.threads, _work_cap(eval_op_flops)) if eval_op_flops is not None else None
    return replace(plan, threads=min(plan.threads, _work_cap(op_flops)), op_flops=op_flops, eval_threads=evaluation)


def _work_cap(op_flops: float) -> int:
    return max(1, int(op_flops // MIN_FLOPS_PER_THREAD))


def _share(cores: int, processes: int, loader_workers: int) -> int:
    return max(1, cores // max(1, processes) - loader_workers)


def user_limit(environ: MutableMapping[str, str] = os.environ) -> int | None:
    """OMP_NUM_THREADS as a positive count, None where unset, not a count, or torchrun's own default (1 in a job of
    several local ranks, set when the user set none)."""
    try:
        limit = int(environ.get("OMP_NUM_THREADS", "").split(",")[0])
    except ValueError:
        return None
    if limit < 1 or (limit == 1 and _local_ranks(environ) > 1):
        return None
    return limit


def openmp_wait(environ: MutableMapping[str, str] = os.environ) -> str:
    """How idle OpenMP threads wait, in words, from the environment (libgomp read it when torch was imported)."""
    set_ = [f"{v}={environ[v]}" for v in OPENMP_WAIT_VARIABLES if v in environ]
    return ", ".join(set_) if set_ else "spin, then sleep (libgomp's default)"


def quiet_openmp(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set WAIT_POLICY in `environ` unless the user set one of OPENMP_WAIT_VARIABLES; return what it set.
    Takes effect only in a process that has not imported torch yet (and in the processes it starts)."""
    if any(v in environ for v in OPENMP_WAIT_VARIABLES):
        return {}
    environ.update(WAIT_POLICY)
    return dict(WAIT_POLICY)
