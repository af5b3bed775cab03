"""The folder layout every importer writes, written once, in one piece, the same bytes every time.

``OUT/images/<split>/NAME.<ext>``, ``OUT/masks/<split>/NAME.png`` (index PNGs, palette mode: the values are
class indices, the palette only makes them viewable) and ``OUT/dataset.json`` (classes, palette,
ignore_index): what :class:`eval.datasets.FolderDataset`, ``isa check-data`` and ``isa train --data`` read.

Everything is written into a staging folder beside ``OUT`` and renamed into place at the end, so an
interrupted import leaves no half dataset; running the same import again replaces a folder that an
earlier import wrote (it holds ``.isa-import.json``) with identical bytes, and refuses any other
non-empty folder (a killed import may leave ``.OUT.importing-PID`` beside it: safe to delete). JPEG and
PNG bytes are copied unchanged after they decode through :mod:`zoo.images` (no
re-encoding; an EXIF rotation stays in the file and the readers apply it, as annotation tools show
photos upright); other formats are written as PNGs of the upright pixels.
"""
from __future__ import annotations

import io
import json
import os
import random
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from eval.checks import DataReport, check_dataset
from eval.datasets import FOLDER_IMAGE_SUFFIXES, DatasetError
from zoo.images import ImageError, probe, read_file, read_image

MARKER = ".isa-import.json"


class ImportDataError(DatasetError):
    """A malformed input to an importer; the message names the file, the id and the fix."""


def raise_if(errors: Sequence[str], what: str, skip_invalid: bool, warn: Callable[[str], Any] = print) -> None:
    """Refuse the import when there are problems, unless asked to skip them (then each is printed)."""
    if not errors:
        return
    if skip_invalid:
        for e in errors:
            warn(f"warning: skipped: {e}")
        return
    shown = "\n  ".join(errors[:10])
    more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
    raise ImportDataError(f"{what}: {len(errors)} problem(s):\n  {shown}{more}\nFix them, or pass --skip-invalid "
                          "(skip_invalid=True) to leave those images out")


