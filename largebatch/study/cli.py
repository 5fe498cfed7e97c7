"""`largebatch study` and `largebatch report`: the batch-size study from the command line.

    largebatch study --recipe mnist-lenet --batch-sizes 256,1024,2048,4096,8192,16384,32768,60000 \\
        --optimizers sgd,lars --epochs 30 --trials 8 --seeds 3 --storage sqlite:///runs/study.db
    largebatch report sqlite:///runs/study.db --out runs/report [--probe runs/probe-mnist-lenet/probe.json]
    largebatch probe --recipe mnist-lenet --epochs 2     # predict the critical batch before the sweep

Your own problem: `--recipe-file my_recipe.py[:function]` (a Python file defining a function that returns
a RunConfig) or `--recipe mypkg.recipes:function` in place of a named recipe, in `study` and `probe`. The
study is decided on the task's primary metric: accuracy for classification (higher is better; a batch
keeps the baseline A at >= 0.995 A), the loss for regression and language models (lower is better; A is the
validation loss when every run has one, and a batch keeps it at <= 1.01 A; `report --tolerance` changes the 1%);
`--target` is a value of that metric. A language model, with each optimizer's own LR:

    largebatch study --recipe shakespeare-gpt --batch-sizes 12,48,192 --optimizers adamw,lamb --lr-scaling sqrt \
        --set lamb:optimizer.base_lr=0.025 --storage sqlite:///runs/lm.db      # benchmarks/lm_study.py

A killed study resumes by running the same command (finished trials are read from the storage);
`--workers N` runs trials in N processes. Several machines share a study by running the same command with one
`--storage`: a PostgreSQL URL (`pip install 'largebatch[postgres]'`), or `journal:////shared/study.log` on a
shared filesystem; SQLite is for one machine (largebatch.study.storage). A killed machine's trial is rerun by
another once it has missed 3 `--heartbeat`s. `--pruner halving` stops hopeless tuned trials early on their evaluation
curves (successive halving; also median, hyperband); `--stop-when-decided` also stops runs once B_L and B_H
cannot change by them (a run reaching the baseline's threshold stops there). A larger `--seeds` adds only the
missing seeds to finished points; `--import-trials report/trials.csv` rebuilds a lost database from a report and
continues it.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from largebatch.cli import ArgumentParser, int_list
from largebatch.config import SCALINGS, ConfigError, RunConfig, check_writable_dir, read_json_object

if TYPE_CHECKING:
    from largebatch.study.spec import StudySpec


def _range(flag: str):
    def parse(text: str) -> tuple[float, float]:
        try:
            lo, hi = (float(x) for x in text.split(","))
        except ValueError:
            raise ConfigError(f"{flag} {text!r} is invalid: give LOW,HIGH, e.g. 0.125,8") from None
        return lo, hi
    return parse


def _read_json(path: Path, flag: str, what: str) -> dict:
    """The JSON object in `path`; ConfigError naming the flag, the file and the fix otherwise."""
    return read_json_object(path, f"{flag} {path}", f"pass {what}")


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set {pair!r} is invalid: use FIELD=VALUE, e.g. --set data.train_limit=1024")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value  # a plain string
    return out


def _recipe_flags(ap: argparse.ArgumentParser) -> None:
    """--recipe NAME|module:function and --recipe-file FILE.py[:function], one of them required."""
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--recipe", help="named recipe (`largebatch recipes`), module.path:function returning a "
                                        "RunConfig, or a recipe file as --recipe-file takes it")
    group.add_argument("--recipe-file", metavar="FILE.py[:FUNCTION]",
                       help="Python file defining a function that returns a RunConfig (:FUNCTION picks one of several)")


def _recipe(args: argparse.Namespace) -> tuple[str, RunConfig]:
    """(reference, RunConfig) of --recipe or --recipe-file; a bad one is a one-line ConfigError before any work."""
    from largebatch.study.recipe import is_file_ref, load_recipe

    if args.recipe_file is not None and not is_file_ref(args.recipe_file):
        raise ConfigError(f"--recipe-file {args.recipe_file} is not a Python file: give FILE.py or FILE.py:function")
    ref = args.recipe_file or args.recipe  # --recipe takes every form, as `largebatch train --recipe` does
    return ref, load_recipe(ref)


def _check_target(target: float | None, metric: str | None, argv: list[str]) -> None:
    """A target is a finite value of the metric (None: not known yet); of an accuracy, a fraction in (0, 1]. The
    error names the flag as typed; `--target-accuracy` says the metric is an accuracy."""
    flag = next((a.split("=")[0] for a in reversed(argv) if a.split("=")[0] in ("--target", "--target-accuracy")),
                "--target")
    metric = "accuracy" if flag == "--target-accuracy" else metric
    accuracy = metric is not None and metric.endswith("accuracy")
    if target is not None and (not math.isfinite(target) or (accuracy and not 0 < target <= 1)):
        raise ConfigError(f"{flag} {target} is invalid: give a value of the study's metric"
                          f"{f' ({metric}, a fraction in (0, 1])' if accuracy else f' ({metric})' if metric else ''}")


def _tolerance(text: str) -> float:
    """--tolerance: a relative tolerance in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: give a relative tolerance in [0, 1), e.g. 0.01")
    return value


