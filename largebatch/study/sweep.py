"""Batch-size sweeps with tuning: one Optuna study per (rung, batch) in RDB storage, one run per seed.

Each study holds the **untuned** trial (the recipe's base LR scaled linearly to B, Goyal et al. 2017,
with the recipe's warmup: the baseline tuning must beat) and `trials` **tuned** trials: an LR
multiplier on that scaled LR and a warmup length, from a grid (log-spaced LR multipliers x evenly
spaced warmups, in `grid_order`: coverage first, so a small budget brackets the scaled LR on both sides)
or a seeded TPE; Shallue et al. 2019 found grid search as good as an auto-tuner. A trial trains every
seed and optimises the mean final value of the task's primary metric (`record.score`: validation when the
data has a validation split, else test), maximising accuracy and minimising a loss; diverged or failed
runs score the metric's worst value (0 accuracy, infinite loss). The trial's user attribute "records"
holds one `TrialRecord` (as a dict) per seed.

    spec = StudySpec(recipe="mnist-lenet", batch_sizes=(256, 4096), rungs=("sgd", "lars"), epochs=30,
                     trials=8, seeds=3, target=0.99)
    records = run_study(spec, "sqlite:///runs/study.db", "lenet", workers=2)

**Resuming.** The storage (`largebatch.study.storage`: SQLite for one machine, PostgreSQL or a journal file
for several) is the state: run_study counts finished (COMPLETE/PRUNED) trials and runs only missing ones. Trials
beat a heartbeat every `spec.heartbeat` s; a killed process's RUNNING trial goes stale after GRACE_BEATS of them,
is marked FAIL and re-queued with its parameters (Optuna's RetryHeartbeatStaleTrialCallback), and run_study
polls until it is done. A stop request (SIGINT/SIGTERM) re-queues the trial and raises `Stopped`. Run
directories are output_dir/name/rung/b{B}/t{trial}-s{seed}, a re-queued trial keeping its first
number: a finished summary.json there is reused, a checkpoint is resumed.

**More seeds.** Raising `seeds` on a finished study runs only the missing seeds: a *top-up* trial
(user attributes top_up_of, seeds, run_number) repeats a finished trial's point for the seeds it
lacks, best trials first, writing t{trial}-s{seed} beside the first seeds; records aggregate per
point, so top-ups count as more seeds of that point, not as new trials.

**Importing.** `import_records` rebuilds a study's trials from the records of a report's trials.csv
(a database lost or left on another machine): the study then continues, with finished points, their
seeds and their run-directory numbers as they were.

**Pruning** (`spec.pruner`, Optuna's pruners: `make_pruner`). The first seed of a trial reports its curve (the
study's metric at each evaluation, `runs.Curve`) as the trial's intermediate values, and a tuned trial whose
cell's pruner says so stops there: its record is "pruned", the trial PRUNED (a finished trial: resuming does not
rerun it, and no seeds are added to its point). Each decision compares trials of one (rung, batch) study, as
successive halving compares the configurations of one bracket (Jamieson & Talwalkar 2016; Li et al. 2018). The
untuned trial reports (its curve is what tuned ones are measured against) but is never pruned: it defines B_L and
every cell's reference. Only the first seed reports: the seeds of a trial run one after another, so a mean curve
would need every seed trained to each evaluation before the decision, which saves nothing on one core; later
seeds of a trial that survived, and top-ups, run to the end, so a point's seed mean is never cut short.

**Deciding early** (`spec.decide`, `largebatch.study.decide`). Every seed's run asks, at each evaluation, whether
its calls are decided: one that reached the baseline's threshold ends as a completed record there, one whose batch
another run decided is pruned; a cell whose trials can no longer change B_L or B_H claims no more (only the
baseline's trial runs at B0).

**Races.** Processes claim trials by counting; when two claim the last slot, or the same grid point,
the later trial is failed as surplus before training and the process claims the next free point.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import threading
import time
from collections import defaultdict
from dataclasses import asdict
from typing import Callable, Iterable

from largebatch import threads as cpu
from largebatch.config import ConfigError, RunConfig
from largebatch.extras import require
from largebatch.study import runs
from largebatch.study.decide import Decisions
from largebatch.study.record import PRUNED, TrialRecord, score, study_metric, worst
from largebatch.study.spec import StudySpec, cell_config, grid_order, study_name, trials_of, warmup_bounds
from largebatch.study.storage import GRACE_BEATS, open_storage, quiet_experimental

optuna = require("study", "optuna", "the batch-size study (largebatch.study.sweep)")
TrialState = optuna.trial.TrialState

STOP_WAIT_S = 300  # how long a stopped study waits for its workers to checkpoint and exit
POLL_S = 30  # longest wait between checks while other processes hold the study's last trials (a heartbeat if shorter)
_CLAIMED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
_DONE = (TrialState.COMPLETE, TrialState.PRUNED)


class Stopped(Exception):
    """A stop request ended a training run; its trial is re-queued and resumes on the next run_study."""


class _Surplus(Exception):
    """Another process claimed this trial's slot first."""


