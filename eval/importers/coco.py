"""COCO segmentation exports (Roboflow, CVAT, Label Studio, ...) to the project's folder layout.

Rules (what the masks mean):

* Classes: the file's ``categories`` sorted by category id. With ``background=True`` (default) class 0 is
  ``"background"`` (pixels no instance covers) and category *i* in that order is class *i + 1*; with
  ``background=False`` categories are classes 0..K-1 and uncovered pixels are ignored (255).
* Shapes: polygons, compressed RLE (``counts`` a string) and uncompressed RLE (``counts`` a list) are decoded
  by ``pycocotools`` exactly as ``COCO.annToMask`` does (polygons of one annotation are merged).
* Overlaps: crowd regions (``iscrowd: 1``) are painted ignore (255) first, then the other instances in order
  of decreasing mask area (ties: increasing annotation id), each over the previous ones: where instances
  overlap the smaller one wins, and an instance wins over a crowd region.
* Images without annotations are kept as background (``empty="keep"``) or left out (``empty="skip"``).
* Splits: a file whose name says ``val``/``valid``/``validation`` or ``test`` (or whose folder is named so)
  gives that split, any other ``train``; ``split=`` names it; ``val_fraction`` with ``seed`` splits one
  file's images instead.

A polygon with fewer than 3 points (or outlines longer than ``MAX_OUTLINE`` x (H + W) pixels), an RLE
whose size or run lengths do not match its image, an unknown category or image id and a missing or
undecodable image file are refused, named with the file and the id; ``skip_invalid=True`` leaves such
images out whole (each is printed) instead. RLE run lengths are checked before ``pycocotools`` decodes
them (its decoder trusts them), and an image's size against the pixel limit before any mask is made for
it. Needs the optional extra ``coco`` (``pip install 'isa-triton[coco]'``).

>>> report = import_coco("annotations/instances_train.json", "images", "my_data")   # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from eval.checks import DataReport
from zoo.classes import default_palette
from zoo.images import MAX_PIXELS, ImageError, check_pixels

from .layout import ImportDataError, LayoutWriter, raise_if, split_names

PathLike = str | os.PathLike
IGNORE = 255
MAX_OUTLINE = 256  # polygon outline pixels per annotation, in units of the image's height + width


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # ids: a list or dict would not even hash


def _mask_utils() -> Any:
    try:
        from pycocotools import mask as mask_utils
    except ImportError as err:
        raise ImportDataError("the COCO importer needs pycocotools: pip install 'isa-triton[coco]'") from err
    return mask_utils


def split_of(path: PathLike) -> str:
    """The split a COCO file's name or folder names: ``val`` (val, valid, validation), ``test``, else ``train``.

    >>> split_of("annotations/instances_val2017.json"), split_of("valid/_annotations.coco.json")
    ('val', 'val')
    """
    path = Path(path)
    words = set(re.split(r"[^a-z]+", path.stem.lower())) | {path.parent.name.lower()}  # Roboflow: valid/x.json
    if words & {"val", "valid", "validation"}:
        return "val"
    return "test" if "test" in words else "train"


def rle_counts(counts: str | bytes) -> list[int]:
    """The run lengths of a compressed COCO RLE string (pycocotools' ``rleFrString`` format), to check them
    before decoding; raises ValueError on a character outside the format."""
    data = counts.encode() if isinstance(counts, str) else bytes(counts)
    out: list[int] = []
    p = 0
    while p < len(data):
        x = k = 0
        more = True
        while more:
            if p >= len(data):
                raise ValueError("truncated run length")
            c = data[p] - 48
            if not 0 <= c < 64:
                raise ValueError(f"character {chr(data[p])!r} is not in the RLE alphabet")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out


def annotation_mask(ann: dict[str, Any], height: int, width: int, where: str) -> np.ndarray:
    """The (H, W) uint8 0/1 mask of one annotation, decoded as ``COCO.annToMask`` does; ValueError if malformed."""
    return np.ascontiguousarray(_mask_utils().decode(annotation_rle(ann, height, width, where)), dtype=np.uint8)


def annotation_rle(ann: dict[str, Any], height: int, width: int, where: str) -> dict[str, Any]:
    """The compressed RLE of one annotation (pycocotools' form: a few bytes where the mask would be H x W),
    checked as :func:`annotation_mask` documents; ValueError if malformed."""
    mask_utils = _mask_utils()
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        if not seg:
            raise ValueError(f"{where}: empty segmentation")
        outline = 0.0
        for i, poly in enumerate(seg):
            if not isinstance(poly, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                     and np.isfinite(v) for v in poly):
                raise ValueError(f"{where}: polygon {i} is not a list of numbers")
            if len(poly) < 6 or len(poly) % 2:
                raise ValueError(f"{where}: polygon {i} has {len(poly) / 2:g} points; a polygon needs 3 or more "
                                 "(x, y) pairs")
            xs, ys = poly[0::2], poly[1::2]
            # pycocotools' rasteriser walks every edge at 5x: far-away points would cost unbounded time and memory
            if min(xs) < -width or max(xs) > 2 * width or min(ys) < -height or max(ys) > 2 * height:
                raise ValueError(f"{where}: polygon {i} has points far outside the {width}x{height} image "
                                 f"(x {min(xs):g}..{max(xs):g}, y {min(ys):g}..{max(ys):g})")
            # ... and allocates 16 bytes per upsampled outline pixel: a few MB of JSON could ask for many GB
            outline += sum(max(abs(xs[j] - xs[j - 1]), abs(ys[j] - ys[j - 1])) for j in range(len(xs)))
        if outline > MAX_OUTLINE * (height + width):
            raise ValueError(f"{where}: its polygons' outlines are {outline:.0f} pixels long, over {MAX_OUTLINE} "
                             f"times the image's height + width ({height} + {width}); simplify the polygons")
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list) and all(_is_int(v) for v in size) and size == [height, width]):
            raise ValueError(f"{where}: RLE size {size} is not the image's [height, width] [{height}, {width}]")
        if isinstance(counts, list):
            runs = counts
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in runs):
                raise ValueError(f"{where}: uncompressed RLE counts must be integers")
        elif isinstance(counts, (str, bytes)):
            try:
                runs = rle_counts(counts)
            except ValueError as err:
                raise ValueError(f"{where}: compressed RLE counts: {err}") from err
        else:
            raise ValueError(f"{where}: RLE counts must be a list (uncompressed) or a string (compressed)")
        if any(v < 0 for v in runs) or sum(runs) != height * width:
            raise ValueError(f"{where}: RLE run lengths sum to {sum(runs)} (or are negative); the image has "
                             f"{height * width} pixels")
        rle = (mask_utils.frPyObjects(seg, height, width) if isinstance(counts, list)
               else {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts})
    else:
        raise ValueError(f"{where}: no polygon or RLE 'segmentation'")
    return rle


def compose(instances: Sequence[tuple[int, int, bool, np.ndarray | dict[str, Any]]], shape: tuple[int, int],
            background: int) -> np.ndarray:
    """The label map from (annotation id, class, iscrowd, 0/1 mask or its RLE) by the module's overlap rule;
    RLEs are decoded one at a time (an image's thousands of instances are not all held as H x W masks)."""
    def area(m: np.ndarray | dict[str, Any]) -> int:
        return int(m.sum()) if isinstance(m, np.ndarray) else int(_mask_utils().area(m))

    def pixels(m: np.ndarray | dict[str, Any]) -> np.ndarray:
        return (m if isinstance(m, np.ndarray) else _mask_utils().decode(m)).astype(bool)

    out = np.full(shape, background, dtype=np.uint8)
    for _, _, _, m in (i for i in instances if i[2]):
        out[pixels(m)] = IGNORE
    solid = [i for i in instances if not i[2]]
    for _, cls, _, m in sorted(solid, key=lambda i: (-area(i[3]), i[0])):
        out[pixels(m)] = cls
    return out


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:  # RecursionError: arrays nested thousands deep
        raise ImportDataError(f"cannot read COCO file {path}: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("categories"), list):
        raise ImportDataError(f"{path}: not a COCO file (needs lists 'images', 'categories' and 'annotations')")
    return data


def import_coco(annotations: PathLike | Sequence[PathLike], images: PathLike | Sequence[PathLike],
                out: PathLike, *, split: str | None = None, val_fraction: float | None = None, seed: int = 0,
                background: bool = True, empty: str = "keep", skip_invalid: bool = False) -> DataReport:
    """Import COCO file(s) with their image folder(s) into ``out``; returns the data checks' report.

    ``annotations`` and ``images`` are one path each or equally long lists (one split per file, see
    :func:`split_of`). See the module docstring for the rules.
    """
    ann_files = [Path(annotations)] if isinstance(annotations, (str, os.PathLike)) else [Path(a) for a in annotations]
    image_dirs = [Path(images)] if isinstance(images, (str, os.PathLike)) else [Path(i) for i in images]
    if len(ann_files) != len(image_dirs) or not ann_files:
        raise ValueError("give one images folder per COCO file")
    if empty not in ("keep", "skip"):
        raise ValueError(f"empty must be 'keep' or 'skip', got {empty!r}")
    if val_fraction is not None and (len(ann_files) != 1 or split is not None):
        raise ValueError("--val-fraction splits one COCO file; it cannot be combined with --split or several files")
    files = [(a, d, _load(a)) for a, d in zip(ann_files, image_dirs)]
    categories: dict[int, str] | None = None
    for path, _, data in files:
        cats = {}
        for c in data["categories"]:
            if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
                raise ImportDataError(f"{path}: category {c!r} needs an integer 'id' and a string 'name'")
            if c["id"] in cats:
                raise ImportDataError(f"{path}: category id {c['id']} is listed twice")
            cats[c["id"]] = c["name"]
        if categories is not None and cats != categories:
            raise ImportDataError(f"{path}: its categories differ from {files[0][0]}'s; the files must share one list")
        categories = cats
    assert categories is not None
    if not categories:
        raise ImportDataError(f"{files[0][0]}: no categories")
    order = sorted(categories)
    first = 1 if background else 0
    class_of = {cid: first + i for i, cid in enumerate(order)}
    classes = (["background"] if background else []) + [categories[c] for c in order]
    if len(classes) > 255:
        raise ImportDataError(f"{len(classes)} classes do not fit 8-bit masks with 255 as ignore")
    palette = default_palette(len(classes))
    bg_value = 0 if background else IGNORE
    _mask_utils()  # the missing extra is reported before any work

    errors: list[str] = []
    plan = []  # [split, name, image path, height, width, annotations, where, COCO file, image entry]
    for path, image_dir, data in files:
        by_image: dict[int, list[dict[str, Any]]] = {}
        ids = [im.get("id") for im in data["images"] if isinstance(im, dict) and _is_int(im.get("id"))]
        known = set(ids)
        if len(known) != len(ids):
            twice = sorted(i for i, n in Counter(ids).items() if n > 1)
            errors.append(f"{path}: image id(s) {twice[:10]} are listed more than once in 'images'")
        for ann in data.get("annotations", []) or []:
            if not isinstance(ann, dict):
                errors.append(f"{path}: annotation {ann!r} is not an object")
                continue
            if not _is_int(ann.get("image_id")) or ann["image_id"] not in known:
                errors.append(f"{path}: annotation id {ann.get('id')}: image_id {ann.get('image_id')} is not in "
                              "'images'")
                continue
            by_image.setdefault(ann["image_id"], []).append(ann)
        for im in data["images"]:
            if not isinstance(im, dict) or not isinstance(im.get("file_name"), str):
                errors.append(f"{path}: image entry {im!r} has no 'file_name'")
                continue
            where = f"{path}: image id {im.get('id')} ({im['file_name']})"
            if not _is_int(im.get("id")):
                errors.append(f"{where}: needs an integer 'id'")
                continue
            h, w = im.get("height"), im.get("width")
            if not (_is_int(h) and _is_int(w) and h > 0 and w > 0):
                errors.append(f"{where}: needs positive integer 'height' and 'width'")
                continue
            try:  # before any (H, W) array is made for it
                check_pixels(w, h, MAX_PIXELS, where)
            except ImageError as err:
                errors.append(str(err))
                continue
            file_path = image_dir / im["file_name"]
            if not file_path.is_file() and (image_dir / Path(im["file_name"]).name).is_file():
                file_path = image_dir / Path(im["file_name"]).name  # exports that keep the exporter's folder
            if not file_path.is_file():
                errors.append(f"{where}: image file not found at {file_path}")
                continue
            anns = by_image.get(im["id"], [])
            if not anns and empty == "skip":
                continue
            name = Path(im["file_name"]).with_suffix("").as_posix()
            plan.append([split or split_of(path), name, file_path, h, w, anns, where, path, im])
    if not skip_invalid:
        raise_if(errors, "COCO import", skip_invalid)  # before any decoding: missing files, unknown ids
    if val_fraction is not None:
        assign = split_names([p[1] for p in plan], val_fraction, seed)
        for p in plan:
            p[0] = assign[p[1]]
    source = {"format": "coco", "annotations": [str(a) for a in ann_files], "images": [str(d) for d in image_dirs],
              "split": split, "val_fraction": val_fraction, "seed": seed, "background": background, "empty": empty}
    # one image at a time (decoded, composed, written): memory does not grow with the dataset
    with LayoutWriter(out, source) as writer:
        for split_name, name, file_path, h, w, anns, where, path, im in plan:
            instances, bad = [], 0
            for ann in anns:
                a_where = f"{path}: annotation id {ann.get('id')} (image id {im['id']}, {im['file_name']})"
                problem = None
                if not isinstance(ann.get("id"), int) or isinstance(ann.get("id"), bool):
                    problem = f"{a_where}: 'id' must be an integer"
                elif not _is_int(ann.get("category_id")) or ann["category_id"] not in class_of:
                    problem = f"{a_where}: category_id {ann.get('category_id')} is not in 'categories'"
                else:
                    try:
                        m = annotation_rle(ann, h, w, a_where)
                    except ValueError as err:
                        problem = str(err)
                if problem:
                    errors.append(problem)
                    bad += 1
                    continue
                instances.append((ann["id"], class_of[ann["category_id"]], bool(ann.get("iscrowd", 0)), m))
            if bad:  # left out whole: an image with an instance missing would teach background there
                continue
            try:
                writer.add(split_name, name, file_path, compose(instances, (h, w), bg_value), where, palette)
            except ImportDataError as err:
                errors.append(str(err))
        raise_if(errors, "COCO import", skip_invalid)
        return writer.finish(classes, palette, IGNORE)
