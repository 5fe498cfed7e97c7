"""The language-model workload end to end: a tiny corpus written here, the shakespeare-gpt recipe pointed at it
(`--data.dir`), a 4-layer GPT (`gpt-tiny`) through the CLI. References: the uninterrupted run for a resumed one
(bitwise, fp32), one process with accumulation for two torchrun ranks (float64, 1e-9)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from largebatch import checkpoint
from largebatch.cli import main
from largebatch.models.gpt import gpt_mini
from largebatch.optim.param_groups import param_groups, tensor_kinds
from largebatch.recipes import get_recipe

ROOT = Path(__file__).resolve().parents[1]
WORDS = "to be or not that is the question whether tis nobler in mind suffer slings arrows outrageous fortune".split()


def corpus(folder: Path) -> Path:
    """Four 'works' of seeded word salad (~12K characters each)."""
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for w in range(4):
        idx = torch.randint(0, len(WORDS), (2400,), generator=g).tolist()
        (folder / f"work{w}.txt").write_text(" ".join(WORDS[i] for i in idx) + "\n")
    return folder


def args(tmp_path: Path, *extra: str) -> list[str]:
    texts = tmp_path / "texts"
    return ["--recipe", "shakespeare-gpt", "--data.dir", str(texts if texts.exists() else corpus(texts)),
            "--model.name", "gpt-tiny", "--data.block-size", "32", "--epochs", "0.5",
            "--schedule.warmup-steps", "2", "--batch.global-batch", "64", "--eval-every", "0.25", "--threads", "1",
            "--optimizer.base-lr", "1e-3",  # pinned: the recipe's LR was tuned for gpt-mini at batch 2
            "--device", "cpu", "--output-dir", str(tmp_path), "--output.no-progress", *extra]


def test_recipe_on_a_tiny_corpus_learns_reports_tokens_and_resumes_bitwise(tmp_path, capsys):
    assert main(["train", *args(tmp_path, "--precision.dtype", "fp32", "--output.name", "whole")]) == 0
    s = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert (s["task"], s["metric"], s["higher_is_better"]) == ("language-model", "loss", False)
    assert s["test_loss"] < 2.5 and s["val_loss"] < 2.5  # a uniform guess over ~20 characters scores 3.0
    assert s["tokens_per_example"] == 32 and s["train_tokens"] == s["steps"] * 64 * 32
    vocab = json.loads((tmp_path / "whole" / "vocab.json").read_text())
    text = "".join(p.read_text() for p in sorted((tmp_path / "texts").iterdir()))
    assert vocab["vocab"] == sorted(set(text)) and vocab["block_size"] == 32
    audit = (tmp_path / "whole" / "optimizer_audit.txt").read_text()
    assert "embedding" in audit
    assert main(["train", *args(tmp_path, "--precision.dtype", "fp32", "--output.name", "split",
                                "--checkpoint.stop-at-step", "3")]) == 4  # stopped
    assert main(["train", "--resume", str(tmp_path / "split"), "--output.no-progress"]) == 0
    a, b = (checkpoint.load(tmp_path / n / checkpoint.NAME)["model"] for n in ("whole", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_ranks_equal_one_process_with_accumulation(tmp_path):
    common = args(tmp_path, "--precision.dtype", "fp64", "--epochs", "0.25")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                        "largebatch", "train", *common, "--output.name", "ddp"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert main(["train", *common, "--batch.micro-batch", "32", "--output.name", "one"]) == 0
    ddp, one = (checkpoint.load(tmp_path / n / checkpoint.NAME)["model"] for n in ("ddp", "one"))
    for k in one:
        torch.testing.assert_close(ddp[k], one[k], rtol=1e-9, atol=1e-12)


def test_lamb_large_recipe_keeps_the_baselines_token_budget():
    base, large = get_recipe("shakespeare-gpt"), get_recipe("shakespeare-gpt-lamb-large")
    assert large.batch.global_batch == 16 * base.batch.global_batch and large.epochs == base.epochs
    assert (large.optimizer.name, large.model, large.data) == ("lamb", base.model, base.data)
    assert base.optimizer.weight_decay_on == "matrices"
    # LAMB's trust ratio covers the tied embedding (2-D) but no LayerNorm gain: the audit's kinds, per tensor
    model = gpt_mini(vocab_size=84)
    groups = param_groups(model, large.optimizer.weight_decay, large.optimizer.weight_decay_on,
                          large.optimizer.adapt_on)
    adapted = {id(p) for g in groups if g["adapt"] for p in g["params"]}
    kind_of = tensor_kinds(model)
    kinds = {name: kind_of[id(p)][0] for name, p in model.named_parameters()}
    assert {kinds[n] for n, p in model.named_parameters() if id(p) in adapted} == {"embedding", "matrix"}
    assert not any(id(p) in adapted for n, p in model.named_parameters() if kinds[n] in ("norm", "bias"))


def test_study_probe_and_report_of_the_language_model_are_decided_on_validation_loss(tmp_path):
    """`study --optimizers adamw,lamb,lars` on the tiny corpus (LAMB's and LARS's own LR through rung-scoped --set,
    sqrt LR scaling), the probe, and the report: regimes on the validation loss (lower is better, 1%), steps to a
    validation loss, and the probe's prediction."""
    texts = corpus(tmp_path / "texts")
    db = f"sqlite:///{tmp_path}/study.db"
    common = ["--set", f"data.dir={texts}", "--set", "model.name=gpt-tiny", "--set", "data.block_size=32",
              "--set", "threads=1", "--set", "output.progress=false", "--set", "eval.every_epochs=0.0625"]
    assert main(["study", "--recipe", "shakespeare-gpt", "--batch-sizes", "16,64", "--optimizers", "adamw,lamb,lars",
                 "--epochs", "0.125", "--trials", "0", "--lr-scaling", "sqrt", "--storage", db, "--target", "2.9",
                 "--output-dir", str(tmp_path / "runs"), *common, "--set", "lamb:optimizer.base_lr=0.01",
                 "--set", "lars:optimizer.base_lr=1.0", "--set", "lars:optimizer.reference_batch=16"]) == 0
    lamb = json.loads((tmp_path / "runs/shakespeare-gpt/lamb/b64/t0-s0/config.json").read_text())["optimizer"]
    assert (lamb["name"], lamb["base_lr"], lamb["scaling"]) == ("lamb", 0.01, "sqrt")
    assert main(["probe", "--recipe", "shakespeare-gpt", "--epochs", "0.0625", "--accum", "4",
                 "--output-dir", str(tmp_path), *common, "--set", "batch.global_batch=16"]) == 0  # the study's B0
    probe = tmp_path / "probe-shakespeare-gpt" / "probe.json"
    assert main(["report", db, "--out", str(tmp_path / "report"), "--probe", str(probe), "--baseline", "adamw"]) == 0
    reg = json.loads((tmp_path / "report" / "regimes.json").read_text())
    assert (reg["metric"], reg["higher_is_better"], reg["split"], reg["tolerance"]) == ("loss", False, "val", 0.01)
    assert reg["baseline_batch"] == 16 and reg["threshold"] == pytest.approx(1.01 * reg["baseline_value"])
    rows = {r["batch_size"]: r for r in reg["per_batch"]}
    assert rows[16]["baseline"]["value"]["mean"] == pytest.approx(reg["baseline_value"])
    text = (tmp_path / "report" / "report.md").read_text()
    assert "- Metric: validation loss, lower is better" in text and "## Prediction" in text
    header, *lines = (tmp_path / "report" / "trials.csv").read_text().splitlines()
    assert len(lines) == 6 and {line.split(",")[header.split(",").index("rung")] for line in lines} == {
        "adamw", "lamb", "lars"}