def direction(higher_is_better: bool) -> str:
    """The Optuna direction of a study decided by a metric of this direction."""
    return "maximize" if higher_is_better else "minimize"


# ---------------------------------------------------------------------------------------------
# the coverage-first grid


def _point(trial: optuna.trial.FrozenTrial) -> tuple[float, float] | None:
    """A tuned trial's grid point: its parameters, or the fixed ones of an enqueued (WAITING) trial."""
    p = trial.params or trial.system_attrs.get("fixed_params") or {}
    return (p["lr_multiplier"], p["warmup_epochs"]) if "lr_multiplier" in p else None


def _same(a: tuple[float, float] | None, b: tuple[float, float] | None) -> bool:
    return a is not None and b is not None and all(math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)
                                                   for x, y in zip(a, b))


def next_grid_point(spec: StudySpec, warmup_epochs: float,
                    trials: list[optuna.trial.FrozenTrial]) -> dict[str, float] | None:
    """The first point of grid_order that no claimed tuned trial holds (None: the grid is used up); the
    order goes downward once the untuned trial, or a top-up of its seeds, has finished with the worst score
    (accuracy 0: every seed diverged or failed; an infinite loss: one did)."""
    taken = [_point(t) for t in trials if t.state in _CLAIMED and t.user_attrs.get("tuned", True)]
    bad = worst(spec.higher_is_better)
    downward = any(t.state == TrialState.COMPLETE and not t.user_attrs.get("tuned", True) and t.value == bad
                   for t in trials)
    for p in grid_order(spec, warmup_epochs, downward):
        if not any(_same((p["lr_multiplier"], p["warmup_epochs"]), q) for q in taken):
            return p
    return None


class CoverageGridSampler(optuna.samplers.BaseSampler):
    """Gives each new tuned trial `next_grid_point`: the grid in grid_order, minus the points claimed
    trials hold. Two processes sampling at once may draw the same point; the objective fails the
    higher-numbered trial as surplus once both points are stored, and its process samples again (if the
    lower one stores its point only after the higher one has checked, the point runs twice: a wasted
    run, not a wrong result). Optuna's GridSampler draws in a seeded random order, so a small budget can
    spend every trial on one side of the scaled LR."""

    def __init__(self, spec: StudySpec, warmup_epochs: float):
        self.spec, self.warmup_epochs = spec, warmup_epochs

    def infer_relative_search_space(self, study, trial) -> dict:
        return {"lr_multiplier": optuna.distributions.FloatDistribution(*self.spec.lr_range, log=True),
                "warmup_epochs": optuna.distributions.FloatDistribution(*warmup_bounds(self.spec))}

    def sample_relative(self, study, trial, search_space) -> dict:
        return next_grid_point(self.spec, self.warmup_epochs, study.get_trials(deepcopy=False)) or {}

    def sample_independent(self, study, trial, param_name, param_distribution):
        raise _Surplus(f"trial {trial.number}: every grid point is claimed by another trial")


# ---------------------------------------------------------------------------------------------
# one trial: every seed, one record each


def _rank(value: float | None, higher_is_better: bool) -> float:
    """Sort key of a trial value, best first (a trial without a value last)."""
    if value is None:
        return math.inf
    return -value if higher_is_better else value


