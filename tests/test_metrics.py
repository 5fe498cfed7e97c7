"""`largebatch.metrics.ProgressBar`: a process forked after a bar exists, dying while it holds the bars' lock,
must not leave the next run in this process waiting for ever (tqdm's default lock is shared with forked processes)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A bar (taking the lock), a forked child that takes the lock and dies holding it, then a new bar in the parent.
FORK_AND_DIE = """
import os, sys
from tqdm import tqdm
from largebatch.metrics import ProgressBar
Bar = ProgressBar if sys.argv[1] == "ours" else tqdm
Bar(total=1, disable=True).close()
pid = os.fork()
if pid == 0:
    Bar.get_lock().acquire()
    os._exit(0)
os.waitpid(pid, 0)
Bar(total=1, disable=True).close()
print("next bar made")
"""


def _fork_and_die(bar: str, timeout: float) -> str:
    return subprocess.run([sys.executable, "-c", FORK_AND_DIE, bar], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=True).stdout


def test_a_forked_process_dying_with_the_lock_leaves_the_next_bar_free():
    assert _fork_and_die("ours", timeout=60).strip() == "next bar made"


def test_tqdms_own_lock_would_hang_there():
    """What ProgressBar avoids (the control: this test fails if tqdm's lock stops being shared across a fork)."""
    with pytest.raises(subprocess.TimeoutExpired):
        _fork_and_die("tqdm", timeout=4)
