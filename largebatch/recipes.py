"""Named recipes: functions that return a complete RunConfig.

Each docstring gives the source, the command and the expected result. `largebatch recipes`
lists them; `largebatch show-config --recipe NAME [overrides]` prints one resolved.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from largebatch.config import (BatchConfig, ConfigError, DataConfig, EvalConfig, ModelConfig, OptimizerConfig,
                               RunConfig, ScheduleConfig)

RECIPES: dict[str, Callable[[], RunConfig]] = {}
"""Every named recipe: its name -> the function that returns its RunConfig (filled by `@recipe`)."""


def recipe(name: str) -> Callable[[Callable[[], RunConfig]], Callable[[], RunConfig]]:
    def register(fn: Callable[[], RunConfig]) -> Callable[[], RunConfig]:
        RECIPES[name] = fn
        return fn
    return register


def get_recipe(name: str) -> RunConfig:
    """A fresh RunConfig of the recipe `name` (ConfigError naming the choices when there is none); change it with
    `dataclasses.replace`."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}: choose one of {', '.join(sorted(RECIPES))} "
                          f"(see `largebatch recipes`)")
    return RECIPES[name]()


def describe(name: str) -> str:
    """First line of a recipe's docstring."""
    return (RECIPES[name].__doc__ or "").strip().splitlines()[0]


@recipe("mnist-lenet")
def mnist_lenet() -> RunConfig:
    """MNIST/LeNet-5 baseline: batch 256, momentum SGD, 30 epochs; the seed reports 99.2% test accuracy.

    You et al., "The Limit of the Batch Size": batch 256 reaches 99.2% in 30 epochs. Here: momentum
    0.9, peak LR 0.1 at batch 256 after a 3-epoch linear warmup, cosine decay to 0, weight decay 5e-4
    (Caffe's LeNet solver). Measured: 99.36% (2 cores, fp32, ~7 min alone). Without warmup LR 0.05
    diverges in the first epoch with Caffe's Xavier initialisation; LR 0.02 stalls at 99.17%.
        largebatch train --recipe mnist-lenet
    """
    return RunConfig(
        recipe="mnist-lenet",
        epochs=30,
        optimizer=OptimizerConfig(name="sgd", base_lr=0.1, reference_batch=256, scaling="linear",
                                  momentum=0.9, weight_decay=5e-4),
        schedule=ScheduleConfig(warmup_epochs=3, decay="cosine"),
        batch=BatchConfig(global_batch=256),
    )


@recipe("mnist-lenet-lars-8k")
def mnist_lenet_lars_8k() -> RunConfig:
    """MNIST/LeNet-5 at batch 8192 with LARS, warmup + polynomial decay, 30 epochs; seed: 99.4%.

    You et al., "The Limit of the Batch Size" (Table 4): LARS keeps LeNet at 99.4% at batch 8K in the
    baseline's 30 epochs. LARS in the timm form (`lars_form = timm`: the trust ratio scales the gradient
    before the momentum buffer, the LR multiplies the buffer; the numbers below were measured in this form),
    trust coefficient 0.001, momentum 0.9, weight decay 5e-4 (not on biases), 2 warmup epochs, then
    (1 - t/T)^2 decay, and random translations of up to 2 pixels (`data.crop_padding`, drawn on the device per step).
    Measured (fp32 on an AVX2-only EPYC, 1 thread, 16-40 min each, 2026-12-02; benchmarks/seeds.py): seeds 0-4
    99.10 / 99.24 / 98.90 / 99.31 / 97.65%, mean 98.84% +/- 0.85 (95% CI): seed 4's loss explodes at the end
    of warmup and recovers only partly, so this LR sits near LeNet's stability edge at 8K.
    Without the translations every tuned variant plateaued at 99.1-99.2% (seeds 0, 1: 99.13, 99.20%):
    220 steps fit the training set (loss ~0.002) and the test error stops falling.
        largebatch train --recipe mnist-lenet-lars-8k
    """
    return RunConfig(
        recipe="mnist-lenet-lars-8k",
        epochs=30,
        optimizer=OptimizerConfig(name="lars", base_lr=10.0, reference_batch=8192, scaling="linear",
                                  momentum=0.9, weight_decay=5e-4, trust_coefficient=0.001, lars_form="timm"),
        schedule=ScheduleConfig(warmup_epochs=2, decay="poly", power=2.0),
        batch=BatchConfig(global_batch=8192),
        data=DataConfig(crop_padding=2),
    )


