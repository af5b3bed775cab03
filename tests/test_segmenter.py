"""`zoo.Segmenter`: photos in, label maps out, equal to the 0.x test pipeline written out independently here."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import zoo
from zoo import ModelMeta, Segmenter
from zoo.inference import TestSettings
from zoo.utils import IMAGENET_MEAN, IMAGENET_STD


def photo(h: int = 375, w: int = 500, seed: int = 0) -> np.ndarray:
    """A photo-like uint8 image: smooth colour fields plus texture (not white noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.int16)
    return np.clip(smooth + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)


def model_with(name: str, settings: TestSettings, num_classes: int = 5) -> zoo.ISANet:
    """A seeded random model whose classifier is not near-flat (no near-ties in the argmax)."""
    torch.manual_seed(0)
    config = zoo.get_config(name)
    meta = ModelMeta.for_variant(config, num_classes, test=settings)
    model = zoo.ISANet(config, num_classes=num_classes, meta=meta).eval()
    with torch.no_grad():
        model.decode_head.conv_seg.weight.normal_(0, 0.5)
    return model


def reference_labels(model: torch.nn.Module, image: np.ndarray, settings: TestSettings) -> torch.Tensor:
    """Spec §3: keep-ratio resize (cv2's bilinear on uint8), normalise, model.inference, resize back, argmax."""
    h, w = image.shape[:2]
    scale = min(max(settings.scale_wh) / max(h, w), min(settings.scale_wh) / min(h, w))
    size = (int(h * scale + 0.5), int(w * scale + 0.5))
    x = torch.from_numpy(image).permute(2, 0, 1).float().unsqueeze(0)
    x = torch.floor(F.interpolate(x, size=size, mode="bilinear", align_corners=False) + 0.5).clamp(0, 255)
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = model.inference(x)
    logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=settings.align_corners)
    return logits.softmax(1).argmax(1)[0]


@pytest.mark.parametrize("name, mode", [("isanet_r50-d8_512x512_20k_voc12aug", "whole"),
                                        ("isanet_r50-d8_769x769_40k_cityscapes", "slide")])
def test_segmenter_on_a_photo_equals_the_reference_test_pipeline(name, mode):
    base = TestSettings.from_config(zoo.get_config(name))
    # small scales keep the CPU run short; slide: several overlapping windows
    settings = dataclasses.replace(base, scale_wh=(256, 192)) if mode == "whole" else \
        dataclasses.replace(base, scale_wh=(240, 176), crop_hw=(128, 128), stride_hw=(96, 96))
    model = model_with(name, settings)
    image = photo()
    seg = Segmenter(model, device="cpu", dtype="float32")
    assert seg.settings.mode == mode and seg.settings.align_corners == (mode == "slide")
    got = seg(image)
    assert got.shape == (375, 500) and got.dtype == torch.uint8
    # the same network (the Segmenter's BN-folded copy) through the reference pipeline: the same labels
    assert torch.equal(got.long(), reference_labels(seg.model, image, settings))
    # the unfused model differs by rounding only: labels flip only where two classes tie to ~1e-6
    assert (got.long() == reference_labels(model, image, settings)).float().mean() > 0.9999


def test_batched_call_equals_one_by_one_and_inputs_of_every_kind_agree(tmp_path):
    settings = dataclasses.replace(TestSettings.from_config(zoo.get_config("isanet_r50-d8_512x512_20k_voc12aug")),
                                   scale_wh=(96, 64))
    seg = Segmenter(model_with("isanet_r50-d8_512x512_20k_voc12aug", settings), device="cpu", dtype="float32")
    images = [photo(90, 120, 1), photo(90, 120, 2), photo(70, 64, 3), photo(90, 120, 4)]
    batched = seg(images)
    single = [seg(im) for im in images]
    assert all(torch.equal(a, b) for a, b in zip(batched, single))
    path = tmp_path / "p.png"
    Image.fromarray(images[2]).save(path)
    kinds = [str(path), path, Image.open(path), images[2], torch.from_numpy(images[2]),
             torch.from_numpy(images[2]).permute(2, 0, 1)]
    for kind in kinds:
        assert torch.equal(seg(kind), single[2]), type(kind)
    probs = seg(images[2], probs=True)
    assert probs.shape == (5, 70, 64) and torch.allclose(probs.sum(0), torch.ones(70, 64), atol=1e-5)
    assert torch.equal(probs.argmax(0).to(torch.uint8), single[2])


def test_segmenter_names_bad_inputs():
    settings = TestSettings(scale_wh=(64, 48))
    seg = Segmenter(model_with("isanet_r50-d8_512x512_20k_voc12aug", settings), device="cpu")
    with pytest.raises(ValueError, match="uint8"):
        seg(np.zeros((40, 40, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="megapixels"):
        Segmenter(model_with("isanet_r50-d8_512x512_20k_voc12aug", settings), device="cpu", max_pixels=100)(
            photo(40, 40))
    with pytest.raises(TypeError, match="path, PIL image"):
        seg(42)
