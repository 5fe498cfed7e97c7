"""The machine a run is on: device and precision choice, CPU threads, memory accounting, env.json."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Mapping

import torch
from torch import nn

from largebatch import threads as cpu
from largebatch.config import ConfigError
from largebatch.malloc import release_freed_memory

_rss_at_start = 0


def resolve_device(name: str) -> torch.device:
    """`auto` is cuda when available, else cpu; asking for cuda without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda' but torch sees no CUDA device: use --device cpu (or auto)")
    return torch.device(name)


def apply_threads(requested: cpu.Threads, loader_workers: int = 0, malloc: str = "") -> cpu.ThreadPlan:
    """Set torch's intra-op threads as `largebatch.threads.plan_threads` derives them for this process (its
    cores, the local processes sharing them, this rank's DataLoader workers, the user's OMP_NUM_THREADS); return
    the plan (with `malloc`, what `largebatch.malloc.keep_freed_memory` set)."""
    plan = cpu.plan_threads(requested, cpu.physical_cores(cpu.cpus_available()), cpu.local_processes(),
                            loader_workers, default=torch.get_num_threads(), limit=cpu.user_limit(),
                            wait=cpu.openmp_wait(), malloc=malloc)
    if requested != 0:
        torch.set_num_threads(plan.threads)
    return plan


def fit_threads(plan: cpu.ThreadPlan, op_flops: float | None, eval_op_flops: float | None = None) -> cpu.ThreadPlan:
    """`largebatch.threads.fit_to_work`: `auto`'s count for a step whose average matmul/convolution is `op_flops`
    FLOPs, set in torch where it changes (and the count for evaluation batches of `eval_op_flops`, `threads_while`
    sets it while they run)."""
    fitted = cpu.fit_to_work(plan, op_flops, eval_op_flops)
    if fitted.threads != plan.threads:
        torch.set_num_threads(fitted.threads)
    return fitted


@contextlib.contextmanager
def threads_while(count: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `count` inside the block (None: left as they are), put back after."""
    before = torch.get_num_threads()
    if count and count != before:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


# oneDNN instruction-set caps (ONEDNN_MAX_CPU_ISA) below AVX512_CORE_BF16: under them oneDNN emulates bf16.
_ONEDNN_ISAS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def cpu_has_fast_bf16(environ: Mapping[str, str] = os.environ) -> bool:
    """True where oneDNN runs bf16 natively (AVX512-BF16 or AMX) and is allowed to (no ONEDNN_MAX_CPU_ISA, or
    DNNL_MAX_CPU_ISA, capping it below AVX512_CORE_BF16); elsewhere bf16 is emulated and slower than fp32
    (measured 6-10x slower for LeNet on an AVX2-only CPU)."""
    cap = (environ.get("ONEDNN_MAX_CPU_ISA") or environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    if cap in _ONEDNN_ISAS_WITHOUT_BF16:
        return False
    try:
        caps = torch._C._cpu._get_cpu_capability()  # private, but the only per-feature view
    except AttributeError:
        return False
    return bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))


def resolve_precision(dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for forward/backward, or None for fp32 and fp64 (no autocast)."""
    if dtype in ("fp32", "fp64"):
        return None
    if dtype == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("precision.dtype = 'bf16' but this GPU has no bf16 support: use fp32 or auto")
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_fast_bf16() else None


def to_float64(model: nn.Module) -> nn.Module:
    """`precision.dtype = fp64`: float64 weights and buffers, and a forward pre-hook that casts floating inputs
    to float64 (the data arrive as float32), so activations and the loss are float64 too.

    For reference runs and equivalence tests: sums taken in another order (ranks vs micro-batches, one kernel
    vs another) then differ by ~1e-16 instead of ~1e-7 relative, so a comparison holds on every CPU's kernels
    (AVX2, AVX-512, AMX) without a tolerance fitted to one of them.
    """
    model.double()
    model.register_forward_pre_hook(_inputs_to_float64)
    return model


def _inputs_to_float64(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def loss_dtype(logits: torch.Tensor) -> torch.Tensor:
    """Logits in the loss's precision: float32 for bf16/fp16/fp32 compute, float64 for fp64 runs."""
    return logits if logits.dtype == torch.float64 else logits.float()


def _current_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _reset_peak_rss() -> None:
    """Reset the kernel's peak resident set (VmHWM) to the current one (Linux >= 4.0; elsewhere nothing, and the
    peak is the process's lifetime one)."""
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def _peak_rss() -> int:
    """VmHWM of /proc/self/status (since the last reset), else the process's lifetime peak (getrusage)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def start_memory_tracking(device: torch.device) -> None:
    """Start measuring the run's peak memory (`peak_memory`). On CPU: free memory an earlier run in this process
    kept (`largebatch.malloc`) goes back to the OS first, and the peak resident set restarts from here."""
    global _rss_at_start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        release_freed_memory()
        _reset_peak_rss()
    _rss_at_start = _current_rss()


def peak_memory(device: torch.device) -> int:
    """Peak training memory in bytes: CUDA's peak allocation, or on CPU the growth of the process's peak resident
    set, since `start_memory_tracking`, over its size then (data, model, activations)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return max(0, _peak_rss() - _rss_at_start)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device, precision: torch.dtype, plan, threads: cpu.ThreadPlan) -> dict:
    """What env.json records: code version, software, hardware, the thread plan (`threads` the count torch
    runs with) and the run plan's derived numbers (`largebatch.batch.RunPlan.to_dict`)."""
    return {
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        **threads.to_dict(),
        "precision": str(precision),
        **plan.to_dict(),
        "argv": sys.argv,
    }
