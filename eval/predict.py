"""``isa predict``'s work: label maps for image files, saved as palette masks and overlays with a legend."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from zoo.images import IMAGE_SUFFIXES, ImageError, to_rgb_tensor
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


BATCH_PIXELS = 1 << 23  # pixels per batch of same-size photos; a larger photo runs alone (bounded memory)


class _Files(torch.utils.data.Dataset):
    """Decodes image files in DataLoader workers; a file that cannot be read comes back as its error, so the
    main process raises the reader's own message (naming the file), not a worker traceback."""

    def __init__(self, files: Sequence[tuple[Path, str]], max_pixels: int | None) -> None:
        self.files, self.max_pixels = list(files), max_pixels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Path, str, Any]:
        path, name = self.files[index]
        try:
            return path, name, to_rgb_tensor(path, self.max_pixels)
        except Exception as exc:  # noqa: BLE001 — handed to the main process as is
            return path, name, exc


def _one(batch: list) -> Any:
    return batch[0]


def predict_files(segmenter: Segmenter, inputs: Sequence[str | Path], out_dir: str | Path, *, tta: bool = False,
                  alpha: float = 0.5, classes: Sequence[str] | None = None,
                  palette: Sequence[Sequence[int]] | None = None, progress: bool = True,
                  num_workers: int = 0,
                  on_error: Callable[[Path, ImageError], None] | None = None) -> list[dict[str, Any]]:
    """Segment every image in ``inputs``; write ``<out>/<name>_mask.png`` and ``<out>/<name>_overlay.png``.

    The mask is a palette PNG (pixel values = class indices, colours = the palette); the overlay blends
    the image with the colours and adds a legend of the classes present. Names and colours are the
    weights' own (``segmenter.classes``/``palette``) unless ``classes``/``palette`` replace them.
    Consecutive images of the same size run as one batch of up to ``segmenter.batch_size`` (and
    ``BATCH_PIXELS`` pixels: a large photo runs alone); ``num_workers`` DataLoader workers decode the next
    files meanwhile. Returns one record per image. A file the reader refuses (``zoo.images.ImageError``)
    stops the run, or, with ``on_error``, is handed to it (path, error) and skipped.

    >>> from zoo import Segmenter                                                             # doctest: +SKIP
    >>> predict_files(Segmenter(weights="runs/mine/model.safetensors"), ["street.jpg"], "out")  # doctest: +SKIP
    """
    out_dir = Path(out_dir)
    classes = list(classes or segmenter.classes)
    palette = list(palette or segmenter.palette)
    files = find_images(inputs)
    loader = DataLoader(_Files(files, segmenter.max_pixels), batch_size=1, collate_fn=_one,
                        num_workers=num_workers, prefetch_factor=2 if num_workers > 0 else None)
    records: list[dict[str, Any]] = []
    pending: list[tuple[Path, str, torch.Tensor]] = []
    bar = tqdm(total=len(files), desc="predict", unit="img", disable=not progress)

    def flush() -> None:
        labels = segmenter([image for _, _, image in pending], tta=tta)
        for (path, name, image), label in zip(pending, labels):
            mask_path, overlay_path = out_dir / f"{name}_mask.png", out_dir / f"{name}_overlay.png"
            save_png(label_png(label, palette), mask_path)
            save_png(overlay_with_legend(image, label, classes, palette, alpha), overlay_path)
            records.append({"image": str(path), "mask": str(mask_path), "overlay": str(overlay_path),
                            "classes_present": sorted(int(c) for c in label.unique())})
        bar.update(len(pending))
        pending.clear()

    for path, name, image in loader:
        if isinstance(image, ImageError) and on_error is not None:
            on_error(path, image)
            bar.update(1)
            continue
        if isinstance(image, Exception):
            raise image
        if pending and (image.shape != pending[0][2].shape or len(pending) >= segmenter.batch_size
                        or (len(pending) + 1) * image[0].numel() > BATCH_PIXELS):
            flush()
        pending.append((path, name, image))
        del image
    if pending:
        flush()
    bar.close()
    return records
