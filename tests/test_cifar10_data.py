"""CIFAR-10 reading: a tiny copy of torchvision's on-disk format written here, compared with torchvision.

The copy has all six batch files and the meta file of the real layout, but a few images per batch
(different counts per file, so nothing may assume 10,000). torchvision's CIFAR10 verifies md5 sums of
the real files in `_check_integrity` and `_load_meta`, which tiny files cannot pass, so the comparison
monkeypatches `torchvision.datasets.cifar.check_integrity` (used by both) to accept them.
"""

import os
import pickle

import numpy as np
import pytest
import torchvision

from largebatch.data.cifar10 import (FOLDER, MEAN, STD, TEST_FILE, TRAIN_FILES, channel_stats,
                                     load_cifar10)
from largebatch.data.mnist import DataError

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
COUNTS = {**dict(zip(TRAIN_FILES, (3, 4, 2, 5, 3))), TEST_FILE: 4}


def dump(path, obj, protocol=2):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def make_cifar_dir(root, bytes_keys=False, protocol=2):
    """Write cifar-10-batches-py under `root`; return {file name: (data [n, 3072], labels)}."""
    folder = root / FOLDER
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    written = {}
    for name, n in COUNTS.items():
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        dump(folder / name, {key("batch_label"): name, key("labels"): labels, key("data"): data,
                             key("filenames"): [f"{name}_{i}.png" for i in range(n)]}, protocol)
        written[name] = (data, labels)
    dump(folder / "batches.meta", {key("num_cases_per_batch"): 10000, key("label_names"): CLASSES,
                                   key("num_vis"): 3072}, protocol)
    return written


@pytest.fixture
def tv_accepts_tiny_files(monkeypatch):
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)


@pytest.mark.parametrize("point_at,protocol", [("root", 2), ("folder", 2), ("root", pickle.HIGHEST_PROTOCOL)])
def test_matches_torchvision(tmp_path, tv_accepts_tiny_files, point_at, protocol):
    make_cifar_dir(tmp_path, protocol=protocol)
    d = load_cifar10(str(tmp_path if point_at == "root" else tmp_path / FOLDER))
    for train, images, labels in ((True, d.train_images, d.train_labels), (False, d.test_images, d.test_labels)):
        tv = torchvision.datasets.CIFAR10(str(tmp_path), train=train, download=False)
        assert images.shape == (len(tv), 3, 32, 32) and images.dtype == np.uint8
        np.testing.assert_array_equal(images.transpose(0, 2, 3, 1), tv.data)  # pixel-exact
        np.testing.assert_array_equal(labels, np.asarray(tv.targets))
        assert labels.dtype == np.int64
        assert d.classes == tv.classes == CLASSES
        # one image through torchvision's PIL path too
        img, label = tv[len(tv) - 1]
        np.testing.assert_array_equal(np.asarray(img), images[-1].transpose(1, 2, 0))
        assert label == labels[-1]
    assert len(d.train_labels) == sum(COUNTS[f] for f in TRAIN_FILES)


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL])
def test_python2_style_bytes_keys(tmp_path, protocol):
    written = make_cifar_dir(tmp_path, bytes_keys=True, protocol=protocol)
    d = load_cifar10(tmp_path)
    np.testing.assert_array_equal(d.test_images.reshape(-1, 3072), written[TEST_FILE][0])
    assert d.classes == CLASSES


def error_of(path) -> str:
    with pytest.raises(DataError) as e:
        load_cifar10(path)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_no_dir_says_how_to_get_the_data(tmp_path):
    assert "--data.dir" in error_of(None) and "download=True" in error_of(None)
    assert "not a directory" in error_of(tmp_path / "nowhere")
    msg = error_of(tmp_path)
    assert f"no {FOLDER} folder" in msg and str(tmp_path) in msg


def test_missing_file(tmp_path):
    make_cifar_dir(tmp_path)
    (tmp_path / FOLDER / "data_batch_3").unlink()
    msg = error_of(tmp_path)
    assert f"{FOLDER}/data_batch_3 not found" in msg and "data_batch_5" in msg  # names the layout


def test_unreadable_pickle(tmp_path):
    make_cifar_dir(tmp_path)
    path = tmp_path / FOLDER / TEST_FILE
    path.write_bytes(path.read_bytes()[:500])
    assert f"cannot unpickle {path}" in error_of(tmp_path)
    path.write_bytes(b"not a pickle at all")
    assert f"cannot unpickle {path}" in error_of(tmp_path)


def test_foreign_code_in_a_pickle_is_refused(tmp_path):
    make_cifar_dir(tmp_path)
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    dump(tmp_path / FOLDER / "data_batch_1", {"data": Evil(), "labels": []})
    assert "refusing to load" in error_of(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("change,expect", [
    (lambda d: {**d, "data": d["data"][:, :3071]}, r"'data' is uint8 \[4, 3071\], not uint8 \[N, 3072\]"),
    (lambda d: {**d, "data": d["data"].astype(np.float32)}, r"'data' is float32 \[4, 3072\]"),
    (lambda d: {**d, "data": d["data"].tolist()}, r"'data' is list"),
    (lambda d: {**d, "labels": d["labels"][:3]}, r"4 images but 'labels' has shape \[3\]"),
    (lambda d: {**d, "labels": [[1, 2]] * 4}, r"4 images but 'labels' has shape \[4, 2\]"),
    (lambda d: {**d, "labels": d["labels"][:3] + [10]}, r"labels range over \d\.\.10, CIFAR-10 has 0-9"),
    (lambda d: {**d, "labels": [-1] + d["labels"][1:]}, r"labels range over -1\.\.\d, CIFAR-10 has 0-9"),
    (lambda d: {"data": d["data"]}, r"no 'data' and 'labels'"),
    (lambda d: [d["data"]], r"holds a list, not a dict"),
])
def test_malformed_batch(tmp_path, change, expect):
    make_cifar_dir(tmp_path)
    path = tmp_path / FOLDER / TEST_FILE
    with open(path, "rb") as f:
        d = pickle.load(f)
    dump(path, change(d))
    msg = error_of(tmp_path)
    assert str(path) in msg and "expected <dir>/cifar-10-batches-py/" in msg
    assert __import__("re").search(expect, msg), msg


def test_malformed_meta(tmp_path):
    make_cifar_dir(tmp_path)
    dump(tmp_path / FOLDER / "batches.meta", {"label_names": CLASSES[:9]})
    msg = error_of(tmp_path)
    assert "batches.meta" in msg and "not a list of 10 names" in msg


def test_channel_stats_definition():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (7, 3, 5, 4), dtype=np.uint8)
    mean, std = channel_stats(images)
    x = images.astype(np.float64) / 255
    np.testing.assert_allclose(mean, x.transpose(1, 0, 2, 3).reshape(3, -1).mean(1), rtol=1e-12)
    np.testing.assert_allclose(std, x.transpose(1, 0, 2, 3).reshape(3, -1).std(1), rtol=1e-12)


@pytest.mark.skipif(not os.environ.get("LARGEBATCH_CIFAR10_DIR"), reason="set LARGEBATCH_CIFAR10_DIR to a real copy")
def test_mean_std_are_those_of_the_real_training_set():
    d = load_cifar10(os.environ["LARGEBATCH_CIFAR10_DIR"])
    assert d.train_images.shape == (50000, 3, 32, 32) and d.test_images.shape == (10000, 3, 32, 32)
    mean, std = channel_stats(d.train_images)
    np.testing.assert_allclose(mean, MEAN, atol=1e-4)
    np.testing.assert_allclose(std, STD, atol=1e-4)
