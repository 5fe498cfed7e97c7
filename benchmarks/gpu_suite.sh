#!/usr/bin/env bash
# Every GPU figure in one invocation, under 8 minutes on one NVIDIA H100/H200 (issue 16, part 5):
#
#     bash benchmarks/gpu_suite.sh     # writes $OUT/gpu-suite-<time>.md (without OUT: benchmarks/results/gpu/)
#
# Steps, in order (each under its own `timeout`, all within one deadline, GPU_SUITE_BUDGET_S = 465 s by default):
#   1. ResNet-50 v1.5 training images/s at 224, bf16, batch 256: the largebatch trainer vs a plain torchvision +
#      autocast loop, eager (benchmarks/resnet50_throughput.py; target >= 3,000 images/s per GPU);
#   2. the CUDA optimizer-step table on ResNet-50's parameters: LARS vs SGD-foreach, LAMB vs AdamW-foreach, timm's
#      (benchmarks/optimizer_step.py --device cuda);
#   3. LeNet-5 / MNIST time to 99.2% test accuracy on the GPU (`largebatch train --recipe mnist-lenet --eval.target
#      0.992`): the trainer's time-to-train line and summary;
#   4. NCCL DDP on the GPUs there are (benchmarks/ddp.py --device cuda: 1 GPU vs all of them, and the DDP step's
#      communication share; on one GPU a 1-rank NCCL group);
#   5. step 1 with torch.compile on both sides (the compile on/off comparison; last, as it takes the longest).
# A failing or timed-out step is recorded in the results file and the suite goes on to the next. Without CUDA it
# stops at once with one line on stderr and exit code 2, before writing anything.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
export PYTHONUNBUFFERED=1  # a step cut by its timeout keeps the lines it printed
START=$(date +%s)

if ! "$PY" -c 'import torch; assert torch.cuda.is_available()' >/dev/null 2>&1; then
    echo "gpu_suite.sh: error: torch sees no CUDA device on this machine ($PY); run it on a GPU machine" >&2
    exit 2
fi

DEADLINE=$((START + ${GPU_SUITE_BUDGET_S:-465}))
MIN_STEP_S=${GPU_SUITE_MIN_STEP_S:-10}  # a step with less time left than this is skipped
RESULTS_DIR="${OUT:-$ROOT/benchmarks/results/gpu}"
mkdir -p "$RESULTS_DIR"
RESULTS="$RESULTS_DIR/gpu-suite-$(date -u +%Y%m%d-%H%M%S).md"
RUNS="$(mktemp -d)"
trap 'rm -rf "$RUNS"' EXIT
FAILED=0

{
    echo "# GPU suite, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    if commit=$(git rev-parse --short HEAD 2>/dev/null); then
        echo "git $commit$(git diff --quiet HEAD 2>/dev/null || echo ' with local changes')"
    else
        echo "git: not a repository"
    fi
    "$PY" -c 'import torch, platform; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
              f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}, python {platform.python_version()}")'
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv,noheader 2>&1 \
        | sed 's/^/nvidia-smi: /'
    echo "CPUs: $(nproc)"
} >>"$RESULTS"

# step TITLE BUDGET_S COMMAND...: run COMMAND under `timeout` (BUDGET_S, cut to what is left before the deadline),
# appending its output, exit status and wall time to the results file.
step() {
    local title=$1 budget=$2
    shift 2
    local left=$((DEADLINE - $(date +%s)))
    local limit=$((budget < left ? budget : left))
    {
        echo
        echo "## $title"
        echo
        echo "    $*"
        echo
    } >>"$RESULTS"
    if ((limit < MIN_STEP_S)); then
        echo "SKIPPED: the suite's deadline leaves ${left} s" >>"$RESULTS"
        FAILED=$((FAILED + 1))
        return
    fi
    echo "[gpu_suite] $title (up to ${limit} s)" >&2
    local t0 rc err
    t0=$(date +%s)
    err="$(mktemp)"
    timeout --kill-after=10 "$limit" "$@" >>"$RESULTS" 2>"$err"
    rc=$?
    if ((rc == 0)); then
        echo "(ok, $(($(date +%s) - t0)) s)" >>"$RESULTS"
    else
        FAILED=$((FAILED + 1))
        {
            if ((rc == 124 || rc == 137)); then
                echo "TIMED OUT after ${limit} s"
            else
                echo "FAILED with exit code $rc after $(($(date +%s) - t0)) s"
            fi
            echo "last lines of stderr:"
            tail -n 30 "$err" | sed 's/^/    /'
        } >>"$RESULTS"
    fi
    rm -f "$err"
}

lenet_to_target() {  # run by `bash -c` under timeout: PY and RUNS are exported
    local cmd=("$PY" -m largebatch train --recipe mnist-lenet --device cuda --eval.target 0.992
               --checkpoint.every-epochs 0 --output-dir "$RUNS" --output.name lenet-tta --output.no-progress)
    echo "    ${cmd[*]}"
    echo
    "${cmd[@]}" || return
    "$PY" - "$RUNS/lenet-tta" <<'EOF'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
s, env = (json.loads((run / f).read_text()) for f in ("summary.json", "env.json"))
print(f"target {s['target']} reached: {s['target_reached']} at epoch {s['epochs_to_target']} in "
      f"{s['time_to_train_seconds']} s (time to train); final test accuracy {s['test_accuracy']:.4f}; "
      f"{s['train_images_per_second']:,.0f} train images/s; precision {env['precision']}")
EOF
}

step "ResNet-50 training images/s, 224, bf16, eager: trainer vs plain loop" 100 \
    "$PY" benchmarks/resnet50_throughput.py --resolution 224 --batch 256 --steps 30 --warmup 10 --repeats 2
step "optimizer.step() on ResNet-50's parameters, CUDA" 60 \
    "$PY" benchmarks/optimizer_step.py --device cuda --repeats 11 --steps 5 --warmup 3
export -f lenet_to_target
export PY RUNS
step "LeNet-5 / MNIST time to 99.2% on the GPU" 80 bash -c lenet_to_target
step "NCCL DDP on the available GPUs (MNIST/LeNet, LARS, batch 8192)" 70 \
    "$PY" benchmarks/ddp.py --device cuda --epochs 2 --repeats 1
step "ResNet-50 training images/s, 224, bf16, torch.compile on both sides" 200 \
    "$PY" benchmarks/resnet50_throughput.py --resolution 224 --batch 256 --steps 30 --warmup 10 --repeats 1 --compile

echo >>"$RESULTS"
echo "total $(($(date +%s) - START)) s; $FAILED step(s) failed, timed out or skipped" >>"$RESULTS"
echo "[gpu_suite] results: $RESULTS ($FAILED step(s) failed)" >&2
exit $((FAILED > 0))
