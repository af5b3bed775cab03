"""Loss and mIoU curves as a PNG, drawn with Pillow's ImageDraw (no matplotlib).

Example:
    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "curves.png")
    >>> plot_curves([{"iter": 1, "loss": 2.0}, {"iter": 2, "loss": 1.5},
    ...              {"iter": 2, "mode": "val", "mIoU": 10.0}], p).size
    (800, 560)
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 800, 560
_MARGIN_L, _MARGIN_R, _MARGIN_T, _MARGIN_B = 70, 20, 30, 40


def read_log(path: Union[str, os.PathLike]) -> List[Dict]:
    """The records of a log.jsonl (unparseable lines, e.g. a half-written last line, are skipped)."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def _nice_ticks(lo: float, hi: float, n: int = 5) -> List[float]:
    if hi <= lo:
        hi = lo + 1.0
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 or float(v).is_integer() else f"{v:.3g}"


def _panel(draw: ImageDraw.ImageDraw, box: Tuple[int, int, int, int], series: Sequence[Tuple[float, float]],
           title: str, colour: Tuple[int, int, int], x_range: Tuple[float, float], font) -> None:
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=(0, 0, 0))
    draw.text((x0, y0 - 16), title, fill=(0, 0, 0), font=font)
    if not series:
        draw.text((x0 + 10, y0 + 10), "no data yet", fill=(120, 120, 120), font=font)
        return
    ys = [y for _, y in series if math.isfinite(y)]
    if not ys:
        return
    lo, hi = min(ys), max(ys)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    xlo, xhi = x_range

    def to_px(x: float, y: float) -> Tuple[float, float]:
        px = x0 + (x - xlo) / max(xhi - xlo, 1e-12) * (x1 - x0)
        py = y1 - (y - lo) / (hi - lo) * (y1 - y0)
        return px, py

    for t in _nice_ticks(lo, hi):
        _, py = to_px(xlo, t)
        if y0 <= py <= y1:
            draw.line([(x0, py), (x1, py)], fill=(225, 225, 225))
            draw.text((x0 - 60, py - 6), _fmt(t), fill=(0, 0, 0), font=font)
    for t in _nice_ticks(xlo, xhi):
        px, _ = to_px(t, lo)
        if x0 <= px <= x1:
            draw.text((px - 10, y1 + 4), _fmt(t), fill=(0, 0, 0), font=font)
    points = [to_px(x, y) for x, y in series if math.isfinite(y)]
    if len(points) > 1:
        draw.line(points, fill=colour, width=2)
    for px, py in points if len(points) <= 50 else points[-1:]:
        draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)


def plot_curves(records: Iterable[Dict], path: Union[str, os.PathLike], title: Optional[str] = None) -> Image.Image:
    """Draw training loss (top) and validation mIoU (bottom) against iteration; save PNG atomically."""
    records = list(records)
    loss = [(r["iter"], float(r["loss"])) for r in records if r.get("mode", "train") == "train" and "loss" in r]
    miou = [(r["iter"], float(r["mIoU"])) for r in records if r.get("mode") == "val" and "mIoU" in r]
    xs = [x for x, _ in loss + miou] or [0, 1]
    x_range = (0.0, float(max(xs)) or 1.0)
    img = Image.new("RGB", (WIDTH, HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    if title:
        draw.text((_MARGIN_L, 6), title, fill=(0, 0, 0), font=font)
    half = (HEIGHT - _MARGIN_T - _MARGIN_B) // 2
    top = (_MARGIN_L, _MARGIN_T + 14, WIDTH - _MARGIN_R, _MARGIN_T + half - 20)
    bottom = (_MARGIN_L, _MARGIN_T + half + 24, WIDTH - _MARGIN_R, HEIGHT - _MARGIN_B)
    _panel(draw, top, loss, "training loss", (31, 119, 180), x_range, font)
    _panel(draw, bottom, miou, "validation mIoU (%)", (214, 39, 40), x_range, font)
    draw.text((WIDTH // 2 - 20, HEIGHT - 18), "iteration", fill=(0, 0, 0), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
    return img
