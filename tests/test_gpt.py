"""The GPT language model (`largebatch.models.gpt`, Radford et al. 2019 as nanoGPT writes it) and the `matrices`
mask it needs: parameter counts against a hand formula and GPT-2's published 124M, causality, shapes, tied
embeddings, a few LAMB steps that lower the loss, the masks and the audit."""

from __future__ import annotations

import math
import typing

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from largebatch.config import ConfigError, OptimizerConfig
from largebatch.models import BUILTIN, INPUT_SIZE, build_model
from largebatch.models.gpt import GPT, SIZES
from largebatch.optim import MASKS, audit, build_optimizer, param_groups, tensor_kinds

V = 65  # a character vocabulary (Shakespeare's 65 characters, nanoGPT's shakespeare_char)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() lists the tied tensor once


def _by_hand(V: int, T: int, L: int, d: int, bias: bool) -> int:
    """Token and position tables, then per block: LayerNorm (scale, shift), q/k/v (d x 3d + 3d), output
    projection (d x d + d), LayerNorm, MLP (d x 4d + 4d, 4d x d + d); the final LayerNorm; the head is tied."""
    ln = 2 * d if bias else d
    attn = d * 3 * d + d * d + ((3 * d + d) if bias else 0)
    mlp = d * 4 * d + 4 * d * d + ((4 * d + d) if bias else 0)
    return V * d + T * d + L * (2 * ln + attn + mlp) + ln


def _meta(name: str, vocab_size: int, **kw) -> nn.Module:
    with torch.device("meta"):
        return build_model(name, vocab_size=vocab_size, **kw)


@pytest.mark.parametrize("name", sorted(SIZES))
def test_parameter_counts_by_hand(name: str) -> None:
    s = SIZES[name]
    for vocab in (V, 50257):
        assert _count(_meta(name, vocab)) == _by_hand(vocab, s.block_size, s.n_layer, s.n_embd, s.bias)
    model = _meta(name, V, block_size=32)  # the data's sequence length sets the position table
    assert model.transformer.wpe.weight.shape == (32, s.n_embd)


def test_published_counts() -> None:
    """GPT-2 small: 124,439,808 with tied embeddings; nanoGPT prints 123.65M, leaving out the position table.
    nanoGPT's shakespeare_char model (no biases) prints 10.65M the same way; its CPU baby GPT 0.80M."""
    gpt2 = _meta("gpt2-small", 50257)
    assert _count(gpt2) == 124_439_808
    assert round((_count(gpt2) - gpt2.transformer.wpe.weight.numel()) / 1e6, 2) == 123.65
    for name, printed in (("gpt-char", 10.65), ("gpt-mini", 0.80)):
        m = _meta(name, V)
        assert round((_count(m) - m.transformer.wpe.weight.numel()) / 1e6, 2) == printed
    assert {name: _count(_meta(name, V)) for name in SIZES} == {
        "gpt-tiny": 208_320, "gpt-mini": 804_096, "gpt-char": 10_745_088, "gpt2-small": 85_892_352}
    assert SIZES["gpt-char"].dropout == 0.2 and _meta("gpt-char", V).transformer.drop.p == 0.2


def test_builtin_names_build_through_the_registry() -> None:
    for name in ("gpt-tiny", "gpt-mini", "gpt-char", "gpt2-small"):
        assert name in BUILTIN and name not in INPUT_SIZE
        model = _meta(name, 50, block_size=16, num_classes=10, in_channels=3)  # image keywords are dropped
        assert isinstance(model, GPT) and model.block_size == 16 and model.lm_head.out_features == 50
    tiny = _meta("gpt-tiny", V, dropout=0.1, bias=False, n_layer=2)  # further keywords override the size
    assert len(tiny.transformer.h) == 2 and tiny.transformer.drop.p == 0.1 and tiny.transformer.ln_f.bias is None
    with pytest.raises(ConfigError, match="vocab_size"):  # image data gives no vocabulary: a one-line error
        build_model("gpt-tiny", num_classes=10, in_channels=3, image_size=32)


@pytest.fixture(scope="module")
def tiny() -> GPT:
    torch.manual_seed(0)
    return build_model("gpt-tiny", vocab_size=V, block_size=16).eval()


def test_shapes_and_tied_embeddings(tiny: GPT) -> None:
    idx = torch.randint(0, V, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert tiny(idx).shape == (3, 16, V) and tiny(idx[:, :5]).shape == (3, 5, V)
    assert tiny.lm_head.weight is tiny.transformer.wte.weight
    assert len(list(tiny.parameters())) == len(list(tiny.named_parameters(remove_duplicate=False))) - 1
    assert "lm_head.weight" in tiny.state_dict()  # both names saved, one tensor: loads back tied
    with pytest.raises(ValueError, match="block_size = 16"):
        tiny(torch.zeros(1, 17, dtype=torch.long))


def test_gpt2_initialisation() -> None:
    """N(0, 0.02) weights, residual projections N(0, 0.02 / sqrt(2 n_layer)) (Radford et al. 2019, sec. 2.3)."""
    torch.manual_seed(0)
    model = build_model("gpt-mini", vocab_size=V, n_embd=256)  # more elements: a tighter std estimate
    std = 0.02 / math.sqrt(2 * 4)
    for name, p in model.named_parameters():
        if p.ndim == 2:
            expected = std if name.endswith("c_proj.weight") else 0.02
            assert abs(p.std().item() / expected - 1) < 0.05, name
        elif "ln" in name:
            assert torch.equal(p, torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p))