@recipe("mnist-speedrun")
def mnist_speedrun() -> RunConfig:
    """MNIST/LeNet-5 to 99.2% test accuracy in the least time: 3 epochs at batch 256, one-cycle Nesterov SGD.

    The Caffe LeNet-5 of `mnist-lenet` (no batch norm: LeNet-BN reached the same accuracy per epoch, 99.21-99.30%
    at 2.5-3 epochs, at 27% fewer images/s), Nesterov momentum 0.9, peak LR 0.1 after 0.2 epochs of linear warmup,
    then linear decay to 0 (a one-cycle schedule), label smoothing 0.05, gradients clipped to global norm 2,
    weight decay 5e-4, no augmentation (it slows a 3-epoch run), and a single evaluation, at the end: with a
    one-cycle schedule the accuracy peaks at the last step, so earlier evaluations only cost time. Run with
    `--target-accuracy 0.992` it reports the time to train in summary.json (`time_to_train_seconds`: the training
    steps and that one evaluation).
    Measured on a 2-core Xeon with AMX-bf16 (bf16, the precision `auto` picks there; 2026-12-02), seeds 0-4 with
    `largebatch train`: label smoothing 0.1 and no clipping ended at 99.21% mean (99.14-99.28), 0.2 at 99.16%,
    0.05 at 99.28% but seed 4 diverged (LR 0.1 is this network's edge without batch norm); 0.05 with clipping at
    norm 2, this recipe, at 99.32 / 99.29 / 99.22 / 99.33 / 99.26% (all five reach 99.2%): time to train 15.1 s
    mean, 16.0 s worst, at 12,200 images/s (2026-12-03, freed memory kept: `largebatch.malloc`; 18.8 s before),
    against 32.2 s for the same recipe as a plain fp32 loop (`benchmarks/speedrun.py --seeds 5`,
    benchmarks/results/speedrun-amx.md). On an AVX2-only EPYC (fp32, label
    smoothing 0.1, no clipping) it took 54 s at 3,651 images/s: 20 s needs a CPU with AMX or AVX512-BF16.
        largebatch train --recipe mnist-speedrun --target-accuracy 0.992
    """
    return RunConfig(
        recipe="mnist-speedrun",
        epochs=3,
        optimizer=OptimizerConfig(name="sgd", base_lr=0.1, reference_batch=256, scaling="linear",
                                  momentum=0.9, nesterov=True, weight_decay=5e-4),
        schedule=ScheduleConfig(warmup_epochs=0.2, decay="poly", power=1.0),
        batch=BatchConfig(global_batch=256),
        label_smoothing=0.05,
        grad_clip_norm=2.0,
        eval=EvalConfig(every_epochs=0.0),
    )


# --- ImageNet and CIFAR-10 (need --data.dir; expected results are the papers', not measured here) --------------

def _imagenet_lars_32k(name: str, model: str, epochs: float, base_lr: float, weight_decay: float,
                       warmup_epochs: float, lars_form: str) -> RunConfig:
    """The shared skeleton of the ImageNet recipes: LARS at batch 32,768 (the given `lars_form`, trust
    coefficient 0.001, momentum 0.9, epsilon 0), warmup then (1 - t/T)^2 decay, eval every 4 epochs."""
    return RunConfig(
        recipe=name,
        epochs=epochs,
        data=DataConfig(name="imagenet", image_size=224),
        model=ModelConfig(name=model),
        optimizer=OptimizerConfig(name="lars", base_lr=base_lr, reference_batch=32768, scaling="linear",
                                  momentum=0.9, weight_decay=weight_decay, trust_coefficient=0.001, eps=0.0,
                                  lars_form=lars_form),
        schedule=ScheduleConfig(warmup_epochs=warmup_epochs, decay="poly", power=2.0),
        batch=BatchConfig(global_batch=32768),
        eval=EvalConfig(every_epochs=4, batch_size=250),
    )


