"""ImageNet-style folders, CIFAR-10, synthetic data and time-to-accuracy mode, end to end through the CLI.

Each test builds its tiny data set in the standard on-disk format and trains through the command line's own code,
`largebatch.cli.main`, in this process (tests/test_train.py::test_cli_smoke_run runs `python -m largebatch` itself);
the time-to-accuracy run's MLPerf log is checked with mlperf-logging's compliance checker.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from largebatch import mlperf
from largebatch.cli import main

CLASSES = ("n01", "n02", "n03", "n04")


def make_imagefolder(root: Path, per_class: tuple[int, int] = (6, 3)) -> Path:
    """<root>/{train,val}/<wnid>/*.JPEG: each class a distinct colour plus noise, various sizes."""
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "val"), per_class):
        for c, wnid in enumerate(CLASSES):
            (root / split / wnid).mkdir(parents=True)
            for i in range(count):
                h, w = (72, 90) if i % 2 else (96, 80)
                base = np.array([(c * 80) % 256, (255 - c * 60) % 256, (c * 140) % 256], dtype=np.int16)
                img = np.clip(base + rng.integers(-30, 30, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(root / split / wnid / f"{wnid}_{i}.JPEG", quality=90)
    return root


def make_cifar10(root: Path, per_batch: int = 16) -> Path:
    """<root>/cifar-10-batches-py with 5 training batches and a test batch of `per_batch` images each."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        with open(d / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [f"{i}.png".encode() for i in range(per_batch)]}, f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)], b"num_cases_per_batch": per_batch,
                     b"num_vis": 3072}, f)
    return root


def run(tmp_path: Path, *args: str) -> dict:
    assert main(["train", *args, "--output-dir", str(tmp_path / "runs"), "--output.name", "r", "--output.no-progress",
                 "--device", "cpu", "--precision.dtype", "fp32", "--threads", "1"]) == 0
    return json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())


def test_imagenet_folder_resnet50_one_epoch(tmp_path):
    root = make_imagefolder(tmp_path / "imagenet")
    s = run(tmp_path, "--recipe", "imagenet-resnet50-mlperf", "--data.dir", str(root), "--data.image-size", "64",
            "--data.workers", "2", "--batch.global-batch", "8", "--epochs", "1", "--schedule.warmup-epochs", "0.5",
            "--eval.batch-size", "5",
            "--eval.target-accuracy", "0", "--eval-every", "1")
    assert s["status"] == "completed" and s["train_examples"] == 24 and s["steps"] == 3
    assert 0 <= s["test_accuracy"] <= 1 and "target_reached" not in s
    cfg = json.loads((tmp_path / "runs" / "r" / "config.json").read_text())
    assert cfg["model"]["name"] == "resnet50" and cfg["optimizer"]["name"] == "lars"


def test_cifar10_resnet_one_epoch_with_device_augmentation(tmp_path):
    root = make_cifar10(tmp_path / "cifar")
    s = run(tmp_path, "--recipe", "cifar10-resnet50-b128", "--data.dir", str(root), "--model.name", "resnet20-cifar",
            "--batch.global-batch", "40", "--epochs", "1", "--eval-every", "1")
    assert s["status"] == "completed" and s["train_examples"] == 80 and s["steps"] == 2


def test_synthetic_data_for_throughput(tmp_path):
    s = run(tmp_path, "--data.name", "synthetic", "--data.image-size", "32", "--data.synthetic-examples", "64",
            "--data.synthetic-classes", "10", "--model.name", "resnet20-cifar", "--batch.global-batch", "32",
            "--epochs", "1")
    assert s["status"] == "completed" and s["train_examples"] == 64 and s["train_images_per_second"] > 0


def test_time_to_accuracy_stops_at_target_and_writes_a_compliant_mlperf_log(tmp_path):
    s = run(tmp_path, "--recipe", "mnist-lenet", "--data.train-limit", "2000", "--data.test-limit", "1000",
            "--optimizer.base-lr", "0.02", "--schedule.warmup-epochs", "0.5", "--epochs", "4",
            "--target-accuracy", "0.8", "--eval-every", "0.25")
    assert s["status"] == "completed" and s["target_reached"] is True
    assert s["test_accuracy"] >= 0.8 and s["epochs"] < 4 and s["epochs_to_target"] == pytest.approx(s["epochs"])
    log = tmp_path / "runs" / "r" / "mlperf.log"
    assert mlperf.check(log) == []  # lenet is not the reference model: open division
    events = mlperf.read_events(log)
    accs = [e["value"] for e in events if e["key"] == "eval_accuracy"]
    assert accs[-1] >= 0.8 > max(accs[:-1], default=0)  # stopped at the first evaluation that reached it
    assert s["time_to_train_seconds"] == pytest.approx(mlperf.time_to_train(log), abs=0.5)
    assert 0 < s["time_to_train_seconds"] < s["wall_seconds"]


def main_in_process(capsys, *argv: str) -> tuple[int, str]:
    """`largebatch ...` through cli.main in this process (no interpreter start-up): exit code, stderr."""
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("args,msg", [
    (["--data.name", "imagenet", "--data.dir", "/nonexistent/imagenet"], "/nonexistent/imagenet"),
    (["--data.name", "imagenet"], "needs --data.dir"),
    (["--data.name", "cifar10"], "needs --data.dir"),
    (["--data.name", "imagenet", "--data.dir", "/tmp", "--data.train-limit", "5"], "data.train_limit"),
])
def test_bad_data_is_one_line_before_work(tmp_path, capsys, args, msg):
    code, err = main_in_process(capsys, "train", "--model.name", "resnet20-cifar", *args, "--output-dir", str(tmp_path))
    assert code == 2 and err.strip().count("\n") == 0 and msg in err, err
    assert not any(tmp_path.iterdir())


def test_malformed_cifar_names_the_file(tmp_path, capsys):
    root = make_cifar10(tmp_path / "cifar")
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    code, err = main_in_process(capsys, "train", "--recipe", "cifar10-resnet50-b128", "--data.dir", str(root),
                                "--output-dir", str(tmp_path / "o"))
    assert code == 2 and err.strip().count("\n") == 0 and "test_batch" in err, err


def test_empty_class_folder_names_the_folder(tmp_path, capsys):
    root = make_imagefolder(tmp_path / "imagenet")
    for f in (root / "train" / "n02").iterdir():
        f.unlink()
    code, err = main_in_process(capsys, "train", "--recipe", "imagenet-resnet50-mlperf", "--data.dir", str(root),
                                "--output-dir", str(tmp_path / "o"))
    assert code == 2 and err.strip().count("\n") == 0 and "n02" in err, err


def test_mlperf_recipe_is_logged_in_the_closed_division(tmp_path):
    """The imagenet-resnet50-mlperf recipe at its 32K batch logs what the closed ResNet rules demand."""
    from largebatch import batch as batching
    from largebatch.recipes import get_recipe
    from largebatch.schedules import build_schedule, warmup_steps_of
    from largebatch.tasks import Classification
    from largebatch.tta import TimeToAccuracy

    cfg, n = get_recipe("imagenet-resnet50-mlperf"), 1_281_167
    B = cfg.batch.global_batch
    steps = batching.total_steps(cfg.epochs, n, B)
    plan = batching.RunPlan(batching.BatchPlan(B, 256, 128, 1), n, steps, 31.2, warmup_steps_of(cfg.schedule, n, B),
                            build_schedule(cfg.schedule, steps, n, B))
    tta = TimeToAccuracy(cfg, plan, Classification(), tmp_path, True, 50_000, bn_batch=128)
    reached = []
    for epoch, acc in ((4, 0.31), (8, 0.62), (12, 0.7591)):
        tta.before_eval(epoch)
        reached.append(tta.after_eval(epoch, acc, last=False))
    summary = tta.finish()
    assert reached == [False, False, True] and summary["epochs_to_target"] == 12
    assert mlperf.check(tmp_path / "mlperf.log") == []
    values = {e["key"]: e["value"] for e in mlperf.read_events(tmp_path / "mlperf.log")}
    assert values["submission_division"] == "closed" and values["opt_name"] == "lars"
    assert values["lars_opt_end_learning_rate"] == pytest.approx(1e-4)
    assert values["lars_opt_learning_rate_warmup_epochs"] == pytest.approx(25, abs=0.03)
    assert values["global_batch_size"] == 32768 and values["train_samples"] == n


def test_time_to_accuracy_clock_survives_a_resume(tmp_path):
    args = ["--recipe", "mnist-lenet", "--data.train-limit", "2000", "--data.test-limit", "500", "--epochs", "2",
            "--schedule.warmup-epochs", "2", "--target-accuracy", "0.999", "--eval-every", "0.5",
            "--checkpoint.every-epochs", "0.5"]
    assert main(["train", *args, "--checkpoint.stop-at-step", "4", "--output-dir", str(tmp_path), "--output.name", "r",
                 "--output.no-progress", "--threads", "1"]) == 4  # stopped
    first = mlperf.read_events(tmp_path / "r" / "mlperf.log")
    assert main(["train", "--resume", str(tmp_path / "r"), "--output.no-progress"]) == 0
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["target_reached"] is False and s["time_to_train_seconds"] is None and s["steps"] == 16
    resumed = mlperf.read_events(tmp_path / "r" / "mlperf-resumed-4.log")  # the first segment's log is kept
    assert [e["value"] for e in first if e["key"] == "eval_accuracy"] and resumed[0]["key"] == "submission_benchmark"
    assert [e["metadata"]["first_epoch_num"] for e in resumed if e["key"] == "block_start"][0] == pytest.approx(1.512,
                                                                                                        abs=0.01)
    for events in (first, resumed):  # the target was never reached: each segment's clock stops "aborted"
        assert [e["metadata"]["status"] for e in events if e["key"] == "run_stop"] == ["aborted"]
