"""ImageNet-style folders: layout errors, decoding, exact eval crops, and that training batches depend only
on (seed, step) whatever the ranks, the workers or a resume. The folders are tiny ones written here."""

import pickle

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from largebatch.config import ConfigError
from largebatch.data.imagefolder import (IMAGENET_MEAN, IMAGENET_STD, LAYOUT, FolderEval, FolderTrain, decode,
                                         load_imagefolder, scan_imagefolder)
from largebatch.data.mnist import DataError

# torchvision 0.29 deprecates its decoders (the module silences this; pytest resets filters per test)
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")

CPU = torch.device("cpu")
CLASSES = ["n01", "n02", "n03", "n04"]
SIZES = [(80, 60), (50, 90), (64, 64), (120, 40), (37, 51), (90, 70)]
VAL_COUNTS = (3, 3, 3, 2)  # 11 images: 3 ranks get 4 positions each, one of them padding
S = 32


def write_image(path, rng, size, kind="rgb"):
    w, h = size
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if kind == "gray":
        img.convert("L").save(path, format="JPEG")
    elif kind == "cmyk":
        img.convert("CMYK").save(path, format="JPEG")
    elif kind == "png":  # a PNG with a .JPEG name, as one file in ImageNet's train set is
        img.save(path, format="PNG")
    elif kind == "bmp":
        img.save(path, format="BMP")
    else:
        img.save(path, format="JPEG", quality=90)


def make_folder(root, val_counts=VAL_COUNTS):
    """4 classes x 6 train images of various sizes and kinds, and `val_counts` val images per class."""
    rng = np.random.default_rng(0)
    special = {(0, 1): "gray", (1, 2): "cmyk", (2, 3): "png", (3, 4): "bmp"}
    for c, name in enumerate(CLASSES):
        for split, count in (("train", 6), ("val", val_counts[c])):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                kind = special.get((c, i), "rgb") if split == "train" else ("gray" if (c, i) == (1, 0) else "rgb")
                ext = ".bmp" if kind == "bmp" else ".JPEG"
                write_image(root / split / name / f"{name}_{i}{ext}", rng, SIZES[(c + i) % len(SIZES)], kind)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("imagenet"))


def train_source(folder, num_workers=0, seed=3, **kw):
    train, _ = scan_imagefolder(folder)
    return FolderTrain(train, CPU, seed=seed, image_size=S, num_workers=num_workers, **kw)


def eval_source(folder, num_workers=0):
    _, val = scan_imagefolder(folder)
    return FolderEval(val, CPU, image_size=S, num_workers=num_workers)


def step_batch(source, step, global_batch=8, rank=0, world_size=1, micro_batch=3):
    xs, ys = zip(*source.micro_batches(step, global_batch, rank, world_size, micro_batch))
    return torch.cat(xs), torch.cat(ys)


# ---- layout ----

def layout_error(root) -> str:
    with pytest.raises(DataError) as e:
        scan_imagefolder(root)
    msg = str(e.value)
    assert "\n" not in msg and LAYOUT in msg
    return msg


def test_layout_errors(tmp_path):
    assert "needs --data.dir" in layout_error(None)
    assert f"{tmp_path / 'nowhere'} is not a directory" in layout_error(tmp_path / "nowhere")
    (tmp_path / "val").mkdir()
    assert f"{tmp_path / 'train'} is not a directory" in layout_error(tmp_path)
    (tmp_path / "val").rmdir()
    (tmp_path / "train").mkdir()
    assert f"{tmp_path / 'val'} is not a directory" in layout_error(tmp_path)
    (tmp_path / "val").mkdir()
    (tmp_path / "train" / "stray.JPEG").write_bytes(b"")  # a file is not a class folder
    assert f"{tmp_path / 'train'} has no class folders" in layout_error(tmp_path)


def test_class_folder_without_images(tmp_path):
    root = make_folder(tmp_path)
    for f in (root / "train" / "n03").iterdir():
        f.unlink()
    (root / "train" / "n03" / "notes.txt").write_text("not an image")
    assert f"{root / 'train' / 'n03'} holds no images (.jpg, .jpeg" in layout_error(root)


@pytest.mark.parametrize("change,expect", [
    (lambda val: (val / "n05").mkdir(), "missing: none; not in train: n05"),
    (lambda val: [f.unlink() for f in (val / "n02").iterdir()] and (val / "n02").rmdir(), "missing: n02; not in"),
])
def test_val_classes_must_equal_train_classes(tmp_path, change, expect):
    root = make_folder(tmp_path)
    change(root / "val")
    msg = layout_error(root)
    assert f"{root / 'val'} has" in msg and expect in msg


def test_listing_is_torchvision_imagefolder(folder):
    train, val = scan_imagefolder(folder)
    for split, name in ((train, "train"), (val, "val")):
        tv = torchvision.datasets.ImageFolder(str(folder / name))
        assert split.classes == tv.classes == CLASSES
        assert [(split.path(i), int(split.labels[i])) for i in range(len(split))] == tv.samples
    assert len(train) == 24 and len(val) == sum(VAL_COUNTS)


# ---- decoding ----

def test_decode_gray_cmyk_png_bmp_as_rgb_like_pil(folder):
    train, _ = scan_imagefolder(folder)
    for i in range(len(train)):
        path = train.path(i)
        img = decode(path)
        pil = v2.functional.pil_to_tensor(Image.open(path).convert("RGB"))
        assert img.dtype == torch.uint8 and img.shape == pil.shape and img.shape[0] == 3
        assert (img.int() - pil.int()).abs().max() <= 2, path  # libjpeg-turbo vs PIL's libjpeg: same or +-1