def test_causal(tiny: GPT) -> None:
    """Changing token t changes no logit at positions < t (and does change those at >= t)."""
    idx = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(2))
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % V
    with torch.no_grad():
        a, b = tiny(idx), tiny(changed)
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_lamb_steps_lower_the_loss() -> None:
    """A tiny repeated sequence is learnt in a few LAMB steps with the `matrices` masks."""
    torch.manual_seed(0)
    model = build_model("gpt-tiny", vocab_size=16, block_size=32, n_layer=2)
    tokens = torch.arange(8).repeat(2, 5)[:, :33]  # 0 1 ... 7 0 1 ...: each next token is determined
    x, y = tokens[:, :-1], tokens[:, 1:]
    cfg = OptimizerConfig(name="lamb", weight_decay=0.01, weight_decay_on="matrices", adapt_on="matrices")
    opt = build_optimizer(model, cfg, lr=0.01)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses


# ---------------------------------------------------------------- masks


def _groups_of(model: nn.Module, wd_on: str, adapt_on: str) -> dict[str, tuple[float, bool]]:
    where = {id(p): (g["weight_decay"], g["adapt"]) for g in param_groups(model, 0.1, wd_on, adapt_on)
             for p in g["params"]}
    return {n: where[id(p)] for n, p in model.named_parameters()}


def test_matrices_mask_skips_norms_biases_and_embeddings(tiny: GPT) -> None:
    groups = param_groups(tiny, 0.1, "matrices", "matrices")
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(tiny.parameters()))  # the tied tensor once
    got = _groups_of(tiny, "matrices", "matrices")
    linear = {n for n, m in tiny.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    assert {n for n, (wd, adapt) in got.items() if wd and adapt} == {f"{n}.weight" for n in linear}
    assert got["transformer.wte.weight"] == got["transformer.wpe.weight"] == (0.0, False)
    assert got["transformer.h.0.ln_1.weight"] == got["transformer.h.0.attn.c_attn.bias"] == (0.0, False)
    # `weights` (ndim > 1) decays the embeddings too; the two masks stay independent
    weights = _groups_of(tiny, "weights", "matrices")
    assert weights["transformer.wte.weight"] == weights["transformer.wpe.weight"] == (0.1, False)
    for field in ("weight_decay_on", "adapt_on"):  # config restates the names (it imports no torch)
        assert typing.get_args(typing.get_type_hints(OptimizerConfig)[field]) == MASKS == ("weights", "matrices", "all")
    with pytest.raises(ValueError, match="matrices"):
        param_groups(tiny, 0.1, "linear", "all")


def test_tensor_kinds() -> None:
    model = nn.Sequential(nn.Embedding(5, 4), nn.Conv1d(4, 4, 3), nn.BatchNorm1d(4), nn.MultiheadAttention(4, 2),
                          nn.Linear(4, 5))
    model[4].weight = model[0].weight  # a tied head: an embedding, whichever module holds it
    model.register_parameter("pos", nn.Parameter(torch.zeros(3, 4)))  # a bare positional table: not a matrix
    kinds = {n: tensor_kinds(model)[id(p)] for n, p in model.named_parameters()}
    assert kinds["0.weight"] == ("embedding", "Embedding") and kinds["1.weight"] == ("matrix", "Conv1d")
    assert kinds["1.bias"][0] == "bias" and kinds["2.weight"] == kinds["2.bias"] == ("norm", "BatchNorm1d")
    assert kinds["3.in_proj_weight"][0] == kinds["3.out_proj.weight"][0] == "matrix"
    assert kinds["3.in_proj_bias"][0] == "bias" and kinds["4.bias"][0] == "bias"
    assert kinds["pos"] == ("other", "Sequential")
    decayed = {n for n, (wd, _) in _groups_of(model, "matrices", "all").items() if wd}
    assert decayed == {"1.weight", "3.in_proj_weight", "3.out_proj.weight"}


def test_audit_shows_kind_and_tied_names(tiny: GPT) -> None:
    cfg = OptimizerConfig(name="lamb", weight_decay=0.1, weight_decay_on="matrices", adapt_on="matrices")
    table = audit(tiny, build_optimizer(tiny, cfg, lr=1e-3))
    rows = {line.split()[0]: line for line in table.splitlines()[3:] if line.strip()}
    wte = rows["transformer.wte.weight"]
    assert "embedding (Embedding)" in wte and wte.endswith("tied: also lm_head.weight") and "lm_head.weight" not in rows
    assert "embedding (Embedding)" in rows["transformer.wpe.weight"]
    assert "norm (LayerNorm)" in rows["transformer.ln_f.weight"]
    assert rows["transformer.h.0.attn.c_attn.weight"].split()[-3:] == ["(Linear)", "0.1", "yes"]
    assert rows["transformer.h.0.attn.c_attn.bias"].split()[-4:] == ["bias", "(Linear)", "0", "no"]
    n = len(list(tiny.parameters()))
    assert f"decayed: {4 * 4} of {n} tensors" in table and f"adapted: {4 * 4} of {n} tensors" in table
    assert "matrices = kind matrix" in table
