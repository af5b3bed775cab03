"""``isa predict``'s work: label maps for image files, saved as palette masks and overlays with a legend."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from eval.datasets import IMAGE_SUFFIXES, read_image
from eval.inference import TestSettings, predict_label_map
from eval.report import label_png, save_png_atomic
from eval.visualize import overlay_with_legend


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


@torch.no_grad()
def predict_files(model: torch.nn.Module, inputs: Sequence[str | Path], out_dir: str | Path, *,
                  classes: Sequence[str], palette: Sequence[Sequence[int]], settings: TestSettings | None = None,
                  aug_test: bool = False, dtype: str | torch.dtype | None = None,
                  device: str | torch.device | None = None, alpha: float = 0.5,
                  progress: bool = True) -> list[dict[str, Any]]:
    """Segment every image in ``inputs``; write ``<out>/<name>_mask.png`` and ``<out>/<name>_overlay.png``.

    The mask is a palette PNG (pixel values = class indices, colours = ``palette``); the overlay blends
    the image with the colours and adds a legend of the classes present. Returns one record per image.

    >>> from zoo import create_model                                                      # doctest: +SKIP
    >>> from eval.classes import dataset_meta                                             # doctest: +SKIP
    >>> meta = dataset_meta("cityscapes")                                                 # doctest: +SKIP
    >>> model = create_model("isanet_r50-d8_512x1024_40k_cityscapes", weights="auto").eval()  # doctest: +SKIP
    >>> predict_files(model, ["street.jpg"], "out", classes=meta.classes, palette=meta.palette)  # doctest: +SKIP
    """
    out_dir = Path(out_dir)
    model.eval()
    records = []
    for path, name in tqdm(find_images(inputs), desc="predict", unit="img", disable=not progress):
        image = read_image(path, exif_transpose=True)
        labels = predict_label_map(model, image, settings, aug_test=aug_test, dtype=dtype, device=device).cpu()
        mask_path, overlay_path = out_dir / f"{name}_mask.png", out_dir / f"{name}_overlay.png"
        save_png_atomic(label_png(labels, palette), mask_path)
        save_png_atomic(overlay_with_legend(image, labels, classes, palette, alpha), overlay_path)
        records.append({"image": str(path), "mask": str(mask_path), "overlay": str(overlay_path),
                        "classes_present": sorted(int(c) for c in labels.unique())})
    return records
