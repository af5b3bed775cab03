"""The 0.x test pipeline without cv2: keep-ratio size rule, bilinear image resize, nearest mask resize, normalize.

Spec §3.1. ``rescale_size`` is mmcv's ``rescale_size`` rule exactly (Python float64 arithmetic, the same
``int(x + 0.5)`` rounding). The resizes use ``torch.nn.functional.interpolate``:

* images: bilinear, ``align_corners=False``, ``antialias=False`` — cv2 ``INTER_LINEAR`` also samples at
  half-pixel centres (src = (dst + 0.5) · in/out − 0.5, clamped at the border) and does not low-pass when
  shrinking. mmcv resizes the *uint8* image, so the result is rounded back to integers 0..255 before
  normalization, as cv2 does. cv2 computes uint8 bilinear in 11-bit fixed point, so individual pixels may
  differ from this float computation by ±1 grey level (measured against opencv-python 5.0 through
  ``mmcv.imrescale`` on uniform-noise images at the spec's test scales: never more than 1 level, on ~13 %
  of pixels; an exact 2:1 shrink matched bit for bit). Label maps matched cv2 exactly.
* masks: nearest with ``mode="nearest"`` (src = floor(dst · in/out)), which is cv2 ``INTER_NEAREST``'s rule
  (not the half-pixel ``nearest-exact``).

>>> import torch
>>> from zoo.transforms import rescale_size, TestTransform
>>> rescale_size((1024, 2048), (2049, 1025))          # Cityscapes 769 configs, spec §3.1
(1025, 2049)
>>> rescale_size((375, 500), (2048, 512))             # VOC 500×375 → 683×512
(512, 683)
>>> x = TestTransform((2048, 512))(torch.zeros(3, 375, 500, dtype=torch.uint8))
>>> tuple(x.shape), x.dtype
((3, 512, 683), torch.float32)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .utils import IMAGENET_MEAN, IMAGENET_STD


def rescale_size(size_hw: Sequence[int], scale: float | Sequence[int]) -> tuple[int, int]:
    """New (height, width) of mmcv's keep-ratio resize (``mmcv.rescale_size``).

    ``scale`` is either a factor, or a pair whose order does not matter: the image is made as large as
    possible with its long side ≤ max(scale) and its short side ≤ min(scale):
    s = min(max(scale) / max(h, w), min(scale) / min(h, w)); new = (int(h·s + 0.5), int(w·s + 0.5)).

    >>> rescale_size((512, 512), (2048, 1024))
    (1024, 1024)
    >>> rescale_size((100, 40), 0.5)
    (50, 20)
    """
    h, w = int(size_hw[0]), int(size_hw[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"rescale_size: image size must be positive, got (h, w) = ({h}, {w})")
    if isinstance(scale, (int, float)):
        if scale <= 0:
            raise ValueError(f"rescale_size: scale factor must be positive, got {scale}")
        factor = float(scale)
    else:
        if len(scale) != 2 or min(scale) <= 0:
            raise ValueError(f"rescale_size: scale must be a positive factor or a (w, h) pair, got {scale!r}")
        factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    out = int(h * factor + 0.5), int(w * factor + 0.5)
    if min(out) < 1:  # an extreme aspect ratio: refuse here, not as a 0-sized tensor further on
        raise ValueError(f"an image of {h}x{w} (h x w) rescaled to the scale {scale} would be {out[0]}x{out[1]}: "
                         "a side of 0. Its aspect ratio is too extreme for this scale; crop or pad the image, or "
                         "leave it out")
    return out


def resize_image(image: torch.Tensor, size_hw: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of a uint8 image (3, H, W) or batch (N, 3, H, W), like cv2 ``INTER_LINEAR`` on uint8.

    Returns float32 with integer values in 0..255 (the rounding cv2 does when it writes uint8), on the
    image's device. A same-size resize is the identity, as in cv2.

    >>> import torch
    >>> resize_image(torch.full((3, 4, 4), 7, dtype=torch.uint8), (2, 8)).unique().tolist()
    [7.0]
    """
    batched = image.dim() == 4
    x = image if batched else image.unsqueeze(0)
    size = (int(size_hw[0]), int(size_hw[1]))
    if tuple(x.shape[-2:]) == size:
        out = x.float()
    else:
        out = torch.empty((x.shape[0], x.shape[1], *size), dtype=torch.float32, device=x.device)
        for c in range(x.shape[1]):  # a plane at a time: all of a 48-megapixel photo in float32 is 576 MB
            # contiguous: the NCHW kernel whatever the input's strides (channels_last rounds differently)
            plane = F.interpolate(x[:, c:c + 1].float().contiguous(), size=size, mode="bilinear",
                                  align_corners=False, antialias=False)
            # cv2 writes uint8 with round-half-up; floor(x + 0.5) reproduces that (torch.round is half-to-even).
            out[:, c:c + 1] = torch.floor(plane + 0.5).clamp_(0, 255)
    return out if batched else out.squeeze(0)


