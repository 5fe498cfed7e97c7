"""`largebatch plan`: time per step, steps to target, time to train and chip-hours over chips x global batch sizes.

    largebatch plan --recipe imagenet-resnet50-mlperf --profile h100 --chips 8,64,512,4096 --out runs/plan
    largebatch plan --recipe mnist-lenet --study benchmarks/results/mnist-study --profile a100
    largebatch plan --recipe mnist-lenet --probe runs/probe-mnist-lenet/probe.json --max-chips 64
    largebatch plan --recipe mnist-lenet --model mypkg.nets:build --budget 10     # your own model
    largebatch plan --check-published          # predicted vs published times to train
    largebatch plan --calibrate [--procs 2]    # measure this machine; writes a profile later plans reuse
    largebatch plan --list-profiles

Steps to target (one of): --study (a report folder or trials.csv), --probe (probe.json, McCandlish et al. 2018),
--mlperf (MLPerf ResNet-50 reference convergence points), --epochs E (fixed budget); default: --mlperf for a
ResNet-50 on ImageNet, else the recipe's epochs. Nothing is trained; the model is built on the meta device.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
from pathlib import Path

from largebatch.cli import ArgumentParser, int_list
from largebatch.config import ConfigError, RunConfig
from largebatch.plan import comm, convergence, hardware, planner


def _parser() -> ArgumentParser:
    ap = ArgumentParser(prog="largebatch plan", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check-published", action="store_true", help="predicted vs published times to train")
    mode.add_argument("--calibrate", action="store_true", help="measure compute and collectives on this machine")
    mode.add_argument("--list-profiles", action="store_true", help="the built-in hardware profiles")
    ap.add_argument("--recipe", help="named recipe, module:function or recipe file (as `largebatch train` takes)")
    ap.add_argument("--model", help="plan this model instead of the recipe's: a name or module:function")
    ap.add_argument("--profile", default="h100", help="built-in profile (--list-profiles) or a profile file")
    ap.add_argument("--chips", type=int_list("--chips", "8,64,512", "merge"), default=None,
                    help="chip counts (default 1, 2, 4, ... 4096)")
    ap.add_argument("--batch-sizes", type=int_list("--batch-sizes", "256,8192", "merge"), default=None,
                    help="global batch sizes (default: the recipe's x 1/8 ... x 4)")
    steps = ap.add_mutually_exclusive_group()
    steps.add_argument("--study", help="report folder (trials.csv, regimes.json) or trials.csv of `largebatch study`")
    steps.add_argument("--probe", help="probe.json of `largebatch probe` (gradient noise scale)")
    steps.add_argument("--mlperf", action="store_true", help="MLPerf ResNet-50 reference convergence points")
    steps.add_argument("--epochs", type=float, help="a fixed budget in epochs at every batch")
    ap.add_argument("--topology", choices=comm.TOPOLOGIES, help="all-reduce algorithm (default: the profile's)")
    ap.add_argument("--grad-bytes", type=int, choices=(2, 4), help="bytes per gradient (2: bf16; default: profile's)")
    ap.add_argument("--shard-weights", action="store_true", help="weight-update sharding: reduce-scatter + all-gather")
    ap.add_argument("--no-overlap", action="store_true", help="all-reduce after the backward pass, not during it")
    ap.add_argument("--bucket-mb", type=float, default=25.0, help="DDP bucket size in MiB")
    ap.add_argument("--servers", type=int, default=1, help="parameter servers (--topology parameter-server)")
    ap.add_argument("--max-chips", type=int, help="best choice within this many chips")
    ap.add_argument("--budget", type=float, help="best choice within this many chip-hours")
    ap.add_argument("--dataset-size", type=int, help="training examples (a data set without a built-in size)")
    ap.add_argument("--input-shape", type=int_list("--input-shape", "3,224,224", "keep"),
                    help="C,H,W of one input (your own data set)")
    ap.add_argument("--out", help="write plan.csv, plan.txt and the plots here")
    ap.add_argument("--procs", type=int, default=2, help="--calibrate: processes for the collectives (2-4)")
    ap.add_argument("--profile-out", default="runs/plan/local-profile.json", help="--calibrate: profile file written")
    return ap


def _options(args: argparse.Namespace) -> planner.Options:
    if not args.bucket_mb > 0:
        raise ConfigError(f"--bucket-mb {args.bucket_mb} is invalid: give a bucket size in MiB, > 0")
    if args.servers < 1:
        raise ConfigError(f"--servers {args.servers} is invalid: give 1 or more parameter servers")
    return planner.Options(topology=args.topology, grad_bytes=args.grad_bytes, shard_weights=args.shard_weights,
                           bucket_bytes=args.bucket_mb * 2**20, overlap=not args.no_overlap, servers=args.servers)


def _convergence(args: argparse.Namespace, cfg: RunConfig, dataset_size: int) -> convergence.Convergence:
    model = args.model or cfg.model.name
    if args.study:
        return convergence.read_study(Path(args.study), dataset_size)
    if args.probe:
        return convergence.read_probe(Path(args.probe), cfg.batch.global_batch, cfg.epochs)
    if args.epochs is not None:
        return convergence.fixed(args.epochs)
    if args.mlperf or (model.startswith("resnet50") and cfg.data.name == "imagenet"):
        return convergence.mlperf_resnet()
    return convergence.fixed(cfg.epochs)


def _grid(args: argparse.Namespace, cfg: RunConfig, dataset_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    b0 = cfg.batch.global_batch
    batches = args.batch_sizes or tuple(sorted({max(1, min(dataset_size, b0 * 2**k // 8)) for k in range(6)}))
    chips = args.chips or tuple(2**k for k in range(13) if 2**k <= max(batches))
    return chips, batches


def _hms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def table(rows: list[planner.Row]) -> list[str]:
    """The plan as text lines: one row per (chips, batch) point."""
    head = (f"{'chips':>6} {'batch':>7} {'b/chip':>6} {'compute':>9} {'comm':>9} {'exposed':>9} {'optim':>8} "
            f"{'eval':>8} {'step':>9} {'epochs':>6} {'steps':>8} {'time':>9} {'chip-h':>9}")
    out = [head]
    for r in rows:
        ms = [f"{1e3 * v:.2f}ms" if v is not None else "-" for v in
              (r.compute_s, r.comm_s, r.exposed_comm_s, r.optimizer_s, r.eval_per_step_s, r.step_s)]
        out.append(f"{r.chips:>6} {r.batch:>7} {r.per_chip:>6} {ms[0]:>9} {ms[1]:>9} {ms[2]:>9} {ms[3]:>8} "
                   f"{ms[4]:>8} {ms[5]:>9} {_num(r.epochs, '.1f'):>6} {_num(r.steps, ','):>8} "
                   f"{_hms(r.time_to_train_s):>9} {_num(r.chip_hours, ',.1f'):>9}")
    return out


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _summary(rows: list[planner.Row], args: argparse.Namespace) -> list[str]:
    def say(r: planner.Row | None, what: str) -> str:
        if r is None:
            return f"{what}: no point of the plan fits"
        return (f"{what}: {r.chips} chips at batch {r.batch}: {_hms(r.time_to_train_s)}, "
                f"{r.chip_hours:,.1f} chip-hours")
    out = [say(planner.best(rows), "fastest")]
    if args.max_chips is not None or args.budget is not None:
        out.append(say(planner.best(rows, args.max_chips, args.budget),
                       f"fastest within {args.max_chips or 'any'} chips and {args.budget or 'any'} chip-hours"))
    out.append("efficient frontier (time, chip-hours): " + "; ".join(
        f"{r.chips}x@{r.batch} {_hms(r.time_to_train_s)} {r.chip_hours:,.1f}" for r in planner.frontier(rows)))
    unknown = sorted({r.batch for r in rows if r.epochs is None})
    if unknown:
        out.append(f"no steps to target known at batch {', '.join(map(str, unknown))} (beyond the evidence)")
    return out


def write_csv(rows: list[planner.Row], path: Path) -> None:
    """plan.csv: one line per point, the columns of `planner.Row`."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(planner.COLUMNS)
        for r in rows:
            w.writerow(["" if v is None else v for v in dataclasses.astuple(r)])


