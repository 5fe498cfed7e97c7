"""Batched on-device augmentation vs a per-image reference, and the device sources' rank/resume invariance."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from largebatch.data import DeviceEval, DeviceSplit, DeviceTrain, augment


def reference_translate(img: torch.Tensor, dy: int, dx: int, pad: int, flip: bool) -> torch.Tensor:
    """One image: zero-pad by `pad`, take the crop at offset (pad - dy, pad - dx), flip if asked."""
    h, w = img.shape[-2:]
    padded = F.pad(img, (pad, pad, pad, pad))
    out = padded[:, pad - dy: pad - dy + h, pad - dx: pad - dx + w]
    return out.flip(-1) if flip else out


def test_apply_matches_per_image_reference():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 9, 7), dtype=torch.uint8, generator=g)
    for pad, flip in ((0, True), (1, False), (3, True), (4, True)):
        params = augment.draw(len(images), pad, flip, torch.Generator().manual_seed(pad))
        got = augment.apply(images, params, pad, flip)
        for img, (dy, dx, f), out in zip(images, params.tolist(), got):
            assert torch.equal(out, reference_translate(img, dy, dx, pad, bool(f))), (pad, flip, dy, dx, f)


def test_translation_moves_pixels_and_fills_zeros():
    img = torch.arange(1, 26, dtype=torch.uint8).reshape(1, 1, 5, 5)
    out = augment.apply(img, torch.tensor([[1, -2, 0]]), pad=2, flip=False)[0, 0]
    # shifted down by 1 and left by 2: out[i, j] = img[i - 1, j + 2]
    assert torch.equal(out[1:, :3], img[0, 0, :4, 2:])
    assert out[0].eq(0).all() and out[:, 3:].eq(0).all()


def test_draw_ranges_and_determinism():
    p = augment.draw(10_000, 4, True, torch.Generator().manual_seed(1))
    assert p[:, :2].min() == -4 and p[:, :2].max() == 4
    assert set(p[:, 2].unique().tolist()) == {0, 1}
    assert abs(p[:, 2].float().mean().item() - 0.5) < 0.03
    assert torch.equal(p, augment.draw(10_000, 4, True, torch.Generator().manual_seed(1)))
    assert augment.draw(100, 2, False, torch.Generator().manual_seed(1))[:, 2].eq(0).all()


def _split(n: int = 96) -> DeviceSplit:
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    return DeviceSplit(x, torch.arange(n) % 10, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), torch.device("cpu"))


def test_per_channel_normalisation():
    s = _split()
    x, _ = s.get(slice(0, 4))
    raw = s.images[:4].double() / 255
    ref = (raw - torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    torch.testing.assert_close(x.double(), ref, rtol=0, atol=1e-5)


def test_ranks_see_the_single_process_batch_with_augmentation():
    one = DeviceTrain(_split(), seed=5, pad=2, flip=True)
    two = [DeviceTrain(_split(), seed=5, pad=2, flip=True) for _ in range(2)]
    for step in range(4):  # 96 examples, batch 40: step 2 crosses an epoch boundary
        ref = list(one.micro_batches(step, 40, 0, 1, 10))
        got = [mb for r in range(2) for mb in two[r].micro_batches(step, 40, r, 2, 10)]
        assert len(ref) == len(got) == 4
        for (x1, y1), (x2, y2) in zip(ref, got):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_resumed_source_repeats_the_uninterrupted_one_and_augments():
    a = DeviceTrain(_split(), seed=5, pad=2, flip=True)
    seen = [torch.cat([x for x, _ in a.micro_batches(s, 32, 0, 1, 32)]) for s in range(5)]
    b = DeviceTrain(_split(), seed=5, pad=2, flip=True)
    assert torch.equal(torch.cat([x for x, _ in b.micro_batches(3, 32, 0, 1, 16)]), seen[3])
    plain = DeviceTrain(_split(), seed=5)
    unaugmented = torch.cat([x for x, _ in plain.micro_batches(3, 32, 0, 1, 32)])
    assert not torch.equal(unaugmented, seen[3])  # the augmentation did something


def test_device_eval_shards_cover_each_example_once():
    s = _split(50)
    ev = DeviceEval(s)
    labels = []
    for r in range(3):
        for x, y, mask in ev.batches(r, 3, 7):
            assert x.shape[0] == y.shape[0] == mask.shape[0] <= 7
            labels.append(y[mask])
    assert torch.equal(torch.cat(labels), s.labels)
