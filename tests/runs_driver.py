"""Run under torchrun by test_distributed.py: several command lines one after another in one process group, so
the interpreter start-up, the torch import and the rendezvous are paid once per launch, not once per run.
Not a test module.

    torchrun --standalone --nproc-per-node 2 tests/runs_driver.py RUNS.json OUT_DIR

RUNS.json is a list of [name, argv]. Each rank forms the gloo group itself (an embedding program's, which the
trainer joins and leaves formed, see `distributed.init`) and then, for each entry in order, calls
`largebatch.cli.main(argv)` (argv = ["train", flags...]: the code `python -m largebatch train` runs), or, for
argv = ["call", "module:function", args...], that function of a module in tests/ with the string args. Each rank
writes OUT_DIR/rank<r>.json: {name: {"code": exit code, "stdout": ..., "stderr": ...}}. An unexpected exception
ends the launch with its traceback.
"""

import contextlib
import importlib
import io
import json
import sys
from pathlib import Path

import torch.distributed as dist

from largebatch.cli import main as cli_main


def run(argv: list[str]) -> int:
    if argv[0] != "call":
        return cli_main(argv)
    module, function = argv[1].split(":")
    return getattr(importlib.import_module(module), function)(*argv[2:])


def main() -> None:
    runs, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    results = {}
    dist.init_process_group("gloo")  # from torchrun's environment (env://)
    rank = dist.get_rank()
    try:
        for name, argv in runs:
            stdout, stderr = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                code = run(argv)
            results[name] = {"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}
            print(f"[runs_driver] rank {rank}: {name} exited {code}", flush=True)
    finally:
        dist.destroy_process_group()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