def _tolerance_flag(ap: ArgumentParser) -> None:
    """--tolerance, the same for the study (where `--stop-when-decided` stops runs) and its report."""
    ap.add_argument("--tolerance", type=_tolerance, default=None,
                    help="relative tolerance of 'keeps the baseline A' (default: 0.005 for an accuracy, You et al. "
                         "2020's 99.5%%; 0.01 for a loss, at most 1.01 A)")


def _study_parser() -> ArgumentParser:
    ap = ArgumentParser(prog="largebatch study", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    _recipe_flags(ap)
    ap.add_argument("--batch-sizes", required=True, type=int_list("--batch-sizes", "256,1024"),
                    help="comma-separated global batch sizes")
    ap.add_argument("--optimizers", default="sgd", help="comma-separated rungs: optimizer names (sgd, lars, ...)")
    ap.add_argument("--epochs", type=float, default=30.0, help="training budget of every run, in epochs")
    ap.add_argument("--trials", type=int, default=8, help="tuned (LR, warmup) points per (optimizer, batch)")
    ap.add_argument("--seeds", type=int, default=1, help="seeds per point")
    ap.add_argument("--sampler", choices=["grid", "tpe"], default="grid")
    ap.add_argument("--pruner", default="none", metavar="{none,median,halving,hyperband}",
                    help="stop tuned trials early whose evaluation curve the cell's Optuna pruner judges hopeless "
                         "(halving: successive halving; see largebatch.study.sweep.make_pruner); none: every run "
                         "trains its whole budget. The untuned point always runs to the end")
    ap.add_argument("--stop-when-decided", action="store_true",
                    help="stop a run, or skip a trial, once nothing it could show changes B_L or B_H: only the "
                         "first optimizer's untuned run at the smallest batch (the baseline) runs there, a run "
                         "reaching the baseline's threshold stops there, and a decided batch runs nothing more "
                         "(largebatch.study.decide); report it with the same --tolerance")
    ap.add_argument("--lr-scaling", choices=SCALINGS, default="linear",
                    help="how the untuned point's LR scales from the recipe's reference batch to B (linear: You et "
                         "al. 2020's definition of B_L; sqrt: the usual rule for Adam-family optimizers)")
    ap.add_argument("--lr-range", type=_range("--lr-range"), default=(1 / 8, 8.0),
                    help="LR multipliers on the scaled base LR, LOW,HIGH (log-spaced grid of 7)")
    ap.add_argument("--warmup-range", type=_range("--warmup-range"), default=(0.0, 1 / 6),
                    help="warmup length as fractions of --epochs, LOW,HIGH (grid of 3)")
    ap.add_argument("--target", "--target-accuracy", type=float, default=None,
                    help="value of the task's metric for steps-to-target (accuracy: >=, a loss: <=)")
    ap.add_argument("--storage", default="sqlite:///runs/study.db",
                    help="Optuna storage shared by every process of the study: sqlite:///FILE for one machine (many "
                         "workers queue on its lock and may fail with 'database is locked'; never on a network "
                         "filesystem), postgresql://user:password@host/db (or any SQLAlchemy URL) or journal:///FILE "
                         "(a log on a shared filesystem) for several")
    _tolerance_flag(ap)
    ap.add_argument("--heartbeat", type=int, default=60, metavar="S",
                    help="seconds between a running trial's heartbeats; a trial silent for 3 heartbeats belongs to a "
                         "killed process and is rerun by another. Give every process of a study the same")
    ap.add_argument("--name", default=None, help="study name (default: the recipe's, or its function's)")
    ap.add_argument("--workers", type=int, default=1, help="parallel trial processes")
    ap.add_argument("--output-dir", default="runs", help="parent of the study's run directories")
    ap.add_argument("--import-trials", default=None, metavar="TRIALS_CSV",
                    help="first rebuild the finished trials of a report's trials.csv in the storage (for each "
                         "optimizer and batch whose study is still empty): a lost or remote database continues")
    ap.add_argument("--set", action="append", default=[], metavar="[RUNG:]FIELD=VALUE",
                    help="RunConfig override for every run, e.g. --set data.train_limit=1024, or for one rung's "
                         "runs, e.g. --set lamb:optimizer.base_lr=0.01")
    return ap


def _study_spec(args: argparse.Namespace, argv: list[str], ref: str, base: RunConfig) -> StudySpec:
    """The StudySpec of the arguments, every run's config validated and the model imported (one-line errors)."""
    from largebatch.study.spec import PRUNERS, RUNGS, StudySpec, cell_config  # torch loads now

    if args.pruner not in PRUNERS:
        raise ConfigError(f"--pruner {args.pruner!r} is unknown: choose from {', '.join(PRUNERS)}")

    rungs = tuple(r for r in args.optimizers.split(",") if r)
    for r in rungs:
        if r not in RUNGS:
            raise ConfigError(f"--optimizers {args.optimizers!r}: unknown rung {r!r}; choose from {', '.join(RUNGS)}")
        if rungs.count(r) > 1:
            raise ConfigError(f"--optimizers {args.optimizers!r} lists {r} more than once: give each rung once")
    for pair in args.set:
        rung, sep, _ = pair.partition("=")[0].rpartition(":")
        if sep and rung not in rungs:
            raise ConfigError(f"--set {pair!r} names rung {rung!r}, which --optimizers {args.optimizers!r} does not "
                              f"run: give one of {', '.join(rungs)} before the colon")
    spec = StudySpec(recipe=ref, base=base, batch_sizes=args.batch_sizes, rungs=rungs, epochs=args.epochs,
                     trials=args.trials, seeds=args.seeds, sampler=args.sampler, lr_range=args.lr_range,
                     warmup_range=args.warmup_range, target=args.target, output_dir=args.output_dir,
                     extra=_overrides(args.set), lr_scaling=args.lr_scaling, pruner=args.pruner,
                     heartbeat=args.heartbeat, decide=args.stop_when_decided, tolerance=args.tolerance)
    _check_target(spec.target, spec.metric, argv)
    for rung in spec.rungs:  # every run's config is valid before the first one starts
        for batch in spec.batch_sizes:
            cell_config(spec, rung, batch).validate()
    _check_model(cell_config(spec, spec.rungs[0], spec.batch_sizes[0]).model.name)
    return spec


def study_main(argv: list[str]) -> int:
    args = _study_parser().parse_args(argv)
    from largebatch.study.recipe import recipe_name

    ref, base = _recipe(args)  # a bad recipe is a one-line error before any work
    from largebatch.study.storage import check_storage, open_checked

    check_storage(args.storage, "--storage")
    check_writable_dir(Path(args.output_dir), "--output-dir")
    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers} is invalid: give 1 or more trial processes")
    if args.import_trials and not Path(args.import_trials).is_file():
        raise ConfigError(f"--import-trials {args.import_trials}: no such file; pass the trials.csv of a report")
    spec, name = _study_spec(args, argv, ref, base), args.name or recipe_name(ref)
    from largebatch.study import sweep
    from largebatch.study.record import read_csv

    try:
        trials = read_csv(args.import_trials) if args.import_trials else None
    except UnicodeDecodeError as e:
        raise ConfigError(f"--import-trials {args.import_trials} is not UTF-8 text ({e.reason} at byte {e.start}): "
                          f"pass the trials.csv of a report") from None
    open_checked(args.storage, "--storage")  # a database that cannot be opened fails here, before any run
    if trials is not None:
        added = sweep.import_records(spec, args.storage, name, trials)
        print(f"[largebatch] imported {added} finished trials of study {name} from {args.import_trials}", flush=True)
    try:
        records = sweep.run_study(spec, args.storage, name, workers=args.workers)
    except sweep.Stopped as e:  # SIGINT/SIGTERM: the trial is re-queued, nothing finished is lost
        print(f"[largebatch] study {name} stopped ({e}); rerun the same command to resume", flush=True)
        return 4  # the exit code of a stopped `largebatch train`
    diverged, pruned = (sum(r.status == s for r in records) for s in ("diverged", "pruned"))
    decided = sum(r.reached_early for r in records)
    print(f"[largebatch] study {name}: {len(records)} runs ({diverged} diverged"
          f"{f', {pruned} pruned' if pruned else ''}{f', {decided} stopped where they reached A' if decided else ''})"
          f" in {args.storage}; "
          f"report: largebatch report {args.storage} --name {name} --out runs/report")
    return 0


