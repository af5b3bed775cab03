"""Small synthetic datasets in the custom folder layout, for tests, demos and smoke runs.

- `make_synthetic_dataset`: a noisy background with a few squares (class 1) and discs (class 2),
  each shape kind with its own colour family, so a network can learn it in minutes on a CPU. Some
  images carry an ignored (255) border strip, as real datasets do.
- `make_scene_dataset` (`isa demo`): procedural outdoor-like scenes with five classes - a smooth
  gradient sky, mottled ground, striped boxes, checkered tiles and ringed discs - whose colours are
  all drawn from one shared distribution, so only texture, shape and position tell them apart.

Example:
    >>> import tempfile
    >>> root = make_synthetic_dataset(tempfile.mkdtemp(), num_train=2, num_val=1, size_hw=(48, 64))
    >>> sorted(p.name for p in (root / "images" / "train").iterdir())
    ['img_000.png', 'img_001.png']
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Sequence, Tuple, Union

import numpy as np
from PIL import Image

CLASSES = ("background", "square", "disc")
PALETTE = ((0, 0, 0), (220, 60, 40), (40, 90, 220))


def _sample(rng: np.random.Generator, h: int, w: int) -> Tuple[np.ndarray, np.ndarray]:
    image = rng.normal(110, 25, size=(h, w, 3)) + rng.uniform(-30, 30, size=3)
    mask = np.zeros((h, w), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(int(rng.integers(2, 5))):
        kind = int(rng.integers(1, 3))
        size = int(rng.integers(max(h, w) // 8, max(h, w) // 3))
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        if kind == 1:
            region = (abs(yy - cy) <= size // 2) & (abs(xx - cx) <= size // 2)
        else:
            region = (yy - cy) ** 2 + (xx - cx) ** 2 <= (size // 2) ** 2
        colour = np.array(PALETTE[kind], dtype=np.float64) + rng.normal(0, 15, size=3)
        image[region] = colour + rng.normal(0, 12, size=(int(region.sum()), 3))
        mask[region] = kind
    if rng.random() < 0.3:
        mask[:, : max(w // 16, 1)] = 255  # an unlabeled strip
    return np.clip(image, 0, 255).astype(np.uint8), mask


def make_synthetic_dataset(root: Union[str, os.PathLike], num_train: int = 16, num_val: int = 4,
                           size_hw: Sequence[int] = (96, 128), seed: int = 0) -> Path:
    """Write ROOT/images/{train,val}/img_NNN.png, ROOT/masks/{train,val}/img_NNN.png and dataset.json."""
    return _write_dataset(root, _sample, num_train, num_val, size_hw, seed,
                          [list(c) for c in PALETTE])


Draw = Callable[[np.random.Generator, int, int], Tuple[np.ndarray, np.ndarray]]


def _write_dataset(root: Union[str, os.PathLike], draw: Draw, num_train: int, num_val: int,
                   size_hw: Sequence[int], seed: int, palette: list) -> Path:
    """The folder layout of `draw`'s (image, mask) samples, train then val from one seeded generator."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    h, w = int(size_hw[0]), int(size_hw[1])
    for split, count in (("train", num_train), ("val", num_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "masks" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, mask = draw(rng, h, w)
            Image.fromarray(image).save(root / "images" / split / f"img_{i:03d}.png")
            Image.fromarray(mask, mode="L").save(root / "masks" / split / f"img_{i:03d}.png")
    spec = {"classes": list(CLASSES), "palette": palette, "ignore_index": 255}
    (root / "dataset.json").write_text(json.dumps(spec, indent=1))
    return root


RARE_COLOUR = (180, 70, 110)  # near the squares' red family: colour alone barely tells the rare disc apart


def _imbalanced_sample(rng: np.random.Generator, h: int, w: int, rare_share: float) -> Tuple[np.ndarray, np.ndarray]:
    image = rng.normal(110, 25, size=(h, w, 3)) + rng.uniform(-30, 30, size=3)
    mask = np.zeros((h, w), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(int(rng.integers(2, 5))):
        size = int(rng.integers(max(h, w) // 8, max(h, w) // 3))
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        region = (abs(yy - cy) <= size // 2) & (abs(xx - cx) <= size // 2)
        colour = np.array(PALETTE[1], dtype=np.float64) + rng.normal(0, 15, size=3)
        image[region] = colour + rng.normal(0, 12, size=(int(region.sum()), 3))
        mask[region] = 1
    # one small disc whose area is about rare_share of the image, drawn last
    radius = np.sqrt(rare_share * h * w / np.pi) * rng.uniform(0.8, 1.2)
    cy, cx = int(rng.integers(int(radius), h - int(radius))), int(rng.integers(int(radius), w - int(radius)))
    region = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
    colour = np.array(RARE_COLOUR, dtype=np.float64) + rng.normal(0, 15, size=3)
    image[region] = colour + rng.normal(0, 12, size=(int(region.sum()), 3))
    mask[region] = 2
    return np.clip(image, 0, 255).astype(np.uint8), mask


def make_imbalanced_dataset(root: Union[str, os.PathLike], num_train: int = 24, num_val: int = 8,
                            size_hw: Sequence[int] = (96, 128), rare_share: float = 0.005, seed: int = 0) -> Path:
    """Like `make_synthetic_dataset`, but class 2 (disc) is one small disc per image, about `rare_share` of
    the pixels (0.5 %), in a colour near the squares': the class-imbalance case of the README's fine-tuning
    example (`isa train --class-weights auto`)."""
    return _write_dataset(root, lambda rng, h, w: _imbalanced_sample(rng, h, w, rare_share), num_train, num_val,
                          size_hw, seed, [list(PALETTE[0]), list(PALETTE[1]), list(RARE_COLOUR)])



# --------------------------------------------------------------------------------------------------
# procedural scenes (`isa demo`)

SCENE_CLASSES = ("sky", "ground", "striped box", "checkered tile", "ringed disc")
# label colours for overlays only: the image colours of every class come from one shared range
SCENE_PALETTE = ((70, 130, 180), (152, 251, 152), (250, 170, 30), (220, 20, 60), (0, 0, 230))
_MIN_CONTRAST = 60.0  # grey-level gap between the two colours of a texture


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(35, 220, size=3)


def _colour_pair(rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Two colours from the shared range whose grey levels differ enough for the texture to show."""
    grey = np.array([0.299, 0.587, 0.114])
    a = _colour(rng)
    for _ in range(50):
        b = _colour(rng)
        if abs(float((a - b) @ grey)) >= _MIN_CONTRAST:
            return a, b
    return a, 255.0 - a  # pragma: no cover - 50 misses in a row are very unlikely


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Value noise in [0, 1]: a random grid every `cell` pixels, bicubic-interpolated."""
    gh, gw = h // cell + 3, w // cell + 3
    grid = Image.fromarray(rng.random((gh, gw)).astype(np.float32), mode="F")
    full = np.asarray(grid.resize((gw * cell, gh * cell), Image.BICUBIC))
    oy, ox = (int(v) for v in rng.integers(0, cell, size=2))
    return np.clip(full[oy:oy + h, ox:ox + w], 0.0, 1.0)


def _square_wave(phase: np.ndarray) -> np.ndarray:
    # a slightly softened square wave in [0, 1]: crisp texture without aliasing speckle
    return np.clip(np.sin(phase) * 3.0, -1.0, 1.0) * 0.5 + 0.5


def render_scene(rng: np.random.Generator, size_hw: Sequence[int] = (96, 128)) -> Tuple[np.ndarray, np.ndarray]:
    """One procedural scene: (H, W, 3) uint8 RGB image and (H, W) uint8 label map (SCENE_CLASSES).

    Sky (0) above a wavy horizon is a smooth vertical gradient; ground (1) below is mottled value
    noise; then one striped box (2), one checkered tile (3), one ringed disc (4) and up to two more
    random objects are drawn, later ones occluding earlier ones. Every colour is drawn from the
    same range, so a pixel's colour says nothing about its class.

    Example:
        >>> image, mask = render_scene(np.random.default_rng(0), (48, 64))
        >>> image.shape, image.dtype, mask.shape, int(mask.max()) <= 4
        ((48, 64, 3), dtype('uint8'), (48, 64), True)
    """
    h, w = int(size_hw[0]), int(size_hw[1])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    mean_horizon = h * rng.uniform(0.3, 0.55)
    horizon = mean_horizon + rng.uniform(2, 6) * np.sin(2 * np.pi * xx[0] / rng.uniform(40, 120) + rng.uniform(0, 6.3))
    sky = yy < horizon[None, :]

    top, bottom = _colour_pair(rng)
    t = np.clip(yy / mean_horizon, 0.0, 1.0)[..., None]
    sky_image = top * (1.0 - t) + bottom * t
    a, b = _colour_pair(rng)
    mottle = 0.65 * _smooth_noise(rng, h, w, int(rng.integers(6, 12))) + 0.35 * _smooth_noise(rng, h, w, 2)
    ground_image = a + (b - a) * mottle[..., None]
    image = np.where(sky[..., None], sky_image, ground_image)
    mask = np.where(sky, 0, 1).astype(np.uint8)

    kinds = [2, 3, 4] + [int(k) for k in rng.integers(2, 5, size=int(rng.integers(0, 3)))]
    rng.shuffle(kinds)
    for kind in kinds:
        cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.08, 0.92) * w
        a, b = _colour_pair(rng)
        angle = rng.uniform(-0.6, 0.6)
        u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
        if kind == 2:  # striped box: a rotated rectangle with stripes of any direction
            region = (np.abs(u) <= rng.uniform(0.12, 0.28) * w) & (np.abs(v) <= rng.uniform(0.12, 0.25) * h)
            theta, period = rng.uniform(0, np.pi), rng.uniform(5, 9)
            pattern = _square_wave(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period)
        elif kind == 3:  # checkered tile: a rotated square with a checkerboard aligned to it
            side = rng.uniform(0.14, 0.24) * (h + w) / 2
            region = (np.abs(u) <= side) & (np.abs(v) <= side)
            cell = rng.uniform(4, 8)
            pattern = ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float64)
        else:  # ringed disc: concentric rings
            radius = rng.uniform(0.17, 0.3) * h
            dist = np.hypot(yy - cy, xx - cx)
            region = dist <= radius
            pattern = _square_wave(2 * np.pi * dist / rng.uniform(5, 8) + rng.uniform(0, 6.3))
        texture = a + (b - a) * pattern[..., None]
        image[region] = texture[region]
        mask[region] = kind

    image = image + rng.normal(0, 4, size=image.shape)  # sensor noise
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), mask


def make_scene_dataset(root: Union[str, os.PathLike], num_train: int = 40, num_val: int = 8,
                       size_hw: Sequence[int] = (96, 128), seed: int = 0) -> Path:
    """Write procedural scenes (`render_scene`) in the custom folder layout; returns `root`.

    Layout: ROOT/images/{train,val}/scene_NNN.png (RGB), ROOT/masks/{train,val}/scene_NNN.png
    (8-bit class indices 0..4) and ROOT/dataset.json (classes, palette, ignore_index 255).
    The same arguments always write the same bytes (seeded numpy, PNG files).

    Example:
        >>> import tempfile
        >>> root = make_scene_dataset(tempfile.mkdtemp(), num_train=2, num_val=1, size_hw=(48, 64))
        >>> json.loads((root / "dataset.json").read_text())["classes"][:2]
        ['sky', 'ground']
    """
    if num_train < 1 or num_val < 0:
        raise ValueError(f"need num_train >= 1 and num_val >= 0, got {num_train} and {num_val}")
    h, w = int(size_hw[0]), int(size_hw[1])
    if h < 32 or w < 32:
        raise ValueError(f"size_hw must be at least 32x32 (textures need room), got {tuple(size_hw)}")
    root = Path(root)
    # one stream per split: the val images do not change when num_train does
    for split, count, stream in (("train", num_train, 0), ("val", num_val, 1)):
        rng = np.random.default_rng([seed, stream])
        image_dir, mask_dir = root / "images" / split, root / "masks" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, mask = render_scene(rng, (h, w))
            _save_png(Image.fromarray(image), image_dir / f"scene_{i:03d}.png")
            _save_png(Image.fromarray(mask, mode="L"), mask_dir / f"scene_{i:03d}.png")
    spec = {"classes": list(SCENE_CLASSES), "palette": [list(c) for c in SCENE_PALETTE], "ignore_index": 255}
    tmp = root / ".dataset.json.tmp"
    tmp.write_text(json.dumps(spec, indent=1) + "\n")
    os.replace(tmp, root / "dataset.json")
    return root


def _save_png(image: Image.Image, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
