"""MMSegmentation's train pipeline rules, checked against hand computations (spec §4.1)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from train import transforms as T

MEAN = np.array([123.675, 116.28, 103.53])
STD = np.array([58.395, 57.12, 57.375])


class Script:
    """Replaces torch.rand / torch.randint with scripted values and records the calls in order."""

    def __init__(self, monkeypatch, rand=(), randint=()):
        self.rand, self.randint, self.calls = list(rand), list(randint), []
        monkeypatch.setattr(torch, "rand", self._rand)
        monkeypatch.setattr(torch, "randint", self._randint)

    def _rand(self, *args, **kwargs):
        self.calls.append(("rand",))
        return torch.tensor(self.rand.pop(0), dtype=torch.float64)

    def _randint(self, low, high, size=None, **kwargs):
        self.calls.append(("randint", low, high))
        return torch.tensor(self.randint.pop(0))


def _image(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tv_tensors.Image(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g))


# ------------------------------------------------------------------------------------------ resize

@pytest.mark.parametrize("hw, scale_wh, rand, expected_hw", [
    # VOC 500x375 image, scale (2048, 512), r = 0.5 + 0.5 * 1.5 = 1.25 -> target (2560, 640):
    # s = min(2560/500, 640/375) = 1.70667 -> (int(500 s + .5), int(375 s + .5)) = (853, 640)
    ((375, 500), (2048, 512), 0.5, (640, 853)),
    # Cityscapes 2048x1024 at r = 0.5 -> target (1024, 512) -> s = 0.5 -> 1024x512
    ((1024, 2048), (2048, 1024), 0.0, (512, 1024)),
    # r -> 2.0 (upper end): target (4096, 2048): s = min(4096/2048, 2048/1024) = 2
    ((1024, 2048), (2048, 1024), 1.0, (2048, 4096)),
])
def test_ratio_resize_uses_mmcv_keep_ratio_rule(monkeypatch, hw, scale_wh, rand, expected_hw):
    t = T.RandomRescale(scale_wh, (0.5, 2.0))
    Script(monkeypatch, rand=[rand])
    params = t.make_params([tv_tensors.Image(torch.zeros(3, *hw, dtype=torch.uint8))])
    assert params["size_hw"] == expected_hw


def test_ratio_resize_keeps_mask_labels_and_resizes_image_bilinear(monkeypatch):
    img = _image(20, 30)
    mask = tv_tensors.Mask(torch.arange(600, dtype=torch.uint8).reshape(20, 30) % 7)
    t = T.RandomRescale((60, 40), (1.0, 1.0))  # s = min(60/30, 40/20) = 2 -> 40x60
    out_img, out_mask = t(img, mask)
    assert out_img.shape == (3, 40, 60) and out_mask.shape == (40, 60)
    assert out_img.dtype == torch.uint8 and isinstance(out_mask, tv_tensors.Mask)
    # nearest: output pixel (y, x) takes source (floor(y/2), floor(x/2)) (cv2 INTER_NEAREST)
    assert torch.equal(out_mask, mask.repeat_interleave(2, 0).repeat_interleave(2, 1))
    # bilinear with half-pixel centres: pixel (1, 1) of a 2x upscale = 0.75*src[0,0] + 0.25*src[1,1] mix
    src = img.double()
    want = (0.75 * 0.75 * src[:, 0, 0] + 0.75 * 0.25 * (src[:, 0, 1] + src[:, 1, 0]) + 0.25 * 0.25 * src[:, 1, 1])
    assert torch.allclose(out_img[:, 1, 1].double(), torch.floor(want + 0.5), atol=1)


# ------------------------------------------------------------------------------------------ crop

def _crop_mask():
    m = torch.zeros(100, 100, dtype=torch.uint8)
    m[0:10, 0:20] = 1  # the 20x20 box at (0, 0) holds classes 0 and 1, 200 pixels each: share 0.5
    return tv_tensors.Mask(m)


def test_crop_accepts_the_first_box_passing_the_cat_max_ratio_check(monkeypatch):
    inputs = [_image(100, 100), _crop_mask()]
    # boxes drawn as (top, left): three single-class boxes, then the good one at (0, 0)
    script = Script(monkeypatch, randint=[50, 50, 60, 10, 70, 70, 0, 0, 5, 5])
    t = T.CatMaxRandomCrop((20, 20), cat_max_ratio=0.75)
    params = t.make_params(inputs)
    assert params["box"] == (0, 0, 20, 20) and params["checks"] == 4
    # offsets drawn uniformly in [0, H - h] and [0, W - w]: randint(0, 81)
    assert script.calls[:2] == [("randint", 0, 81), ("randint", 0, 81)]
    assert len(script.calls) == 8  # 4 boxes, 2 draws each; the 5th box is never drawn


def test_crop_uses_the_eleventh_box_unchecked_after_ten_failures(monkeypatch):
    # 11 failing boxes then a good one that must never be reached
    offsets = []
    for i in range(11):
        offsets += [40 + i, 40 + i]
    inputs = [_image(100, 100), _crop_mask()]
    script = Script(monkeypatch, randint=offsets + [0, 0])
    t = T.CatMaxRandomCrop((20, 20), cat_max_ratio=0.75)
    params = t.make_params(inputs)
    assert params["checks"] == 10
    assert params["box"] == (50, 50, 20, 20)  # the 11th draw
    assert len(script.calls) == 22


def test_crop_check_ignores_255_and_needs_share_strictly_below_the_ratio():
    m = torch.zeros(4, 4, dtype=torch.uint8)
    m[:, :1] = 255
    assert not T.crop_is_acceptable(m, 0.75)  # only class 0 besides ignore
    m[0, 1:4] = 1  # 3 of 12 labelled pixels are class 1: share of class 0 = 0.75 -> not < 0.75
    assert not T.crop_is_acceptable(m, 0.75)
    m[1, 1] = 1  # 4 of 12: share 8/12 < 0.75
    assert T.crop_is_acceptable(m, 0.75)


def test_crop_of_a_small_image_is_smaller_than_the_crop_size(monkeypatch):
    img = _image(40, 39)
    Script(monkeypatch, randint=[0, 7])
    t = T.CatMaxRandomCrop((64, 32), cat_max_ratio=1.0)  # no check, one draw
    params = t.make_params([img])
    assert params["box"] == (0, 7, 40, 32)
    out = t.transform(img, params)
    assert torch.equal(out, img[:, :, 7:39])


# ------------------------------------------------------------------------------------------ HSV

def _ref_rgb_to_hsv(r, g, b):
    """OpenCV RGB2HSV_b transcribed pixel by pixel (12-bit fixed point, hue range 180)."""
    r, g, b = int(r), int(g), int(b)
    v, vmin = max(r, g, b), min(r, g, b)
    diff = v - vmin
    sdiv = round((255 << 12) / v) if v else 0
    hdiv = round((180 << 12) / (6 * diff)) if diff else 0
    s = (diff * sdiv + (1 << 11)) >> 12
    if v == r:
        h = g - b
    elif v == g:
        h = b - r + 2 * diff
    else:
        h = r - g + 4 * diff
    h = (h * hdiv + (1 << 11)) >> 12
    return (h + 180 if h < 0 else h), s, v


def _ref_hsv_to_rgb(h, s, v, vector_path):
    h, s, v = int(h), int(s), int(v)
    f = np.float32
    hh = f(h) * f(6.0 / 180.0)
    ss, vv = f(s) * f(1.0 / 255.0), f(v) * f(1.0 / 255.0)
    sector = int(hh)
    fr = hh - f(sector)
    p = vv * (f(1) - ss)
    q = vv * f(1.0 - float(ss) * float(fr))
    t = vv * f(1.0 - float(ss) * float(f(1) - fr))
    r, g, b = [(vv, t, p), (q, vv, p), (p, vv, t), (p, q, vv), (t, p, vv), (vv, p, q)][sector]
    conv = (lambda x: int(np.trunc(f(x) * f(255)))) if vector_path else (lambda x: int(np.rint(f(x) * f(255))))
    return conv(r), conv(g), conv(b)


@pytest.mark.parametrize("rgb, hsv", [
    ((255, 0, 0), (0, 255, 255)), ((0, 255, 0), (60, 255, 255)), ((0, 0, 255), (120, 255, 255)),
    ((255, 255, 0), (30, 255, 255)), ((128, 128, 128), (0, 0, 128)), ((0, 0, 0), (0, 0, 0)),
    ((255, 0, 128), (165, 255, 255)),  # hue 330 degrees: 360 - 60*128/255 = 329.9 -> /2 -> 165
])
def test_rgb_to_hsv_known_colours(rgb, hsv):
    img = torch.tensor(rgb, dtype=torch.uint8).view(3, 1, 1)
    assert tuple(T.rgb_to_hsv_uint8(img).flatten().tolist()) == hsv


def test_hsv_conversions_match_opencv_transcription_with_its_32_pixel_blocks():
    g = torch.Generator().manual_seed(3)
    img = torch.randint(0, 256, (3, 2, 40), dtype=torch.uint8, generator=g)  # 40 = one block + 8 tail
    hsv = T.rgb_to_hsv_uint8(img)
    for y in range(2):
        for x in range(40):
            assert tuple(hsv[:, y, x].tolist()) == _ref_rgb_to_hsv(*img[:, y, x].tolist())
    hsv_in = torch.stack([torch.randint(0, 180, (2, 40), generator=g), torch.randint(0, 256, (2, 40), generator=g),
                          torch.randint(0, 256, (2, 40), generator=g)]).to(torch.uint8)
    rgb = T.hsv_to_rgb_uint8(hsv_in)
    for y in range(2):
        for x in range(40):
            assert tuple(rgb[:, y, x].tolist()) == _ref_hsv_to_rgb(*hsv_in[:, y, x].tolist(), vector_path=x < 32)


# ------------------------------------------------------------------------------------------ photometric

def _ref_convert(a, alpha=1.0, beta=0.0):
    return np.clip(a.astype(np.float32) * np.float32(alpha) + np.float32(beta), 0, 255).astype(np.uint8)


def _ref_photometric(img, p):
    """MMSeg's PhotoMetricDistortion.transform for given draws, on an (H, W, 3) RGB uint8 array."""
    def to_hsv(a):
        return np.array([[_ref_rgb_to_hsv(*a[y, x]) for x in range(a.shape[1])] for y in range(a.shape[0])],
                        dtype=np.int64)

    def to_rgb(hsv):
        return np.array([[_ref_hsv_to_rgb(*hsv[y, x], vector_path=x < 32) for x in range(hsv.shape[1])]
                         for y in range(hsv.shape[0])], dtype=np.uint8)

    if p["brightness"] is not None:
        img = _ref_convert(img, beta=p["brightness"])
    if p["contrast_first"] and p["contrast"] is not None:
        img = _ref_convert(img, alpha=p["contrast"])
    if p["saturation"] is not None:
        hsv = to_hsv(img)
        hsv[..., 1] = _ref_convert(hsv[..., 1].astype(np.uint8), alpha=p["saturation"])
        img = to_rgb(hsv)
    if p["hue"] is not None:
        hsv = to_hsv(img)
        hsv[..., 0] = (hsv[..., 0] + p["hue"]) % 180
        img = to_rgb(hsv)
    if not p["contrast_first"] and p["contrast"] is not None:
        img = _ref_convert(img, alpha=p["contrast"])
    return img