def resize_mask(mask: torch.Tensor, size_hw: Sequence[int]) -> torch.Tensor:
    """Nearest resize of a label map (H, W) or (N, H, W), any integer dtype; cv2 ``INTER_NEAREST``'s rule.

    >>> import torch
    >>> resize_mask(torch.tensor([[0, 1], [2, 3]], dtype=torch.uint8), (4, 4))[0].tolist()
    [0, 0, 1, 1]
    """
    size = (int(size_hw[0]), int(size_hw[1]))
    if tuple(mask.shape[-2:]) == size:
        return mask
    x = mask.unsqueeze(0) if mask.dim() == 2 else mask
    # Nearest on float is exact for labels < 2**24; interpolate has no integer kernel on every device.
    y = F.interpolate(x.unsqueeze(1).float(), size=size, mode="nearest").squeeze(1).to(mask.dtype)
    return y.squeeze(0) if mask.dim() == 2 else y


def normalize(image: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """(x − mean) / std per RGB channel on 0..255 values, float32; (3, H, W) or (N, 3, H, W)."""
    x = image.float()
    shape = (3, 1, 1)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(shape)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(shape)
    return (x - m) / s


class TestTransform:
    """The spec §3.1 test pipeline for one image: keep-ratio resize to ``scale_wh``, then normalize.

    Input: uint8 RGB (3, H, W) (a ``tv_tensors.Image`` is fine). Output: float32 (3, h, w) with
    (h, w) = ``rescale_size((H, W), scale_wh)``. The mask is not touched: the metric compares at the
    original resolution (§6).

    >>> import torch
    >>> TestTransform((2048, 1024))(torch.zeros(3, 1024, 2048, dtype=torch.uint8)).shape
    torch.Size([3, 1024, 2048])
    """

    __test__ = False  # not a pytest class, despite the name

    def __init__(self, scale_wh: float | Sequence[int], mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        self.scale_wh = scale_wh if isinstance(scale_wh, (int, float)) else tuple(int(v) for v in scale_wh)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"TestTransform expects an RGB image (3, H, W), got shape {tuple(image.shape)}")
        size = rescale_size(image.shape[-2:], self.scale_wh)
        return normalize(resize_image(image.as_subclass(torch.Tensor), size), self.mean, self.std)

    def __repr__(self) -> str:
        return f"TestTransform(scale_wh={self.scale_wh}, mean={self.mean}, std={self.std})"


def scaled_pair(scale_wh: Sequence[int], ratio: float) -> tuple[int, int]:
    """0.x ``MultiScaleFlipAug``'s per-ratio target: (int(W·r), int(H·r)) of the config scale (§3.3).

    >>> scaled_pair((2049, 1025), 1.25)
    (2561, 1281)
    """
    return int(scale_wh[0] * ratio), int(scale_wh[1] * ratio)

