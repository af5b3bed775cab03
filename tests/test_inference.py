"""Single-scale, slide and ms+flip inference against the spec's sizes and an fp64 re-derivation of 0.x's steps."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import zoo
from zoo.inference import TestSettings, predict_label_map, segment_probs, view_plan
from zoo.utils import IMAGENET_MEAN, IMAGENET_STD
from zoo.inference import slide_inference, slide_windows


class PointwiseModel(nn.Module):
    """logits = a fixed 1×1 conv of the input (+ an optional horizontal ramp that breaks flip symmetry)."""

    def __init__(self, num_classes: int = 4, align_corners: bool = False, ramp: float = 0.0):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, num_classes, 1)
        self.num_classes, self.align_corners, self.ramp = num_classes, align_corners, ramp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.conv(x)
        if self.ramp:
            w = x.shape[-1]
            ramp = torch.linspace(0, self.ramp, w, dtype=x.dtype, device=x.device)
            logits = logits + ramp * torch.arange(self.num_classes, dtype=x.dtype).view(1, -1, 1, 1).to(x)
        return logits


class CoarseModel(PointwiseModel):
    """Logits predicted at 1/4 resolution and upsampled, so windows see different context than the whole."""

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        small = F.avg_pool2d(x, 4, ceil_mode=True)
        return F.interpolate(self.conv(small), size=x.shape[-2:], mode="bilinear", align_corners=self.align_corners)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_logits(x)


def reference_probs(model, image, views, align_corners):
    """0.x's steps for the given (size, flip) views, written from spec §3.1–3.3, in fp64 after the image resize.

    The uint8 image resize stays fp32 (then rounded, as cv2 writes uint8): in fp64 an exact .5 tie may round
    the other way and move a pixel by one grey level, which is not what these tests are about.
    """
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    h, w = image.shape[-2:]
    total = 0
    model.double()
    for (th, tw), flip in views:
        x = image.float().unsqueeze(0)
        if (th, tw) != (h, w):
            x = torch.floor(F.interpolate(x, size=(th, tw), mode="bilinear", align_corners=False) + 0.5)
        x = x.double()
        if flip:
            x = x.flip(-1)
        logits = model((x - mean) / std)
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=align_corners)
        probs = logits.softmax(1)
        total = total + (probs.flip(-1) if flip else probs)
    model.float()
    return total / len(views)


def test_ms_flip_views_follow_0x_config_scale_rule():
    # Spec §3.3: targets (int(W·r), int(H·r)) of the config scale, each keep-ratio resized; plain then flipped.
    voc = view_plan((375, 500), TestSettings(scale_wh=(2048, 512)), tta=True)
    assert [hw for hw, _ in voc[::2]] == [(256, 341), (384, 512), (512, 683), (640, 853), (768, 1024), (896, 1195)]
    assert [flip for _, flip in voc] == [False, True] * 6
    city769 = view_plan((1024, 2048), TestSettings(scale_wh=(2049, 1025)), tta=True)
    assert [hw for hw, _ in city769[::2]] == [(512, 1024), (768, 1536), (1025, 2049), (1281, 2561), (1537, 3073),
                                             (1793, 3585)]
    assert view_plan((1024, 2048), TestSettings(scale_wh=(2049, 1025))) == [((1025, 2049), False)]


def test_single_scale_matches_fp64_reference_with_align_corners():
    image = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    for align in (False, True):
        model = PointwiseModel(align_corners=align)
        settings = TestSettings(scale_wh=(45, 40), align_corners=align)  # 20×30 → 30×45
        got = segment_probs(model, image, settings)
        want = reference_probs(model, image, [((30, 45), False)], align)
        assert got.shape == (1, 4, 20, 30) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=0)
        assert torch.equal(predict_label_map(model, image, settings), got.argmax(1)[0])


def test_ms_flip_matches_fp64_reference():
    image = torch.randint(0, 256, (3, 12, 18), dtype=torch.uint8)
    model = PointwiseModel(ramp=2.0)
    settings = TestSettings(scale_wh=(36, 24))
    views = view_plan((12, 18), settings, tta=True)
    assert len(views) == 12
    got = segment_probs(model, image, settings, tta=True)
    torch.testing.assert_close(got.double(), reference_probs(model, image, views, False), atol=2e-5, rtol=0)
    torch.testing.assert_close(got.sum(1), torch.ones(1, 12, 18))


def test_flip_tta_output_is_mirror_symmetric_on_a_symmetric_image():
    # A symmetric image through a model that is not flip-equivariant: the plain and the un-flipped views are
    # mirror images of each other, so their average must be symmetric (it is not if the un-flip is missing).
    half = torch.randint(0, 256, (3, 16, 12), dtype=torch.uint8)
    image = torch.cat([half, half.flip(-1)], dim=-1)
    model = PointwiseModel(ramp=3.0)
    settings = TestSettings(scale_wh=(48, 32), ratios=(1.0,))
    probs = segment_probs(model, image, settings, tta=True)
    torch.testing.assert_close(probs, probs.flip(-1), atol=1e-6, rtol=0)
    plain = segment_probs(model, image, settings)
    assert not torch.allclose(plain, plain.flip(-1), atol=1e-3)  # the ramp really breaks symmetry
    # A pointwise (flip-equivariant) model: the flipped view equals the plain one on any image.
    equivariant = PointwiseModel()
    any_image = torch.randint(0, 256, (3, 16, 24), dtype=torch.uint8)
    torch.testing.assert_close(segment_probs(equivariant, any_image, settings, tta=True),
                               segment_probs(equivariant, any_image, settings), atol=1e-6, rtol=0)


def test_slide_window_grid_for_1025x2049():
    boxes = slide_windows(1025, 2049, (769, 769), (513, 513))
    assert len(boxes) == 8  # 2 × 4, spec §3.2
    assert sorted({b[0] for b in boxes}) == [0, 256] and sorted({b[2] for b in boxes}) == [0, 513, 1026, 1280]
    assert all(y2 - y1 == 769 and x2 - x1 == 769 for y1, y2, x1, x2 in boxes)
    count = torch.zeros(1025, 2049)
    for y1, y2, x1, x2 in boxes:
        count[y1:y2, x1:x2] += 1
    assert count.min() >= 1


def test_slide_equals_whole_when_one_window_covers_the_image():
    model = CoarseModel()
    x = torch.randn(1, 3, 40, 56)
    whole = model.forward_logits(x)
    assert torch.equal(slide_inference(model.forward_logits, x, (64, 64), (48, 48)), whole)
    # Two windows: different context, so different logits — the comparison above is not vacuous.
    assert not torch.allclose(slide_inference(model.forward_logits, x, (40, 40), (16, 16)), whole)


def test_zoo_slide_variant_runs_single_window_as_whole_through_eval_inference():
    model = zoo.create_model("isanet_r50-d8_769x769_40k_cityscapes", num_classes=3).eval()
    image = torch.randint(0, 256, (3, 40, 72), dtype=torch.uint8)
    settings = TestSettings.from_model(model, scale_wh=(72, 40))
    assert settings.align_corners is True
    probs = segment_probs(model, image, settings)
    with torch.no_grad():
        x = ((image.float() - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) /
             torch.tensor(IMAGENET_STD).view(3, 1, 1)).unsqueeze(0)
        want = model.encode_decode(x).softmax(1)
    torch.testing.assert_close(probs, want, atol=1e-5, rtol=0)


def test_bfloat16_autocast_runs_and_mostly_agrees():
    image = torch.randint(0, 256, (3, 16, 24), dtype=torch.uint8)
    model = PointwiseModel()
    settings = TestSettings(scale_wh=(24, 16))
    fp32 = predict_label_map(model, image, settings)
    bf16 = predict_label_map(model, image, settings, dtype="bf16")
    assert bf16.dtype == torch.uint8 and (bf16 == fp32).float().mean() > 0.9


def test_bad_image_shape_is_rejected():
    with pytest.raises(ValueError, match="RGB image"):
        segment_probs(PointwiseModel(), torch.zeros(1, 3, 8, 8, dtype=torch.uint8), TestSettings(scale_wh=(8, 8)))


def test_slide_windows_batched_equal_one_window_at_a_time():
    """Windows of one image (and of two images) run as batches: the same canvas to fp32 rounding, same argmax."""
    model = CoarseModel().eval()
    x = torch.randn(2, 3, 40, 70)
    with torch.no_grad():
        one = slide_inference(model.forward_logits, x, (24, 24), (16, 16))
        assert len(slide_windows(40, 70, (24, 24), (16, 16))) == 2 * 4
        for window_batch in (3, 4, 16, 100):  # uneven last chunk, several images per pass
            for images in (x[:1], x):
                got = slide_inference(model.forward_logits, images, (24, 24), (16, 16), window_batch=window_batch)
                want = one[:images.shape[0]]
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
                assert torch.equal(got.argmax(1), want.argmax(1))
    calls = []
    slide_inference(lambda t: calls.append(t.shape[0]) or model.forward_logits(t), x[:1], (24, 24), (16, 16),
                    window_batch=3)
    assert calls == [3, 3, 2]  # 8 windows, 3 per forward pass
