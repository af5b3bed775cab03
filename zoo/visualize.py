"""Pictures of a label map: palette PNG, colour mask, overlay on the image with a legend of the classes present."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .utils import PathLike, atomic_write


def colorize(labels: torch.Tensor | np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """(H, W) class indices → (H, W, 3) uint8 RGB with ``palette[c]`` for class c (black outside the palette).

    >>> colorize(np.array([[0, 1]]), [(10, 20, 30), (40, 50, 60)]).tolist()
    [[[10, 20, 30], [40, 50, 60]]]
    """
    array = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    table = np.zeros((max(len(palette), int(array.max(initial=0)) + 1), 3), dtype=np.uint8)
    table[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    return table[array]


def class_shares(labels: torch.Tensor | np.ndarray) -> list[tuple[int, float]]:
    """(class, fraction of pixels) for each class present, largest first."""
    array = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    counts = np.bincount(array.reshape(-1))  # a sort (np.unique) of a 48-megapixel map takes seconds
    present = np.flatnonzero(counts)
    order = present[np.argsort(-counts[present], kind="stable")]
    return [(int(c), float(counts[c]) / array.size) for c in order]


def overlay_with_legend(image: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray,
                        classes: Sequence[str], palette: Sequence[Sequence[int]], alpha: float = 0.5
                        ) -> Image.Image:
    """The image blended with its colour mask (``alpha`` = mask weight), with a legend panel on the right.

    ``image`` is uint8 RGB (3, H, W) or (H, W, 3). The legend lists the classes present, largest first, with
    their colour and share of the pixels.
    """
    rgb = image.permute(1, 2, 0).cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    array = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    table = colorize(np.arange(max(len(palette), int(array.max(initial=0)) + 1)), palette).astype(np.float32)
    legend = draw_legend(class_shares(array), classes, palette)
    h, w = array.shape
    canvas = np.full((max(h, legend.height), w + legend.width, 3), 255, dtype=np.uint8)
    rows = max(1, (1 << 22) // (3 * w))  # blended in bands: a float copy of a 48-megapixel photo is 576 MB
    for y in range(0, h, rows):
        mixed = rgb[y:y + rows].astype(np.float32) * (1.0 - alpha) + table[array[y:y + rows]] * alpha
        canvas[y:y + len(mixed), :w] = np.clip(mixed + 0.5, 0, 255).astype(np.uint8)
    canvas[:legend.height, w:] = np.asarray(legend)
    return Image.fromarray(canvas)


def draw_legend(shares: Sequence[tuple[int, float]], classes: Sequence[str],
                palette: Sequence[Sequence[int]]) -> Image.Image:
    """A white panel with one row per class: colour swatch, name, share of the pixels."""
    font = ImageFont.load_default()
    row, swatch, pad = 16, 12, 6
    names = [(classes[c] if c < len(classes) else f"class {c}").strip() or repr(classes[c]) for c, _ in shares]
    texts = [f"{name}  {share * 100:.1f}%" for name, (_, share) in zip(names, shares)]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max([int(probe.textlength(t, font=font)) for t in texts] + [40])
    panel = Image.new("RGB", (pad * 3 + swatch + text_w, pad * 2 + row * max(len(texts), 1)), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    for i, ((c, _), text) in enumerate(zip(shares, texts)):
        y = pad + i * row
        colour = tuple(int(v) for v in palette[c]) if c < len(palette) else (0, 0, 0)
        draw.rectangle([pad, y + 2, pad + swatch, y + 2 + swatch], fill=colour, outline=(0, 0, 0))
        draw.text((pad * 2 + swatch, y + 2), text, fill=(0, 0, 0), font=font)
    return panel


def label_png(labels: torch.Tensor | np.ndarray, palette: Sequence[Sequence[int]]) -> Image.Image:
    """A palette-mode ("P") PIL image: pixel values are the class indices, colours are the palette.

    More than 256 classes do not fit a palette PNG; those are written as 16-bit grey indices.
    """
    array = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if len(palette) > 256 or (array.size and array.max() > 255):
        return Image.fromarray(array.astype(np.uint16))
    image = Image.fromarray(array.astype(np.uint8, copy=False))  # mode "L"
    flat = [v for colour in palette for v in colour]
    image.putpalette(flat + [0] * (768 - len(flat)))  # makes it a "P" image, without a copy
    return image


def save_png(image: Image.Image, path: PathLike) -> Path:
    """Save a PIL image as PNG, atomically (the previous file stays until the new one is complete)."""
    return atomic_write(path, lambda f: image.save(f, format="PNG"))
