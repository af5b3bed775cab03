"""Whole-image and sliding-window inference exactly as MMSegmentation 0.x runs them (spec §3.2)."""
from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import torch
import torch.nn.functional as F

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def whole_inference(fn: LogitsFn, x: torch.Tensor) -> torch.Tensor:
    """Logits of the whole batch at its own size; `fn` maps (N, 3, h, w) to (N, K, h, w)."""
    return fn(x)


def slide_windows(h: int, w: int, crop_hw: Sequence[int], stride_hw: Sequence[int]
                  ) -> List[Tuple[int, int, int, int]]:
    """Window boxes (y1, y2, x1, x2) in MMSeg's order; windows are shifted back inside the image.

    Example:
        >>> [(y1, x1) for y1, _, x1, _ in slide_windows(1025, 2049, (769, 769), (513, 513))]
        [(0, 0), (0, 513), (0, 1026), (0, 1280), (256, 0), (256, 513), (256, 1026), (256, 1280)]
    """
    crop_h, crop_w = crop_hw
    stride_h, stride_w = stride_hw
    h_grids = max(h - crop_h + stride_h - 1, 0) // stride_h + 1
    w_grids = max(w - crop_w + stride_w - 1, 0) // stride_w + 1
    boxes = []
    for r in range(h_grids):
        for c in range(w_grids):
            y1, x1 = r * stride_h, c * stride_w
            y2, x2 = min(y1 + crop_h, h), min(x1 + crop_w, w)
            y1, x1 = max(y2 - crop_h, 0), max(x2 - crop_w, 0)
            boxes.append((y1, y2, x1, x2))
    return boxes


def slide_inference(fn: LogitsFn, x: torch.Tensor, crop_hw: Sequence[int], stride_hw: Sequence[int],
                    align_corners: bool = False) -> torch.Tensor:
    """Average of the window logits on a zero canvas (spec §3.2); returns (N, K, H, W).

    `fn` returns logits at its input size (e.g. `ISANet.encode_decode`, which already resizes with
    the variant's `align_corners`); `align_corners` is kept for callers whose `fn` returns
    lower-resolution logits, which are then resized to the window size here.
    """
    n, _, h, w = x.shape
    canvas = None
    count = x.new_zeros((1, 1, h, w))
    for y1, y2, x1, x2 in slide_windows(h, w, crop_hw, stride_hw):
        logits = fn(x[:, :, y1:y2, x1:x2])
        if logits.shape[2:] != (y2 - y1, x2 - x1):
            logits = F.interpolate(logits, size=(y2 - y1, x2 - x1), mode="bilinear",
                                   align_corners=align_corners)
        if canvas is None:
            canvas = logits.new_zeros((n, logits.shape[1], h, w))
        # MMSeg pads each window's logits into the full canvas; adding in place is the same sum
        canvas[:, :, y1:y2, x1:x2] += logits
        count[:, :, y1:y2, x1:x2] += 1
    return canvas / count.to(canvas.dtype)
