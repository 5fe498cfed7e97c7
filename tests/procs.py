"""Helpers for tests that run the CLI in a child process and kill it. Not a test module."""

import signal
import subprocess
import sys
import time
from pathlib import Path

from largebatch import checkpoint

ROOT = Path(__file__).resolve().parents[1]


def kill_after_first_checkpoint(args: list[str], run_dir: Path, env: dict, timeout: float = 120) -> int:
    """Start `python -m largebatch train *args`, SIGKILL it as soon as `run_dir` holds a checkpoint, and return
    the checkpoint's step."""
    proc = subprocess.Popen([sys.executable, "-m", "largebatch", "train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = run_dir / checkpoint.NAME
    deadline = time.time() + timeout
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), f"no checkpoint in {run_dir} after {timeout} s"
    return checkpoint.load(ckpt)["step"]
