"""From one raw image to the final label map exactly as MMSegmentation 0.x does it (spec §3.1–3.3).

Single scale (0.x ``simple_test``): keep-ratio resize to the config's test scale → normalize →
``model.inference`` (whole or slide, zoo/inference.py) → bilinear resize of the logits to the original size
with the variant's ``align_corners`` → softmax → argmax.

Multi-scale + flip (0.x ``tools/test.py --aug-test``): for each ratio r in 0.5…1.75 the target is
``(int(W·r), int(H·r))`` of the *config* scale, then keep-ratio resized (so for ADE/VOC it is not r × the
image); each scale is run plain and horizontally flipped (flip after resize, as ``RandomFlip`` follows
``Resize``); every view's logits are resized to the original size, softmaxed and un-flipped, and the 12
probability maps are averaged (in 0.x's order: r0, r0-flip, r1, …) before the argmax. 1.x's TTA, which
scales the original image instead, gives different sizes for ADE/VOC and is *not* what the published
ms+flip numbers used.

>>> import torch
>>> from eval.inference import TestSettings, view_plan
>>> s = TestSettings(scale_wh=(2048, 512))
>>> [(hw, flip) for hw, flip in view_plan((375, 500), s, aug_test=True)][:3]
[((256, 341), False), ((256, 341), True), ((384, 512), False)]
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from eval.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize, rescale_size, resize_image, scaled_pair

MS_FLIP_RATIOS: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``"bf16"`` / ``"bfloat16"`` / ``torch.bfloat16`` → ``torch.bfloat16``; None → float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16") from None


@dataclass(frozen=True)
class TestSettings:
    """What the test pipeline needs from a variant: scale, normalization, ``align_corners``, TTA ratios."""

    __test__ = False  # not a pytest class, despite the name

    scale_wh: tuple[int, int]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    align_corners: bool = False
    ratios: tuple[float, ...] = MS_FLIP_RATIOS
    flip: bool = True

    @classmethod
    def from_config(cls, config: Any, scale_wh: Sequence[int] | None = None) -> TestSettings:
        """Settings of a ``zoo.VariantConfig``; ``scale_wh`` overrides the test scale (quick checks only).

        >>> from zoo import get_config
        >>> TestSettings.from_config(get_config("isanet_r50-d8_769x769_40k_cityscapes")).scale_wh
        (2049, 1025)
        """
        norm = config.img_norm
        scale = scale_wh if scale_wh is not None else config.test_img_scale_wh
        return cls(scale_wh=(int(scale[0]), int(scale[1])), mean=tuple(norm["mean"]), std=tuple(norm["std"]),
                   align_corners=bool(config.align_corners),
                   ratios=tuple(float(r) for r in (config.ms_flip_ratios or MS_FLIP_RATIOS)),
                   flip=bool(getattr(config, "ms_flip", True)))

    @classmethod
    def from_model(cls, model: torch.nn.Module, scale_wh: Sequence[int] | None = None) -> TestSettings:
        """Settings of a zoo model (its ``config``; ``align_corners`` from the model itself)."""
        model = _unwrap(model)
        settings = cls.from_config(model.config, scale_wh)
        align = getattr(model, "align_corners", settings.align_corners)
        return settings if align == settings.align_corners else replace(settings, align_corners=bool(align))


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # DistributedDataParallel / DataParallel keep the real model in .module; .inference lives there.
    return model.module if hasattr(model, "module") and isinstance(model.module, torch.nn.Module) else model


def view_plan(image_hw: Sequence[int], settings: TestSettings, aug_test: bool = False
              ) -> list[tuple[tuple[int, int], bool]]:
    """The (resized (h, w), flipped) views 0.x runs for one image, in its order."""
    if not aug_test:
        return [(rescale_size(image_hw, settings.scale_wh), False)]
    views = []
    for ratio in settings.ratios:
        size = rescale_size(image_hw, scaled_pair(settings.scale_wh, ratio))
        views.append((size, False))
        if settings.flip:
            views.append((size, True))
    return views


def _autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.inference_mode()
def segment_probs(model: torch.nn.Module, image: torch.Tensor, settings: TestSettings | None = None, *,
                  aug_test: bool = False, dtype: str | torch.dtype | None = None,
                  device: str | torch.device | None = None) -> torch.Tensor:
    """Class probabilities (1, K, H, W) float32 at the image's original size, as 0.x's ``inference``.

    ``image``: uint8 RGB (3, H, W) as read from disk. ``model`` needs ``inference(x) -> logits at x's size``
    (any ``zoo`` model; a plain module is called instead) and is used in whatever mode it is in — call
    ``model.eval()`` first. ``dtype`` runs the network under autocast; resizes and softmax stay float32.
    """
    model = _unwrap(model)
    settings = settings or TestSettings.from_model(model)
    dtype = parse_dtype(dtype)
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected one RGB image (3, H, W), got shape {tuple(image.shape)}")
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else image.device
    device = torch.device(device)
    image = image.as_subclass(torch.Tensor).to(device)
    ori_hw = tuple(image.shape[-2:])
    forward = getattr(model, "inference", model)
    total = None
    views = view_plan(ori_hw, settings, aug_test)
    for size_hw, flip in views:
        x = normalize(resize_image(image, size_hw), settings.mean, settings.std).unsqueeze(0)
        if flip:
            x = x.flip(-1)
        with _autocast(device, dtype):
            logits = forward(x)
        logits = logits.float()
        if tuple(logits.shape[-2:]) != ori_hw:
            logits = F.interpolate(logits, size=ori_hw, mode="bilinear", align_corners=settings.align_corners)
        probs = logits.softmax(dim=1)
        if flip:
            probs = probs.flip(-1)
        total = probs if total is None else total.add_(probs)
    return total / len(views) if len(views) > 1 else total


def predict_label_map(model: torch.nn.Module, image: torch.Tensor, settings: TestSettings | None = None, *,
                      aug_test: bool = False, dtype: str | torch.dtype | None = None,
                      device: str | torch.device | None = None) -> torch.Tensor:
    """The final label map (H, W) int64 of one uint8 RGB image (3, H, W), exactly as 0.x produces it.

    >>> import torch
    >>> from zoo import create_model
    >>> model = create_model("isanet_r50-d8_512x1024_40k_cityscapes").eval()
    >>> image = torch.randint(0, 256, (3, 40, 80), dtype=torch.uint8)
    >>> settings = TestSettings.from_model(model, scale_wh=(128, 64))   # small scale: a quick CPU run
    >>> predict_label_map(model, image, settings).shape
    torch.Size([40, 80])
    """
    probs = segment_probs(model, image, settings, aug_test=aug_test, dtype=dtype, device=device)
    return probs.argmax(dim=1)[0]