def _plan(args: argparse.Namespace) -> int:
    from largebatch.plan.workload import data_shape, workload
    from largebatch.study.recipe import load_recipe

    if not args.recipe:
        raise ConfigError("plan: give --recipe NAME (`largebatch recipes`), or --check-published, --calibrate or "
                          "--list-profiles")
    for flag, v in (("--max-chips", args.max_chips), ("--budget", args.budget), ("--dataset-size", args.dataset_size)):
        if v is not None and not v > 0:
            raise ConfigError(f"{flag} {v} is invalid: give a positive number")
    if args.input_shape is not None and len(args.input_shape) != 3:
        raise ConfigError(f"--input-shape {args.input_shape} is invalid: give C,H,W, e.g. 3,224,224")
    cfg = load_recipe(args.recipe)
    profile, opt = hardware.load_profile(args.profile), _options(args)
    size = data_shape(cfg, args.dataset_size, args.input_shape).train
    chips, batches = _grid(args, cfg, size)
    w = workload(cfg, _convergence(args, cfg, size), args.model, args.dataset_size, args.input_shape)
    rows = planner.plan(w, profile, chips, batches, opt)
    eff, half = profile.sustained
    lines = [f"plan: {w.name} ({w.flops_per_example / 1e9:.3g} GFLOP/example fwd+bwd, {w.params:,} parameters, "
             f"{w.dataset_size:,} examples) on {profile.name} ({profile.peak_flops / 1e12:.4g} TFLOP/s peak x "
             f"{eff:g} efficiency, half at {half:g}/chip; {opt.topology or profile.topology}); steps to target: "
             f"{w.convergence.source}", *table(rows), *_summary(rows, args)]
    print("\n".join(lines))
    if args.out:
        from largebatch.plan.plots import plot_frontier, plot_time_to_train

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_csv(rows, out / "plan.csv")
        (out / "plan.txt").write_text("\n".join(lines) + "\n")
        plot_time_to_train(rows, out / "time_to_train.png", title=f"{w.name} on {profile.name}")
        plot_frontier(rows, out / "frontier.png", title=f"{w.name} on {profile.name}")
        print(f"[largebatch] plan -> {out}/plan.csv, plan.txt, time_to_train.png, frontier.png")
    return 0


def plan_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.list_profiles:
        for name in hardware.builtin_profiles():
            p = hardware.load_profile(name)
            print(f"{name:<10} {p.description}")
        return 0
    if args.check_published:
        from largebatch.plan.published import check_table

        lines, ratios = check_table()
        print("\n".join(lines))
        worst = max(max(ratios), 1 / min(ratios))
        print(f"{len(ratios)} runs; all within {worst:.2f}x (bar: 2x, goal: 1.3x); "
              f"{sum(1 / 1.3 <= r <= 1.3 for r in ratios)} within 30%")
        return 0
    if args.calibrate:
        from largebatch.plan.calibrate import calibrate_main

        return calibrate_main(args)
    return _plan(args)

