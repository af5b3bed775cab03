"""Data checks for a folder dataset: the classic mistakes, found before a training run wastes hours.

`check_dataset(root)` reads every image header and every mask of each split and reports, per split, a
table of pixel counts per class, then errors and warnings, each naming the file and the value:

- errors: images without masks and masks without images, empty splits, image/mask size mismatches
  (naming the EXIF orientation where the mask fits the stored pixels but not the upright image that
  training and evaluation read), mask values outside the classes (with pixel counts), masks that hold
  only 0 and 255 (binary masks saved as 0/255: 255 is the ignore label, so the foreground would never
  be learnt), unreadable, corrupt, oversized or lossy (JPEG) files;
- warnings: classes with no pixel in the train split, splits where most pixels are ignored, photos with
  an EXIF orientation (read upright: masks must be drawn on the upright view), a crop larger than every
  train image, train classes under 0.1% of the labelled pixels (with the `--class-weights auto` hint).

Every file goes through the one reader (`zoo.images`): the same checks and pixels as training and
evaluation. Masks pair with images by stem across `mask_suffixes` (a JPEG mask is found, and refused as
lossy).

`isa check-data DIR` prints the report; `isa train` runs it first on a folder dataset and stops on errors.

>>> report = check_dataset("my_data")          # doctest: +SKIP
>>> print(report.format()); report.ok          # doctest: +SKIP
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eval.datasets import (FOLDER_IMAGE_SUFFIXES, MASK_SUFFIXES, DatasetError, Sample, folder_meta, list_files,
                           read_mask, size_mismatch)
from zoo.classes import DatasetMeta
from zoo.images import MAX_PIXELS, ImageError, probe, read_image

MOSTLY_IGNORED = 0.5  # a split whose share of ignored pixels exceeds this gets a warning
RARE_CLASS = 0.001  # a train class under this share of the labelled pixels gets a warning (--class-weights hint)
_SHOWN = 5  # files named per problem before "... and N more"


@dataclass
class SplitReport:
    """What one split holds: file counts and pixel counts per class index (after label_map and reduce_zero_label)."""

    name: str
    images: int = 0
    masks: int = 0
    pixels: dict[int, int] = field(default_factory=dict)  # value -> pixel count

    def total(self) -> int:
        return sum(self.pixels.values())


@dataclass
class DataReport:
    """The result of `check_dataset`: per-split tables, errors and warnings."""

    root: Path
    meta: DatasetMeta
    splits: list[SplitReport] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when there is no error (warnings allowed)."""
        return not self.errors

    def format(self) -> str:
        """The table (pixels per class and split, in percent) followed by the errors and warnings."""
        names = list(self.meta.classes) + [f"ignored ({self.meta.ignore_index})"]
        width = max(len(n) for n in names + ["class"])
        head = f"{'class':<{width}} " + " ".join(f"{s.name:>12}" for s in self.splits)
        lines = [f"dataset {self.root}: {self.meta.num_classes} classes", head,
                 f"{'images':<{width}} " + " ".join(f"{s.images:>12}" for s in self.splits),
                 f"{'masks':<{width}} " + " ".join(f"{s.masks:>12}" for s in self.splits)]
        for index, name in enumerate(names):
            value = index if index < self.meta.num_classes else self.meta.ignore_index
            cells = []
            for s in self.splits:
                count = s.pixels.get(value, 0)
                cells.append(f"{100.0 * count / s.total():11.2f}%" if s.total() else f"{'-':>12}")
            lines.append(f"{name:<{width}} " + " ".join(cells))
        lines += [f"error: {e}" for e in self.errors] + [f"warning: {w}" for w in self.warnings]
        if self.ok:
            lines.append("no errors" + (f", {len(self.warnings)} warning(s)" if self.warnings else ""))
        return "\n".join(lines)


