"""`largebatch.malloc`: freed memory stays in the process, so a training step takes no page faults, unless the user
chose an allocator setting of their own."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from largebatch import malloc

ROOT = Path(__file__).resolve().parents[1]


class Mallopt:
    def __init__(self, answer: int = 1) -> None:
        self.calls, self.answer = [], answer

    def __call__(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.answer


def test_both_thresholds_are_raised():
    mallopt = Mallopt()
    assert malloc.keep_freed_memory({}, mallopt) == malloc.KEPT
    assert mallopt.calls == [(malloc.M_MMAP_THRESHOLD, malloc.KEEP), (malloc.M_TRIM_THRESHOLD, malloc.KEEP)]
    assert malloc.KEEP == 2**31 - 1  # mallopt's value is a C int


@pytest.mark.parametrize("environ, said", [
    ({"MALLOC_TRIM_THRESHOLD_": "131072"}, "glibc malloc as set: MALLOC_TRIM_THRESHOLD_=131072"),
    ({"MALLOC_MMAP_THRESHOLD_": "1", "MALLOC_TOP_PAD_": "0"},
     "glibc malloc as set: MALLOC_MMAP_THRESHOLD_=1, MALLOC_TOP_PAD_=0"),
    ({"GLIBC_TUNABLES": "glibc.pthread.rseq=0:glibc.malloc.trim_threshold=4096"},
     "glibc malloc as set: glibc.malloc.trim_threshold=4096"),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"},
     "preloaded allocator /usr/lib/x86_64-linux-gnu/libjemalloc.so.2"),
    ({"LD_PRELOAD": "libtcmalloc_minimal.so.4:libfoo.so"}, "preloaded allocator libtcmalloc_minimal.so.4"),
])
def test_the_users_own_setting_is_kept(environ, said):
    mallopt = Mallopt()
    assert malloc.keep_freed_memory(environ, mallopt) == said
    assert mallopt.calls == []


def test_other_preloads_and_tunables_do_not_count():
    mallopt = Mallopt()
    environ = {"LD_PRELOAD": "libfoo.so", "GLIBC_TUNABLES": "glibc.pthread.rseq=0"}
    assert malloc.keep_freed_memory(environ, mallopt) == malloc.KEPT and len(mallopt.calls) == 2


def test_not_glibc_or_refused_is_said():
    assert malloc.keep_freed_memory({}, None) == "the C library's allocator (not glibc: unchanged)"
    assert malloc.keep_freed_memory({}, Mallopt(0)) == "glibc malloc's defaults (mallopt refused the thresholds)"


# A LeNet-5 training step at batch 768, fp32 (the same on every CPU), in a fresh process: page faults a step once
# the step has run a few times. The first convolution's output alone is 768 x 20 x 24 x 24 x 4 bytes = 35 MB,
# above the 32 MiB to which glibc raises its mmap threshold at most, so by default that block comes from the kernel
# and goes back every step: at least its 8,640 pages (4 KiB) fault each time. Memory kept takes a small part of that
# (0 to 10% of the default's faults were seen: torch asks for 64-byte-aligned blocks, and a freed block with a
# small one allocated after it is too short for the next aligned request of its size, so the heap still grows
# now and then).
STEP_FAULTS = """
import json, resource, sys, torch
from largebatch.malloc import keep_freed_memory
from largebatch.models import build_model
said = keep_freed_memory() if sys.argv[1] == "keep" else "glibc default"
torch.manual_seed(0)
model = build_model("lenet")
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
x, y = torch.randn(768, 1, 28, 28), torch.randint(0, 10, (768,))
def step():
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()
for _ in range(4):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print(json.dumps({"said": said, "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4}))
"""


def _clean_env() -> dict:
    """This environment without the user's allocator settings, one torch thread."""
    env = {k: v for k, v in os.environ.items() if k not in (*malloc.USER_VARIABLES, "LD_PRELOAD", "GLIBC_TUNABLES")}
    return {**env, "OMP_NUM_THREADS": "1"}


def _step_faults(arm: str) -> dict:
    out = subprocess.run([sys.executable, "-c", STEP_FAULTS, arm], cwd=ROOT, env=_clean_env(), capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.skipif(malloc._glibc_mallopt() is None, reason="glibc's malloc only")
def test_a_training_step_takes_far_fewer_page_faults_once_memory_is_kept():
    kept, default = _step_faults("keep"), _step_faults("default")
    assert kept["said"] == malloc.KEPT
    assert default["faults"] > 8640, default  # what it saves: glibc returns the 35 MB block every step
    assert kept["faults"] < default["faults"] / 4, (kept, default)


# The mechanism alone, without torch: a 64 MiB block malloc'ed, written and freed, again and again. glibc's default
# maps it from the kernel each time (16,384 faults of 4 KiB pages); kept, it is reused and faults no more.
BLOCK_FAULTS = """
import ctypes, resource, sys
from largebatch.malloc import keep_freed_memory
if sys.argv[1] == "keep":
    keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
def block():
    p = libc.malloc(64 << 20)
    libc.memset(p, 1, 64 << 20)
    libc.free(p)
block()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    block()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
"""


@pytest.mark.skipif(malloc._glibc_mallopt() is None, reason="glibc's malloc only")
@pytest.mark.parametrize("arm, pages", [("keep", 0), ("default", (64 << 20) // 4096)])
def test_a_freed_block_is_kept_for_the_next_request(arm, pages):
    out = subprocess.run([sys.executable, "-c", BLOCK_FAULTS, arm], cwd=ROOT, env=_clean_env(), capture_output=True,
                         text=True, timeout=60, check=True)
    assert pages <= float(out.stdout) <= pages + 2  # + the odd page of the interpreter's own


def test_a_run_measures_its_own_peak_memory_after_others_in_the_process(tmp_path):
    """Memory an earlier run (or anything else) left free in this process is handed back before a run starts, and
    the peak resident set restarts there: the same run measured again reports about the same peak, not 0."""
    import torch

    from largebatch.trainer import train
    from test_train import small_config

    train(small_config(tmp_path, name="warm"))  # one-time costs: the data read and cached, torch's lazy set-up
    first = train(small_config(tmp_path, name="first"))["peak_memory_bytes"]
    block = torch.ones(64 << 18)  # 64 MiB touched, then freed and kept (largebatch.malloc)
    del block
    again = train(small_config(tmp_path, name="again"))["peak_memory_bytes"]
    assert first > 0 and 0.5 * first <= again <= 2 * first, (first, again)
