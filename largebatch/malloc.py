"""The CPU memory allocator: keep the memory a training step frees for the next step.

A training step allocates and frees the same large blocks every step (activations, their gradients, a
convolution's workspace). glibc's malloc hands a block above its mmap threshold (128 KiB, raised on the fly up to
32 MiB) straight back to the OS when it is freed, and trims the top of its heap above its trim threshold; the next
step then gets fresh pages from the kernel, and each first touch of a 4 KiB page is a page fault that zero-fills it.
LeNet-5 at batch 256 took about 5,000 such faults a step on a 2-core AMX Xeon. `keep_freed_memory` raises both
thresholds (`mallopt`), so freed blocks stay in the process and are reused: the faults go to zero, and LeNet ran
1.34x faster at batch 256 and 1.53x at 8192 (`benchmarks/allocator.py`, benchmarks/results/throughput-amx.md).
The cost: the process keeps its peak memory, as tcmalloc or jemalloc would (LeNet: 310 vs 301 MiB at batch 256,
770 vs 645 at 8192), until it exits or its next run starts (which hands it back first, `release_freed_memory`, so
that the run measures its own peak).

The user's own choice wins: nothing is changed when glibc's malloc variables are set (MALLOC_MMAP_THRESHOLD_,
MALLOC_TRIM_THRESHOLD_, a `glibc.malloc.` tunable in GLIBC_TUNABLES), when another allocator is preloaded
(LD_PRELOAD), or where the C library is not glibc. The trainer calls it once, for CPU runs, and prints what is in
effect on its threads line (also env.json's `malloc`). Torch-free.
"""

from __future__ import annotations

import ctypes
import os
from typing import Callable, Mapping

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h> parameter numbers
KEEP = 2**31 - 1
"""Both thresholds, in bytes: the largest value mallopt's int takes. A block above 2 GiB still goes to mmap."""
USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
KEPT = "freed memory kept for reuse (mallopt: mmap and trim thresholds 2 GiB)"


def _user_setting(environ: Mapping[str, str]) -> str:
    """The user's own allocator setting, in words ('' where there is none)."""
    named = [f"{v}={environ[v]}" for v in USER_VARIABLES if v in environ]
    named += [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t.startswith("glibc.malloc.")]
    if named:
        return f"glibc malloc as set: {', '.join(named)}"
    preload = [p for p in environ.get("LD_PRELOAD", "").replace(":", " ").split() if "alloc" in os.path.basename(p)]
    return f"preloaded allocator {', '.join(preload)}" if preload else ""


def _glibc() -> ctypes.CDLL | None:
    """The C library where it is glibc, else None."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc alone has it (musl and macOS have mallopt stubs or none)
        return libc
    except (OSError, AttributeError):
        return None


def _glibc_mallopt() -> Callable[[int, int], int] | None:
    """glibc's mallopt, or None where the C library is not glibc."""
    libc = _glibc()
    return libc.mallopt if libc is not None else None


def release_freed_memory() -> None:
    """Hand the memory this process holds free back to the OS (glibc's malloc_trim; nothing elsewhere), so that a
    run's resident-set growth counts what it uses, not less by what an earlier run in the process left free."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def keep_freed_memory(environ: Mapping[str, str] = os.environ,
                      mallopt: Callable[[int, int], int] | None | str = "glibc") -> str:
    """Raise glibc's mmap and trim thresholds to KEEP unless the user chose an allocator setting (see the module
    docstring); return what is in effect, in words. `mallopt` is for tests (None: not glibc)."""
    user = _user_setting(environ)
    if user:
        return user
    mallopt = _glibc_mallopt() if mallopt == "glibc" else mallopt
    if mallopt is None:
        return "the C library's allocator (not glibc: unchanged)"
    if mallopt(M_MMAP_THRESHOLD, KEEP) != 1 or mallopt(M_TRIM_THRESHOLD, KEEP) != 1:
        return "glibc malloc's defaults (mallopt refused the thresholds)"
    return KEPT