def split_names(names: Sequence[str], val_fraction: float, seed: int) -> dict[str, str]:
    """name -> "train"/"val": a seeded shuffle of the sorted names; ``round(n * val_fraction)`` go to val
    (at least one when the fraction is > 0 and there are two or more names). Same names, same seed: same split."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    ordered = sorted(names)
    random.Random(seed).shuffle(ordered)
    n_val = round(len(ordered) * val_fraction)
    if val_fraction > 0 and n_val == 0 and len(ordered) > 1:
        n_val = 1
    val = set(ordered[:n_val])
    return {n: ("val" if n in val else "train") for n in names}


class LayoutWriter:
    """Writes one imported dataset; use as a context manager, call :meth:`add` per sample, then :meth:`finish`."""

    def __init__(self, out: str | os.PathLike, source: dict[str, Any]) -> None:
        self.out = Path(out)
        if self.out.exists():
            if not self.out.is_dir():
                raise ImportDataError(f"--out {self.out} exists and is not a folder")
            if any(self.out.iterdir()) and not (self.out / MARKER).is_file():
                raise ImportDataError(f"--out {self.out} is not empty and was not written by `isa import` "
                                      f"(no {MARKER}); choose a new or empty folder")
        self.source = source
        self.stage = self.out.parent / f".{self.out.name}.importing-{os.getpid()}"
        if self.stage.exists():
            shutil.rmtree(self.stage)
        self.stage.mkdir(parents=True)
        self.names: dict[tuple[str, str], str] = {}
        self.counts: dict[str, int] = {}

    def __enter__(self) -> "LayoutWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.stage.exists():
            shutil.rmtree(self.stage, ignore_errors=True)

    def add(self, split: str, name: str, image: Path | bytes, mask: np.ndarray, where: str,
            palette: Sequence[Sequence[int]]) -> None:
        """Write image ``name`` of ``split`` (a file, or encoded bytes such as labelme's imageData) and its mask.

        The image must decode (``zoo.images.read_image``) to the mask's size; ``where`` names the source in errors.
        """
        parts = Path(name).parts
        if not parts or name.startswith(("/", "\\")) or ".." in parts or Path(name).is_absolute() or "\0" in name:
            raise ImportDataError(f"{where}: image name {name!r} must be a relative path inside the images folder")
        if not isinstance(split, str) or not split or split in (".", "..") or any(c in split for c in "/\\\0"):
            # a split is one folder name: "../x" or "/x" would write outside OUT
            raise ImportDataError(f"{where}: split name {split!r} must be a plain folder name (such as train or val)")
        key = (split, name)
        if key in self.names:
            raise ImportDataError(f"{where}: image name {name!r} is used twice in split {split!r} (also by "
                                  f"{self.names[key]}); rename one of them")
        self.names[key] = where
        image_dir = self.stage / "images" / split
        suffix, data = self._image(image, mask.shape, where)
        dst = image_dir / f"{name}{suffix}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(data)  # the bytes that were checked, not a second read of the file
        write_index_png(self.stage / "masks" / split / f"{name}.png", mask, palette)
        self.counts[split] = self.counts.get(split, 0) + 1

    @staticmethod
    def _image(image: Path | bytes, hw: tuple[int, ...], where: str) -> tuple[str, bytes]:
        """(suffix, the file or bytes to write) after the image decodes through the project's reader to ``hw``
        (upright: the readers apply the EXIF orientation, as annotation tools show photos)."""
        try:
            data = image if isinstance(image, bytes) else read_file(image)
            info = probe(data, source=where)
            pixels = read_image(data, "image", source=where)  # a full decode: the copied bytes are sound
        except ImageError as err:
            raise ImportDataError(str(err)) from err
        h, w = info.upright_hw
        if (h, w) != tuple(hw):
            raise ImportDataError(f"{where}: the image is {h}x{w} (h x w, upright) but the annotation is for "
                                  f"{hw[0]}x{hw[1]}")
        if info.format in ("JPEG", "PNG"):
            canonical = ".jpg" if info.format == "JPEG" else ".png"
            suffix = "" if isinstance(image, bytes) else image.suffix
            same = {".jpg", ".jpeg"} if info.format == "JPEG" else {".png"}
            return (suffix if suffix.lower() in same and suffix in FOLDER_IMAGE_SUFFIXES else canonical), data
        buffer = io.BytesIO()  # BMP, WebP, TIFF, GIF: the folder reader lists JPEG and PNG
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
        return ".png", buffer.getvalue()

    def finish(self, classes: Sequence[str], palette: Sequence[Sequence[int]], ignore_index: int = 255,
               extra: dict[str, Any] | None = None) -> DataReport:
        """Write dataset.json, move the folder into place, run the data checks and return their report."""
        if not self.counts:
            raise ImportDataError(f"{self.source.get('format', 'import')}: no image to import")
        spec = {"classes": list(classes), "palette": [[int(v) for v in c] for c in palette],
                "ignore_index": int(ignore_index), **(extra or {})}
        (self.stage / "dataset.json").write_text(json.dumps(spec, indent=1) + "\n")
        (self.stage / MARKER).write_text(json.dumps(self.source, indent=1, sort_keys=True) + "\n")
        old = self.out.parent / f".{self.out.name}.replaced-{os.getpid()}"
        if self.out.exists():
            os.replace(self.out, old)
        os.replace(self.stage, self.out)
        shutil.rmtree(old, ignore_errors=True)
        return check_dataset(self.out, splits=sorted(self.counts, key=lambda s: (s != "train", s != "val", s)))


def write_index_png(path: Path, mask: np.ndarray, palette: Sequence[Sequence[int]]) -> None:
    """An 8-bit palette-mode PNG whose values are the class indices (255: ignore, drawn white)."""
    if mask.dtype != np.uint8:
        raise ImportDataError(f"{path}: mask values must fit in 0..255")
    flat = [int(v) for c in palette for v in c][: 255 * 3]
    flat += [0] * (255 * 3 - len(flat)) + [255, 255, 255]
    image = Image.fromarray(np.ascontiguousarray(mask))  # uint8 (H, W): mode "L"
    image.putpalette(flat)  # turns the L image into P with the same indices
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
