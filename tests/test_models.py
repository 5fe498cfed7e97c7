"""Models in `largebatch.models`: parameter counts against published figures and against counts derived
here from the layer shapes, stride placement (ResNet-50 v1 vs v1.5), pre-activation structure (v2),
zero-initialised residual blocks, shapes, channels_last, gradients. ImageNet models run on 64x64 inputs."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import Bottleneck

from largebatch.config import ConfigError
from largebatch.models import INPUT_SIZE, MODELS, RESIDUAL, build_model
from largebatch.models.resnet import BasicBlockA, PreActBottleneck

NAMES = [n for n in MODELS if n in INPUT_SIZE]  # the image models (the language models: tests/test_gpt.py)
BIG = ("resnet50", "resnet50-v1", "resnet50-v2", "resnet50-cifar", "alexnet", "alexnet-bn")


@functools.lru_cache(maxsize=None)
def _cached(name: str, num_classes: int) -> nn.Module:
    """One model per (name, num_classes), shared by the tests that only read it or run it."""
    torch.manual_seed(0)
    return build_model(name, num_classes)


@functools.lru_cache(maxsize=None)
def _meta(name: str, num_classes: int) -> nn.Module:
    """The model on the meta device: shapes and parameter counts without allocating or initialising."""
    with torch.device("meta"):
        return build_model(name, num_classes)


def _fresh(name: str, num_classes: int) -> nn.Module:
    """A private copy of the shared model, for tests that change it."""
    return copy.deepcopy(_cached(name, num_classes))


def _input(name: str, batch: int = 2, channels: int | None = None, side: int | None = None) -> torch.Tensor:
    """A small batch: the natural size for LeNet and ResNet-20, 64x64 for the ImageNet models, 16x16 for
    ResNet-50-CIFAR (its stages then run at 16, 8, 4, 2: a quarter of the work of 32x32)."""
    side = side or {"resnet50-cifar": 16}.get(name, min(INPUT_SIZE[name], 64))
    c = channels if channels is not None else (1 if name.startswith("lenet") else 3)
    return torch.randn(batch, c, side, side, generator=torch.Generator().manual_seed(1))


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _conv(cin: int, cout: int, k: int, bias: bool = False) -> int:
    return cin * cout * k * k + (cout if bias else 0)


def _bn(c: int) -> int:  # gamma and beta
    return 2 * c


def _fc(cin: int, cout: int, bias: bool = True) -> int:
    return cin * cout + (cout if bias else 0)


STAGES = ((64, 3), (128, 4), (256, 6), (512, 3))  # ResNet-50: (bottleneck width, blocks) per stage


def _resnet50_v15_count(num_classes: int, stem_k: int = 7) -> int:
    """Post-activation bottleneck ResNet-50 (v1 and v1.5 alike): conv-BN everywhere, projection + BN
    shortcut in the first block of each stage."""
    n, cin = _conv(3, 64, stem_k) + _bn(64), 64
    for p, blocks in STAGES:
        for j in range(blocks):
            n += _conv(cin, p, 1) + _bn(p) + _conv(p, p, 3) + _bn(p) + _conv(p, 4 * p, 1) + _bn(4 * p)
            if j == 0:
                n += _conv(cin, 4 * p, 1) + _bn(4 * p)
            cin = 4 * p
    return n + _fc(2048, num_classes)


def _resnet50_v2_parts(num_classes: int) -> tuple[int, int, int]:
    """Pre-activation ResNet-50: (parameters, conv biases Keras adds, BN channels)."""
    n, biases, bn_channels, cin = _conv(3, 64, 7), 64, 0, 64  # bare stem conv (Keras: with bias)
    for p, blocks in STAGES:
        for j in range(blocks):
            n += _bn(cin) + _conv(cin, p, 1) + _bn(p) + _conv(p, p, 3) + _bn(p) + _conv(p, 4 * p, 1)
            bn_channels += cin + 2 * p
            biases += 4 * p  # Keras: the last 1x1 conv of a block has a bias
            if j == 0:
                n += _conv(cin, 4 * p, 1)  # projection shortcut, no BN
                biases += 4 * p  # Keras: so does the shortcut conv
            cin = 4 * p
    n += _bn(2048) + _fc(2048, num_classes)
    return n, biases, bn_channels + 2048


# ---------------------------------------------------------------- parameter counts


def test_published_parameter_counts() -> None:
    # torchvision's documentation / the ResNet-50 of MLPerf; v1 moves a stride only
    assert _count(_meta("resnet50", 1000)) == 25_557_032
    assert _count(_meta("resnet50-v1", 1000)) == 25_557_032
    assert _resnet50_v15_count(1000) == 25_557_032
    # torchvision's AlexNet (Krizhevsky 2014 one-tower)
    assert _count(_meta("alexnet", 1000)) == 61_100_840
    alexnet = (_conv(3, 64, 11, True) + _conv(64, 192, 5, True) + _conv(192, 384, 3, True)
               + _conv(384, 256, 3, True) + _conv(256, 256, 3, True)
               + _fc(9216, 4096) + _fc(4096, 4096) + _fc(4096, 1000))
    assert alexnet == 61_100_840
    # LeNets keep their documented counts
    assert _count(_cached("lenet", 10)) == 431_080
    assert _count(_cached("lenet-bn", 10)) == 432_220


def test_resnet20_cifar_parameter_count() -> None:
    # He et al. 2015 Table 6: ResNet-20 has 0.27M parameters. Derived: 3x3 stem conv 3->16 + BN, then per
    # stage 3 blocks of two 3x3 convs + BN each (16, 32, 64 channels), fc 64->10. Option-A shortcuts are
    # parameter free; option B (1x1 conv + BN projections on the 2 widening shortcuts) would add
    # 16*32 + 2*32 + 32*64 + 2*64 = 2,752, i.e. 272,474.
    n, cin = _conv(3, 16, 3) + _bn(16), 16
    for c in (16, 32, 64):
        for _ in range(3):
            n += _conv(cin, c, 3) + _bn(c) + _conv(c, c, 3) + _bn(c)
            cin = c
    n += _fc(64, 10)
    assert n == 269_722
    assert round(n / 1e6, 2) == 0.27
    assert _count(_cached("resnet20-cifar", 10)) == n


def test_resnet50_v2_parameter_count() -> None:
    n, biases, bn_channels = _resnet50_v2_parts(1000)
    assert n == 25_549_352
    assert _count(_meta("resnet50-v2", 1000)) == n
    assert _count(_cached("resnet50-v2", 10)) == _resnet50_v2_parts(10)[0]
    # Keras ResNet50V2 (Keras Applications table): 25,613,800 parameters in all, of which 25,568,360 are
    # trainable. Same layers, but Keras gives a bias to the stem conv, the last 1x1 conv of each block and
    # each shortcut conv (19,008 biases), and its total counts each BN's moving mean and variance too.
    assert biases == 19_008
    assert n + biases == 25_568_360
    assert n + biases + 2 * bn_channels == 25_613_800


def test_resnet50_cifar_and_alexnet_bn_parameter_counts() -> None:
    assert _count(_cached("resnet50-cifar", 10)) == _resnet50_v15_count(10, stem_k=3) == 23_520_842
    # AlexNet-BN: torchvision's widths, convs and hidden fc without bias, BN(2d/1d) after each of them
    n = (_conv(3, 64, 11) + _conv(64, 192, 5) + _conv(192, 384, 3) + _conv(384, 256, 3) + _conv(256, 256, 3)
         + _bn(64 + 192 + 384 + 256 + 256)
         + _fc(9216, 4096, bias=False) + _bn(4096) + _fc(4096, 4096, bias=False) + _bn(4096)
         + _fc(4096, 1000))
    assert n == 61_110_184
    assert _count(_meta("alexnet-bn", 1000)) == n


# ---------------------------------------------------------------- structure


def _conv_strides(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {k: m.stride for k, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def test_resnet50_v1_and_v15_differ_only_in_stride_placement() -> None:
    v15, v1 = _cached("resnet50", 10), _cached("resnet50-v1", 10)
    assert {k: v.shape for k, v in v15.state_dict().items()} == {k: v.shape for k, v in v1.state_dict().items()}
    for i, (l15, l1) in enumerate(zip((v15.layer1, v15.layer2, v15.layer3, v15.layer4),
                                      (v1.layer1, v1.layer2, v1.layer3, v1.layer4))):
        for j, (b15, b1) in enumerate(zip(l15, l1)):
            s = (2, 2) if i > 0 and j == 0 else (1, 1)
            assert (b15.conv1.stride, b15.conv2.stride, b15.conv3.stride) == ((1, 1), s, (1, 1))
            assert (b1.conv1.stride, b1.conv2.stride, b1.conv3.stride) == (s, (1, 1), (1, 1))
            assert b15.conv2.padding == b1.conv2.padding == (1, 1)
            if j == 0:
                assert b15.downsample[0].stride == b1.downsample[0].stride == s
            else:
                assert b15.downsample is None and b1.downsample is None
    s15, s1 = _conv_strides(v15), _conv_strides(v1)
    differ = {k for k in s15 if s15[k] != s1[k]}
    assert differ == {f"layer{i}.0.conv{c}" for i in (2, 3, 4) for c in (1, 2)}
    # behaviour: v1 sub-samples before the 3x3 conv, v1.5 in it
    seen: dict[str, tuple[int, ...]] = {}
    hooks = [m.layer2[0].conv1.register_forward_hook(lambda _m, _i, o, k=k: seen.__setitem__(k, o.shape))
             for k, m in (("v15", v15), ("v1", v1))]
    with torch.no_grad():
        v15.eval()(_input("resnet50"))
        v1.eval()(_input("resnet50"))
    for h in hooks:
        h.remove()
    assert seen["v15"][-2:] == (16, 16) and seen["v1"][-2:] == (8, 8)


def test_resnet50_cifar_stem_and_stages() -> None:
    m = _cached("resnet50-cifar", 10).eval()
    assert (m.conv1.kernel_size, m.conv1.stride, m.conv1.padding) == ((3, 3), (1, 1), (1, 1))
    assert isinstance(m.maxpool, nn.Identity)
    assert _conv_strides(m) == {**_conv_strides(_cached("resnet50-v1", 10)), "conv1": (1, 1)}  # v1 strides
    sides = []
    hooks = [layer.register_forward_hook(lambda _m, _i, o: sides.append(o.shape[-1]))
             for layer in (m.layer1, m.layer2, m.layer3, m.layer4)]
    with torch.no_grad():
        m(_input("resnet50-cifar", side=32))
    for h in hooks:
        h.remove()
    assert sides == [32, 16, 8, 4]


def _randomise_bn_(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics and affine parameters, so that eval-mode checks see real normalisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))


def _f_bn(x: torch.Tensor, bn: nn.BatchNorm2d, training: bool) -> torch.Tensor:
    return F.batch_norm(x, bn.running_mean.clone(), bn.running_var.clone(), bn.weight, bn.bias,
                        training, 0.0, bn.eps)


def test_resnet50_v2_is_pre_activation() -> None:
    m = _fresh("resnet50-v2", 10)
    _randomise_bn_(m)
    blocks = [b for b in m.modules() if isinstance(b, PreActBottleneck)]
    assert len(blocks) == 16
    # structure: every block calls BN first and a BN-ReLU precedes each conv
    for b, expect_down in ((m.layer1[0], True), (m.layer2[0], True), (m.layer2[1], False)):
        calls: list[str] = []
        names = {id(mod): k for k, mod in b.named_children()}
        hooks = [mod.register_forward_hook(lambda mod, _i, _o: calls.append(names[id(mod)]))
                 for mod in b.children()]
        with torch.no_grad():
            b.eval()(torch.randn(2, b.bn1.num_features, 8, 8))
        for h in hooks:
            h.remove()
        assert isinstance(b.bn1, nn.BatchNorm2d) and calls[0] == "bn1"
        body = ["conv1", "bn2", "relu", "conv2", "bn3", "relu", "conv3"]
        assert calls == ["bn1", "relu"] + (["downsample"] if expect_down else []) + body
    # forward == hand-written composition (strides written out here, not read from the modules)
    x = torch.randn(2, 256, 16, 16)
    for training in (False, True):
        for b, stride in ((m.layer2[0], 2), (m.layer2[1], 1)):
            inp = x if b is m.layer2[0] else torch.randn(2, 512, 8, 8)
            pre = F.relu(_f_bn(inp, b.bn1, training))
            out = F.conv2d(pre, b.conv1.weight)
            out = F.conv2d(F.relu(_f_bn(out, b.bn2, training)), b.conv2.weight, stride=stride, padding=1)
            out = F.conv2d(F.relu(_f_bn(out, b.bn3, training)), b.conv3.weight)
            short = F.conv2d(pre, b.downsample.weight, stride=2) if stride == 2 else inp
            with torch.no_grad():
                torch.testing.assert_close(b.train(training)(inp), out + short, rtol=1e-4, atol=1e-5)
    # whole network: bare stem conv + max-pool, blocks, final BN-ReLU, global average pool, fc
    m.eval()
    x = _input("resnet50-v2")
    with torch.no_grad():
        h = F.max_pool2d(F.conv2d(x, m.conv1.weight, stride=2, padding=3), 3, 2, 1)
        for b in blocks:
            h = b(h)
        h = F.relu(_f_bn(h, m.bn_final, False)).mean((2, 3))
        torch.testing.assert_close(m(x), F.linear(h, m.fc.weight, m.fc.bias), rtol=1e-4, atol=1e-5)


def test_resnet50_v2_matches_timm_resnetv2_50() -> None:
    """timm's `resnetv2_50` is an independent implementation of the same network (pre-activation,
    bare stem, stride in the 3x3 conv, final BN-ReLU); with its weights ours computes the same function."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = timm.create_model("resnetv2_50", pretrained=False, num_classes=10)
    _randomise_bn_(ref, seed=3)
    sd = {}
    for k, v in ref.state_dict().items():
        k2 = (k.replace("stem.conv.", "conv1.").replace("downsample.conv.", "downsample.")
              .replace("norm1", "bn1").replace("norm2", "bn2").replace("norm3", "bn3").replace("head.fc.", "fc."))
        if k2.startswith("stages."):
            _, i, _, rest = k2.split(".", 3)
            k2 = f"layer{int(i) + 1}.{rest}"
        if k2.startswith("norm."):
            k2 = "bn_final." + k2[len("norm."):]
        sd[k2] = v.flatten(1) if k2 == "fc.weight" else v
    ours = _fresh("resnet50-v2", 10)
    ours.load_state_dict(sd, strict=True)
    x = _input("resnet50-v2")
    with torch.no_grad():
        for training in (False, True):
            out, want = ours.train(training)(x), ref.train(training)(x)
            torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_resnet20_cifar_blocks_and_option_a_shortcut() -> None:
    torch.manual_seed(0)
    m = build_model("resnet20-cifar", 10)
    _randomise_bn_(m)
    assert [len(layer) for layer in (m.layer1, m.layer2, m.layer3)] == [3, 3, 3]
    assert [layer[0].conv1.out_channels for layer in (m.layer1, m.layer2, m.layer3)] == [16, 32, 64]
    b = m.layer2[0]
    x = torch.randn(2, 16, 32, 32)
    for training in (False, True):
        out = F.relu(_f_bn(F.conv2d(x, b.conv1.weight, stride=2, padding=1), b.bn1, training))
        out = _f_bn(F.conv2d(out, b.conv2.weight, padding=1), b.bn2, training)
        short = torch.cat([x[:, :, ::2, ::2], torch.zeros(2, 16, 16, 16)], 1)
        with torch.no_grad():
            torch.testing.assert_close(b.train(training)(x), F.relu(out + short), rtol=1e-4, atol=1e-5)
    sides = []
    hooks = [layer.register_forward_hook(lambda _m, _i, o: sides.append(tuple(o.shape[1:])))
             for layer in (m.layer1, m.layer2, m.layer3)]
    with torch.no_grad():
        m.eval()(_input("resnet20-cifar"))
    for h in hooks:
        h.remove()
    assert sides == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]


