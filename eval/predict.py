"""``isa predict``'s work: label maps for image files, saved as palette masks and overlays with a legend."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from zoo.images import IMAGE_SUFFIXES
from zoo.segmenter import Segmenter
from zoo.visualize import label_png, overlay_with_legend, save_png


def find_images(inputs: Sequence[str | Path]) -> list[tuple[Path, str]]:
    """(file, output name) for each image file given or found (recursively, sorted) in a folder given.

    Output names keep sub-folders of a folder input; two inputs that would write the same name raise.
    """
    found: list[tuple[Path, str]] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {item}")
            found += [(p, p.relative_to(item).with_suffix("").as_posix()) for p in files]
        elif item.is_file():
            found.append((item, item.stem))
        else:
            raise FileNotFoundError(f"{item} is neither an image file nor a folder")
    names: dict[str, Path] = {}
    for path, name in found:
        if name in names:
            raise ValueError(f"{names[name]} and {path} would both write {name}_mask.png; predict them into "
                             "separate --out folders or rename one")
        names[name] = path
    return found


def predict_files(segmenter: Segmenter, inputs: Sequence[str | Path], out_dir: str | Path, *, tta: bool = False,
                  alpha: float = 0.5, classes: Sequence[str] | None = None,
                  palette: Sequence[Sequence[int]] | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Segment every image in ``inputs``; write ``<out>/<name>_mask.png`` and ``<out>/<name>_overlay.png``.

    The mask is a palette PNG (pixel values = class indices, colours = the palette); the overlay blends
    the image with the colours and adds a legend of the classes present. Names and colours are the
    weights' own (``segmenter.classes``/``palette``) unless ``classes``/``palette`` replace them.
    Returns one record per image.

    >>> from zoo import Segmenter                                                             # doctest: +SKIP
    >>> predict_files(Segmenter(weights="runs/mine/model.safetensors"), ["street.jpg"], "out")  # doctest: +SKIP
    """
    out_dir = Path(out_dir)
    classes = list(classes or segmenter.classes)
    palette = list(palette or segmenter.palette)
    records = []
    for path, name in tqdm(find_images(inputs), desc="predict", unit="img", disable=not progress):
        image = segmenter.load(path)
        labels = segmenter(image, tta=tta)
        mask_path, overlay_path = out_dir / f"{name}_mask.png", out_dir / f"{name}_overlay.png"
        save_png(label_png(labels, palette), mask_path)
        save_png(overlay_with_legend(image, labels, classes, palette, alpha), overlay_path)
        records.append({"image": str(path), "mask": str(mask_path), "overlay": str(overlay_path),
                        "classes_present": sorted(int(c) for c in labels.unique())})
        del image, labels
    return records