@pytest.mark.parametrize("params", [
    {"brightness": 20.7, "contrast_first": True, "contrast": 1.3, "saturation": 0.6, "hue": -18},
    {"brightness": -31.2, "contrast_first": False, "contrast": 0.55, "saturation": 1.4, "hue": 7},
    {"brightness": None, "contrast_first": False, "contrast": 1.49, "saturation": None, "hue": 17},
])
def test_photometric_distortion_matches_mmseg_steps_in_order(params):
    img = _image(3, 36, seed=5)
    got = T.PhotoMetricDistortion.apply(img.as_subclass(torch.Tensor), params)
    want = _ref_photometric(img.permute(1, 2, 0).numpy(), params)
    assert np.array_equal(got.permute(1, 2, 0).numpy(), want)


def test_contrast_first_and_last_differ_when_it_matters():
    img = _image(2, 8, seed=1).as_subclass(torch.Tensor)
    base = {"brightness": None, "contrast": 1.5, "saturation": 1.5, "hue": None}
    first = T.PhotoMetricDistortion.apply(img, {**base, "contrast_first": True})
    last = T.PhotoMetricDistortion.apply(img, {**base, "contrast_first": False})
    assert not torch.equal(first, last)


def test_photometric_draws_follow_mmseg_order_and_ranges(monkeypatch):
    # mode 0 (contrast last): coin, U(-32,32), mode, coin(sat), U, coin(hue), randint(-18,18), coin(contrast), U
    script = Script(monkeypatch, randint=[1, 0, 1, 1, -18, 1], rand=[0.75, 0.5, 0.25])
    params = T.PhotoMetricDistortion().make_params([])
    assert params == {"brightness": 16.0, "contrast_first": False, "saturation": 1.0, "hue": -18,
                      "contrast": 0.75}
    assert script.calls == [("randint", 0, 2), ("rand",), ("randint", 0, 2), ("randint", 0, 2), ("rand",),
                            ("randint", 0, 2), ("randint", -18, 18), ("randint", 0, 2), ("rand",)]
    # mode 1 (contrast first): its coin and alpha come right after the mode draw; all coins 0 skip
    script = Script(monkeypatch, randint=[0, 1, 1, 0, 0], rand=[0.0])
    params = T.PhotoMetricDistortion().make_params([])
    assert params == {"brightness": None, "contrast_first": True, "saturation": None, "hue": None,
                      "contrast": 0.5}
    assert [c[0] for c in script.calls] == ["randint", "randint", "randint", "rand", "randint", "randint"]