@recipe("imagenet-resnet50-mlperf")
def imagenet_resnet50_mlperf() -> RunConfig:
    """ImageNet/ResNet-50 v1.5, LARS at batch 32,768 to 75.9% top-1 (MLPerf-0.6 time-to-accuracy).

    Kumar et al. 2019, "Scale MLPerf-0.6 models on Google TPU-v3 Pods": LARS in its Fig. 5 form, the MLPerf
    reference (`lars_form = scaled`: v = m v + g + wd w, w -= lr * trust ratio * v), base LR 31.2 at batch 32K,
    momentum 0.9, weight decay 1e-4 and no adaptation on biases and BN, label smoothing 0.1, 25 warmup epochs
    then (1 - t/T)^2 decay to 1e-4 over 72.8 epochs. Evaluation every 4 epochs, stop at 75.9% and write an
    MLPerf log (mlperf.log). bf16 on CUDA, fp32 BN and loss.
        torchrun --nproc-per-node 8 -m largebatch train --recipe imagenet-resnet50-mlperf --data.dir /data/imagenet
    The seed's Table 1 rows, as overrides appended to that command:
        scaled momentum (Fig. 5), seed 72.8 epochs: none
        unscaled momentum (Fig. 6), seed 70.6 epochs:
            --optimizer.lars-form unscaled
        unscaled momentum, momentum 0.929, 18 warmup epochs, seed 64 epochs:
            --optimizer.lars-form unscaled --optimizer.momentum 0.929 --schedule.warmup-epochs 18 --epochs 64
    """
    cfg = _imagenet_lars_32k("imagenet-resnet50-mlperf", "resnet50", epochs=72.8, base_lr=31.2, weight_decay=1e-4,
                             warmup_epochs=25, lars_form="scaled")
    return replace(cfg, label_smoothing=0.1,
                   schedule=replace(cfg.schedule, end_factor=1e-4 / 31.2),  # decay to LR 1e-4 (MLPerf closed rule)
                   eval=replace(cfg.eval, target=0.759))


@recipe("imagenet-resnet50v2-lars-32k")
def imagenet_resnet50v2_lars_32k() -> RunConfig:
    """ImageNet/ResNet-50 v2 (pre-activation), LARS at batch 32K, 90 epochs; the seed reports 76.3% top-1.

    You et al. 2018, "ImageNet Training in Minutes" (the LARS scaling of ResNet-50 to 32K): LARS, warmup
    then polynomial (power 2) decay, 90 epochs. The LR and warmup here (peak 29 at 32K, 5 epochs, weight
    decay 5e-5 ... 1e-4 range: 1e-4 used) are a starting point in the paper's range, not a reproduced run:
    this machine has no ImageNet. Tune with `largebatch study` before a long run.
        torchrun --nproc-per-node 8 -m largebatch train --recipe imagenet-resnet50v2-lars-32k --data.dir /data/imagenet
    """
    return _imagenet_lars_32k("imagenet-resnet50v2-lars-32k", "resnet50-v2", epochs=90, base_lr=29.0,
                              weight_decay=1e-4, warmup_epochs=5, lars_form="timm")


