"""Error pictures: image | ground truth | prediction | error map, side by side, with a legend.

The error map shows the image dimmed where the prediction is right, :data:`ERROR_COLOUR` where it is wrong
and :data:`IGNORE_COLOUR` where the label is ``ignore_index`` (not scored); the ground-truth panel shows
ignored pixels in the same grey. The legend lists the classes present in the label or the prediction (share
of the labelled pixels) and the two fixed colours. Panels wider than ``max_width`` are scaled down (labels
with nearest neighbour, so no colour is invented).

:class:`WorstImages` keeps the N lowest-scoring images seen so far (a heap: memory for N pictures' inputs,
not for the whole dataset).

>>> import numpy as np, torch
>>> image = torch.zeros(3, 4, 6, dtype=torch.uint8)
>>> label = torch.tensor([[0] * 6, [1] * 6, [255] * 6, [0] * 6])
>>> pred = torch.zeros(4, 6, dtype=torch.long)
>>> picture = error_picture(image, label, pred, ["a", "b"], [(10, 10, 10), (20, 20, 20)])
>>> picture.getpixel(panel_origin(picture, 3, y=1, x=0)) == ERROR_COLOUR   # row 1: b predicted as a
True
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from zoo.visualize import colorize, draw_legend

ERROR_COLOUR = (0, 255, 255)  # cyan: wrong pixels in the error map (no Cityscapes class has it)
IGNORE_COLOUR = (150, 150, 150)  # grey: pixels the label leaves unscored
PANELS = ("image", "ground truth", "prediction", "errors")
CAPTION_H, GAP = 18, 6


def error_picture(image: torch.Tensor, label: torch.Tensor, pred: torch.Tensor, classes: Sequence[str],
                  palette: Sequence[Sequence[int]], ignore_index: int = 255, max_width: int = 640,
                  title: str | None = None) -> Image.Image:
    """The four panels and the legend as one RGB picture; ``image`` uint8 (3, H, W), ``label``/``pred`` (H, W)."""
    rgb = image.permute(1, 2, 0).cpu().numpy()
    lab = label.cpu().numpy().astype(np.int64)
    prd = pred.cpu().numpy().astype(np.int64)
    h, w = lab.shape
    ignored = lab == ignore_index
    wrong = (lab != prd) & ~ignored
    k = len(classes)
    gt = colorize(np.where(ignored, 0, np.clip(lab, 0, None)), palette)
    gt[ignored] = IGNORE_COLOUR
    pr = colorize(np.clip(prd, 0, None), palette)
    err = (rgb.astype(np.float32) * 0.35 + 0.5).astype(np.uint8)  # dimmed image: right pixels show context
    err[wrong] = ERROR_COLOUR
    err[ignored] = IGNORE_COLOUR
    scale = min(1.0, max_width / w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    panels = []
    for array, smooth in ((rgb, True), (gt, False), (pr, False), (err, False)):
        panel = Image.fromarray(np.ascontiguousarray(array))
        if size != (w, h):
            panel = panel.resize(size, Image.BILINEAR if smooth else Image.NEAREST)
        panels.append(panel)
    labelled = int((~ignored).sum())
    counts = np.bincount(lab[~ignored].clip(0, k), minlength=k + 1)[:k]
    present = sorted(set(np.flatnonzero(counts).tolist()) | set(np.unique(prd[(prd >= 0) & (prd < k)]).tolist()))
    present.sort(key=lambda c: (-int(counts[c]), c))
    shares = [(c, float(counts[c]) / labelled if labelled else 0.0) for c in present]
    shares += [(k, float(wrong.sum()) / labelled if labelled else 0.0), (k + 1, float(ignored.mean()))]
    names = list(classes) + ["wrong (error map)", "ignored (not scored)"]
    colours = [tuple(int(v) for v in c) for c in palette[:k]] + [ERROR_COLOUR, IGNORE_COLOUR]
    legend = draw_legend(shares, names, colours)
    pw, ph = size
    top = CAPTION_H + (CAPTION_H if title else 0)
    width = 4 * pw + 5 * GAP + legend.width
    height = max(top + ph + GAP, legend.height + top)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=12)
    if title:
        draw.text((GAP, 2), title, fill=(0, 0, 0), font=font)
    captions = list(PANELS)
    captions[3] = f"errors ({float(wrong.sum()) / labelled * 100 if labelled else 0:.1f}% wrong)"
    for i, (panel, caption) in enumerate(zip(panels, captions)):
        x = GAP + i * (pw + GAP)
        canvas.paste(panel, (x, top))
        draw.text((x, top - CAPTION_H + 2), caption, fill=(0, 0, 0), font=font)
    canvas.paste(legend, (GAP + 4 * (pw + GAP), top))
    canvas.info["panels"] = (GAP, top, pw, ph, scale)
    return canvas


def panel_origin(picture: Image.Image, panel: int, y: int = 0, x: int = 0) -> tuple[int, int]:
    """Where pixel (y, x) of the original image lands in ``panel`` (0 image … 3 errors) of an
    :func:`error_picture` (for checks)."""
    gap, top, pw, _, scale = picture.info["panels"]
    return gap + panel * (pw + gap) + int(x * scale), top + int(y * scale)


class WorstImages:
    """The ``n`` images with the lowest score (ties: the one seen first stays), for error pictures.

    ``offer(score, key, make)`` calls ``make()`` for the payload only when the image gets in, so the
    inputs of an image that is not among the worst are never copied.
    """

    def __init__(self, n: int) -> None:
        self.n = max(0, int(n))
        self._heap: list[tuple[float, int, Any, Any]] = []  # (-score, -order, key, payload): a max-heap of scores
        self._order = itertools.count()

    def offer(self, score: float, key: Any, make: Any) -> None:
        """Consider an image with ``score`` (NaN scores are skipped: nothing was labelled)."""
        if self.n == 0 or score != score:
            return
        item = (-float(score), -next(self._order))
        if len(self._heap) < self.n:
            heapq.heappush(self._heap, (*item, key, make()))
        elif item > self._heap[0][:2]:  # lower score than the best of the kept ones
            heapq.heapreplace(self._heap, (*item, key, make()))

    def items(self) -> list[tuple[float, Any, Any]]:
        """(score, key, payload), worst first."""
        return [(-s, key, payload) for s, _, key, payload in sorted(self._heap, key=lambda t: (-t[0], -t[1]))]
