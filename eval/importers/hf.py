"""A Hugging Face ``datasets`` dataset (a folder from ``save_to_disk``, a local dataset folder, or a Hub name
when online) to the project's folder layout.

Rules:

* Columns: ``image_column`` holds the photos, ``mask_column`` the label maps (Image features, PIL images,
  encoded bytes or arrays). Encoded JPEG/PNG photos are copied byte for byte after they decode; others are
  written as PNG. Masks are read as stored (index values; a palette PNG gives its indices).
* Splits: ``train`` stays ``train``, ``validation``/``valid``/``val`` become ``val``, ``test`` stays
  ``test``; a single split goes to ``train``, or is divided by ``val_fraction`` with ``seed``. Images are
  named by their row number (``000123``), so a re-import writes the same files.
* Classes: ``classes`` (a list or a comma-separated string) names them; without it they are ``class_<i>``
  up to the largest value found. ``reduce_zero_label=True`` is for datasets whose 0 means "other"
  (``scene_parse_150``): the masks are written reduced, as MMSegmentation's ``reduce_zero_label`` reads them
  (0 -> 255 ignored, 1..K -> 0..K-1), and ``classes`` names stored values 1..K. A value that is no class
  nor 255 is refused with its row.

``datasets`` is the optional extra ``hf`` (``pip install 'isa-triton[hf]'``, ~70 MB of wheels: pyarrow and
pandas); :func:`import_rows` does the same from any mapping of split -> rows without it.

>>> import_hf("scene_parse_150", "ade_small", image_column="image", mask_column="annotation",
...           reduce_zero_label=True)   # doctest: +SKIP
"""
from __future__ import annotations

import io
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from eval.checks import DataReport
from zoo.classes import default_palette
from zoo.images import ImageError, read_file, read_image, to_rgb_tensor

from .layout import ImportDataError, LayoutWriter, raise_if, split_names

PathLike = str | os.PathLike
IGNORE = 255
SPLIT_NAMES = {"train": "train", "training": "train", "validation": "val", "valid": "val", "val": "val",
               "test": "test"}


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _file_bytes(path: Any, where: str) -> bytes:
    """The bytes of a row's ``path``: a regular file only (a device such as /dev/zero or a FIFO never ends)."""
    file = Path(str(path))
    if not file.is_file():
        raise ValueError(f"{where}: {file} is not a file")
    return read_file(file)


def _as_bytes(value: Any, where: str) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):  # bytes(10**12) would allocate a terabyte
        raise ValueError(f"{where}: 'bytes' holds a {type(value).__name__}, not encoded image bytes")
    return bytes(value)


def _image_bytes(value: Any, where: str) -> bytes:
    """Encoded image bytes: the stored file when there is one, else a lossless PNG of the pixels."""
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        if value.get("bytes"):
            return _as_bytes(value["bytes"], where)
        return _file_bytes(value["path"], where)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    try:
        pixels = to_rgb_tensor(value if not isinstance(value, list) else np.asarray(value, dtype=np.uint8))
    except (ImageError, TypeError, OverflowError) as err:  # OverflowError: a list value outside 0..255
        raise ValueError(f"{where}: not an image: {err}") from err
    return _png(pixels.permute(1, 2, 0).numpy())


def _mask_array(value: Any, where: str) -> np.ndarray:
    """The stored label values, read by the project's reader (zoo.images.read_image, kind "mask")."""
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        data = _as_bytes(value["bytes"], where) if value.get("bytes") else _file_bytes(value["path"], where)
    elif isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, Image.Image):
        if value.format in ("JPEG", "MPO"):  # re-encoding it as a PNG would hide its compression artefacts
            raise ValueError(f"{where}: the mask is a decoded JPEG: its compression artefacts would become class "
                             "ids; masks must be stored losslessly (PNG)")
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        data = buffer.getvalue()
    else:
        array = np.asarray(value)
        if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer) or array.min() < 0 or array.max() > 255:
            raise ValueError(f"{where}: a mask array must be (H, W) integers 0..255, got {array.dtype} {array.shape}")
        data = _png(array.astype(np.uint8))
    try:
        mask = np.asarray(read_image(data, "mask", source=where))
    except ImageError as err:
        raise ValueError(str(err)) from err
    if mask.ndim != 2 or mask.min() < 0 or mask.max() > 255:
        raise ValueError(f"{where}: a mask must be one channel of values 0..255 (an index or palette PNG), got "
                         f"shape {mask.shape}")
    return mask.astype(np.uint8)