@recipe("imagenet-alexnet-bn-lars-32k")
def imagenet_alexnet_bn_lars_32k() -> RunConfig:
    """ImageNet/AlexNet-BN, LARS at batch 32K, 100 epochs; the LARS paper reports ~58% top-1 (baseline 60%).

    You et al. 2017, "Large Batch Training of Convolutional Networks": AlexNet with batch norm after each
    layer and no LRN keeps its accuracy to 8K and loses ~2 points at 32K with LARS, warmup and poly(2) decay
    in 100 epochs. The LR (peak 13 at 32K), 5 warmup epochs and weight decay 5e-4 are a starting point in the
    paper's range, not a reproduced run (no ImageNet here). 224x224 crops (torchvision's AlexNet).
        torchrun --nproc-per-node 8 -m largebatch train --recipe imagenet-alexnet-bn-lars-32k --data.dir /data/imagenet
    """
    return _imagenet_lars_32k("imagenet-alexnet-bn-lars-32k", "alexnet-bn", epochs=100, base_lr=13.0,
                              weight_decay=5e-4, warmup_epochs=5, lars_form="timm")


@recipe("cifar10-resnet50-b128")
def cifar10_resnet50_b128() -> RunConfig:
    """CIFAR-10/ResNet-50 v1 (32x32 stem), batch 128, momentum SGD, 200 epochs; the seed's baseline is 93.9%.

    You et al. 2020, "The Limit of the Batch Size" (CIFAR-10 baseline): batch 128 reaches 93.9% in 200 epochs.
    Here the standard He et al. 2015 recipe: LR 0.1 at batch 128, momentum 0.9, weight decay 5e-4 (not on
    biases and BN), step decay x0.1 at epochs 100 and 150, pad-4 random crops and flips drawn on the device.
    Not measured here (200 ResNet-50 epochs need a GPU: about 1 h on an H100).
        largebatch train --recipe cifar10-resnet50-b128 --data.dir /data/cifar10
    """
    return RunConfig(
        recipe="cifar10-resnet50-b128",
        epochs=200,
        data=DataConfig(name="cifar10", crop_padding=4, flip=True),
        model=ModelConfig(name="resnet50-cifar"),
        optimizer=OptimizerConfig(name="sgd", base_lr=0.1, reference_batch=128, scaling="linear",
                                  momentum=0.9, weight_decay=5e-4),
        schedule=ScheduleConfig(decay="step", milestones=(100.0, 150.0), gamma=0.1),
        batch=BatchConfig(global_batch=128),
        eval=EvalConfig(every_epochs=5, batch_size=1000),
    )


