"""Command line: `largebatch train | study | report | probe | show-config | recipes`.

    largebatch train --recipe mnist-lenet [--batch.global-batch 8192 --optimizer.base-lr 0.1 ...]
    largebatch train --config my_run.json [overrides]
    largebatch train --resume runs/mnist-lenet-20261123-120000
    largebatch show-config --recipe mnist-lenet [overrides]
    largebatch recipes
    largebatch study --recipe mnist-lenet --batch-sizes 256,8192 --optimizers sgd,lars --storage sqlite:///runs/s.db
    largebatch report sqlite:///runs/s.db --out runs/report

    torchrun --nproc-per-node 2 -m largebatch train --recipe mnist-lenet-lars-8k   # data parallel

Overrides are the RunConfig fields as flags (`largebatch train --help` lists them with their units).
A bad value or flag stops with a one-line error before any work starts (exit code 2).
Exit codes of `train`: 0 completed, 2 bad input, 3 diverged, 4 stopped (resume it with --resume RUN_DIR),
5 the distributed process group could not be formed (a rank did not join in time).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import tyro

from largebatch.config import ConfigError, RunConfig, from_dict, to_dict
from largebatch.recipes import RECIPES, describe, get_recipe

EXIT = {"completed": 0, "diverged": 3, "stopped": 4}


def _base_config(cmd: str, rest: list[str]) -> tuple[RunConfig, list[str], Path | None]:
    """Pick the starting config from --recipe, --config or --resume; return it and the other flags."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe")
    pre.add_argument("--config")
    if cmd == "train":
        pre.add_argument("--resume")
    known, overrides = pre.parse_known_args(rest)
    resume = getattr(known, "resume", None)
    given = [f"--{k}" for k in ("recipe", "config", "resume") if getattr(known, k, None)]
    if len(given) > 1:
        raise ConfigError(f"{' and '.join(given)} cannot be combined: a run starts from one of them")
    if known.recipe:
        return get_recipe(known.recipe), overrides, None
    if known.config:
        path = Path(known.config)
        if not path.is_file():
            raise ConfigError(f"--config {path}: no such file")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"--config {path}: not valid JSON ({e})") from None
        return from_dict(data), overrides, None
    if resume:
        from largebatch.rundir import resume_config

        run_dir = Path(resume)
        cfg = resume_config(run_dir)
        output = dataclasses.replace(cfg.output, dir=str(run_dir.parent), name=run_dir.name)
        return dataclasses.replace(cfg, output=output), overrides, run_dir
    return RunConfig(), overrides, None


def _parse(cmd: str, rest: list[str]) -> tuple[RunConfig, Path | None]:
    base, overrides, resume = _base_config(cmd, rest)
    cfg = tyro.cli(RunConfig, default=base, args=overrides, prog=f"largebatch {cmd}",
                   description=f"largebatch {cmd} [--recipe NAME | --config FILE"
                               f"{' | --resume RUN_DIR' if cmd == 'train' else ''}] [overrides]")
    cfg.validate()
    return cfg, resume


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "recipes":
            width = max(map(len, RECIPES))
            for name in sorted(RECIPES):
                print(f"{name:<{width}}  {describe(name)}")
            return 0
        if cmd in ("study", "report", "probe"):
            from largebatch.study import cli as study_cli

            return {"study": study_cli.study_main, "report": study_cli.report_main,
                    "probe": study_cli.probe_main}[cmd](rest)
        if cmd == "show-config":
            cfg, _ = _parse(cmd, rest)
            print(json.dumps(to_dict(cfg), indent=2))
            return 0
        if cmd == "train":
            cfg, resume = _parse(cmd, rest)
            from largebatch.distributed import DistributedError  # torch-heavy imports only when training
            from largebatch.train import train

            try:
                summary = train(cfg, resume=resume is not None)
            except DistributedError as e:
                print(f"largebatch: error: {e}", file=sys.stderr)
                return 5
            return EXIT[summary["status"]]
        raise ConfigError(f"unknown command {cmd!r}: use train, study, report, probe, show-config or recipes (largebatch --help)")
    except ConfigError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank finds the same error: say it once
            print(f"largebatch: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