def _claimed(trials: list[optuna.trial.FrozenTrial], tuned: bool, before: int | None = None) -> int:
    """Claimed trials (not top-ups) of one kind, optionally only those numbered below `before`."""
    return sum(1 for t in trials if t.state in _CLAIMED and t.user_attrs.get("tuned", True) == tuned
               and _base(t) is None and (before is None or t.number < before))


def _base(t: optuna.trial.FrozenTrial) -> int | None:
    """The number of the trial whose seeds top-up trial `t` adds to (None: `t` is not a top-up)."""
    return t.user_attrs.get("top_up_of")


def _run_number(t: optuna.trial.FrozenTrial) -> int:
    """The trial number in a trial's run directories (t{number}-s{seed}): a re-queued trial keeps the first
    one's, a top-up its base trial's."""
    return t.user_attrs.get("run_number", t.system_attrs.get("failed_trial", t.number))


def next_top_up(spec: StudySpec, trials: list[optuna.trial.FrozenTrial], tuned: bool | None = None
                ) -> tuple[optuna.trial.FrozenTrial, list[int]] | None:
    """The finished trial (of that kind, when `tuned` is given), best first, lacking some of seeds 0 .. spec.seeds-1
    (counting the seeds of its records and of its claimed top-ups), and the seeds it lacks; None when every finished
    trial has all. A pruned trial is finished without a result: its point gets no more seeds."""
    held: dict[int, set[int]] = defaultdict(set)
    for t in trials:
        if _base(t) is None and t.state in _DONE:
            held[t.number] |= {r["seed"] for r in t.user_attrs.get("records", [])}
        elif _base(t) is not None and t.state in _CLAIMED:
            held[_base(t)] |= set(t.user_attrs["seeds"])
    bases = sorted((t for t in trials if _base(t) is None and t.state == TrialState.COMPLETE
                    and (tuned is None or t.user_attrs.get("tuned", True) == tuned)),
                   key=lambda t: (_rank(t.value, spec.higher_is_better), t.number))
    for t in bases:
        missing = [s for s in range(spec.seeds) if s not in held[t.number]]
        if missing:
            return t, missing
    return None


def _objective(spec: StudySpec, name: str, rung: str, batch: int, current: dict,
               decisions: Decisions | None = None) -> Callable:
    def objective(trial: optuna.Trial) -> float:
        current["number"] = trial.number
        trials = trial.study.get_trials(deepcopy=False)
        tuned = trial.user_attrs.get("tuned", True)
        me = next(t for t in trials if t.number == trial.number)
        if _base(me) is not None:
            return _top_up_objective(spec, name, rung, batch, trial, me, trials, decisions)
        if _claimed(trials, tuned, before=trial.number) >= (trials_of(spec, rung) if tuned else 1):
            raise _Surplus(f"trial {trial.number}: another process claimed the last slot")
        if decisions is not None and not decisions.needed(rung, batch, tuned):  # e.g. a tuned trial at B0, created
            raise _Surplus(f"trial {trial.number}: its calls are decided")  # when another process took the queued one
        number = _run_number(me)  # a re-queued trial keeps its run dirs
        lr_mult, warmup = 1.0, None
        if tuned:
            lr_mult = trial.suggest_float("lr_multiplier", *spec.lr_range, log=True)
            warmup = trial.suggest_float("warmup_epochs", *warmup_bounds(spec))
            # after suggesting (the point is in storage): a lower trial of another process drew it too
            if spec.sampler == "grid" and any(
                    _same((lr_mult, warmup), _point(t)) for t in trial.study.get_trials(deepcopy=False)
                    if t.number < trial.number and t.state in _CLAIMED and t.user_attrs.get("tuned", True)
                    and _base(t) is None):
                raise _Surplus(f"trial {trial.number}: another process claimed grid point {(lr_mult, warmup)}")
        trial.set_user_attr("tuned", tuned)
        return _run_seeds(trial, spec, name, rung, batch, number, range(spec.seeds), tuned, lr_mult, warmup,
                          curve=spec.pruner != "none", decisions=decisions)
    return objective