def _check_model(name: str) -> None:
    """Import the model factory `name` names (a one-line ConfigError if it does not import), before any run:
    a typo would otherwise fail every run of the study as a "failed" record."""
    from largebatch.models.registry import resolve

    resolve(name)


def report_main(argv: list[str]) -> int:
    ap = ArgumentParser(prog="largebatch report", description="Write report.md, plots and trials.csv "
                        "for a study: regimes B_L, B_H, B_F (You et al. 2020) with their evidence.")
    ap.add_argument("storage", help="the study's --storage, e.g. sqlite:///runs/study.db or journal:///runs/study.log")
    ap.add_argument("--name", default=None, help="study name (default: the only one in the storage)")
    ap.add_argument("--out", default="runs/report", help="output directory")
    ap.add_argument("--dataset-size", type=int, default=0, help="training-set size B_F (default: from the runs)")
    ap.add_argument("--target", "--target-accuracy", type=float, default=None,
                    help="steps to this value of the study's metric, re-measured from the runs' metrics.jsonl "
                         "(default: the study's)")
    ap.add_argument("--baseline", default=None, help="rung whose untuned runs define B_L (default: best at B0)")
    ap.add_argument("--probe", default=None, help="probe.json of `largebatch probe`: its prediction vs B_L")
    _tolerance_flag(ap)
    args = ap.parse_args(argv)
    probe = None
    if args.probe:
        probe = _read_json(Path(args.probe), "--probe", "the probe.json a `largebatch probe` wrote")
    _check_target(args.target, None, argv)  # against the study's metric once its records are read
    if args.dataset_size < 0:
        raise ConfigError(f"--dataset-size {args.dataset_size} is invalid: give the training-set size "
                          f"(0: from the runs)")
    check_writable_dir(Path(args.out), "--out")
    from largebatch.study.storage import check_storage, open_checked

    check_storage(args.storage, "report", existing=True)
    import optuna

    from largebatch.study.record import study_metric
    from largebatch.study.report import write_report
    from largebatch.study.runs import retarget
    from largebatch.study.sweep import load_records

    names = sorted({s.split("/")[0] for s in optuna.get_all_study_names(open_checked(args.storage, "report"))})
    if args.name is not None and args.name not in names:
        raise ConfigError(f"report: {args.storage} holds no study {args.name!r} (it holds "
                          f"{', '.join(names) or 'none'}): pass one of them with --name")
    name = args.name or (names[0] if len(names) == 1 else None)
    if name is None:
        raise ConfigError(f"report: choose a study with --name ({', '.join(names) or 'the storage holds none'})")
    records = load_records(args.storage, name)
    if not records:
        raise ConfigError(f"report: study {name!r} has no finished runs yet")
    if args.baseline is not None and args.baseline not in {r.rung for r in records}:
        raise ConfigError(f"--baseline {args.baseline!r}: study {name!r} has no runs of that rung (it has "
                          f"{', '.join(sorted({r.rung for r in records}))})")
    _check_target(args.target, study_metric(records)[0], argv)
    if args.target is not None:
        records = [retarget(r, args.target) for r in records]
    size = args.dataset_size or _train_examples(records)
    path = write_report(records, Path(args.out), dataset_size=size, target=args.target,
                        baseline_rung=args.baseline, probe=probe, tolerance=args.tolerance)
    print(f"[largebatch] {len(records)} runs of study {name} -> {path}")
    return 0


