"""labelme JSON files (one per image) to the project's folder layout.

Rules:

* Classes: without ``labels``, ``"background"`` (class 0, unlabelled pixels) then the union of the shapes'
  labels sorted by name; ``"background"`` / ``"_background_"`` shapes paint class 0 and ``"__ignore__"``
  paints ignore (255), as labelme's ``labelme2voc`` conventions. With ``labels`` (a list, or a labels.txt
  with one name a line) the classes are exactly those, in that order; unlabelled pixels are the class named
  ``background`` / ``_background_`` if listed, else ignored; a shape whose label is not listed is refused.
* Shapes are drawn in file order, each over the previous ones (labelme's ``shapes_to_label``), with Pillow's
  ``ImageDraw`` as labelme's ``shape_to_mask`` draws them: ``polygon`` (3+ points, outline included),
  ``rectangle`` (two corners, both included), ``circle`` (centre and a point on the circle), ``line`` and
  ``linestrip`` (``line_width`` pixels wide), ``point`` (a disc of radius ``point_size``).
* Boundary rule: Pillow fills every pixel the outline touches, ``pycocotools`` only pixels whose centre
  lies inside the polygon (after its 5x upsampling), so the same polygon gives masks that differ only on
  pixels within one pixel of the outline; rectangles with integer corners give the same pixels as an
  RLE of that box.
* Images: ``imagePath`` relative to the JSON file, else the embedded ``imageData``; a JSON file without
  ``shapes`` is not a labelme file and is refused, as are polygons with < 3 points and missing images,
  named with the file and the shape index (``skip_invalid=True`` leaves such images out).
* Splits: all ``train``, or ``val_fraction`` with ``seed``.

>>> report = import_labelme("labelme_folder", "my_data", val_fraction=0.2)   # doctest: +SKIP
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from eval.checks import DataReport
from eval.datasets import list_files
from zoo.classes import default_palette
from zoo.images import ImageError, probe, read_file

from .layout import ImportDataError, LayoutWriter, raise_if, split_names

PathLike = str | os.PathLike
IGNORE = 255
BACKGROUND_NAMES = ("background", "_background_")
IGNORE_NAME = "__ignore__"


def _parse_labels(labels: Sequence[str] | PathLike | None) -> list[str] | None:
    if labels is None:
        return None
    if isinstance(labels, (str, os.PathLike)) and Path(labels).is_file():
        names = [line.strip() for line in Path(labels).read_text().splitlines() if line.strip()]
    elif isinstance(labels, str):
        names = [n.strip() for n in labels.split(",") if n.strip()]
    else:
        names = [str(n) for n in labels]
    names = [n for n in names if n != IGNORE_NAME]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"--labels must name each class once, got {names}")
    return names


def _points(shape: dict[str, Any], where: str) -> list[tuple[float, float]]:
    pts = shape.get("points")
    if not isinstance(pts, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                        and math.isfinite(v) for v in p) for p in pts):
        raise ValueError(f"{where}: 'points' must be a list of [x, y] numbers")
    return [(float(x), float(y)) for x, y in pts]


def draw_shape(draw: ImageDraw.ImageDraw, shape: dict[str, Any], value: int, where: str, line_width: int = 10,
               point_size: int = 5) -> None:
    """Paint one labelme shape with ``value`` (the module's rules); ValueError names ``where`` if malformed."""
    kind = shape.get("shape_type") or "polygon"
    pts = _points(shape, where)
    width, height = draw.im.size
    if pts and (min(x for x, _ in pts) < -width or max(x for x, _ in pts) > 2 * width
                or min(y for _, y in pts) < -height or max(y for _, y in pts) > 2 * height):
        raise ValueError(f"{where}: points far outside the {width}x{height} image")
    if kind == "polygon":
        if len(pts) < 3:
            raise ValueError(f"{where}: polygon has {len(pts)} point(s); a polygon needs 3 or more")
        draw.polygon(pts, fill=value, outline=value)
    elif kind == "rectangle":
        if len(pts) != 2:
            raise ValueError(f"{where}: rectangle needs 2 corner points, has {len(pts)}")
        (x0, y0), (x1, y1) = pts
        draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], fill=value, outline=value)
    elif kind == "circle":
        if len(pts) != 2:
            raise ValueError(f"{where}: circle needs its centre and a point on it, has {len(pts)} points")
        (cx, cy), (px, py) = pts
        r = math.hypot(cx - px, cy - py)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=value, outline=value)
    elif kind in ("line", "linestrip"):
        if len(pts) < 2:
            raise ValueError(f"{where}: {kind} needs 2 or more points, has {len(pts)}")
        draw.line(pts, fill=value, width=line_width)
    elif kind == "point":
        if len(pts) != 1:
            raise ValueError(f"{where}: point needs 1 point, has {len(pts)}")
        (cx, cy), r = pts[0], point_size
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=value, outline=value)
    else:
        raise ValueError(f"{where}: shape_type {kind!r} is not supported (polygon, rectangle, circle, line, "
                         "linestrip, point)")


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:  # RecursionError: arrays nested thousands deep
        raise ValueError(f"cannot read {path}: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("shapes"), list):
        raise ValueError(f"{path}: not a labelme file (no 'shapes' list)")
    return data


def _image_source(path: Path, data: dict[str, Any]) -> Path | bytes:
    image_path = data.get("imagePath")
    if isinstance(image_path, str) and image_path:
        candidate = path.parent / image_path.replace("\\", "/")
        if candidate.is_file():
            return candidate
    if isinstance(data.get("imageData"), str) and data["imageData"]:
        try:
            return base64.b64decode(data["imageData"], validate=True)
        except (binascii.Error, ValueError) as err:
            raise ValueError(f"{path}: 'imageData' is not base64: {err}") from err
    raise ValueError(f"{path}: image file not found ({path.parent / str(image_path)}) and no 'imageData'")


def import_labelme(folder: PathLike, out: PathLike, *, labels: Sequence[str] | PathLike | None = None,
                   val_fraction: float | None = None, seed: int = 0, line_width: int = 10, point_size: int = 5,
                   skip_invalid: bool = False) -> DataReport:
    """Import every ``*.json`` labelme file under ``folder`` into ``out``; returns the data checks' report."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImportDataError(f"labelme folder {folder} does not exist")
    json_files = list_files(folder, ".json")
    if not json_files:
        raise ImportDataError(f"{folder}: no labelme .json files")
    given = _parse_labels(labels)
    errors: list[str] = []
    readable, seen = [], set()
    for rel in json_files:  # a first pass for the label names only: files are read again one at a time below
        try:
            seen |= {sh["label"] for sh in _read(folder / rel)["shapes"]
                     if isinstance(sh, dict) and isinstance(sh.get("label"), str)}
            readable.append(rel)
        except ValueError as err:
            errors.append(str(err))
    names_seen = sorted(seen - {IGNORE_NAME, *BACKGROUND_NAMES})
    classes = given if given is not None else ["background", *names_seen]
    value_of: dict[str, int] = {n: i for i, n in enumerate(classes)}
    background = next((value_of[n] for n in BACKGROUND_NAMES if n in value_of), IGNORE)
    for n in BACKGROUND_NAMES:
        value_of.setdefault(n, background)
    value_of[IGNORE_NAME] = IGNORE
    if len(classes) > 255:
        raise ImportDataError(f"{len(classes)} classes do not fit 8-bit masks with 255 as ignore")
    palette = default_palette(len(classes))
    names = [rel[: -len(".json")] for rel in readable]
    assign = split_names(names, val_fraction, seed) if val_fraction else {}
    src = {"format": "labelme", "folder": str(folder), "labels": given, "val_fraction": val_fraction, "seed": seed,
           "line_width": line_width, "point_size": point_size}
    with LayoutWriter(out, src) as writer:
        for rel, name in zip(readable, names):
            path = folder / rel
            try:
                data = _read(path)
                source = _image_source(path, data)
                # the upright size: labelme shows (and labels) photos with their EXIF rotation applied
                h, w = probe(source if isinstance(source, bytes) else read_file(source), source=str(path)).upright_hw
            except (ValueError, ImageError) as err:
                errors.append(str(err) if str(path) in str(err) else f"{path}: {err}")
                continue
            canvas = Image.new("L", (w, h), background)
            draw = ImageDraw.Draw(canvas)
            bad = False
            for index, shape in enumerate(data["shapes"]):
                where = f"{path}: shape {index}"
                if not isinstance(shape, dict):
                    errors.append(f"{where}: not an object")
                    bad = True
                    continue
                label = shape.get("label")
                where = f"{where} (label {label!r})"
                if not isinstance(label, str):
                    errors.append(f"{where}: 'label' must be a string")
                    bad = True
                    continue
                if label not in value_of:
                    errors.append(f"{where}: label not in --labels {classes}")
                    bad = True
                    continue
                try:
                    draw_shape(draw, shape, value_of[label], where, line_width, point_size)
                except ValueError as err:
                    errors.append(str(err))
                    bad = True
            if bad:
                continue
            try:
                writer.add(assign.get(name, "train"), name, source, np.asarray(canvas), str(path), palette)
            except ImportDataError as err:
                errors.append(str(err))
        raise_if(errors, "labelme import", skip_invalid)
        return writer.finish(classes, palette, IGNORE)
