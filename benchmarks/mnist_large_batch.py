"""MNIST/LeNet at batch 8192: which optimizers keep the baseline's accuracy in 30 epochs.

    .venv/bin/python benchmarks/mnist_large_batch.py                 # 6 runs x 30 epochs, ~45 min on 2 cores
    .venv/bin/python benchmarks/mnist_large_batch.py --epochs 10 --only lars,sgd

Reproduces the MNIST rows of You et al., "The Limit of the Batch Size" (Tables 3-4) at batch
8192: plain momentum SGD with the baseline LR scaled linearly (paper: diverges), SGD with a
layer-wise trust ratio (paper: 99.2%), Adam, Adam with a layer-wise bounded trust ratio
(paper: 99.4%), LAMB, and the `mnist-lenet-lars-8k` recipe (paper: 99.4%). Every run is a
`largebatch train` run under --output-dir; the table is printed at the end and written to
<output-dir>/table.md. No augmentation by default, as in the paper (`--crop-padding 2` uses the
recipe's random translations for every row).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from largebatch.config import OptimizerConfig, OutputConfig
from largebatch.recipes import get_recipe
from largebatch.trainer import train

B = 8192


def variants() -> dict[str, tuple[OptimizerConfig, str]]:
    """name -> (optimizer config at batch 8192, the paper's figure)."""
    base = get_recipe("mnist-lenet").optimizer  # tuned at batch 256, linear scaling to 8192
    return {
        "sgd": (base, "diverges"),
        "sgd+layerwise": (dataclasses.replace(base, layerwise=True, base_lr=10.0, reference_batch=B,
                                              layerwise_trust_coefficient=0.001), "99.2%"),  # LARS's scale
        "adam": (OptimizerConfig(name="adam", base_lr=1e-3, reference_batch=256, scaling="sqrt"), "-"),
        "adam+layerwise+bound": (OptimizerConfig(name="adam", base_lr=0.02, reference_batch=B, scaling="linear",
                                                 layerwise=True, layerwise_trust_coefficient=1.0, min_ratio=0.01,
                                                 max_ratio=10.0), "99.4%"),  # LAMB's rule (the seed's Table 3)
        "lamb": (OptimizerConfig(name="lamb", base_lr=0.02, reference_batch=B, weight_decay=0.01,
                                 min_ratio=0.01, max_ratio=10.0), "-"),
        "lars": (get_recipe("mnist-lenet-lars-8k").optimizer, "99.4%"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=float, default=30)
    ap.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(variants()))
    ap.add_argument("--output-dir", default="runs/mnist-8k")
    ap.add_argument("--crop-padding", type=int, default=0, help="random translation (pixels) for every row")
    args = ap.parse_args()
    chosen = [v for v in variants() if not args.only or v in args.only.split(",")]
    rows = []
    for name in chosen:
        opt, paper = variants()[name]
        cfg = get_recipe("mnist-lenet-lars-8k")  # batch 8192, warmup 2 epochs + poly decay
        cfg = dataclasses.replace(cfg, recipe=f"mnist-8k-{name}", epochs=args.epochs, optimizer=opt,
                                  data=dataclasses.replace(cfg.data, crop_padding=args.crop_padding),
                                  output=OutputConfig(dir=args.output_dir, name=name, progress=False))
        s = train(cfg, resume=(Path(args.output_dir) / name / "checkpoint.pt").exists())
        acc = f"{100 * s['test_accuracy']:.2f}%" if s["status"] == "completed" else s["status"]
        rows.append(f"| {name} | {B} | {args.epochs:g} | {acc} | {paper} | {s['wall_seconds'] / 60:.1f} |")
    table = "\n".join(["| optimizer | batch | epochs | test accuracy | paper | minutes |",
                       "|---|---|---|---|---|---|", *rows])
    print(table)
    Path(args.output_dir, "table.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
