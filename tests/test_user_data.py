"""A user's own data (`largebatch.data.user`): tensors held on the device and any map-style Dataset streamed by
workers give the same batches, pure functions of (seed, step) whatever the ranks, the workers or a resume; exact
evaluation shards; inferred model keywords and task; every mistake as one line."""

from __future__ import annotations

import random
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from largebatch.config import ConfigError, DataConfig, RunConfig
from largebatch.data import Splits, load_data, load_user_data

CPU = torch.device("cpu")
N, N_TEST, CLASSES = 37, 11, 5


def images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.arange(n) % CLASSES


TRAIN, TEST = images(N, 0), images(N_TEST, 1)


class Pairs(Dataset):
    """Tensors served one (input, int label) sample at a time: streamed, not the TensorDataset fast path."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, **attributes) -> None:
        self.x, self.y = x, y
        self.__dict__.update(attributes)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i]) if self.y.dim() == 1 and not self.y.is_floating_point() else self.y[i]


class Noisy(Pairs):
    """A random transform in __getitem__, drawing from torch's and numpy's global generators."""

    def __getitem__(self, i: int):
        x, y = super().__getitem__(i)
        return x + torch.randn(x.shape) + float(np.random.rand()), y


def cfg(**kw) -> DataConfig:
    return DataConfig(**{"workers": 0, **kw})


def step_batch(source, step, global_batch=16, rank=0, world_size=1, micro_batch=5):
    xs, ys = zip(*source.micro_batches(step, global_batch, rank, world_size, micro_batch))
    return torch.cat(xs), torch.cat(ys)


def same(a, b) -> bool:
    return all(torch.equal(u, v) for u, v in zip(a, b))


def held(seed: int = 3, **kw):
    """The data as device-held tensors."""
    return load_user_data(Splits(TRAIN, TEST), cfg(**kw), CPU, seed=seed)


def streamed(seed: int = 3, dataset=Pairs, **kw):
    """The same data as a streamed Dataset."""
    return load_user_data(Splits(dataset(*TRAIN, classes=list("abcde")), dataset(*TEST)), cfg(**kw), CPU, seed=seed)


def both(**kw):
    return held(**kw), streamed(**kw)


# ------------------------------------------------------------------ batches as pure functions of (seed, step)


def test_streamed_dataset_gives_the_device_held_batches():
    held, streamed = both()
    assert type(held.train).__name__ == "DeviceTrain" and type(streamed.train).__name__ == "DatasetTrain"
    for step in range(4):  # step 2 crosses the epoch boundary (37 examples, batches of 16)
        a, b = step_batch(held.train, step), step_batch(streamed.train, step)
        assert same(a, b) and a[0].dtype == torch.float32 and a[1].dtype == torch.int64
    assert not torch.equal(step_batch(held.train, 0)[1], step_batch(held.train, 1)[1])
    assert same(held.train.example(), streamed.train.example())
    for data in (held, streamed):
        assert data.task == "classification" and set(data.evals) == {"test"}
        assert data.keywords == {"num_classes": CLASSES, "in_channels": 3, "image_size": 8}
    other = load_user_data(Splits(TRAIN, TEST), cfg(), CPU, seed=4)
    assert not same(step_batch(other.train, 0), step_batch(held.train, 0))


def test_rank_shares_union_is_the_one_process_batch():
    for make in (held, streamed):
        one = make().train
        for world_size in (2, 3):
            ranks = [make().train for _ in range(world_size)]  # one source per rank, as in one process per rank
            for step in (0, 3):  # step 3 crosses the epoch boundary (37 examples, batches of 12)
                whole = step_batch(one, step, global_batch=12, micro_batch=4)
                parts = [step_batch(r, step, 12, k, world_size, micro_batch=2) for k, r in enumerate(ranks)]
                assert same(whole, [torch.cat([p[i] for p in parts]) for i in (0, 1)])


def test_a_fresh_source_resumes_at_any_step():
    for make in (held, streamed):
        source = make().train
        run = [step_batch(source, s) for s in range(5)]
        resumed = make().train
        assert same(step_batch(resumed, 3), run[3]) and same(step_batch(resumed, 4), run[4])
        assert same(step_batch(source, 1), run[1])  # seeking back on a live source


def test_workers_and_random_transforms_do_not_change_the_batches():
    state, np_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    sources = [streamed(dataset=Noisy, workers=w) for w in (0, 2)]
    clean = streamed()
    for step in range(3):
        a, b = (step_batch(s.train, step, global_batch=12, rank=1, world_size=2, micro_batch=4) for s in sources)
        assert same(a, b)
        c = step_batch(clean.train, step, global_batch=12, rank=1, world_size=2, micro_batch=4)
        assert torch.equal(a[1], c[1]) and not torch.equal(a[0], c[0])
    (x0, _, m0), = sources[0].evals["test"].batches(0, 1, N_TEST)
    (x2, _, m2), = sources[1].evals["test"].batches(0, 1, N_TEST)
    assert torch.equal(x0, x2) and m0.all()
    # the training process's generators are left alone (workers = 0 reads examples here)
    assert torch.equal(torch.get_rng_state(), state) and np.array_equal(np.random.get_state()[1], np_state)


def test_eval_shards_cover_every_example_once():
    for data in both():
        source = data.evals["test"]
        for world_size in (1, 2, 3):
            xs, ys = [], []
            for rank in range(world_size):
                x, y, mask = (torch.cat(t) for t in zip(*source.batches(rank, world_size, 3)))
                assert len(mask) == -(-N_TEST // world_size)
                xs.append(x[mask]), ys.append(y[mask])
            assert torch.equal(torch.cat(xs), TEST[0]) and torch.equal(torch.cat(ys), TEST[1])


def test_limits_and_held_out_val():
    for data in (load_user_data(Splits(TRAIN, TEST), cfg(val_size=7, train_limit=20, test_limit=4), CPU),
                 load_user_data(Splits(Pairs(*TRAIN, num_classes=5), Pairs(*TEST)),
                                cfg(val_size=7, train_limit=20, test_limit=4), CPU)):
        assert (len(data.train), len(data.evals["val"]), len(data.evals["test"])) == (20, 7, 4)
        (x, y, _), = data.evals["val"].batches(0, 1, 7)
        assert torch.equal(x, TRAIN[0][N - 7:]) and torch.equal(y, TRAIN[1][N - 7:])
        assert list(data.evals) == ["val", "test"]


# ------------------------------------------------------------------ keywords and task


def test_inferred_keywords_and_task():
    x, y = torch.randn(20, 6, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64)
    data = load_user_data(Splits((x, y), (x[:4], y[:4])), cfg(), CPU)
    assert (data.task, data.keywords) == ("regression", {"in_features": 6, "out_features": 2})
    xb, yb = next(data.train.micro_batches(0, 8, 0, 1, 8))
    assert xb.dtype == yb.dtype == torch.float32
    data = load_user_data(Splits(TensorDataset(x.float(), y[:, 0].float()), (x[:4], y[:4, 0])), cfg(), CPU)
    assert (data.task, data.keywords) == ("regression", {"in_features": 6, "out_features": 1})
    assert type(data.train).__name__ == "DeviceTrain"  # TensorDataset: the fast path

    tokens = torch.randint(0, 50, (30, 17), dtype=torch.int32)
    lm = Splits((tokens[:, :-1], tokens[:, 1:]), (tokens[:5, :-1], tokens[:5, 1:]), keywords={"vocab_size": 50})
    data = load_user_data(lm, cfg(), CPU)
    assert (data.task, data.keywords) == ("language-model", {"block_size": 16, "vocab_size": 50})
    xb, yb = next(data.train.micro_batches(0, 4, 0, 1, 4))
    assert xb.dtype == torch.int32 and yb.dtype == torch.int64 and xb.shape == yb.shape == (4, 16)
    streamed = load_user_data(Splits(Pairs(tokens[:, :-1], tokens[:, 1:], vocab_size=64), lm.test), cfg(), CPU)
    assert streamed.keywords == {"block_size": 16, "vocab_size": 64} and streamed.task == "language-model"

    own = Splits(TRAIN, TEST, keywords={"num_classes": 9, "depth": 2}, task="regression")
    data = load_user_data(own, cfg(), CPU)
    assert data.task == "regression"
    assert data.keywords == {"in_channels": 3, "image_size": 8, "out_features": 1, "num_classes": 9, "depth": 2}


# ------------------------------------------------------------------ by name: import path and plug-in

DATA_MODULE = '''
import torch
from largebatch.data import Splits

CALLS = []


def load(dir, seed=0):
    CALLS.append((dir, seed))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(24, 4, generator=g)
    return Splits((x, torch.arange(24) % 3), (x[:6], torch.arange(6) % 3))


def wrong(**kw):
    return {"train": 1}


def needs(split):
    return None
'''


@pytest.fixture
def user(tmp_path, monkeypatch):
    (tmp_path / "mydata.py").write_text(DATA_MODULE)
    site = tmp_path / "site"
    info = site / "mydata_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mydata-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[largebatch.data]\ntinydata = mydata:load\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(site))
    yield tmp_path
    sys.modules.pop("mydata", None)


def test_data_by_import_path_and_plugin(user):
    for name in ("mydata:load", "tinydata"):
        c = RunConfig(data=DataConfig(name=name, dir=str(user), workers=0)).data
        data = load_data(c, CPU, seed=5)
        assert data.keywords == {"in_features": 4, "num_classes": 3} and len(data.train) == 24
    import mydata

    assert mydata.CALLS == [(str(user), 5)] * 2


@pytest.mark.parametrize("name,expected", [
    ("no_such_data_module:load", "data.name = 'no_such_data_module:load': module 'no_such_data_module' not found"),
    ("mydata:lod", "data.name = 'mydata:lod': 'mydata' has no attribute 'lod'; did you mean 'load'?"),
    ("mydata:CALLS", "mydata:CALLS is a value of type list, not a callable that returns largebatch.data.Splits"),
    ("mydata:wrong", "data.name = 'mydata:wrong' returned a value of type dict, not a largebatch.data.Splits"),
    ("mydata:needs", "the data function requires split, which the trainer does not pass (it passes the keywords "
                     "dir, seed)"),
    ("python", "this run's data was given from Python, so it cannot be loaded from the config: pass it again, "
               "largebatch.train(cfg, data=..., resume=True)"),
])
def test_bad_data_names_are_one_line(user, name, expected):
    with pytest.raises(ConfigError) as e:
        load_data(DataConfig(name=name), CPU)
    assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_config_validates_data_names(user):
    for name in ("mnist", "mydata:load", "pkg.sub:Loader.build", "tinydata", "python"):
        assert RunConfig(data=DataConfig(name=name)).data.name == name
    for name, expected in (("mnsit", "did you mean 'mnist'?"), ("my-data:load", "is not module.path:callable"),
                           ("a:b:c", "more than one ':'")):
        with pytest.raises(ConfigError, match=f"data.name = {name!r} is invalid") as e:
            RunConfig(data=DataConfig(name=name))
        assert expected in str(e.value) and "\n" not in str(e.value)


class Odd(Pairs):
    """Samples whose target is `self.target` (None unless given): not a tensor, not a number."""

    def __getitem__(self, i: int):
        return self.x[i], getattr(self, "target", None)


def _missing_classes():
    load_user_data(Splits(Pairs(*TRAIN), Pairs(*TEST)), cfg(), CPU)


def _tokens_without_vocab():
    t = torch.randint(0, 9, (8, 5))
    load_user_data(Splits((t, t), (t, t)), cfg(), CPU)


@pytest.mark.parametrize("make,expected", [
    (lambda: Splits((torch.empty(0, 3), torch.empty(0)), TEST), "Splits.train is empty (0 examples)"),
    (lambda: Splits(TRAIN, Pairs(TEST[0][:0], TEST[1][:0])), "Splits.test is empty (a Dataset of length 0)"),
    (lambda: Splits((torch.zeros(5, 3), torch.zeros(4)), TEST), "Splits.train has 5 inputs but 4 targets"),
    (lambda: Splits(TRAIN, None), "Splits.test is missing"),
    (lambda: Splits(TRAIN, [1, 2, 3]), "Splits.test is a list of 3 items"),
    (lambda: Splits(TRAIN, TEST, val=(TEST[0], [0] * N_TEST)), "Splits.val = (Tensor, list): the pair"),
    (lambda: Splits(TRAIN, TEST, task="my task"), "Splits.task = 'my task' is invalid"),
    (_missing_classes, "cannot tell the number of classes of the training Dataset (it has no `classes` or "
                       "`num_classes` attribute): give Splits(keywords={\"num_classes\": ...})"),
    (_tokens_without_vocab, "give Splits(keywords={\"vocab_size\": ...})"),
    (lambda: load_user_data(Splits(TRAIN, TEST), cfg(flip=True), CPU), "data.flip = True is invalid"),
    (lambda: load_user_data(Splits(TRAIN, TEST, val=TEST), cfg(val_size=3), CPU), "has its own val split"),
    (lambda: load_user_data(Splits(TRAIN, TEST), cfg(val_size=N), CPU), "data.val_size = 37 leaves no training"),
    (lambda: load_user_data((TRAIN, TEST), cfg(), CPU), "not a largebatch.data.Splits"),
    (lambda: load_user_data(Splits([(1, 2)] * 3, TEST), cfg(), CPU), "Splits.train is a list of 3 items"),
    (lambda: load_user_data(Splits(Odd(*TRAIN), TEST), cfg(), CPU), "batching its first sample (a value of type "
                                                                     "tuple) failed (TypeError: default_collate"),
    (lambda: load_user_data(Splits(Odd(*TRAIN, target="cat"), TEST), cfg(), CPU),
     "a collated batch of the Dataset is (Tensor, tuple), not two tensors (inputs, targets)"),
])
def test_mistakes_are_one_line(make, expected):
    with pytest.raises(ConfigError) as e:
        make()
    assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_python_random_is_seeded_too():
    class Coin(Pairs):
        def __getitem__(self, i):
            return torch.tensor([random.random()]), 0

    data = load_user_data(Splits(Coin(*TRAIN, num_classes=1), TEST), cfg(), CPU, seed=1)
    a = step_batch(data.train, 0)[0]
    assert torch.equal(a, step_batch(load_user_data(Splits(Coin(*TRAIN, num_classes=1), TEST), cfg(), CPU, seed=1)
                                     .train, 0)[0]) and len(a.unique()) == len(a)