def _files(names: Sequence[str], folder: Path) -> str:
    shown = ", ".join(str(folder / n) for n in names[:_SHOWN])
    return shown + (f" ... and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def _label(stored: int, lut: dict[int, int], meta: DatasetMeta) -> int:
    # label_map first, then reduce_zero_label (0 and ignore -> ignore, k -> k - 1), as SegDataset.load_mask
    value = lut.get(stored, stored)
    if not meta.reduce_zero_label:
        return value
    return meta.ignore_index if value in (0, meta.ignore_index) else value - 1


def check_dataset(root: str | Path, splits: Sequence[str] = ("train", "val"),
                  num_classes: int | None = None, crop_size: Sequence[int] | None = None,
                  max_pixels: int | None = MAX_PIXELS, mask_suffixes: Sequence[str] = MASK_SUFFIXES) -> DataReport:
    """Check a folder dataset (ROOT/images/<split>, ROOT/masks/<split>, ROOT/dataset.json); never raises
    for bad data — every problem is in the report (a missing ROOT or unreadable dataset.json raises).

    ``crop_size`` (h, w): the training crop, named when it is larger than every train image;
    ``max_pixels``: the reader's pixel limit; ``mask_suffixes``: the mask file suffixes paired by stem.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root} does not exist or is not a folder (expected ROOT/images/<split>/, "
                           "ROOT/masks/<split>/ and ROOT/dataset.json)")
    meta, palette_given = folder_meta(root, num_classes)
    report = DataReport(root, meta)
    palette = meta.palette if palette_given else None  # colour masks map through a palette the user wrote
    lut = {stored: index for stored, index in meta.label_map}
    for split in splits:
        image_dir, mask_dir = root / "images" / split, root / "masks" / split
        if not image_dir.is_dir():
            if split == "train":
                from eval.datasets import layout_hint

                report.errors.append(f"{image_dir} does not exist: training needs ROOT/images/train/"
                                     + layout_hint(root))
            continue
        part = SplitReport(split)
        report.splits.append(part)
        images = {name.rsplit(".", 1)[0]: name for name in list_files(image_dir, FOLDER_IMAGE_SUFFIXES)}
        masks: dict[str, str] = {}
        doubled: list[str] = []
        for name in list_files(mask_dir, tuple(mask_suffixes)) if mask_dir.is_dir() else []:
            stem = name.rsplit(".", 1)[0]
            if stem in masks:
                doubled.append(f"{masks[stem]} / {name}")
            masks.setdefault(stem, name)
        if doubled:
            report.errors.append(f"{split}: {len(doubled)} image(s) with two masks of one stem in {mask_dir} "
                                 f"(keep one): {', '.join(doubled[:_SHOWN])}")
        part.images, part.masks = len(images), len(masks)
        if not images:
            report.errors.append(f"{split}: the split is empty: no image ({', '.join(FOLDER_IMAGE_SUFFIXES)}) in "
                                 f"{image_dir}")
        lonely_images = sorted(images[s] for s in images.keys() - masks.keys())
        lonely_masks = sorted(masks[s] for s in masks.keys() - images.keys())
        if lonely_images:
            report.errors.append(f"{split}: {len(lonely_images)} image(s) without a mask in {mask_dir} "
                                 f"(masks/<split>/NAME.png): {_files(lonely_images, image_dir)}")
        if lonely_masks:
            report.warnings.append(f"{split}: {len(lonely_masks)} mask(s) without an image: "
                                   f"{_files(lonely_masks, mask_dir)}")
        outside: dict[int, list[str]] = {}  # stored mask value -> files
        outside_pixels: dict[int, int] = {}
        binary: list[str] = []
        rotated: list[str] = []
        largest, crop_fits = (0, 0), False
        for stem in sorted(images.keys() & masks.keys()):
            image_path, mask_path = image_dir / images[stem], mask_dir / masks[stem]
            try:  # decoded whole, as training and evaluation will: a corrupt stream is found here
                upright_hw = tuple(read_image(image_path, "image", max_pixels).shape[-2:])
                info = probe(image_path, max_pixels)
            except ImageError as exc:
                report.errors.append(str(exc))
                continue
            if info.orientation != 1:
                rotated.append(images[stem])
            try:
                mask = np.asarray(read_mask(mask_path, palette, max_pixels))
            except (DatasetError, OSError, ValueError) as exc:
                report.errors.append(str(exc))
                continue
            if mask.shape != upright_hw:
                report.errors.append(size_mismatch(Sample(image_path, mask_path, stem), info, mask.shape, "x"))
                continue
            largest = (max(largest[0], upright_hw[0]), max(largest[1], upright_hw[1]))
            if crop_size is not None and upright_hw[0] >= crop_size[0] and upright_hw[1] >= crop_size[1]:
                crop_fits = True
            stored, counts = np.unique(mask, return_counts=True)
            present = set()
            for value, count in zip(stored.tolist(), counts.tolist()):
                label = _label(value, lut, meta)  # what training and evaluation will see (load_mask's order)
                part.pixels[label] = part.pixels.get(label, 0) + count
                present.add(lut.get(value, value))
                if label != meta.ignore_index and not 0 <= label < meta.num_classes:
                    outside.setdefault(value, []).append(masks[stem])
                    outside_pixels[value] = outside_pixels.get(value, 0) + count
            if meta.ignore_index == 255 and present == {0, 255} and 255 not in lut and not meta.reduce_zero_label:
                binary.append(masks[stem])
        if binary and not any(part.pixels.get(c) for c in range(1, meta.num_classes)):
            report.errors.append(
                f"{split}: {len(binary)} mask(s) hold only the values 0 and 255 ({_files(binary, mask_dir)}): 255 is "
                "the ignore label, so everything but the background would be ignored (binary masks saved as 0/255). "
                "Relabel 255 -> 1, or add \"label_map\": {\"255\": 1} to dataset.json")
        reduced = " once reduce_zero_label makes stored value v class v - 1" if meta.reduce_zero_label else ""
        for value, files in sorted(outside.items()):
            report.errors.append(
                f"{split}: value {value} ({outside_pixels[value]} pixels) in {len(files)} mask(s) is not a class "
                f"(0..{meta.num_classes - 1}) nor ignore_index {meta.ignore_index}{reduced}: "
                f"{_files(files, mask_dir)}; "
                "fix \"classes\" / \"ignore_index\" in dataset.json, relabel, or map it with \"label_map\"")
        if rotated:
            report.warnings.append(
                f"{split}: {len(rotated)} image(s) carry an EXIF orientation and are read upright, as "
                f"MMSegmentation reads them ({_files(rotated, image_dir)}): their masks must be drawn on the "
                "upright view (as labelme and CVAT show it)")
        if split == "train" and crop_size is not None and largest != (0, 0) and not crop_fits:
            report.warnings.append(
                f"train: the crop {crop_size[0]}x{crop_size[1]} (h x w) is larger than every train image (the "
                f"largest is {largest[0]}x{largest[1]}): crops are mostly padding unless the ratio resize "
                "enlarges the images; choose a smaller --crop-size")
        total = part.total()
        ignored = part.pixels.get(meta.ignore_index, 0)
        if total and ignored / total > MOSTLY_IGNORED:
            report.warnings.append(f"{split}: {100.0 * ignored / total:.1f}% of the pixels are ignored "
                                   f"(value {meta.ignore_index})")
        if split == "train" and total:
            empty = [meta.classes[c] for c in range(meta.num_classes) if not part.pixels.get(c)]
            if empty:
                report.warnings.append(f"train: no pixel of class(es) {', '.join(repr(c) for c in empty)}: the "
                                       "model cannot learn them")
            labelled = total - part.pixels.get(meta.ignore_index, 0)
            rare = [(meta.classes[c], 100.0 * part.pixels[c] / labelled) for c in range(meta.num_classes)
                    if labelled and 0 < part.pixels.get(c, 0) < RARE_CLASS * labelled]
            if rare:
                report.warnings.append(
                    f"train: class(es) {', '.join(f'{name!r} ({share:.3f}%)' for name, share in rare)} cover under "
                    f"{100 * RARE_CLASS:g}% of the labelled pixels: a model may never predict them; consider "
                    "isa train --class-weights auto (or --loss ce:1.0 dice:1.0)")
    return report
