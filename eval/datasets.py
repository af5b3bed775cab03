"""Dataset readers shared by evaluation and training (spec §5).

API (what ``train`` and ``eval`` code against)
----------------------------------------------
``dataset[i] -> (image, mask, meta)``

* ``image``: ``tv_tensors.Image``, uint8 RGB, shape (3, H, W), the file's pixels turned upright by its EXIF
  orientation, as MMSegmentation's ``LoadImageFromFile`` (OpenCV ``IMREAD_COLOR``) gives them (no resize, no
  normalization). Every file is read by :func:`zoo.images.read_image` (the one reader: format by content,
  the pixel limit ``max_pixels`` from the header, strict PNG, named errors); 0.x decoded with cv2, which
  for JPEG may differ by a grey level on some pixels (different libjpeg builds).
* ``mask``: ``tv_tensors.Mask`` (H, W), uint8 (int64 only if ``num_classes - 1`` or ``ignore_index`` exceed
  255). ``reduce_zero_label`` is already applied when the dataset says so (ADE20K), so values are
  0..K−1 or ``ignore_index``; anything else raises :class:`DatasetError` naming the file, the values and
  their counts. Palette-mode ("P") PNGs read as their indices, like mmseg's ``LoadAnnotations``; masks are
  never rotated (``LoadAnnotations`` does not apply EXIF) and never lossy (a JPEG mask is refused).
* ``meta``: ``{"name": relative path without suffix, "image_path": str, "mask_path": str,
  "ori_hw": (H, W)}``.

With ``transforms=fn`` the dataset returns ``(*fn(image, mask), meta)``; a ``torchvision.transforms.v2``
pipeline works as is (masks get nearest interpolation and their own fill).

Attributes: ``meta`` (:class:`zoo.classes.DatasetMeta`), ``classes``, ``palette``, ``num_classes``,
``ignore_index``, ``reduce_zero_label``, ``samples`` (list of :class:`Sample`, in mmseg's order: sorted
relative names for scanned folders, file order for split files).

Readers: :class:`CityscapesDataset`, :class:`ADE20KDataset`, :class:`VOCDataset`, :class:`FolderDataset`;
:func:`build_dataset` picks one by name. Images are decoded by :func:`zoo.images.read_image`; the test
pipeline (keep-ratio resize, normalise, the network, back to the original size) is :mod:`zoo.inference`.

>>> from eval.datasets import build_dataset                       # doctest: +SKIP
>>> val = build_dataset("cityscapes", "data/cityscapes", "val")   # doctest: +SKIP
>>> image, mask, meta = val[0]                                    # doctest: +SKIP
>>> image.shape, mask.shape, meta["name"]                         # doctest: +SKIP
(torch.Size([3, 1024, 2048]), torch.Size([1024, 2048]), 'frankfurt/frankfurt_000000_000294')
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors

from eval.metrics import reduce_zero_label_
from zoo.classes import DatasetMeta, dataset_meta, default_palette
from zoo.images import MAX_PIXELS, ImageError, probe, read_image

__all__ = [
    "DatasetError", "Sample", "SegDataset", "CityscapesDataset", "ADE20KDataset", "VOCDataset",
    "FolderDataset", "build_dataset", "read_mask", "DATASET_NAMES", "read_folder_meta", "parse_dataset_json",
]

DATASET_NAMES = ("cityscapes", "ade20k", "voc", "folder")
FOLDER_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")
# masks of a folder dataset pair with their image by stem; the first suffix found wins (a JPEG mask is found,
# then refused by the reader as lossy, rather than reported missing)
MASK_SUFFIXES = (".png", ".PNG", ".bmp", ".tif", ".tiff", ".webp", ".jpg", ".jpeg", ".JPG", ".JPEG")


class DatasetError(ValueError):
    """Bad or missing data; the message names the file and says how to fix it."""


@dataclass(frozen=True)
class Sample:
    """One image and its label file; ``name`` is the relative path without suffix (used for outputs)."""

    image_path: Path
    mask_path: Path
    name: str


# ---------------------------------------------------------------------------------------------- file readers

def read_mask(path: str | Path, palette: Sequence[Sequence[int]] | None = None,
              max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """Decode a label file to an integer array (H, W) of class indices, as stored (not rotated), through
    :func:`zoo.images.read_image` (``kind="mask"``: lossless files only, the pixel limit, strict PNG).

    "P" (palette) PNGs give their indices; "L"/"I"/"1" give their values. Colour (RGB/RGBA) masks need
    ``palette`` (index i ↔ colour palette[i]); a colour outside it raises :class:`DatasetError`.
    """
    path = Path(path)
    try:
        array = read_image(path, "mask", max_pixels=max_pixels)
    except ImageError as err:
        raise DatasetError(str(err)) from err
    mode = {2: "LA", 3: "RGB", 4: "RGBA"}.get(array.shape[2], "?") if array.ndim == 3 else "L"
    if array.ndim == 2:
        return array.astype(np.int64) if array.dtype == bool else array
    if mode in ("RGB", "RGBA") and array.ndim == 3:
        rgb = array[..., :3]
        if palette is None:
            grey = bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
            hint = (" It is grey stored as RGB: re-save it single-channel, e.g. "
                    "Image.open(p).convert('L').save(p)." if grey else
                    " Save masks as single-channel index PNGs (mode 'L' or 'P'), or, for a folder dataset, "
                    "list the class colours as \"palette\" in dataset.json so colours map to indices.")
            raise DatasetError(f"mask {path} is an {mode} colour image and there is no palette to map colours "
                               f"to class indices.{hint}")
        return _colours_to_indices(rgb, palette, path)
    raise DatasetError(f"mask {path} has unsupported PIL mode {mode!r} (shape {array.shape}); "
                       "save it as a single-channel index PNG (mode 'L' or 'P')")


def _colours_to_indices(rgb: np.ndarray, palette: Sequence[Sequence[int]], path: Path) -> np.ndarray:
    codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    lookup: dict[int, int] = {}
    for index, (r, g, b) in enumerate(palette):
        lookup.setdefault((int(r) << 16) | (int(g) << 8) | int(b), index)  # first class wins on duplicates
    unique, inverse = np.unique(codes, return_inverse=True)
    unknown = [int(c) for c in unique if int(c) not in lookup]
    if unknown:
        counts = {_code_to_rgb(c): int((codes == c).sum()) for c in unknown[:10]}
        raise DatasetError(f"mask {path}: colours not in the palette (colour: pixel count) {counts}"
                           f"{' …' if len(unknown) > 10 else ''}; add them to \"palette\" in dataset.json or "
                           "convert the masks to index PNGs")
    return np.array([lookup[int(c)] for c in unique], dtype=np.int64)[inverse].reshape(codes.shape)


def _code_to_rgb(code: int) -> tuple[int, int, int]:
    return (code >> 16) & 255, (code >> 8) & 255, code & 255


# ---------------------------------------------------------------------------------------------- base class

class SegDataset(torch.utils.data.Dataset):
    """A list of (image, mask) files with a :class:`DatasetMeta`; see the module docstring for the API."""

    def __init__(self, samples: Sequence[Sample], meta: DatasetMeta, *,
                 transforms: Callable[[Any, Any], tuple[Any, Any]] | None = None,
                 mask_palette: Sequence[Sequence[int]] | None = None, description: str = "",
                 max_pixels: int | None = MAX_PIXELS) -> None:
        if not samples:
            raise DatasetError(f"{description or 'dataset'}: the split is empty (no image files found); "
                               "check --data-root and --split")
        self.samples = list(samples)
        self.meta = meta
        self.transforms = transforms
        self.mask_palette = mask_palette
        self.description = description
        self.max_pixels = max_pixels  # images and masks alike (zoo.images.read_image); 0 or None: no limit
        wide = max(meta.num_classes - 1, meta.ignore_index) > 255 or meta.ignore_index < 0
        self.mask_dtype = torch.int64 if wide else torch.uint8

    classes = property(lambda self: self.meta.classes)
    palette = property(lambda self: self.meta.palette)
    num_classes = property(lambda self: self.meta.num_classes)
    ignore_index = property(lambda self: self.meta.ignore_index)
    reduce_zero_label = property(lambda self: self.meta.reduce_zero_label)

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.description!r}, {len(self)} images, {self.num_classes} classes, "
                f"ignore_index={self.ignore_index}, reduce_zero_label={self.reduce_zero_label})")

    def load_mask(self, index: int) -> torch.Tensor:
        """The checked label map (H, W) of sample ``index`` (reduce_zero_label applied), as a plain tensor."""
        sample = self.samples[index]
        stored = read_mask(sample.mask_path, self.mask_palette, self.max_pixels)
        raw = torch.from_numpy(np.ascontiguousarray(stored).astype(np.int64))
        if self.meta.label_map:
            mapped = raw.clone()
            for stored, index in self.meta.label_map:
                mapped[raw == stored] = index
            raw = mapped
        label = reduce_zero_label_(raw, self.ignore_index) if self.reduce_zero_label else raw
        bad = ((label < 0) | (label >= self.num_classes)) & (label != self.ignore_index)
        if bool(bad.any()):
            values, counts = torch.unique(raw[bad], return_counts=True)
            found = {int(v): int(c) for v, c in zip(values, counts)}
            stage = " (raw PNG values, before reduce_zero_label)" if self.reduce_zero_label else ""
            if self.meta.name == "folder":
                fix = ("Relabel them, or fix \"classes\" / \"ignore_index\" in dataset.json, or map stored values "
                       "to classes with \"label_map\" in dataset.json (e.g. {\"255\": 1}); `isa check-data` lists "
                       "every problem")
            else:
                fix = (f"This is not a {self.meta.name} label map as MMSegmentation expects it (e.g. Cityscapes "
                       "*_labelIds.png instead of *_labelTrainIds.png); regenerate it with MMSegmentation's "
                       "tools/convert_datasets scripts")
            raise DatasetError(
                f"mask {sample.mask_path}: values outside 0..{self.num_classes - 1} that are not "
                f"ignore_index={self.ignore_index} (value: pixel count){stage}: {found}. {fix}")
        return label.to(self.mask_dtype)

    def __getitem__(self, index: int) -> tuple[Any, Any, dict[str, Any]]:
        sample = self.samples[index]
        try:
            image = read_image(sample.image_path, "image", self.max_pixels)
        except ImageError as err:
            raise DatasetError(str(err)) from err
        mask = self.load_mask(index)
        if tuple(image.shape[-2:]) != tuple(mask.shape):
            raise DatasetError(size_mismatch(sample, probe(sample.image_path, self.max_pixels), tuple(mask.shape)))
        meta = {"name": sample.name, "image_path": str(sample.image_path), "mask_path": str(sample.mask_path),
                "ori_hw": (int(image.shape[-2]), int(image.shape[-1]))}
        out_image, out_mask = tv_tensors.Image(image), tv_tensors.Mask(mask)
        if self.transforms is not None:
            out_image, out_mask = self.transforms(out_image, out_mask)
        return out_image, out_mask, meta

    def check(self, limit: int | None = None) -> None:
        """Read every mask (or the first ``limit``) and compare sizes from the image headers; raise on bad data."""
        for index, sample in enumerate(self.samples[:limit]):
            mask = self.load_mask(index)
            try:
                info = probe(sample.image_path, self.max_pixels)
            except ImageError as err:
                raise DatasetError(str(err)) from err
            if info.upright_hw != tuple(mask.shape):
                raise DatasetError(size_mismatch(sample, info, tuple(mask.shape)))


def size_mismatch(sample: Sample, info: Any, mask_hw: tuple[int, ...], x: str = "×") -> str:
    """The message for an image whose upright size (`zoo.images.ImageInfo`) is not its mask's, naming the EXIF
    orientation where the mask fits the stored pixels instead (a mask drawn on the unrotated photo)."""
    up, stored = info.upright_hw, (info.height, info.width)
    text = (f"image {sample.image_path} is {up[0]}{x}{up[1]} (h{x}w, upright) but its mask {sample.mask_path} is "
            f"{mask_hw[0]}{x}{mask_hw[1]}; they must match")
    if info.orientation != 1:
        text += (f". The image is stored {stored[0]}{x}{stored[1]} with EXIF orientation {info.orientation}: "
                 "images are read upright (as MMSegmentation's LoadImageFromFile does), masks as stored")
        if tuple(mask_hw) == stored:
            text += ("; this mask fits the stored pixels, so it was drawn on the unrotated photo: rotate the mask "
                     "the same way (PIL.ImageOps.exif_transpose of the photo shows how), or save the photo upright "
                     "without its orientation tag")
    return text


def list_files(folder: Path, suffixes: str | Sequence[str]) -> list[str]:
    """Relative paths (posix) of the files under ``folder`` ending in one of ``suffixes``, as MMSegmentation
    lists them (mmengine's ``list_dir_or_file`` / mmcv's ``scandir``), sorted by string.

    Hidden files (``.name``, e.g. macOS ``._IMG.jpg`` resource forks) are skipped; directory links are
    followed, each real directory once (a link loop ends there); suffixes match case-sensitively, so
    ``.JPG`` is not ``.jpg`` (list both where both are meant).
    """
    suffixes = (suffixes,) if isinstance(suffixes, str) else tuple(suffixes)
    found: list[str] = []
    seen: set[str] = set()

    def walk(directory: str, prefix: str) -> None:
        real = os.path.realpath(directory)
        if real in seen:
            return
        seen.add(real)
        with os.scandir(directory) as entries:
            for entry in entries:
                if not entry.name.startswith(".") and entry.is_file():
                    if entry.name.endswith(suffixes):
                        found.append(prefix + entry.name)
                elif entry.is_dir():  # follows links, like os.path.isdir
                    walk(entry.path, prefix + entry.name + "/")

    walk(str(folder), "")
    return sorted(found)


def layout_hint(root: str | Path) -> str:
    """Advice when a folder dataset's --data DIR points one level too deep (DIR/images, DIR/masks or
    DIR/images/train): the folder to pass instead; '' otherwise."""
    root = Path(root)
    for up, parent in ((1, root.parent), (2, root.parent.parent)):
        if root.parts[-up:][0] in ("images", "masks") and (parent / "images").is_dir() and (parent / "masks").is_dir():
            return f" ({root} is inside the dataset: pass --data {parent}, the folder that holds images/ and masks/)"
    return ""


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{what}: directory {path} does not exist")
    return path


def _pair(image_dir: Path, mask_dir: Path, rel_images: Sequence[str], image_suffix: str | None,
          mask_suffix: str | Sequence[str], hint: str = "") -> list[Sample]:
    """Samples for relative image paths; the mask path swaps the image suffix for ``mask_suffix`` (mmseg rule),
    or for the first of several suffixes whose file exists."""
    samples, missing = [], []
    suffixes = (mask_suffix,) if isinstance(mask_suffix, str) else tuple(mask_suffix)
    for rel in rel_images:
        stem = rel[: -len(image_suffix)] if image_suffix and rel.endswith(image_suffix) else rel.rsplit(".", 1)[0]
        mask_path = next((p for p in (mask_dir / f"{stem}{x}" for x in suffixes) if p.is_file()),
                         mask_dir / f"{stem}{suffixes[0]}")
        if not mask_path.is_file():
            missing.append((image_dir / rel, mask_path))
            continue
        samples.append(Sample(image_dir / rel, mask_path, stem))
    if missing:
        image, mask = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DatasetError(f"image {image} has no mask: expected {mask}{more}.{hint}")
    return samples


# ---------------------------------------------------------------------------------------------- readers

class CityscapesDataset(SegDataset):
    """Cityscapes: ``ROOT/leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with
    ``ROOT/gtFine/<split>/<city>/*_gtFine_labelTrainIds.png`` (trainIds 0..18, 255 ignored).

    >>> CityscapesDataset("data/cityscapes", "val")    # doctest: +SKIP
    """

    def __init__(self, root: str | Path, split: str = "val", **kwargs: Any) -> None:
        root = Path(root)
        image_dir = _require_dir(root / "leftImg8bit" / split,
                                 f"Cityscapes (--data-root must contain leftImg8bit/ and gtFine/, split {split!r})")
        mask_dir = _require_dir(root / "gtFine" / split, f"Cityscapes split {split!r}")
        rel = list_files(image_dir, "_leftImg8bit.png")
        hint = (" Generate *_gtFine_labelTrainIds.png from the polygons with MMSegmentation's "
                "tools/convert_datasets/cityscapes.py (or cityscapesscripts' createTrainIdLabelImgs).")
        samples = _pair(image_dir, mask_dir, rel, "_leftImg8bit.png", "_gtFine_labelTrainIds.png", hint)
        super().__init__(samples, dataset_meta("cityscapes"), description=f"cityscapes:{root}:{split}", **kwargs)


class ADE20KDataset(SegDataset):
    """``ADEChallengeData2016/images/{training,validation}/*.jpg`` + ``annotations/.../*.png``; reduce_zero_label.

    ``root`` may be ``ADEChallengeData2016`` or its parent; split ``train``/``val`` (or the folder names).

    >>> ADE20KDataset("data/ade/ADEChallengeData2016", "val")    # doctest: +SKIP
    """

    SPLITS = {"train": "training", "val": "validation", "training": "training", "validation": "validation"}

    def __init__(self, root: str | Path, split: str = "val", **kwargs: Any) -> None:
        root = Path(root)
        if not (root / "images").is_dir() and (root / "ADEChallengeData2016").is_dir():
            root = root / "ADEChallengeData2016"
        if split not in self.SPLITS:
            raise DatasetError(f"ADE20K: unknown split {split!r}; use one of {sorted(self.SPLITS)}")
        folder = self.SPLITS[split]
        image_dir = _require_dir(root / "images" / folder,
                                 "ADE20K (--data-root must be ADEChallengeData2016 or its parent)")
        mask_dir = _require_dir(root / "annotations" / folder, "ADE20K")
        samples = _pair(image_dir, mask_dir, list_files(image_dir, ".jpg"), ".jpg", ".png")
        super().__init__(samples, dataset_meta("ade20k"), description=f"ade20k:{root}:{split}", **kwargs)


class VOCDataset(SegDataset):
    """Pascal VOC 2012 (+ SBD aug) from split files ``ImageSets/Segmentation/<split>.txt``.

    ``split`` is a split-file name, or several joined by ``+``. Splits ``aug`` and ``trainaug`` read
    ``SegmentationClassAug`` (made by mmseg's ``tools/convert_datasets/voc_aug.py``), the others
    ``SegmentationClass``. The ISANet configs train on ``train+aug`` (1464 + 9118 = 10582) and test on ``val``.
    ``root`` may be ``VOC2012`` or ``VOCdevkit``.

    >>> VOCDataset("data/VOCdevkit/VOC2012", "train+aug")    # doctest: +SKIP
    """

    AUG_SPLITS = ("aug", "trainaug")

    def __init__(self, root: str | Path, split: str = "val", **kwargs: Any) -> None:
        root = Path(root)
        if not (root / "JPEGImages").is_dir() and (root / "VOC2012").is_dir():
            root = root / "VOC2012"
        image_dir = _require_dir(root / "JPEGImages", "Pascal VOC (--data-root must be VOC2012 or VOCdevkit)")
        samples: list[Sample] = []
        for part in split.split("+"):
            split_file = root / "ImageSets" / "Segmentation" / f"{part}.txt"
            if not split_file.is_file():
                hint = (" Create aug.txt / SegmentationClassAug with MMSegmentation's "
                        "tools/convert_datasets/voc_aug.py." if part in self.AUG_SPLITS else "")
                raise DatasetError(f"Pascal VOC: split file {split_file} does not exist.{hint}")
            ann = "SegmentationClassAug" if part in self.AUG_SPLITS else "SegmentationClass"
            mask_dir = _require_dir(root / ann, f"Pascal VOC split {part!r}")
            stems = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
            if not stems:
                raise DatasetError(f"Pascal VOC: split file {split_file} is empty")
            samples += _pair(image_dir, mask_dir, [f"{s}.jpg" for s in stems], ".jpg", ".png")
        super().__init__(samples, dataset_meta("voc"), description=f"voc:{root}:{split}", **kwargs)


class FolderDataset(SegDataset):
    """A custom dataset: ``ROOT/images/<split>/NAME.(jpg|png)`` + ``ROOT/masks/<split>/NAME.png``.

    ``ROOT/dataset.json`` (optional) holds ``classes`` (list of names), ``palette`` (list of [r, g, b], also
    used to read colour masks), ``ignore_index`` (default 255), ``reduce_zero_label`` (default false) and
    ``label_map`` (stored mask value -> class index, applied first: ``{"255": 1}`` for binary 0/255 masks).
    Without it, pass ``num_classes`` (the CLI takes it from the model) and classes are named ``class_<i>``.
    Sub-folders are allowed; NAME keeps them.

    >>> FolderDataset("my_data", "val")    # doctest: +SKIP
    """

    KEYS = ("classes", "palette", "ignore_index", "reduce_zero_label", "label_map")

    def __init__(self, root: str | Path, split: str = "val", num_classes: int | None = None,
                 **kwargs: Any) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"folder dataset: {root} does not exist or is not a folder (--data DIR expects "
                               "DIR/images/<split>/ and DIR/masks/<split>/)")
        meta, palette_given = folder_meta(root, num_classes)
        image_dir = _require_dir(root / "images" / split,
                                 "folder dataset (expects ROOT/images/<split>/)" + layout_hint(root))
        mask_dir = _require_dir(root / "masks" / split, "folder dataset (expects ROOT/masks/<split>/)")
        rel = list_files(image_dir, FOLDER_IMAGE_SUFFIXES)
        stems: dict[str, str] = {}
        for r in rel:
            stem = r.rsplit(".", 1)[0]
            if stem in stems:
                raise DatasetError(f"folder dataset: {image_dir / stems[stem]} and {image_dir / r} would share the "
                                   f"mask {mask_dir / (stem + '.png')}; rename one of them")
            stems[stem] = r
        samples = _pair(image_dir, mask_dir, rel, None, MASK_SUFFIXES)
        # Colour masks map through the palette only when the user wrote one (a generated one means nothing).
        palette = meta.palette if palette_given else None
        super().__init__(samples, meta, mask_palette=palette, description=f"folder:{root}:{split}", **kwargs)


def read_folder_meta(root: str | Path, num_classes: int | None = None) -> DatasetMeta:
    """The :class:`DatasetMeta` of a folder dataset from ``ROOT/dataset.json`` (or from ``num_classes``)."""
    return folder_meta(Path(root), num_classes)[0]


def folder_meta(root: Path, num_classes: int | None) -> tuple[DatasetMeta, bool]:
    """(meta, whether dataset.json gives a palette, which then maps colour masks to class indices)."""
    path = root / "dataset.json"
    if not path.is_file():
        if num_classes is None and layout_hint(root):
            raise DatasetError(f"folder dataset: {root} holds no dataset.json{layout_hint(root)}")
        if num_classes is None:
            raise DatasetError(f"folder dataset: {path} does not exist and the number of classes is unknown; "
                               "write it, e.g. {\"classes\": [\"background\", \"cat\"], \"ignore_index\": 255}")
        return DatasetMeta("folder", tuple(f"class_{i}" for i in range(num_classes)),
                           default_palette(num_classes)), False
    return _parse_dataset_json(path)


def parse_dataset_json(path: str | Path) -> DatasetMeta:
    """Validate and read a ``dataset.json`` (keys: classes, palette, ignore_index, reduce_zero_label)."""
    return _parse_dataset_json(Path(path))[0]


def _parse_dataset_json(path: Path) -> tuple[DatasetMeta, bool]:
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:  # RecursionError: arrays nested thousands deep
        raise DatasetError(f"cannot read {path}: {err}") from err
    if not isinstance(spec, dict):
        raise DatasetError(f"{path}: expected a JSON object with keys {FolderDataset.KEYS}")
    unknown = sorted(set(spec) - set(FolderDataset.KEYS))
    if unknown:
        raise DatasetError(f"{path}: unknown key(s) {unknown}; known keys are {list(FolderDataset.KEYS)}")
    classes = spec.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise DatasetError(f"{path}: \"classes\" must be a non-empty list of class names")
    palette = spec.get("palette")
    if palette is None:
        palette = default_palette(len(classes))
    elif (not isinstance(palette, list) or len(palette) != len(classes)
          or not all(isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
                     for c in palette)):
        raise DatasetError(f"{path}: \"palette\" must be a list of {len(classes)} [r, g, b] lists of ints 0..255 "
                           "(one per class)")
    ignore_index = spec.get("ignore_index", 255)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise DatasetError(f"{path}: \"ignore_index\" must be an integer, got {ignore_index!r}")
    reduce_zero = spec.get("reduce_zero_label", False)
    if not isinstance(reduce_zero, bool):
        raise DatasetError(f"{path}: \"reduce_zero_label\" must be true or false, got {reduce_zero!r}")
    if 0 <= ignore_index < len(classes):
        raise DatasetError(f"{path}: ignore_index {ignore_index} is also a class index (0..{len(classes) - 1})")
    label_map = spec.get("label_map", {})
    if not isinstance(label_map, dict):
        raise DatasetError(f"{path}: \"label_map\" must map stored mask values to class indices, e.g. {{\"255\": 1}}")
    pairs = []
    for stored, index in label_map.items():
        if not (str(stored).isdigit() and isinstance(index, int) and not isinstance(index, bool)
                and (0 <= index < len(classes) or index == ignore_index)):
            raise DatasetError(f"{path}: \"label_map\" entry {stored!r}: {index!r} must map a stored value (0..255) "
                               f"to a class index 0..{len(classes) - 1} or the ignore_index {ignore_index}")
        pairs.append((int(stored), index))
    meta = DatasetMeta("folder", tuple(classes), tuple(tuple(c) for c in palette), ignore_index, reduce_zero,
                       tuple(pairs))
    return meta, "palette" in spec


def build_dataset(name: str, root: str | Path, split: str = "val", **kwargs: Any) -> SegDataset:
    """A reader by name: ``cityscapes``, ``ade20k``, ``voc`` or ``folder`` (kwargs go to the reader).

    >>> build_dataset("folder", "my_data", "val", num_classes=2)    # doctest: +SKIP
    """
    readers: dict[str, type[SegDataset]] = {"cityscapes": CityscapesDataset, "ade20k": ADE20KDataset,
                                            "voc": VOCDataset, "folder": FolderDataset}
    key = name.lower()
    if key not in readers:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {list(readers)}")
    if key != "folder":
        kwargs.pop("num_classes", None)  # fixed by the benchmark; the caller checks it against the model
    return readers[key](root, split, **kwargs)