def _train_examples(records: list) -> int:
    """The training-set size the runs saw (summary.json `train_examples`)."""
    for r in records:
        summary = Path(r.run_dir) / "summary.json"
        if r.run_dir and summary.is_file():
            n = json.loads(summary.read_text()).get("train_examples")
            if n:
                return int(n)
    raise ConfigError("report: cannot tell the training-set size from the runs; pass --dataset-size")



def probe_main(argv: list[str]) -> int:
    """A short baseline run that measures the gradient noise scale B_simple (McCandlish et al. 2018).

    The recipe runs for --epochs (its schedule stretched to them, as in a study) with its global batch
    split into --accum equal micro-batches, and the trainer measures the noise scale at every step from
    the micro-batch gradients (no extra pass).
    The last EMA estimate is the prediction: batches well below B_simple scale almost perfectly,
    batches well above it waste examples. Written to <run>/probe.json.
    """
    ap = ArgumentParser(prog="largebatch probe", description=probe_main.__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    _recipe_flags(ap)
    ap.add_argument("--epochs", type=float, default=1.0, help="length of the probe run")
    ap.add_argument("--accum", type=int, default=None,
                    help="micro-batches per step, a divisor of the global batch (small batch = B / accum); "
                         "default: the largest divisor up to 8")
    ap.add_argument("--output-dir", default="runs")
    ap.add_argument("--name", default=None, help="run directory name (default: probe-<recipe name>)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="RunConfig override")
    args = ap.parse_args(argv)
    from dataclasses import replace

    from largebatch.study.recipe import recipe_name

    ref, cfg = _recipe(args)  # a bad recipe is a one-line error before any work
    from largebatch import checkpoint
    from largebatch.metrics import read_metrics
    from largebatch.study.spec import apply_overrides, stretch_schedule
    from largebatch.trainer import train

    # the recipe's schedule at the probe's budget (its warmup would outlast a short probe), as a study cell runs it
    cfg = replace(cfg, epochs=args.epochs, schedule=stretch_schedule(cfg.schedule, args.epochs / cfg.epochs))
    cfg = apply_overrides(cfg, _overrides(args.set))
    b = cfg.batch.global_batch
    k = _accum(args.accum, b)
    check_writable_dir(Path(args.output_dir), "--output-dir")
    name = args.name or f"probe-{recipe_name(ref)}"
    cfg = replace(cfg, batch=replace(cfg.batch, micro_batch=b // k),
                  diagnostics=replace(cfg.diagnostics, noise_scale=True, every_steps=1),
                  output=replace(cfg.output, dir=args.output_dir, name=name, progress=False))
    summary = train(cfg)
    run_dir = Path(args.output_dir) / name
    history = [r for r in read_metrics(run_dir) if "noise_scale" in r]
    if not history:
        raise ConfigError(f"probe: the run measured no noise scale ({summary['status']}: {summary['message']})")
    last = history[-1]
    result = {"recipe": ref, "global_batch": b, "micro_batch": b // k, "epochs": args.epochs,
              "steps": last["step"], "status": summary["status"], "b_simple": last["noise_scale"],
              "b_simple_median": median_after_warmup(history, json.loads((run_dir / "env.json").read_text())
                                                     .get("warmup_steps", 0)),
              "grad_sq": last["grad_sq"], "trace_sigma": last["trace_sigma"],
              "history": [[r["step"], r["noise_scale"]] for r in history]}
    checkpoint.write_json(run_dir / "probe.json", result)
    print(f"[largebatch] probe {ref}: gradient noise scale B_simple = {result['b_simple']:,.0f} after "
          f"{result['steps']} steps at batch {b} (micro-batches of {b // k}; median after warmup "
          f"{result['b_simple_median']:,.0f}); batches well below it scale almost linearly (McCandlish et al. "
          f"2018). -> {run_dir / 'probe.json'}")
    return 0


def median_after_warmup(history: list[dict], warmup_steps: int) -> float:
    """Median of the per-step noise-scale estimates after warmup (all of them if warmup is the whole run).

    The last estimate reflects the end of the schedule: as a cosine or polynomial decay anneals the LR the true
    gradient |G|^2 shrinks and B_simple climbs (a character GPT's probe: ~25-55 through training, ~260 at the end),
    while a fixed-budget study's limit is set along the whole run, so the report quotes both."""
    import statistics

    after = [r["noise_scale"] for r in history if r["step"] > warmup_steps] or [r["noise_scale"] for r in history]
    return statistics.median(after)


def _accum(asked: int | None, batch: int) -> int:
    """Micro-batches per probe step: `asked` if it divides `batch` (equal micro-batches, as the noise-scale
    estimator assumes), else a one-line error; by default the largest divisor of `batch` up to 8."""
    divisors = [k for k in range(2, batch + 1) if batch % k == 0]
    if asked is None:
        if not divisors or divisors[0] > 8:
            raise ConfigError(f"probe: no --accum up to 8 divides the global batch {batch}: pass --accum K, K a "
                              f"divisor of {batch} ({', '.join(map(str, divisors[:4])) or 'none'}), or another batch")
        return max(k for k in divisors if k <= 8)
    if asked < 2:
        raise ConfigError(f"probe --accum {asked} is invalid: the noise scale needs 2 or more micro-batches per step")
    if asked not in divisors:
        near = sorted(divisors, key=lambda k: (abs(k - asked), k))[:4]
        raise ConfigError(f"probe --accum {asked} does not divide the global batch {batch} (micro-batches must be "
                          f"equal): choose {' or '.join(map(str, sorted(near))) or 'another recipe'}")
    return asked
