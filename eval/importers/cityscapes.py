"""A raw Cityscapes download to what ``--data-root`` reads: ``*_gtFine_labelTrainIds.png`` beside each
``*_gtFine_labelIds.png``, as MMSegmentation's ``tools/dataset_converters/cityscapes.py`` leaves them.

Each labelIds pixel maps through cityscapesscripts' ``id2label`` table (ids 0..33; the license plate's id
-1 is stored as 255 in the 8-bit file): the 19 evaluated classes get their trainId 0..18, every other id 255.
cityscapesscripts' ``createTrainIdLabelImgs`` draws the same pixels from ``*_gtFine_polygons.json``
(``tests/data/cityscapes_ref`` holds its output for every id, made by ``tools/cityscapes_reference.py``).
The originals are never changed; a value no Cityscapes id stores is refused, naming the file and the values.

>>> import_cityscapes("data/cityscapes")   # doctest: +SKIP
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from eval.datasets import CityscapesDataset, DatasetError, list_files, read_mask
from zoo.utils import write_bytes_atomic

from .layout import ImportDataError, raise_if

PathLike = str | os.PathLike
# id -> trainId of the 19 evaluated classes (cityscapesscripts.helpers.labels); all other ids -> 255
TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
             27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
LICENSE_PLATE = 255  # id -1 as an 8-bit labelIds file stores it
IDS = frozenset(range(34)) | {LICENSE_PLATE}


def train_id_table() -> np.ndarray:
    """A 256-entry lookup table: stored labelIds value -> trainId (255 for unevaluated ids and non-ids)."""
    table = np.full(256, 255, dtype=np.uint8)
    for label_id, train_id in TRAIN_IDS.items():
        table[label_id] = train_id
    return table


def label_ids_to_train_ids(label_ids: np.ndarray, where: str = "labelIds") -> np.ndarray:
    """Map a labelIds array to trainIds; ValueError naming ``where`` for values no Cityscapes id stores."""
    values = np.unique(label_ids)
    unknown = [int(v) for v in values if int(v) not in IDS]
    if unknown:
        raise ValueError(f"{where}: values {unknown[:10]} are not Cityscapes label ids (0..33, 255 for -1); is this "
                         "a *_gtFine_labelIds.png?")
    return train_id_table()[label_ids.astype(np.int64)]


def import_cityscapes(root: PathLike, *, splits: tuple[str, ...] = ("train", "val", "test"),
                      skip_invalid: bool = False, check: bool = True) -> dict[str, int]:
    """Write ``*_gtFine_labelTrainIds.png`` beside every ``ROOT/gtFine/<split>/**/*_gtFine_labelIds.png``
    (atomically; the same bytes again on a re-run), then check each split that has images the way
    ``isa eval --data-root`` reads it. Returns the number of files written per split."""
    root = Path(root)
    gt = root / "gtFine"
    if not gt.is_dir():
        raise ImportDataError(f"{root}: no gtFine/ folder; ROOT must be the Cityscapes download "
                              "(gtFine/, leftImg8bit/)")
    written: dict[str, int] = {}
    errors: list[str] = []
    for split in splits:
        folder = gt / split
        if not folder.is_dir():
            continue
        count = 0
        for rel in list_files(folder, "_gtFine_labelIds.png"):
            src = folder / rel
            try:
                ids = read_mask(src)
                if ids.ndim != 2:
                    raise ValueError(f"{src}: expected a single-channel image")
                train = label_ids_to_train_ids(np.asarray(ids), str(src))
            except (DatasetError, ValueError) as err:
                errors.append(str(err))
                continue
            buffer = io.BytesIO()
            Image.fromarray(train).save(buffer, format="PNG")
            write_bytes_atomic(src.with_name(src.name.replace("_gtFine_labelIds.png", "_gtFine_labelTrainIds.png")),
                               buffer.getvalue())
            count += 1
        written[split] = count
    raise_if(errors, "Cityscapes import", skip_invalid)
    if not any(written.values()):
        raise ImportDataError(f"{gt}: no *_gtFine_labelIds.png under gtFine/{{{','.join(splits)}}}/")
    failed = []
    for split, count in written.items():
        line = f"cityscapes {root} {split}: {count} *_gtFine_labelTrainIds.png written"
        if check and count and (root / "leftImg8bit" / split).is_dir():
            try:
                dataset = CityscapesDataset(root, split)
                dataset.check()
                line += f"; {len(dataset)} image/label pairs read back, sizes and values checked"
            except DatasetError as err:
                failed.append(f"{split}: {err}")
                line += "; check FAILED"
        print(line)
    if failed:
        raise ImportDataError("the trainId files were written but the dataset does not read back: " + "; ".join(failed))
    return written