def test_corrupt_image_names_the_file(tmp_path):
    root = make_folder(tmp_path)
    bad = root / "train" / "n02" / "n02_0.JPEG"
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(DataError, match=f"cannot decode image {bad} .*replace or delete"):
        decode(str(bad))
    for workers in (0, 2):  # every image of the 24 is in the first 3 steps of 8
        source = train_source(root, num_workers=workers)
        with pytest.raises(DataError, match=str(bad)):
            for step in range(3):
                step_batch(source, step)


# ---- training batches ----

def test_shapes_dtypes_and_normalisation(folder):
    source = train_source(folder, channels_last=True)
    assert len(source) == 24 and source.resident_bytes == 0
    batches = list(source.micro_batches(0, 8, 0, 1, 3))
    assert [len(y) for _, y in batches] == [3, 3, 2]
    for x, y in batches:
        assert x.shape[1:] == (3, S, S) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.is_contiguous(memory_format=torch.channels_last)
        pixels = x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        u8 = pixels * 255
        assert torch.allclose(u8, u8.round(), atol=1e-3) and u8.min() > -1e-3 and u8.max() < 255 + 1e-3
    x, y = source.example()
    assert x.shape == (1, 3, S, S) and y.shape == (1,) and y.dtype == torch.int64
    with pytest.raises(ConfigError, match="global batch of 25 needs 1 to 24"):
        source.micro_batches(0, 25, 0, 1, 5)


def test_augmentation_is_on_and_seeded(folder):
    source = train_source(folder)
    a, b = source.dataset[(5, 1)], source.dataset[(5, 2)]
    assert torch.equal(a[0], source.dataset[(5, 1)][0]) and not torch.equal(a[0], b[0])
    clone = pickle.loads(pickle.dumps(source.dataset))  # what spawn / forkserver workers receive
    assert torch.equal(clone[(5, 1)][0], a[0])
    state = torch.get_rng_state()
    source.dataset[(5, 1)]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is left alone


def test_two_ranks_see_the_one_rank_batch(folder):
    one, ranks = train_source(folder), [train_source(folder) for _ in range(2)]
    for step in range(4):  # step 2 crosses the epoch boundary (24 images, batches of 10)
        x1, y1 = step_batch(one, step, global_batch=10, micro_batch=4)
        parts = [step_batch(r, step, global_batch=10, rank=k, world_size=2, micro_batch=2)
                 for k, r in enumerate(ranks)]
        assert torch.equal(x1, torch.cat([p[0] for p in parts])) and torch.equal(y1, torch.cat([p[1] for p in parts]))
        if step == 0:
            live = one._iterator
        assert one._iterator is live  # consecutive steps come from one DataLoader iterator


def test_resume_sees_the_uninterrupted_batches(folder):
    source = train_source(folder, num_workers=2)
    run = [step_batch(source, step) for step in range(5)]
    resumed = train_source(folder, num_workers=2)
    for step in (3, 4):
        assert all(torch.equal(a, b) for a, b in zip(step_batch(resumed, step), run[step]))
    # seeking back on a live source, and an abandoned step, restart its iterator at the asked step
    assert all(torch.equal(a, b) for a, b in zip(step_batch(source, 1), run[1]))
    next(source.micro_batches(2, 8, 0, 1, 3))
    assert all(torch.equal(a, b) for a, b in zip(step_batch(source, 2), run[2]))
    assert not torch.equal(run[0][0], run[3][0])


def test_workers_do_not_change_the_batches(folder):
    sources = [train_source(folder, num_workers=w) for w in (0, 2)]
    for step in range(3):
        a, b = (step_batch(s, step, global_batch=12, rank=1, world_size=2, micro_batch=4) for s in sources)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---- evaluation ----

def test_eval_is_torchvision_centre_crop(folder):
    source = eval_source(folder)
    x, y, mask = (torch.cat(t) for t in zip(*source.batches(0, 1, 4)))
    assert x.shape == (11, 3, S, S) and mask.all() and y.dtype == torch.int64
    tv = torchvision.datasets.ImageFolder(str(folder / "val"))
    reference = v2.Compose([v2.Resize(37), v2.CenterCrop(S), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])  # 37 = round(256 * 32 / 224)
    for i, (path, label) in enumerate(tv.samples):
        expected = reference(decode_image(path, mode=ImageReadMode.RGB))
        torch.testing.assert_close(x[i], expected, atol=1e-6, rtol=1e-6)
        assert y[i] == label


def test_eval_shards_cover_every_image_once(folder):
    source, workers = eval_source(folder), eval_source(folder, num_workers=2)
    whole, labels, _ = (torch.cat(t) for t in zip(*source.batches(0, 1, 11)))
    seen = []
    for rank in range(3):
        x, y, mask = (torch.cat(t) for t in zip(*workers.batches(rank, 3, 3)))
        assert len(mask) == 4 and mask.tolist() == ([True] * 4 if rank < 2 else [True] * 3 + [False])
        seen.append((x[mask], y[mask]))
    assert torch.equal(torch.cat([s[0] for s in seen]), whole) and torch.equal(torch.cat([s[1] for s in seen]), labels)
    again = torch.cat([b[0] for b in workers.batches(2, 3, 3)])  # the cached loader, reused
    assert torch.equal(again[:3], seen[2][0])


def test_data_names_val_test(folder):
    data = load_imagefolder(folder, CPU, seed=1, image_size=S, num_workers=0)
    assert set(data.evals) == {"test"} and len(data.evals["test"]) == 11
    assert (data.keywords, len(data.train)) == ({"num_classes": 4, "in_channels": 3, "image_size": S}, 24)