def test_alexnet_bn_layers() -> None:
    m = _cached("alexnet-bn", 10)
    with torch.device("meta"):  # layer geometry only
        ref = torchvision.models.alexnet(weights=None, num_classes=10)
    C, B, R, P, L, B1 = nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.Linear, nn.BatchNorm1d
    assert [type(x) for x in m.features] == [C, B, R, P, C, B, R, P, C, B, R, C, B, R, C, B, R, P]
    assert [type(x) for x in m.classifier] == [L, B1, R, L, B1, R, L]
    assert not any(isinstance(x, (nn.Dropout, nn.LocalResponseNorm)) for x in m.modules())
    geometry = lambda mods: [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding)  # noqa: E731
                             for c in mods if isinstance(c, nn.Conv2d)]
    assert geometry(m.features) == geometry(ref.features)
    assert [type(x) for x in m.features if not isinstance(x, nn.BatchNorm2d)] == [type(x) for x in ref.features]
    assert ([(x.in_features, x.out_features) for x in m.classifier if isinstance(x, L)]
            == [(x.in_features, x.out_features) for x in ref.classifier if isinstance(x, L)])
    assert all(x.bias is None for x in m.modules() if isinstance(x, (C, L)) and x is not m.classifier[-1])


# ---------------------------------------------------------------- zero_init_residual