def _top_up_objective(spec: StudySpec, name: str, rung: str, batch: int, trial: optuna.Trial,
                      me: optuna.trial.FrozenTrial, trials: list[optuna.trial.FrozenTrial],
                      decisions: Decisions | None = None) -> float:
    """More seeds at a finished trial's point (its fixed parameters), in its run-directory numbering."""
    seeds = me.user_attrs["seeds"]
    if any(t.number < me.number and t.state in _CLAIMED and _base(t) == _base(me)
           and set(t.user_attrs["seeds"]) & set(seeds) for t in trials):
        raise _Surplus(f"trial {me.number}: another process claimed seeds {seeds} of trial {_base(me)}")
    p = me.system_attrs.get("fixed_params") or {}
    return _run_seeds(trial, spec, name, rung, batch, _run_number(me), seeds, me.user_attrs["tuned"],
                      p.get("lr_multiplier", 1.0), p.get("warmup_epochs"), decisions=decisions)


def _run_seeds(trial: optuna.Trial, spec: StudySpec, name: str, rung: str, batch: int, run_number: int,
               seeds: Iterable[int], tuned: bool, lr_mult: float, warmup: float | None, curve: bool = False,
               decisions: Decisions | None = None) -> float:
    """One record per seed into the trial's "records" user attribute; the mean score is the trial's value. With
    `curve`, the first seed reports its curve, and a tuned trial is pruned when its pruner says so (module doc);
    with `decisions`, every seed stops once its calls are decided (`largebatch.study.decide`)."""
    records = []
    decide = None if decisions is None else (lambda metrics: decisions.verdict(rung, batch, tuned, metrics))
    for i, seed in enumerate(seeds):
        report = _reporter(trial, may_prune=tuned) if curve and i == 0 else None
        record = runs.run_record(spec, name, rung, batch, run_number, seed, tuned, lr_mult, warmup, report, decide)
        if record.status == "stopped":
            raise Stopped(f"{record.run_dir}: {record.message}")
        records.append(record)
        trial.set_user_attr("records", [asdict(r) for r in records])
        if record.status == PRUNED:
            raise optuna.TrialPruned(record.message)
    return sum(score(r) for r in records) / len(records)


def _reporter(trial: optuna.Trial, may_prune: bool) -> runs.Report:
    """Reports a run's evaluations as the trial's intermediate values; True when it may be, and is to be, pruned.
    The pruner is asked even where its answer is ignored: successive halving records a trial's rung values then."""
    def report(value: float, index: int) -> bool:
        trial.report(value, index)
        return trial.should_prune() and may_prune
    return report


# ---------------------------------------------------------------------------------------------
# studies in storage


def _cell(spec: StudySpec, rung: str, batch: int) -> RunConfig | None:
    """The cell's untuned config (None when it is invalid: its runs fail anyway)."""
    try:
        return cell_config(spec, rung, batch)
    except ConfigError:
        return None


def make_pruner(spec: StudySpec, cell: RunConfig | None) -> optuna.pruners.BasePruner:
    """The Optuna pruner of one (rung, batch) study, in units of evaluation indices (`runs.Curve`: epochs, with an
    evaluation every epoch). No tuned trial is judged before the longest warmup of the grid (or the cell's own, if
    longer) has ended, at evaluation `first`, since a shorter warmup climbs faster at first; then

    - median: pruned when its best value so far is worse than the median of the finished trials' at the same
      evaluation (after one finished trial: the untuned one, in a cell of a few trials);
    - halving: successive halving (Jamieson & Talwalkar 2016) with rungs at first * 3^k evaluations, a trial
      going on only while it is in the best third of the trials that reached a rung (with fewer than 6: the best);
    - hyperband: Hyperband (Li et al. 2018), brackets of successive halving from `first` to the last evaluation,
      each trial in one bracket (with a few trials per cell many brackets hold one trial, which is never pruned).
    """
    if spec.pruner == "none" or cell is None:
        return optuna.pruners.NopPruner()
    every = cell.eval.every_epochs or spec.epochs
    first = max(1, math.ceil(max(warmup_bounds(spec)[1], cell.schedule.warmup_epochs) / every - 1e-9))
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=first)
    if spec.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first, reduction_factor=3)
    last = max(first, math.ceil(spec.epochs / every - 1e-9))
    return optuna.pruners.HyperbandPruner(min_resource=first, max_resource=last, reduction_factor=3)


