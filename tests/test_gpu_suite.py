"""benchmarks/gpu_suite.sh on a machine without CUDA: one line and exit code 2 at once; and its step bookkeeping
(a failing step recorded, a slow one cut at the deadline, the rest still run) with a stand-in for python."""

import os
import subprocess
import time
from pathlib import Path

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.sh"


def test_without_cuda_it_stops_at_once_with_one_line(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    t = time.perf_counter()
    r = subprocess.run(["bash", str(SUITE)], env=env, capture_output=True, text=True, timeout=120)
    assert time.perf_counter() - t < 60
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [r.stderr.strip()]
    assert r.stderr.startswith("gpu_suite.sh: error: torch sees no CUDA device on this machine")
    assert list(tmp_path.iterdir()) == []  # nothing written


FAKE_PYTHON = """#!/usr/bin/env bash
case "$*" in
    *optimizer_step*) echo "half a table"; echo "Traceback: boom" >&2; exit 3 ;;
    *--compile*) sleep 60 ;;
    *"largebatch train"*) echo "trained $*" ;;
    *) echo "ran $*" ;;
esac
"""


def test_a_failing_step_is_recorded_and_the_suite_goes_on(tmp_path):
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": str(python), "GPU_SUITE_BUDGET_S": "4",
           "GPU_SUITE_MIN_STEP_S": "2"}
    r = subprocess.run(["bash", str(SUITE)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    [results] = list(out.iterdir())
    text = results.read_text()
    sections = text.split("\n## ")[1:]
    assert [s.splitlines()[0] for s in sections] == [
        "ResNet-50 training images/s, 224, bf16, eager: trainer vs plain loop",
        "optimizer.step() on ResNet-50's parameters, CUDA",
        "LeNet-5 / MNIST time to 99.2% on the GPU",
        "NCCL DDP on the available GPUs (MNIST/LeNet, LARS, batch 8192)",
        "ResNet-50 training images/s, 224, bf16, torch.compile on both sides"]
    resnet, optim, lenet, ddp, compiled = sections
    assert "ran benchmarks/resnet50_throughput.py --resolution 224 --batch 256" in resnet and "(ok, " in resnet
    assert "half a table" in optim and "FAILED with exit code 3" in optim and "    Traceback: boom" in optim
    assert "trained -m largebatch train --recipe mnist-lenet --device cuda --eval.target 0.992" in lenet
    assert "ran benchmarks/ddp.py --device cuda" in ddp and "(ok, " in ddp
    assert "TIMED OUT after" in compiled or "SKIPPED" in compiled
    assert text.rstrip().endswith("2 step(s) failed, timed out or skipped")