def _expected_identity(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a zero-initialised block must compute: its shortcut path (written out here)."""
    if isinstance(block, Bottleneck):
        return F.relu(x if block.downsample is None else block.downsample(x))
    if isinstance(block, PreActBottleneck):
        if block.downsample is None:
            return x
        return block.downsample(F.relu(_f_bn(x, block.bn1, False)))
    assert isinstance(block, BasicBlockA)
    if block.stride == 2:
        x = x[:, :, ::2, ::2]
        x = torch.cat([x, x.new_zeros(x.shape[0], x.shape[1], *x.shape[2:])], 1)
    return F.relu(x)


def _zeroed(block: nn.Module) -> torch.Tensor:
    return block.conv3.weight if isinstance(block, PreActBottleneck) else (
        block.bn3.weight if isinstance(block, Bottleneck) else block.bn2.weight)


def _block_io(model: nn.Module, x: torch.Tensor) -> list[tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    seen = []
    blocks = [b for b in model.modules() if isinstance(b, (Bottleneck, PreActBottleneck, BasicBlockA))]
    hooks = [b.register_forward_hook(lambda b, i, o: seen.append((b, i[0].clone(), o.clone()))) for b in blocks]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    assert len(seen) == len(blocks) in (9, 16)
    return seen


@pytest.mark.parametrize("name", sorted(RESIDUAL))
def test_zero_init_residual_blocks_start_as_shortcut(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, 10, zero_init_residual=True)
    x = _input(name)
    with torch.no_grad():
        model.train()(x)  # running statistics away from (0, 1)
    model.eval()
    for block, inp, out in _block_io(model, x):
        assert torch.count_nonzero(_zeroed(block)) == 0
        with torch.no_grad():
            torch.testing.assert_close(out, _expected_identity(block, inp), rtol=1e-5, atol=1e-5)
    # the zeroed parameter still gets a gradient, so each branch can start learning
    model.train()
    F.cross_entropy(model(x), torch.tensor([1, 2])).backward()
    blocks = [b for b in model.modules() if isinstance(b, (Bottleneck, PreActBottleneck, BasicBlockA))]
    for block in blocks:
        assert _zeroed(block).grad is not None and _zeroed(block).grad.abs().sum() > 0
    # control: with the zeroed parameters set to non-zero values, no block is its shortcut any more
    with torch.no_grad():
        for block in blocks:
            nn.init.normal_(_zeroed(block), 1.0, 0.1)
    for block, inp, out in _block_io(model.eval(), x):
        with torch.no_grad():
            assert not torch.allclose(out, _expected_identity(block, inp), rtol=1e-3, atol=1e-3)


def test_zero_init_residual_on_a_model_without_residual_blocks_is_an_error() -> None:
    for name in sorted(set(MODELS) - RESIDUAL):
        with pytest.raises(ValueError, match=name) as e:
            build_model(name, 10, zero_init_residual=True)
        assert "\n" not in str(e.value)
    assert RESIDUAL == {n for n in MODELS if n.startswith("resnet")}


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(ConfigError) as e:  # one line, like every bad config value (tests/test_model_registry.py)
        build_model("vgg16")
    assert all(n in str(e.value) for n in MODELS) and "\n" not in str(e.value)
    assert set(INPUT_SIZE) == {n for n in MODELS if not n.startswith("gpt")}  # every image model has one


# ---------------------------------------------------------------- shapes, formats, gradients


@pytest.mark.parametrize("name", NAMES)
def test_output_shapes_and_channels_last(name: str) -> None:
    model, x = _cached(name, 10), _input(name)
    with torch.no_grad():
        out = model.train()(x)
        assert out.shape == (2, 10) and torch.isfinite(out).all()
        out = model.eval()(x)
        assert out.shape == (2, 10) and torch.isfinite(out).all()
        try:
            model.to(memory_format=torch.channels_last)
            x_cl = x.to(memory_format=torch.channels_last)
            assert x_cl.is_contiguous(memory_format=torch.channels_last)
            assert x.shape[1] == 1 or not x_cl.is_contiguous()  # one channel: both layouts coincide
            out_cl = model(x_cl)
        finally:
            model.to(memory_format=torch.contiguous_format)
    torch.testing.assert_close(out_cl, out, rtol=1e-4, atol=1e-4 * out.abs().max().item())


@pytest.mark.parametrize("name", NAMES)
def test_output_shapes_1000_classes(name: str) -> None:
    model = _meta(name, 1000)
    with torch.device("meta"):
        x = torch.empty(_input(name).shape)
        assert model.train()(x).shape == (2, 1000)
        assert model.eval()(x).shape == (2, 1000)


@pytest.mark.parametrize("name", NAMES)
def test_in_channels(name: str) -> None:
    natural = 1 if name.startswith("lenet") else 3
    first = next(m for m in _cached(name, 10).modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == natural
    other = 3 if natural == 1 else 1
    with torch.device("meta"):  # shapes only: no weights to initialise, no arithmetic
        model = build_model(name, 10, in_channels=other)
        out = model.eval()(torch.empty(_input(name, channels=other).shape))
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == other and first.weight.shape[1] == other
    assert out.shape == (2, 10)
    with pytest.raises(RuntimeError):  # and the natural number of channels no longer fits
        with torch.device("meta"):
            model(torch.empty(_input(name).shape))


@pytest.mark.parametrize("name", NAMES)
def test_backward_reaches_every_parameter(name: str) -> None:
    model = _cached(name, 10).train()
    model.zero_grad(set_to_none=True)
    try:
        F.cross_entropy(model(_input(name)), torch.tensor([3, 7])).backward()
        for k, p in model.named_parameters():
            assert p.grad is not None, k
            assert torch.isfinite(p.grad).all() and p.grad.any(), k
    finally:
        model.zero_grad(set_to_none=True)


def test_build_model_keeps_the_old_call() -> None:
    m = build_model("lenet", 10)
    assert type(m).__name__ == "LeNet5" and m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert build_model("lenet-bn").fc2.out_features == 10