@recipe("shakespeare-gpt")
def shakespeare_gpt() -> RunConfig:
    """Character-level Shakespeare, a 0.8M-parameter GPT (`gpt-mini`), AdamW at batch 2: the small-batch baseline.

    nanoGPT's CPU "baby GPT" model (Karpathy, `config/train_shakespeare_char.py` with its CPU flags: 4 layers,
    4 heads, 128 wide, block 64, AdamW beta2 0.99, cosine to 0.1x) on our corpus: the complete works (4.57M
    training characters, whole plays held out; `largebatch.data.text`), one epoch of 64-character windows
    (4.57M tokens, 35,696 steps), weight decay 0.1 on matrices only (no decay for LayerNorm, biases,
    embeddings), warmup 0.0168 epochs (600 steps; stated in epochs so a study's other batch sizes warm up over
    the same examples). The batch is 2 sequences (128 tokens), not nanoGPT's 12, so that the batch 16x larger
    (`shakespeare-gpt-lamb-large`, 32) stays below the gradient noise scale (B_simple 20-70 sequences,
    `largebatch probe`); the LR is 4e-3 at batch 12 scaled with the square root of the batch (1.63e-3 at 2), x4
    nanoGPT's 1e-3, the best of x2 / x4 / x8 at batch 2 (validation 1.839 / 1.804 / 1.811 at 0.336 epochs).
    `--threads auto` runs it on one CPU thread: an average matmul at batch 2 is 12 MFLOP, under the 25 MFLOP a
    thread that `largebatch.threads.fit_to_work` asks, and waking a second, sleeping OpenMP thread for each such
    op costs more than it saves (8.0-8.5K tokens/s on 1 thread against 4.4-5.1K on 2, bf16, 2-core AVX512-BF16
    EPYC; benchmarks/results/lm-recipes-avx512bf16.md); LAMB's batch 32 (192 MFLOP) gets both cores.
    Measured (2-core AMD EPYC with AVX512-BF16, 2026-12-04): fp32, seeds 0-2, validation 1.6561 +/- 0.0069
    nats/char (2.39 bits; `benchmarks/seeds.py`); as below (bf16, the precision `auto` picks there): validation
    1.672, test 1.665, in 554 s of training (8.2K tokens/s), 565 s from the shell.
        largebatch train --recipe shakespeare-gpt
    nanoGPT's baby GPT itself (batch 12, LR 1e-3, 2,000 steps = 0.336 epochs) is
        largebatch train --recipe shakespeare-gpt --batch.global-batch 12 --optimizer.base-lr 1e-3 --epochs 0.336
    and reaches validation 1.932 here (fp32, 2 threads, AVX2-only EPYC, 2026-12-02; 135 s of training); nanoGPT
    reports about 1.88 on the 1 MB tiny-shakespeare, whose validation split is the end of the same text.
    """
    return RunConfig(
        recipe="shakespeare-gpt",
        epochs=1.0,
        task="language-model",
        data=DataConfig(name="shakespeare", block_size=64),
        model=ModelConfig(name="gpt-mini", channels_last=False),
        optimizer=OptimizerConfig(name="adamw", base_lr=4e-3, reference_batch=12, scaling="sqrt", beta2=0.99,
                                  weight_decay=0.1, weight_decay_on="matrices", adapt_on="matrices"),
        schedule=ScheduleConfig(warmup_epochs=0.0168, decay="cosine", end_factor=0.1),  # 600 steps at batch 2
        batch=BatchConfig(global_batch=2),
        eval=EvalConfig(every_epochs=0.0, batch_size=500),
    )


@recipe("shakespeare-gpt-lamb-large")
def shakespeare_gpt_lamb_large() -> RunConfig:
    """`shakespeare-gpt` with LAMB at batch 32 (16x the baseline's): the same 4.57M tokens in 1/16 the steps.

    You et al. 2020 ("Large batch optimization for deep learning: training BERT in 76 minutes"): LAMB keeps
    attention models at batch sizes where Adam and LARS fail. Same model, data, token budget (1 epoch), decay
    mask, warmup (0.0168 epochs: 37 of the 2,231 steps) and cosine schedule as the baseline. LAMB's step on a
    tensor is lr x ||w|| along the normalised Adam direction, so its LR is not Adam's: 0.015 at batch 32, the best
    of 0.01 / 0.015 / 0.02 at 1 epoch, seed 0 (validation 1.676 / 1.655 / 1.672, fp32, AVX512-BF16 EPYC; 0.03:
    1.735 on an AMX Xeon). The trust ratio covers every weight, the embedding included (`adapt_on="weights"`;
    LayerNorm gains and biases excluded): with matrices only the tied embedding takes plain Adam steps at
    LAMB's LR (0.03 at 0.336 epochs: 1.853 against 1.848).
    Measured (the same CPU, 2026-12-04): fp32, seeds 0-2, validation 1.6545 +/- 0.0126, 0.999 of the baseline's
    1.6561 (the bar: within 1%); as below (bf16, 2 threads): validation 1.645, test 1.639, in 257 s of training
    (17.8K tokens/s), 265 s from the shell, 0.47x the baseline's time.
        largebatch train --recipe shakespeare-gpt-lamb-large
    """
    cfg = shakespeare_gpt()
    return replace(cfg, recipe="shakespeare-gpt-lamb-large",
                   optimizer=replace(cfg.optimizer, name="lamb", base_lr=0.015, reference_batch=32, scaling="none",
                                     adapt_on="weights"),
                   batch=BatchConfig(global_batch=32))
