"""A small synthetic dataset in the custom folder layout, for tests, demos and smoke runs.

Each image is a noisy background with a few squares (class 1) and discs (class 2), each shape kind
with its own colour family, so a network can learn it in minutes on a CPU. Some images carry an
ignored (255) border strip, as real datasets do.

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
from typing import Sequence, Tuple, Union

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
    root = Path(root)
    rng = np.random.default_rng(seed)
    h, w = int(size_hw[0]), int(size_hw[1])
    for split, count in (("train", num_train), ("val", num_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "masks" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, mask = _sample(rng, h, w)
            Image.fromarray(image).save(root / "images" / split / f"img_{i:03d}.png")
            Image.fromarray(mask, mode="L").save(root / "masks" / split / f"img_{i:03d}.png")
    spec = {"classes": list(CLASSES), "palette": [list(c) for c in PALETTE], "ignore_index": 255}
    (root / "dataset.json").write_text(json.dumps(spec, indent=1))
    return root
