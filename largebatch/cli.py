"""Command line: `largebatch train | study | report | probe | plan | show-config | recipes`.

    largebatch train --recipe mnist-lenet [--batch.global-batch 8192 --optimizer.base-lr 0.1 ...]
    largebatch train --config my_run.json [overrides]
    largebatch train --resume runs/mnist-lenet-20261123-120000
    largebatch show-config --recipe mnist-lenet [overrides]
    largebatch recipes
    largebatch study --recipe mnist-lenet --batch-sizes 256,8192 --optimizers sgd,lars --storage sqlite:///runs/s.db
    largebatch report sqlite:///runs/s.db --out runs/report
    largebatch plan --recipe imagenet-resnet50-mlperf --profile h100 --chips 8,64,512 --out runs/plan
    largebatch plan --check-published | --calibrate

    torchrun --nproc-per-node 2 -m largebatch train --recipe mnist-lenet-lars-8k   # data parallel

Overrides are the RunConfig fields as flags (`largebatch train --help` lists them with their units).
A bad value, flag, file or URL stops with a one-line error before any work starts (exit code 2).
Exit codes of `train`: 0 completed, 2 bad input, 3 diverged, 4 stopped (resume it with --resume RUN_DIR),
5 the distributed process group could not be formed (a rank did not join in time).
Idle OpenMP threads sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE, unless OMP_WAIT_POLICY or GOMP_SPINCOUNT
is set; see `largebatch.threads`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import errno
import io
import json
import os
import sys
import typing
from pathlib import Path

import tyro

from largebatch.config import ConfigError, RunConfig, from_dict, read_json_object, to_dict
from largebatch.extras import check_run, require
from largebatch.recipes import RECIPES, describe
from largebatch.threads import quiet_openmp

EXIT = {"completed": 0, "diverged": 3, "stopped": 4}
# What the study commands import from the 'study' extra (probe needs none of it: it is one training run).
STUDY_MODULES = {"study": ("optuna", "sqlalchemy"), "report": ("optuna", "sqlalchemy", "matplotlib")}
# OSErrors that mean "this path is wrong" (the user's input), not a failing machine: one line, exit code 2.
PATH_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.EROFS,
               errno.ENAMETOOLONG, errno.ELOOP}


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors raise ConfigError (one line through `main`'s handler) instead of printing usage."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(f"{message} (`{self.prog} --help` lists the flags)")


def int_list(flag: str, example: str, repeats: typing.Literal["refuse", "merge", "keep"] = "refuse"
             ) -> typing.Callable[[str], tuple[int, ...]]:
    """An argparse `type` for comma-separated integers >= 1 (`flag` and `example` go into its one-line errors). A
    value given twice is refused (a study would count its runs twice), merged (a set of sizes to plan: sorted, each
    once) or kept (a shape, in order)."""
    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise ConfigError(f"{flag} {text!r} is invalid: give comma-separated integers, e.g. {example}") from None
        if not values or min(values) < 1:
            raise ConfigError(f"{flag} {text!r} is invalid: give one or more integers >= 1, e.g. {example}")
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated and repeats == "refuse":
            raise ConfigError(f"{flag} {text!r} lists {', '.join(map(str, repeated))} more than once: give each "
                              f"value once")
        return tuple(sorted(set(values))) if repeats == "merge" else values
    return parse


def _read_config_file(path: Path) -> dict:
    """The JSON object in --config `path`; ConfigError naming the file for anything else."""
    return read_json_object(path, f"--config {path}", "pass a JSON object of config sections "
                            "(`largebatch show-config > FILE` writes one)")


def _base_config(cmd: str, rest: list[str]) -> tuple[RunConfig, list[str], Path | None]:
    """Pick the starting config from --recipe, --config or --resume; return it and the other flags."""
    pre = ArgumentParser(prog=f"largebatch {cmd}", add_help=False)
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
        from largebatch.study.recipe import load_recipe  # a name, module:function or recipe file

        return load_recipe(known.recipe), overrides, None
    if known.config:
        path = Path(known.config)
        data = _read_config_file(path)
        try:
            return from_dict(data), overrides, None
        except ConfigError as e:
            raise ConfigError(f"--config {path}: {e}") from None
    if resume:
        from largebatch.rundir import resume_config

        run_dir = Path(resume)
        cfg = resume_config(run_dir)
        output = dataclasses.replace(cfg.output, dir=str(run_dir.parent), name=run_dir.name)
        return dataclasses.replace(cfg, output=output), overrides, run_dir
    return RunConfig(), overrides, None


def _flags(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Every override flag tyro makes of `cls` (for "did you mean"), with aliases and the --no- switches."""
    out, hints = [], typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _flags(tp, f"{prefix}{f.name}.")
            continue
        name = f.name.replace("_", "-")
        out.append(f"--{prefix}{name}")
        base = typing.get_args(tp)[0] if typing.get_origin(tp) is typing.Annotated else tp
        if base is bool:
            out.append(f"--{prefix}no-{name}")
        for meta in getattr(tp, "__metadata__", ()):
            out += list(getattr(meta, "aliases", None) or ())
    return out


