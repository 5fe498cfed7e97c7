"""Bad input through `largebatch.cli.main`: one table of (command line, expected text), every case ending in
exactly one line `largebatch: error: ...` on stderr, exit code 2, no traceback, and nothing written.

The table covers flags (tyro's and argparse's), values of every config section, config files, data files
(tiny IDX files written here), and the inputs of study, report and probe. Cases that fail while loading
data import torch once (~5 s); everything else fails before any heavy import.
"""

import gzip
import json
import os
import shlex
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from largebatch import cli

ROOT = Path(__file__).resolve().parents[1]

# prepended to every command of that kind (a case's own flags come later and win); {out} must stay absent
DEFAULTS = {
    "train": "--output.no-progress --output.dir {out} --epochs 1 --threads 1 --device cpu --precision.dtype fp32",
    "study": "--storage sqlite:///{out}/study.db --output-dir {out}",
    "probe": "--output-dir {out}",
    "report": "--out {out}/report",
}

CASES = [
    # ---- commands and flags
    ("frobnicate", "unknown command 'frobnicate'"),
    ("show-config --recipe nope", "unknown recipe 'nope'"),
    ("show-config --recipe", "argument --recipe: expected one argument"),
    ("train --recipe mnist-lenet --config {base}/ok.json", "--recipe and --config cannot be combined"),
    ("train --batch.globl-batch 5", "unknown flag --batch.globl-batch; did you mean --batch.global-batch?"),
    ("train --global-batch 512", "unknown flag --global-batch; did you mean --batch.global-batch?"),
    ("show-config --frobnicate", "unknown flag --frobnicate (`largebatch show-config --help` lists the flags)"),
    ("train --batch.global-batch x", "--batch.global-batch 'x' is invalid: give an integer"),
    ("train --epochs=abc", "--epochs 'abc' is invalid: give a number"),
    ("train --batch.global-batch", "--batch.global-batch needs a value: give an integer"),
    ("train --data.name foo", "data.name = 'foo' is invalid: is neither a built-in data set (mnist, cifar10, "
                              "imagenet, synthetic, shakespeare) nor an installed plug-in"),
    ("train --device tpu", "--device 'tpu' is invalid: choose one of auto, cpu, cuda"),
    ("train --optimizer.min-ratio abc", "--optimizer.min-ratio 'abc' is invalid: give a number or None"),
    ("train --schedule.milestones a b", "--schedule.milestones 'a b' is invalid: give numbers separated by spaces"),
    ("train --data.flip yes", "--data.flip takes no value, so 'yes' is left over: write --data.flip or --data.no-flip"),
    ("train extra", "unexpected argument 'extra'"),
    # ---- values of every config section
    ("show-config --epochs 0", "epochs = 0.0 is invalid: must be a finite number > 0"),
    ("show-config --epochs nan", "epochs = nan is invalid"),
    ("show-config --threads -1", "threads = -1 is invalid"),
    ("show-config --label-smoothing 1", "label_smoothing = 1.0 is invalid: must be in [0, 1)"),
    ("show-config --grad-clip-norm -1", "grad_clip_norm = -1.0 is invalid"),
    ("show-config --data.train-limit -1", "data.train_limit = -1 is invalid"),
    ("show-config --data.val-size -5", "data.val_size = -5 is invalid"),
    ("show-config --data.crop-padding -1", "data.crop_padding = -1 is invalid"),
    ("show-config --data.image-size 4", "data.image_size = 4 is invalid: must be >= 8 pixels"),
    ("show-config --data.name imagenet --data.train-limit 10", "not supported with data.name = imagenet"),
    ("show-config --data.dir ''", "data.dir = '' is invalid: must be a folder path"),
    ("show-config --model.ghost-batch 1", "model.ghost_batch = 1 is invalid"),
    ("show-config --model.zero-init-residual", "lenet has no residual blocks"),
    ("show-config --optimizer.base-lr 0", "optimizer.base_lr = 0.0 is invalid"),
    ("show-config --optimizer.momentum 1", "optimizer.momentum = 1.0 is invalid: must be in [0, 1)"),
    ("show-config --optimizer.name lars --optimizer.layerwise", "lars is already layer-wise"),
    ("show-config --schedule.warmup-epochs -1", "schedule.warmup_epochs = -1.0 is invalid"),
    ("show-config --schedule.warmup-epochs inf", "schedule.warmup_epochs = inf is invalid: must be a finite number"),
    ("show-config --schedule.decay step --schedule.milestones 5 2", "must be increasing epochs > 0"),
    ("show-config --schedule.gamma 0", "schedule.gamma = 0.0 is invalid"),
    ("show-config --schedule.decay cyclic", "schedule.cycle_epochs = 0.0 is invalid"),
    ("show-config --batch.global-batch 0", "batch.global_batch = 0 is invalid: must be >= 1"),
    ("show-config --batch.global-batch 256 --batch.micro-batch 512", "must be <= batch.global_batch (256)"),
    ("show-config --batch.memory-cap-gib 0", "batch.memory_cap_gib = 0.0 is invalid"),
    ("show-config --eval.target-accuracy -1", "eval.target = -1.0 is invalid"),
    ("show-config --eval.batch-size 0", "eval.batch_size = 0 is invalid"),
    ("show-config --eval-every -1", "eval.every_epochs = -1.0 is invalid"),
    ("show-config --checkpoint.every-epochs -1", "checkpoint.every_epochs = -1.0 is invalid"),
    ("show-config --output.name a/b", "output.name = 'a/b' is invalid: must be a plain directory name"),
    ("show-config --output.name ..", "output.name = '..' is invalid"),
    ("show-config --output.log-every -1", "output.log_every = -1 is invalid"),
    ("show-config --distributed.timeout-s 0", "distributed.timeout_s = 0.0 is invalid"),
    ("show-config --diagnostics.noise-ema 1", "diagnostics.noise_ema = 1.0 is invalid"),
    ("show-config --noise.label-prob 2", "noise.label_prob = 2.0 is invalid"),
    ("show-config --noise.weight-std -1", "noise.weight_std = -1.0 is invalid"),
    # ---- config files and run directories
    ("show-config --config {base}/latin1.json", "latin1.json is not UTF-8 text (byte 0xe9 at offset 15)"),
    ("show-config --config {base}/broken.json", "broken.json is not valid JSON"),
    ("show-config --config {base}/list.json",
     "list.json holds a JSON list, not an object; pass a JSON object of config sections"),
    ("show-config --config {base}", "is a directory: pass a JSON object of config sections"),
    ("show-config --config {base}/missing.json", "missing.json: no such file"),
    ("show-config --config {base}/typed.json", "typed.json: epochs = 'x' is invalid: must be a number"),
    ("show-config --config {base}/unknown.json", "unknown.json: unknown config key epochz; did you mean epochs?"),
    ("show-config --config {base}/section.json", "section.json: data must be a mapping, got int"),
    ("show-config --config {base}/choice.json", "choice.json: optimizer.name = 'sgdd' is invalid: must be one of"),
    ("show-config --config {base}/range.json", "range.json: batch.global_batch = -1 is invalid"),
    ("train --resume {base}/nowhere", "--resume {base}/nowhere: no config.json there"),
    ("train --resume {base}/badrun", "{base}/badrun/config.json is not valid JSON"),
    # ---- data files (these load torch)
    ("train --data.dir {base}/nowhere", "--data-dir {base}/nowhere is not a directory"),
    ("train --data.dir {base}/empty", "train-images-idx3-ubyte[.gz] not found in {base}/empty"),
    ("train --data.dir {base}/gz", "cannot read {base}/gz/train-images-idx3-ubyte.gz"),
    ("train --data.dir {base}/truncated", "holds 39100 data bytes but its header says 50x28x28 = 39200"),
    ("train --data.dir {base}/magic", "t10k-labels-idx1-ubyte is not an unsigned-byte IDX file (magic 00000d01"),
    ("train --data.dir {base}/size32", "train-images-idx3-ubyte holds images of shape 50x32x32, MNIST's are Nx28x28"),
    ("train --data.dir {base}/count", "holds 50 images but {base}/count/train-labels-idx1-ubyte holds labels of "
                                      "shape 49"),
    ("train --data.dir {base}/labels", "train-labels-idx1-ubyte has labels up to 12, MNIST has 0-9"),
    ("train --data.dir {base}/notrain", "notrain/train-images-idx3-ubyte holds no images"),
    ("train --data.dir {base}/notest", "notest/t10k-images-idx3-ubyte holds no images"),
    ("train --data.dir {base}/ok --data.val-size 50", "data.val_size = 50 leaves no training images: {base}/ok has 50"),
    ("train --data.dir {base}/ok --batch.global-batch 64", "batch.global_batch = 64 exceeds the training set (50"),
    ("train --data.dir {base}/ok --batch.global-batch 32 --output.dir {base}/afile", "afile is a file"),
    ("train --data.dir {base}/ok --batch.global-batch 32 --output.dir {base}/afile/runs", "afile is a file"),
    ("train --data.name cifar10", "data.name = cifar10 needs --data.dir"),
    ("train --data.name cifar10 --data.dir {base}/empty", "{base}/empty holds no cifar-10-batches-py folder"),
    ("train --data.name imagenet --data.dir {base}/empty", "{base}/empty/train is not a directory"),
    # ---- study
    ("study --recipe nope --batch-sizes 64", "unknown recipe 'nope'"),
    ("study --recipe mnist-lenet", "the following arguments are required: --batch-sizes"),
    ("study --recipe mnist-lenet --batch-sizes 256,256", "--batch-sizes '256,256' lists 256 more than once"),
    ("study --recipe mnist-lenet --batch-sizes 64,x", "--batch-sizes '64,x' is invalid: give comma-separated integers"),
    ("study --recipe mnist-lenet --batch-sizes 2.5", "--batch-sizes '2.5' is invalid"),
    ("study --recipe mnist-lenet --batch-sizes -5", "--batch-sizes '-5' is invalid: give one or more integers >= 1"),
    ("study --recipe mnist-lenet --batch-sizes 64 --optimizers sgd,foo", "--optimizers 'sgd,foo': unknown rung 'foo'"),
    ("study --recipe mnist-lenet --batch-sizes 64 --optimizers sgd,sgd", "lists sgd more than once"),
    ("study --recipe mnist-lenet --batch-sizes 64 --lr-range 1", "--lr-range '1' is invalid: give LOW,HIGH"),
    ("study --recipe mnist-lenet --batch-sizes 64 --lr-range 2,1", "lr_range = (2.0, 1.0) is invalid"),
    ("study --recipe mnist-lenet --batch-sizes 64 --warmup-range 0,2", "warmup_range = (0.0, 2.0) is invalid"),
    ("study --recipe mnist-lenet --batch-sizes 64 --epochs x", "argument --epochs: invalid float value: 'x'"),
    ("study --recipe mnist-lenet --batch-sizes 64 --trials -1", "trials = -1 is invalid"),
    ("study --recipe mnist-lenet --batch-sizes 64 --workers 0", "--workers 0 is invalid"),
    ("study --recipe mnist-lenet --batch-sizes 64 --target-accuracy 5", "--target-accuracy 5.0 is invalid"),
    ("study --recipe mnist-lenet --batch-sizes 64 --storage notaurl", "--storage 'notaurl' is not a storage URL"),
    ("study --recipe mnist-lenet --batch-sizes 64 --storage postgresql+pg8000://u@h/db",
     "--storage 'postgresql+pg8000://u@h/db': its database driver"),
    ("study --recipe mnist-lenet --batch-sizes 64 --storage foo://x", "SQLAlchemy knows no database 'foo'"),
    ("study --recipe mnist-lenet --batch-sizes 64 --storage sqlite://", "is an in-memory database"),
    ("study --recipe mnist-lenet --batch-sizes 64 --storage sqlite:///{base}/afile/s.db", "/afile is a file"),
    ("study --recipe mnist-lenet --batch-sizes 64 --storage sqlite:///{base}/text.db",
     "cannot open it as an Optuna storage (file is not a database)"),
    ("study --recipe mnist-lenet --batch-sizes 64 --output-dir {base}/afile", "--output-dir {base}/afile is a file"),
    ("study --recipe mnist-lenet --batch-sizes 64 --set data.nope=1", "override 'data.nope' names no config field"),
    ("study --recipe mnist-lenet --batch-sizes 64 --set threads", "--set 'threads' is invalid: use FIELD=VALUE"),
    ("study --recipe mnist-lenet --batch-sizes 64 --import-trials {base}/missing.csv", "missing.csv: no such file"),
    # ---- report
    ("report", "the following arguments are required: storage"),
    ("report sqlite:///{base}/nowhere/study.db", "no such database file"),
    ("report notaurl", "report 'notaurl' is not a storage URL"),
    ("report postgresql+pg8000://u@h/db", "its database driver"),
    ("report sqlite:///{base}/text.db", "cannot open it as an Optuna storage"),
    ("report sqlite:///{base}/study.db --name nope", "holds no study 'nope' (it holds one)"),
    ("report sqlite:///{base}/study.db --probe {base}/broken.json", "--probe {base}/broken.json is not valid JSON"),
    ("report sqlite:///{base}/study.db --probe {base}/missing.json", "--probe {base}/missing.json: no such file"),
    ("report sqlite:///{base}/study.db --out {base}/afile", "--out {base}/afile is a file"),
    ("report sqlite:///{base}/study.db --target-accuracy 2", "--target-accuracy 2.0 is invalid"),
    ("report sqlite:///{base}/study.db --dataset-size -1", "--dataset-size -1 is invalid"),
    # ---- probe
    ("probe --recipe nope", "unknown recipe 'nope'"),
    ("probe --recipe mnist-lenet --accum 3", "--accum 3 does not divide the global batch 256"),
    ("probe --recipe mnist-lenet --accum 1", "--accum 1 is invalid: the noise scale needs 2 or more micro-batches"),
    ("probe --recipe mnist-lenet --accum x", "argument --accum: invalid int value: 'x'"),
    ("probe --recipe mnist-lenet --set batch.global_batch=257", "no --accum up to 8 divides the global batch 257"),
    ("probe --recipe mnist-lenet --epochs 0", "epochs = 0.0 is invalid"),
    ("probe --recipe mnist-lenet --set optimizer.name=foo", "optimizer.name = 'foo' is invalid"),
    ("probe --recipe mnist-lenet --output-dir {base}/afile", "--output-dir {base}/afile is a file"),
]


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def mnist_dir(folder: Path, n_train: int = 50, n_test: int = 20, size: int = 28, n_labels: int | None = None,
              compress: bool = False) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    sfx = ".gz" if compress else ""
    write_idx(folder / f"train-images-idx3-ubyte{sfx}", rng.integers(0, 256, (n_train, size, size)), compress)
    write_idx(folder / f"train-labels-idx1-ubyte{sfx}", rng.integers(0, 10, n_train if n_labels is None else n_labels),
              compress)
    write_idx(folder / f"t10k-images-idx3-ubyte{sfx}", rng.integers(0, 256, (n_test, size, size)), compress)
    write_idx(folder / f"t10k-labels-idx1-ubyte{sfx}", rng.integers(0, 10, n_test), compress)
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """The bad (and a few good) input files the table names as {base}/..."""
    base = tmp_path_factory.mktemp("inputs")
    (base / "ok.json").write_text("{}")
    (base / "latin1.json").write_bytes('{"recipe": "caf\u00e9"}'.encode("latin-1"))
    (base / "broken.json").write_text('{"epochs": 1,')
    (base / "list.json").write_text("[1, 2]")
    (base / "typed.json").write_text('{"epochs": "x"}')
    (base / "unknown.json").write_text('{"epochz": 1}')
    (base / "section.json").write_text('{"data": 5}')
    (base / "choice.json").write_text('{"optimizer": {"name": "sgdd"}}')
    (base / "range.json").write_text('{"batch": {"global_batch": -1}}')
    (base / "badrun").mkdir()
    (base / "badrun" / "config.json").write_text("{")
    (base / "afile").write_text("not a directory")
    (base / "text.db").write_text("not a database")
    (base / "empty").mkdir()
    mnist_dir(base / "ok")
    gz = mnist_dir(base / "gz", compress=True) / "train-images-idx3-ubyte.gz"
    data = bytearray(gz.read_bytes())
    data[30:60] = bytes(30)  # inside the deflate stream: zlib fails, or the CRC check does
    gz.write_bytes(bytes(data))
    truncated = mnist_dir(base / "truncated") / "train-images-idx3-ubyte"
    truncated.write_bytes(truncated.read_bytes()[:-100])
    magic = mnist_dir(base / "magic") / "t10k-labels-idx1-ubyte"
    magic.write_bytes(b"\x00\x00\x0d\x01" + magic.read_bytes()[4:])
    mnist_dir(base / "size32", size=32)
    mnist_dir(base / "count", n_labels=49)
    write_idx(mnist_dir(base / "labels") / "train-labels-idx1-ubyte", np.full(50, 12))
    mnist_dir(base / "notrain", n_train=0)
    mnist_dir(base / "notest", n_test=0)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(storage=f"sqlite:///{base}/study.db", study_name="one/sgd/b64")
    return base


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse or tyro exiting on their own: the one-line rule is broken
        pytest.fail(f"SystemExit({e.code}) escaped main: {capsys.readouterr().err}")
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command,expected", CASES, ids=[c for c, _ in CASES])
def test_bad_input_is_one_line_before_any_work(command, expected, base, tmp_path, capsys):
    out = tmp_path / "out"
    cmd, *rest = shlex.split(command.format(base=base))
    argv = [cmd, *shlex.split(DEFAULTS.get(cmd, "").format(out=out)), *rest]
    code, _, err = run(argv, capsys)
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("largebatch: error: "), err
    assert expected.format(base=base) in lines[0]
    assert "Traceback" not in err
    assert not out.exists(), f"{command} wrote {sorted(p.name for p in out.rglob('*'))}"