def _sampler(spec: StudySpec, warmup_epochs: float, salt: int) -> optuna.samplers.BaseSampler:
    if spec.sampler == "grid":
        return CoverageGridSampler(spec, warmup_epochs)
    # a seed per trial and worker: a restarted or parallel process must not replay the same draws
    return optuna.samplers.TPESampler(seed=spec.seed * 1_000_003 + salt,
                                      n_startup_trials=min(10, max(2, spec.trials // 2)))


def _cells(spec: StudySpec) -> list[tuple[str, int]]:
    return [(rung, batch) for rung in spec.rungs for batch in spec.batch_sizes]


def _fill_cell(spec: StudySpec, storage: optuna.storages.BaseStorage, name: str, rung: str, batch: int,
               worker: int) -> None:
    """Run trials of one (rung, batch) study until none is left to claim."""
    current: dict = {}
    decisions = Decisions(spec, storage, name) if spec.decide else None
    objective = _objective(spec, name, rung, batch, current, decisions)
    cell = _cell(spec, rung, batch)
    study = optuna.load_study(study_name=study_name(name, rung, batch), storage=storage,
                              pruner=make_pruner(spec, cell))
    warmup = cell.schedule.warmup_epochs if cell is not None else 0.0  # the untuned warmup, in epochs
    while True:
        with quiet_experimental():
            optuna.storages.fail_stale_trials(study)  # killed processes' trials -> FAIL + a WAITING copy
        trials = study.get_trials(deepcopy=False)
        study.sampler = _sampler(spec, warmup, salt=worker * 10_007 + len(trials))
        need = _needed(decisions, rung, batch)
        if any(t.state == TrialState.WAITING for t in trials):
            pass  # optimize() pops the waiting trial first
        elif _claimed(trials, tuned=False) < 1 and need[False]:
            study.enqueue_trial({}, user_attrs={"tuned": False})
        elif not need[True] and not (need[False] and next_top_up(spec, trials, tuned=False)):
            return  # the calls this cell serves are decided (--stop-when-decided)
        elif (short := next_top_up(spec, trials, tuned=None if need[True] else False)) is not None:
            base, seeds = short
            study.enqueue_trial(base.params, user_attrs={"tuned": base.user_attrs.get("tuned", True),
                                                         "top_up_of": base.number, "seeds": seeds,
                                                         "run_number": _run_number(base)})
        elif _claimed(trials, tuned=True) >= trials_of(spec, rung):
            return
        elif spec.sampler == "grid" and next_grid_point(spec, warmup, trials) is None:
            return  # claimed trials of an earlier, different grid hold the rest of the budget
        try:
            study.optimize(objective, n_trials=1, catch=(_Surplus,))
        except (Stopped, KeyboardInterrupt):
            failed = [t for t in study.get_trials() if t.number == current.get("number")]
            if failed and failed[0].state == TrialState.FAIL:
                with quiet_experimental():
                    optuna.storages.RetryHeartbeatStaleTrialCallback()(study, failed[0])  # resume it next time
            raise


def _work(spec: StudySpec, storage_url: str, name: str, worker: int = 0, workers: int = 1) -> None:
    """Run every trial that can be claimed in every (rung, batch) study; a worker process's entry point (one of
    `workers` sharing this machine: `--threads auto` trials get their share of its cores)."""
    cpu.share_cores(workers)
    storage = open_storage(storage_url, spec.heartbeat)
    for rung, batch in _work_order(spec):
        _fill_cell(spec, storage, name, rung, batch, worker)


def _work_order(spec: StudySpec) -> list[tuple[str, int]]:
    """The cells in the order a worker visits them: as given; deciding early (`spec.decide`), the baseline's cell
    first and then the largest batches, which no early decision shortens (they rarely reach the baseline), so
    that the other workers spend the baseline's run on them rather than on runs that could stop once A is known."""
    cells = _cells(spec)
    if not spec.decide:
        return cells
    first = (spec.rungs[0], min(spec.batch_sizes))
    return [first] + sorted((c for c in cells if c != first), key=lambda c: (-c[1], spec.rungs.index(c[0])))


def _unfinished(spec: StudySpec, storage: optuna.storages.BaseStorage, name: str) -> list[str]:
    """Studies still short of finished trials (the rest run in other processes, or went stale)."""
    out = []
    decisions = Decisions(spec, storage, name) if spec.decide else None
    for rung, batch in _cells(spec):
        n = study_name(name, rung, batch)
        done = optuna.load_study(study_name=n, storage=storage).get_trials(deepcopy=False, states=_DONE)
        need = _needed(decisions, rung, batch)
        if ((need[False] and (_claimed(done, tuned=False) < 1 or next_top_up(spec, done, tuned=False)))
                or (need[True] and (_claimed(done, tuned=True) < trials_of(spec, rung)
                                    or next_top_up(spec, done) is not None))):
            out.append(n)
    return out


def _needed(decisions: Decisions | None, rung: str, batch: int) -> dict[bool, bool]:
    """Per kind (tuned: True, untuned: False), whether trials of this cell still count (always, without
    `decisions`)."""
    return {tuned: decisions is None or decisions.needed(rung, batch, tuned) for tuned in (False, True)}


def _spawn(spec: StudySpec, storage: str, name: str, workers: int) -> None:
    """Run `workers` worker processes to the end. A stop request to this process alone (SIGINT or SIGTERM, e.g.
    `kill PID`, where Ctrl-C would have reached the whole process group) is passed on to the workers as SIGINT, so
    each checkpoints and re-queues its trial, and raises `Stopped` once they have exited: none is left orphaned."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_work, args=(spec, storage, name, i, workers)) for i in range(workers)]
    for p in procs:
        p.start()
    main = threading.current_thread() is threading.main_thread()  # only the main thread may set a handler
    old = signal.signal(signal.SIGTERM, signal.default_int_handler) if main else None  # SIGTERM: as SIGINT
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGINT)
        for p in procs:
            p.join(STOP_WAIT_S)
            if p.is_alive():  # still busy after the wait: its trial goes stale and is re-queued
                p.terminate()
        raise Stopped("stop requested: the workers checkpointed and re-queued their trials") from None
    finally:
        if main:
            signal.signal(signal.SIGTERM, old)
    bad = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        raise RuntimeError(f"study worker {bad[0][0]} exited with code {bad[0][1]} (see its output above)")


def run_study(spec: StudySpec, storage: str, name: str, workers: int = 1) -> list[TrialRecord]:
    """Run (or resume) the sweep in `storage` (a URL, `largebatch.study.storage`) and return all its trial records.

    workers > 1 runs that many spawned processes, whose `--threads auto` trials each get cores // workers threads,
    all working on the same studies through the storage; workers = 1 runs in this process. When
    other processes (or killed ones, until their trials go stale) hold the last trials, it polls
    every heartbeat (at most POLL_S seconds) and runs whatever is re-queued.
    """
    if "/" in name or not name:
        raise ConfigError(f"study name {name!r} is invalid: use a plain name without '/'")
    store = open_storage(storage, spec.heartbeat)
    for cell in _cells(spec):  # created here, before any worker starts: concurrent creation races on SQLite
        study = optuna.create_study(storage=store, study_name=study_name(name, *cell),
                                    direction=direction(spec.higher_is_better), load_if_exists=True)
        _same_heartbeat(study, spec.heartbeat)
    while True:
        if workers <= 1:
            _work(spec, storage, name)
        else:
            _spawn(spec, storage, name, workers)
        waiting = _unfinished(spec, store, name)
        if not waiting:
            break
        print(f"[largebatch] {', '.join(waiting)}: waiting for trials running elsewhere (a killed process's "
              f"trials are re-queued {GRACE_BEATS * spec.heartbeat} s after its last heartbeat)", flush=True)
        time.sleep(min(POLL_S, spec.heartbeat))
    return [r for cell in _cells(spec)
            for r in _records(optuna.load_study(study_name=study_name(name, *cell), storage=store))]


def _same_heartbeat(study: optuna.Study, heartbeat: int) -> None:
    """Record the study's heartbeat in its storage, or check it against the recorded one: a process beating more
    slowly than the others' grace period would see its running trials failed and rerun by them."""
    first = study.user_attrs.get("heartbeat")
    if first is None:
        study.set_user_attr("heartbeat", heartbeat)
    elif first != heartbeat:
        raise ConfigError(f"--heartbeat {heartbeat}: study {study.study_name} in this storage runs with --heartbeat "
                          f"{first}; every process of a study must use the same, so pass --heartbeat {first}")


def _records(study: optuna.Study) -> list[TrialRecord]:
    return [TrialRecord.from_dict(r) for t in study.get_trials(deepcopy=False, states=_DONE)
            for r in t.user_attrs.get("records", [])]


def load_records(storage: str, name: str) -> list[TrialRecord]:
    """Every trial record of study `name` in `storage` (finished trials only), study by study."""
    store = open_storage(storage)
    names = [s for s in optuna.get_all_study_names(store) if s.startswith(f"{name}/")]
    if not names:
        raise ValueError(f"no study named {name!r} in {storage}")
    return [r for s in names for r in _records(optuna.load_study(study_name=s, storage=store))]


def import_records(spec: StudySpec, storage: str, name: str, records: list[TrialRecord]) -> int:
    """Rebuild study `name`'s trials from `records` (a report's trials.csv, see `record.read_csv`): every
    (rung, batch) in the records, also those `spec` does not run (the report reads all), whose study holds
    no trials yet; return how many trials were added.

    Records of one (rung, batch, trial) become one finished trial holding all their seeds (PRUNED, without a value
    or a curve, when one is "pruned"), at the same trial number (numbers the records skip become failed
    placeholders), with the spec's parameter
    ranges: a tuned point outside them is a ConfigError. A new study's direction is the records' metric's.
    A study with trials is left as it is, so importing twice adds nothing. Import before other processes
    work on the storage: two imports at once can both find a study empty.
    """
    groups: dict[tuple[str, int], dict[int, list[TrialRecord]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.study == name:
            groups[(r.rung, r.batch_size)][r.trial].append(r)
    if records and not groups:
        studies = sorted({r.study for r in records})
        raise ConfigError(f"the trials to import hold no study {name!r} (they hold {', '.join(studies)}); "
                          f"pass --name with one of those")
    dists = {"lr_multiplier": optuna.distributions.FloatDistribution(*spec.lr_range, log=True),
             "warmup_epochs": optuna.distributions.FloatDistribution(*warmup_bounds(spec))}
    for (rung, batch), trials in groups.items():  # every point is checked before anything is written
        for number, recs in trials.items():
            for k in dists if recs[0].tuned else ():
                v = getattr(recs[0], k)
                if v is None or not dists[k].low <= v <= dists[k].high:
                    raise ConfigError(f"{study_name(name, rung, batch)} trial {number}: {k} {v} lies outside this "
                                      f"study's range [{dists[k].low:g}, {dists[k].high:g}]; give the study the "
                                      f"--lr-range/--warmup-range it ran with")
    store, higher = open_storage(storage), study_metric(records)[1]
    added = 0
    for (rung, batch), trials in sorted(groups.items()):
        study = optuna.create_study(storage=store, study_name=study_name(name, rung, batch),
                                    direction=direction(higher), load_if_exists=True)
        if not study.get_trials(deepcopy=False):
            added += _add_trials(study, trials, dists)
    return added


def _add_trials(study: optuna.Study, trials: dict[int, list[TrialRecord]],
                dists: dict[str, optuna.distributions.FloatDistribution]) -> int:
    """Finished trials numbered as in `trials` (failed placeholders for the numbers it skips); how many."""
    for number in range(max(trials) + 1):
        recs = sorted(trials.get(number, []), key=lambda r: r.seed)
        if not recs:
            study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={"placeholder": True}))
            continue
        params = {k: getattr(recs[0], k) for k in dists} if recs[0].tuned else {}
        pruned = any(r.status == PRUNED for r in recs)
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.PRUNED if pruned else TrialState.COMPLETE,
            value=None if pruned else sum(score(r) for r in recs) / len(recs), params=params,
            distributions={k: dists[k] for k in params},
            user_attrs={"tuned": recs[0].tuned, "records": [asdict(r) for r in recs]}))
    return len(trials)