def _kind(metavar: object) -> str:
    """What a flag takes, in words, from tyro's metavar (INT, {None}|FLOAT, [FLOAT [FLOAT ...]], {a,b}, INT|{auto})."""
    m = str(metavar)
    if m.startswith("{None}|"):
        return f"{_kind(m[len('{None}|'):])} or None"
    if "|" in m:  # a union, e.g. INT|{auto} (threads)
        return " or ".join(_kind(part) for part in m.split("|"))
    if m.startswith("["):
        item = m[1:].split()[0]
        return f"{ {'INT': 'integers', 'FLOAT': 'numbers'}.get(item, item)} separated by spaces (none: an empty list)"
    if m.startswith("{"):
        return "one of " + m[1:-1].replace(",", ", ")
    return {"INT": "an integer", "FLOAT": "a number", "STR": "a string"}.get(m, m)


def _values(args: list[str], flag: str) -> list[str]:
    """The values given to `flag` in `args` (`--flag a b` or `--flag=a`), the last time it occurs (the one used)."""
    values = []
    for i, token in enumerate(args):
        if token.startswith(flag + "="):
            values = [token[len(flag) + 1:]]
        elif token == flag:
            rest = args[i + 1:]
            values = rest[:next((j for j, v in enumerate(rest) if v.startswith("--")), len(rest))]
    return values


def _parse_error(event: object, cmd: str, args: list[str]) -> str | None:
    """One line for a tyro parse-error event (see tyro._errors), or None to fall back on tyro's own text."""
    hint = f"(`largebatch {cmd} --help` lists the flags)"
    kind = type(event).__name__
    if kind == "UnrecognizedArgs":
        token = event.tokens[0]
        if token.startswith("-"):
            flag = token.split("=")[0]
            known = _flags() + ["--recipe", "--config", "--resume"]
            close = difflib.get_close_matches(flag.replace("_", "-"), known, n=1)
            return f"unknown flag {flag}" + (f"; did you mean {close[0]}?" if close else "") + f" {hint}"
        before = args[args.index(token) - 1] if token in args[1:] else ""
        if before.startswith("--"):  # the flag before it took no value: a switch
            section, _, leaf = before[2:].rpartition(".")
            off = f"--{section + '.' if section else ''}{leaf[3:] if leaf.startswith('no-') else 'no-' + leaf}"
            return f"{before} takes no value, so {token!r} is left over: write {before} or {off} alone {hint}"
        return f"unexpected argument {token!r}: overrides are --flag VALUE pairs {hint}"
    arg = getattr(event, "argument", None)
    if arg is None:
        return None
    flags = arg.lowered.name_or_flags
    flag = next((t.split("=")[0] for t in args if t.split("=")[0] in flags), flags[-1])
    if kind == "InvalidChoice":
        return f"{flag} {event.value!r} is invalid: choose {_kind(arg.lowered.metavar)}"
    if kind == "InstantiationFailure":
        return f"{flag} {' '.join(_values(args, flag))!r} is invalid: give {_kind(arg.lowered.metavar)}"
    if kind == "BadValue" and event.reason == "too_few_values":
        return f"{flag} needs a value: give {_kind(arg.lowered.metavar)}"
    return None