def import_rows(splits: Mapping[str, Iterable[Mapping[str, Any]]], out: PathLike, *, image_column: str = "image",
                mask_column: str = "annotation", classes: Sequence[str] | str | None = None,
                reduce_zero_label: bool = False, val_fraction: float | None = None, seed: int = 0,
                skip_invalid: bool = False, source: dict[str, Any] | None = None) -> DataReport:
    """Import rows (mappings with an image and a mask column) per split name into ``out`` (module rules)."""
    names = [c.strip() for c in classes.split(",")] if isinstance(classes, str) else \
        (list(classes) if classes is not None else None)
    top = None if names is None else (len(names) if reduce_zero_label else len(names) - 1)  # largest class value
    if val_fraction:
        if len(splits) != 1:
            raise ValueError("--val-fraction divides a dataset with one split; this one has several")
        only = next(iter(splits.values()))
        assign = split_names([f"{i:06d}" for i in range(len(only))], val_fraction, seed)  # type: ignore[arg-type]
    errors: list[str] = []
    largest = -1
    # one row at a time (read, checked, written): memory does not grow with the dataset
    with LayoutWriter(out, source or {"format": "rows"}) as writer:
        for split, rows in splits.items():
            target = SPLIT_NAMES.get(split.lower(), split)
            for index, row in enumerate(rows):
                where = f"split {split!r} row {index}"
                name = f"{index:06d}"
                try:
                    if image_column not in row or mask_column not in row:
                        raise ValueError(f"{where}: no column {image_column!r} / {mask_column!r} (columns: "
                                         f"{sorted(row)}); name them with --image-column / --mask-column")
                    image = _image_bytes(row[image_column], where)
                    mask = _mask_array(row[mask_column], where)
                    values = set(np.unique(mask).tolist()) - {IGNORE}
                    outside = sorted(v for v in values if top is not None and v > top)
                    if outside:
                        raise ValueError(f"{where}: mask values {outside[:10]} are not classes (0..{top}) nor "
                                         f"{IGNORE}; give all class names with --classes")
                    if reduce_zero_label:  # written reduced: the folder's masks are class indices as they are
                        mask = np.where(mask == 0, IGNORE, np.where(mask == IGNORE, IGNORE, mask - 1)).astype(np.uint8)
                    # the PNG palette only makes masks viewable (the VOC colour map: its first K are the K-class one)
                    writer.add(assign[name] if val_fraction else target, name, image, mask, where, default_palette(255))
                except (ValueError, OSError) as err:
                    errors.append(str(err))
                    continue
                largest = max([largest, *values])
        raise_if(errors, "hf import", skip_invalid)
        k = len(names) if names is not None else max(largest + (0 if reduce_zero_label else 1), 1)
        classes_out = names if names is not None else [f"class_{i + (1 if reduce_zero_label else 0)}" for i in range(k)]
        return writer.finish(classes_out, default_palette(len(classes_out)), IGNORE)


def import_hf(dataset: PathLike, out: PathLike, *, image_column: str = "image", mask_column: str = "annotation",
              classes: Sequence[str] | str | None = None, reduce_zero_label: bool = False,
              split: str | None = None, val_fraction: float | None = None, seed: int = 0, revision: str | None = None,
              skip_invalid: bool = False) -> DataReport:
    """Import a ``datasets`` dataset: a ``save_to_disk`` folder, another local dataset folder, or a Hub name
    (``revision`` pins it; offline mode and the token come from the usual ``HF_*`` environment)."""
    try:
        import datasets
    except ImportError as err:
        raise ImportDataError("the hf importer needs the `datasets` package: pip install 'isa-triton[hf]'") from err
    path = Path(dataset)
    try:
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file()
                              or (path / "state.json").is_file()):
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset(str(dataset), split=split, revision=revision)
    except Exception as err:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ConnectionError)
        raise ImportDataError(f"cannot load the dataset {dataset}: {type(err).__name__}: {err}") from err
    parts = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {split or "train": loaded}
    if split is not None and isinstance(loaded, datasets.DatasetDict):
        if split not in parts:
            raise ImportDataError(f"{dataset}: no split {split!r}; it has {sorted(parts)}")
        parts = {split: parts[split]}
    for name, part in parts.items():  # encoded bytes where the column is an Image feature: no re-encoding
        for column in (image_column, mask_column):
            if isinstance(part.features.get(column), datasets.Image):
                part = part.cast_column(column, datasets.Image(decode=False))
        parts[name] = part
    source = {"format": "hf", "dataset": str(dataset), "revision": revision, "split": split,
              "image_column": image_column, "mask_column": mask_column, "reduce_zero_label": reduce_zero_label,
              "val_fraction": val_fraction, "seed": seed}
    return import_rows(parts, out, image_column=image_column, mask_column=mask_column, classes=classes,
                       reduce_zero_label=reduce_zero_label, val_fraction=val_fraction, seed=seed,
                       skip_invalid=skip_invalid, source=source)