def test_table_covers_every_command_and_config_section():
    assert len(CASES) >= 60
    commands = {c.split()[0] for c, _ in CASES}
    assert {"train", "show-config", "study", "report", "probe"} <= commands
    sections = ("data", "model", "optimizer", "schedule", "batch", "eval", "checkpoint", "output", "distributed",
                "diagnostics", "noise")
    assert all(any(f"--{s}." in c for c, _ in CASES) for s in sections)


def test_help_stays_informative(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--batch.global-batch" in out and "Examples per optimizer step" in out
    assert cli.main(["--help"]) == 0 and "largebatch train" in capsys.readouterr().out


def test_without_tyros_hook_the_error_box_is_still_one_line(monkeypatch, capsys):
    """`tyro._errors` is private: another tyro version may lack it, and then tyro's own text is squeezed."""
    import contextlib

    import tyro._errors

    monkeypatch.setattr(tyro._errors, "on_parse_error", lambda hook: contextlib.nullcontext())
    code, _, err = run(["train", "--device", "tpu"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--device" in err and "'tpu'" in err and "│" not in err


def test_only_rank_0_speaks_under_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["show-config", "--epochs", "0"]) == 2
    assert capsys.readouterr().err == ""


def test_a_bug_keeps_its_traceback(monkeypatch):
    def broken(cmd, rest):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "_run", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["show-config"])


def test_a_path_error_is_one_line(monkeypatch, capsys):
    def missing(cmd, rest):
        open("/nonexistent/largebatch/file")

    monkeypatch.setattr(cli, "_run", missing)
    assert cli.main(["show-config"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "largebatch: error: /nonexistent/largebatch/file: No such file or directory: check the path "
        "(it must exist and be readable, or writable)"]


@pytest.mark.parametrize("command", [["show-config", "--recipe", "mnist-lenet"], ["recipes"]])
def test_a_closed_pipe_ends_quietly(command):
    """`largebatch show-config | head -1`: the reader goes away before the output is written."""
    env = {**os.environ, "PYTHONUNBUFFERED": "0"}
    p = subprocess.Popen([sys.executable, "-m", "largebatch", *command], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # long before the interpreter has started
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and err == ""


def test_the_message_names_a_file_for_a_valid_config_with_bad_json_values(base, capsys):
    """A config file that show-config wrote, edited by hand to a value out of range."""
    from largebatch.recipes import get_recipe

    good = json.loads(json.dumps(cli.to_dict(get_recipe("mnist-lenet"))))
    good["eval"].pop("target")
    good["eval"]["target_accuracy"] = -1.5  # the name older config files use
    path = base / "edited.json"
    path.write_text(json.dumps(good))
    code, _, err = run(["show-config", "--config", str(path)], capsys)
    assert code == 2 and err == f"largebatch: error: --config {path}: eval.target = -1.5 is invalid: must be a " \
                                "finite value of the task's metric >= 0 (0 = off), such as accuracy 0.759 or loss 1.5\n"