@contextlib.contextmanager
def _one_line_parse_errors(cmd: str, args: list[str]) -> typing.Iterator[None]:
    """tyro's error boxes become one ConfigError line. tyro's parse-error hook (`tyro._errors`, private and
    experimental) gives the failing flag; without it (another tyro version), or for an event it does not
    describe, tyro's own text is squeezed onto one line."""
    def hook(event: object) -> None:
        message = _parse_error(event, cmd, args)
        if message:
            raise ConfigError(message)

    try:
        from tyro import _errors as errors
        hooked = errors.on_parse_error(hook)
    except (ImportError, AttributeError):
        hooked = contextlib.nullcontext()
    captured = io.StringIO()
    try:
        with hooked, contextlib.redirect_stderr(captured):
            yield
    except SystemExit as e:
        if e.code not in (0, None):
            text = " ".join(w for line in captured.getvalue().splitlines() if "--help" not in line and "╭" not in line
                            for w in line.strip(" │╮╰╯─").split())  # the box's text without its title and frame
            raise ConfigError(f"{text or 'invalid flags'} (`largebatch {cmd} --help` lists the flags)") from None
        sys.stderr.write(captured.getvalue())
        raise
    sys.stderr.write(captured.getvalue())


def _parse(cmd: str, rest: list[str]) -> tuple[RunConfig, Path | None]:
    base, overrides, resume = _base_config(cmd, rest)
    with _one_line_parse_errors(cmd, overrides):
        cfg = tyro.cli(RunConfig, default=base, args=overrides, prog=f"largebatch {cmd}",
                       description=f"largebatch {cmd} [--recipe NAME | --config FILE"
                                   f"{' | --resume RUN_DIR' if cmd == 'train' else ''}] [overrides]")
    cfg.validate()
    if resume is not None and (cfg.output.dir, cfg.output.name) != (base.output.dir, base.output.name):
        raise ConfigError(f"--resume {resume} continues the run where it is; --output.dir/--output.name cannot move "
                          f"it (copy or rename the directory, then resume that)")
    return cfg, resume


def _run(cmd: str, rest: list[str]) -> int:
    if cmd == "recipes":
        width = max(map(len, RECIPES))
        for name in sorted(RECIPES):
            print(f"{name:<{width}}  {describe(name)}")
        return 0
    if cmd in ("study", "report", "probe"):
        for module in STUDY_MODULES.get(cmd, ()):  # before any flag is read: the command cannot run without them
            require("study", module, f"largebatch {cmd}")
        from largebatch.study import cli as study_cli

        return {"study": study_cli.study_main, "report": study_cli.report_main,
                "probe": study_cli.probe_main}[cmd](rest)
    if cmd == "plan":
        from largebatch.plan.cli import plan_main

        return plan_main(rest)
    if cmd == "show-config":
        cfg, _ = _parse(cmd, rest)
        print(json.dumps(to_dict(cfg), indent=2))
        return 0
    if cmd == "train":
        cfg, resume = _parse(cmd, rest)
        check_run(cfg)  # a missing extra the run needs stops it here, before torch loads
        from largebatch.distributed import DistributedError  # torch-heavy imports only when training
        from largebatch.trainer import train

        try:
            summary = train(cfg, resume=resume is not None)
        except DistributedError as e:
            print(f"largebatch: error: {e}", file=sys.stderr)
            return 5
        return EXIT[summary["status"]]
    raise ConfigError(f"unknown command {cmd!r}: use train, study, report, probe, plan, show-config or recipes "
                      f"(largebatch --help)")


def input_error(e: BaseException) -> str | None:
    """The one-line message of an expected input error (a bad value, flag, file or path), None for a bug."""
    if isinstance(e, ConfigError):
        return " ".join(str(e).split())
    if isinstance(e, OSError) and e.errno in PATH_ERRNOS and e.filename is not None:
        other = f" -> {e.filename2}" if e.filename2 else ""
        return f"{e.filename}{other}: {e.strerror}: check the path (it must exist and be readable, or writable)"
    return None


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every expected input error ends here as one line `largebatch: error: ...` on stderr and
    exit code 2 (under torchrun from rank 0 only); anything else is a bug and keeps its traceback."""
    quiet_openmp()  # first, before anything imports torch: its OpenMP runtime reads the wait policy once, at load
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    try:
        code = _run(argv[0], argv[1:])
        sys.stdout.flush()  # a reader that went away (`| head -1`) is noticed here, not at interpreter exit
        return code
    except BrokenPipeError:
        with contextlib.suppress(OSError, ValueError, AttributeError, io.UnsupportedOperation):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit-time flush fails no more
        return 141  # as if killed by SIGPIPE, what `cat` and `yes` report
    except Exception as e:
        message = input_error(e)
        if message is None:
            raise
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank finds the same error: say it once
            print(f"largebatch: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