# ------------------------------------------------------------------------------------------ normalize + pad

def test_pipeline_normalizes_then_pads_image_with_zero_and_mask_with_255():
    img = _image(40, 50, seed=2)
    mask = tv_tensors.Mask(torch.randint(0, 3, (40, 50), dtype=torch.uint8))
    t = T.build_train_transforms(crop_size_hw=(64, 64), img_scale_wh=(50, 40), ratio_range=(1.0, 1.0),
                                 flip_prob=0.0, photometric=False)
    x, y = t(img, mask)
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and y.shape == (64, 64)
    want = (img.permute(1, 2, 0).numpy().astype(np.float64) - MEAN) / STD
    assert np.allclose(x[:, :40, :50].permute(1, 2, 0).numpy(), want, atol=1e-5)
    assert torch.all(x[:, 40:, :] == 0) and torch.all(x[:, :, 50:] == 0)
    assert torch.equal(y[:40, :50], mask) and torch.all(y[40:, :] == 255) and torch.all(y[:, 50:] == 255)


def test_pipeline_is_reproducible_under_a_seed_and_varies_across_seeds():
    img = _image(90, 120, seed=4)
    mask = tv_tensors.Mask(torch.randint(0, 3, (90, 120), dtype=torch.uint8))
    t = T.build_train_transforms(crop_size_hw=(64, 64), img_scale_wh=(256, 64))
    outs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        outs.append(t(img, mask))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert not torch.equal(outs[0][0], outs[2][0])


def test_horizontal_flip_is_the_stock_v2_transform_flipping_image_and_mask_together():
    img = _image(40, 40, seed=6)
    mask = tv_tensors.Mask(torch.arange(1600).reshape(40, 40) % 5)
    t = T.build_train_transforms(crop_size_hw=(40, 40), img_scale_wh=(40, 40), ratio_range=(1.0, 1.0),
                                 cat_max_ratio=1.0, flip_prob=1.0, photometric=False)
    x, y = t(img, mask)
    assert torch.equal(y, mask.flip(-1))
    want = (img.flip(-1).permute(1, 2, 0).numpy().astype(np.float64) - MEAN) / STD
    assert np.allclose(x.permute(1, 2, 0).numpy(), want, atol=1e-5)
