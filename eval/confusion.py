"""The confusion matrix as a heat map PNG, drawn with Pillow (no plotting library).

Rows are the labelled classes, columns the predicted ones, each row normalised to 100 % of that class's
labelled pixels (a dark diagonal is good; a dark off-diagonal cell is a confusion). Class names label both
axes. Up to ``max_classes`` classes every class gets a row and a column; with more (ADE20K's 150) the map is
a summary: the ``max_classes`` classes with the most labelled pixels, plus one "(other classes)" row and
column that add up the rest, so every row still sums to 100 %.

>>> import torch
>>> image = heatmap(torch.tensor([[8, 2], [1, 9]]), ["road", "sky"])
>>> image.mode, image.getpixel(cell_pixel(image, 0, 0)) == colour_of(0.8)
('RGB', True)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

MAX_CLASSES = 40
LOW, HIGH = (255, 255, 255), (8, 48, 107)  # 0 % white → 100 % dark blue
EMPTY = (225, 225, 225)  # a class without labelled pixels: its row has nothing to normalise


def colour_of(value: float) -> tuple[int, int, int]:
    """The heat map colour of a row share in [0, 1]."""
    v = min(1.0, max(0.0, float(value)))
    return tuple(int(round(lo + (hi - lo) * v)) for lo, hi in zip(LOW, HIGH))  # type: ignore[return-value]


def summarize(matrix: torch.Tensor, classes: Sequence[str], max_classes: int = MAX_CLASSES
              ) -> tuple[torch.Tensor, list[str]]:
    """(matrix, names) with at most ``max_classes`` classes plus an "(other classes)" row/column summing the rest.

    >>> m, names = summarize(torch.tensor([[5, 1, 0], [0, 1, 0], [2, 0, 9]]), ["a", "b", "c"], 2)
    >>> names, m.tolist()
    (['a', 'c', '(other classes)'], [[5, 0, 1], [2, 9, 0], [0, 0, 1]])
    """
    k = matrix.shape[0]
    if k <= max_classes:
        return matrix, list(classes)
    rows = matrix.sum(dim=1)
    keep = sorted(sorted(range(k), key=lambda c: (-int(rows[c]), c))[:max_classes])
    rest = [c for c in range(k) if c not in set(keep)]
    index = torch.tensor(keep)
    other = torch.tensor(rest)
    size = len(keep) + 1
    out = torch.zeros(size, size, dtype=matrix.dtype)
    out[:-1, :-1] = matrix[index][:, index]
    out[:-1, -1] = matrix[index][:, other].sum(dim=1)
    out[-1, :-1] = matrix[other][:, index].sum(dim=0)
    out[-1, -1] = matrix[other][:, other].sum()
    return out, [classes[c] for c in keep] + ["(other classes)"]


def _layout(n: int) -> tuple[int, int]:
    """(cell size, font size) for n rows."""
    if n <= 20:
        return 30, 12
    if n <= 30:
        return 22, 11
    return 16, 10


def heatmap(matrix: torch.Tensor, classes: Sequence[str], *, max_classes: int = MAX_CLASSES,
            title: str | None = None) -> Image.Image:
    """The row-normalised heat map of a K×K confusion matrix (rows: labels, columns: predictions), as RGB."""
    k = matrix.shape[0]
    shown, names = summarize(matrix.long().cpu(), [c.strip() or repr(c) for c in classes], max_classes)
    n = shown.shape[0]
    cell, size = _layout(n)
    font = ImageFont.load_default(size=size)
    small = ImageFont.load_default(size=max(8, size - 3))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(int(probe.textlength(name, font=font)) for name in names) + 8
    pad = 10
    if title is None:
        title = "confusion matrix, each row normalised to 100 % of its labelled pixels"
        if n < k:
            title += f" (the {n - 1} of {k} classes with the most labelled pixels; '(other classes)' sums the rest)"
    axis_h = size + 8
    left = pad + axis_h + text_w
    top = pad + axis_h + axis_h + text_w
    bar_h = 14
    width = max(left + n * cell + pad, int(probe.textlength(title, font=font)) + 2 * pad)
    height = top + n * cell + pad + bar_h + size + 2 * pad
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.text((pad, pad), title, fill=(0, 0, 0), font=font)
    draw.text((left, pad + axis_h), "predicted class ->", fill=(0, 0, 0), font=font)
    # the label axis title, written vertically
    axis = Image.new("RGB", (int(probe.textlength("labelled class ->", font=font)) + 4, size + 4), (255, 255, 255))
    ImageDraw.Draw(axis).text((2, 0), "labelled class ->", fill=(0, 0, 0), font=font)
    axis = axis.rotate(90, expand=True)
    image.paste(axis, (pad, top))
    # column names, vertical
    column = Image.new("RGB", (text_w, n * cell), (255, 255, 255))
    col_draw = ImageDraw.Draw(column)
    for j, name in enumerate(names):
        # rotated a quarter turn anticlockwise below: text starting at x=4 ends up starting next to the cells
        col_draw.text((4, j * cell + (cell - size) // 2), name, fill=(0, 0, 0), font=font)
    image.paste(column.rotate(90, expand=True), (left, top - text_w))
    rows = shown.sum(dim=1)
    for i, name in enumerate(names):
        y = top + i * cell
        draw.text((left - 4 - int(probe.textlength(name, font=font)), y + (cell - size) // 2), name, fill=(0, 0, 0),
                  font=font)
        total = int(rows[i])
        for j in range(n):
            x = left + j * cell
            share = float(shown[i, j]) / total if total else None
            fill = EMPTY if share is None else colour_of(share)
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=fill)
            if share is not None and cell >= 22 and share >= 0.005:
                text = f"{share * 100:.0f}"
                ink = (255, 255, 255) if share > 0.5 else (0, 0, 0)
                draw.text((x + (cell - probe.textlength(text, font=small)) / 2, y + (cell - size + 3) / 2), text,
                          fill=ink, font=small)
    grid = (200, 200, 200)
    for t in range(n + 1):
        draw.line([left, top + t * cell, left + n * cell, top + t * cell], fill=grid)
        draw.line([left + t * cell, top, left + t * cell, top + n * cell], fill=grid)
    # colour bar: 0 % … 100 %
    y = top + n * cell + pad
    bar_w = max(100, min(n * cell, 300))
    for x in range(bar_w):
        draw.line([left + x, y, left + x, y + bar_h], fill=colour_of(x / (bar_w - 1)))
    draw.rectangle([left, y, left + bar_w, y + bar_h], outline=(0, 0, 0))
    draw.text((left, y + bar_h + 2), "0 %", fill=(0, 0, 0), font=small)
    draw.text((left + bar_w - int(probe.textlength("100 %", font=small)), y + bar_h + 2), "100 %", fill=(0, 0, 0),
              font=small)
    draw.text((left + bar_w + pad, y), "grey row: no labelled pixels", fill=(90, 90, 90), font=small)
    image.info["cells"] = (left, top, cell, n)
    return image


def cell_pixel(image: Image.Image, row: int, col: int) -> tuple[int, int]:
    """A pixel of cell (row, col) of an image made by :func:`heatmap` that shows the cell's fill colour: two
    pixels inside its top-left corner (the centre may hold the cell's number)."""
    left, top, cell, _ = image.info["cells"]
    return left + col * cell + 2, top + row * cell + 2
