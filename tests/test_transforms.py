"""The test pipeline's size rule and resizes against hand-computed sizes and an fp64 transcription of cv2's rules."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from zoo.transforms import TestTransform, rescale_size, resize_image, resize_mask
from zoo.utils import IMAGENET_MEAN, IMAGENET_STD


@pytest.mark.parametrize("size_hw, scale, want_hw", [
    ((1024, 2048), (2048, 1024), (1024, 2048)),   # Cityscapes 512x1024 configs: no-op
    ((1024, 2048), (2049, 1025), (1025, 2049)),   # spec §3.1: s = 2049/2048, h = int(1024.5 + 0.5)
    ((375, 500), (2048, 512), (512, 683)),        # spec §3.1: VOC 500×375 → 683×512
    ((100, 1000), (2048, 512), (205, 2048)),      # long side binds: s = 2.048, h = int(204.8 + 0.5)
    ((512, 683), (512, 2048), (512, 683)),        # scale order does not matter
    ((100, 40), 0.5, (50, 20)),                   # a plain factor
    ((3, 3), 0.5, (2, 2)),                        # int(1.5 + 0.5) = 2
])
def test_rescale_size_follows_mmcv_keep_ratio_rule(size_hw, scale, want_hw):
    assert rescale_size(size_hw, scale) == want_hw


def test_rescale_size_rejects_bad_scales():
    with pytest.raises(ValueError, match="positive"):
        rescale_size((10, 10), 0)
    with pytest.raises(ValueError, match="pair"):
        rescale_size((10, 10), (1, 2, 3))


def test_a_resize_to_a_side_of_0_is_refused_naming_the_size_and_the_ratio_range():
    """1x600 into (128, 32): s = 128/600, h = int(0.21 + 0.5) = 0 (no inf->int cast, no 0-sized tensor)."""
    from train.pipeline import RecipePipeline
    from train.transforms import RandomRescale

    with pytest.raises(ValueError, match=r"1x600 .* would be 0x128: a side of 0"):
        rescale_size((1, 600), (128, 32))
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"1x600 .*a side of 0.*ratio range \(0\.5, 2\.0\)"):
        RandomRescale((128, 32), (0.5, 2.0)).draw(1, 600)
    image, mask = torch.zeros((3, 1, 600), dtype=torch.uint8), torch.zeros((1, 600), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"ratio range \(0\.5, 2\.0\)"):
        RecipePipeline((32, 32), (128, 32))(image, mask)


def cv2_linear_reference(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """cv2 INTER_LINEAR in fp64: src = (dst + 0.5)·in/out − 0.5, clamped; separable; no antialias."""
    in_h, in_w = image.shape[:2]

    def taps(n_out, n_in):
        rows = []
        for d in range(n_out):
            f = (d + 0.5) * n_in / n_out - 0.5
            s = math.floor(f)
            a = f - s
            if s < 0:
                s, a = 0, 0.0
            if s >= n_in - 1:
                s, a = n_in - 1, 0.0
            rows.append((s, min(s + 1, n_in - 1), a))
        return rows

    img = image.astype(np.float64)
    tmp = np.stack([img[:, s0] * (1 - a) + img[:, s1] * a for s0, s1, a in taps(out_w, in_w)], axis=1)
    return np.stack([tmp[s0] * (1 - a) + tmp[s1] * a for s0, s1, a in taps(out_h, in_h)], axis=0)


@pytest.mark.parametrize("out_hw", [(3, 4), (9, 13), (5, 7), (4, 20)])
def test_resize_image_matches_cv2_bilinear_rule(out_hw):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    want = cv2_linear_reference(image, *out_hw)
    got = resize_image(torch.from_numpy(image).permute(2, 0, 1), out_hw).permute(1, 2, 0).numpy()
    assert got.shape == want.shape
    # The float result is rounded to uint8 values like cv2's output; fp32 vs fp64 may flip an exact .5 tie.
    assert np.abs(got - np.floor(want + 0.5)).max() <= 1
    assert np.mean(got == np.floor(want + 0.5)) > 0.97
    assert np.abs(got - want).max() <= 0.5 + 1e-3


def test_resize_image_same_size_is_identity_and_batches():
    image = torch.randint(0, 256, (2, 3, 6, 5), dtype=torch.uint8)
    assert torch.equal(resize_image(image, (6, 5)), image.float())
    assert resize_image(image, (3, 4)).shape == (2, 3, 3, 4)


def test_resize_mask_uses_cv2_nearest_floor_rule():
    mask = torch.arange(35, dtype=torch.uint8).view(5, 7)
    out_h, out_w = 8, 3
    rows = [min(math.floor(d * 5 / out_h), 4) for d in range(out_h)]
    cols = [min(math.floor(d * 7 / out_w), 6) for d in range(out_w)]
    want = mask[rows][:, cols]
    got = resize_mask(mask, (out_h, out_w))
    assert got.dtype == torch.uint8 and torch.equal(got, want)


def test_test_transform_resizes_keep_ratio_and_normalizes():
    image = torch.randint(0, 256, (3, 30, 40), dtype=torch.uint8)
    out = TestTransform((80, 20))(image)            # s = min(80/40, 20/30) → 20×27
    assert out.shape == (3, 20, 27) and out.dtype == torch.float32
    resized = resize_image(image, (20, 27))
    for c in range(3):
        torch.testing.assert_close(out[c], (resized[c] - IMAGENET_MEAN[c]) / IMAGENET_STD[c])
    with pytest.raises(ValueError, match="RGB image"):
        TestTransform((80, 20))(torch.zeros(1, 30, 40, dtype=torch.uint8))
