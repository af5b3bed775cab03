"""``evaluate(model, dataset)``: the whole evaluation loop as one Python call (``isa eval``, training, demo).

One image per forward pass, as 0.x tests (images differ in size). The DataLoader workers only decode files;
resizing, normalization and the network run on the model's device (:mod:`zoo.inference`). Under
``torch.distributed`` each rank takes every world-size-th image (no padding duplicates, unlike
``DistributedSampler``) and the confusion matrix is summed across ranks, so every rank returns the same
numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from eval.metrics import IoUMetric
from zoo.inference import TestSettings, predict_label_map, unwrap
from zoo.segmenter import Segmenter
from zoo.utils import dtype_name, parse_dtype
from zoo.visualize import label_png, save_png


def _first(batch: list) -> Any:
    # batch_size is 1 and meta is a dict of paths: no stacking, no default_collate list-of-strings.
    return batch[0]


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def evaluate(model: torch.nn.Module | Segmenter, dataset: Any, *, settings: TestSettings | None = None,
             tta: bool = False, dtype: str | torch.dtype | None = None,
             device: str | torch.device | None = None, max_images: int | None = None, num_workers: int = 2,
             save_preds: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """mIoU of ``model`` on ``dataset`` (an :mod:`eval.datasets` reader) with 0.x's test procedure.

    ``model`` is a ``zoo.Segmenter`` (its fast model, test settings, dtype and device) or a zoo model as
    it is (training's periodic evaluation: no copy; ``dtype`` defaults to float32, ``device`` to the model's).

    Returns ``aAcc``, ``mIoU``, ``mAcc`` (percent, unrounded), per-class ``IoU`` / ``Acc`` lists (NaN for a class
    absent from labels and predictions), ``classes``, ``areas`` (per-class int counts: intersect, union,
    pred, label), ``num_images``, ``tta``, ``dtype``, ``scale_wh``. ``max_images`` evaluates the first
    N images only (periodic checks during training). ``save_preds`` writes each label map as a palette PNG
    ``<dir>/<name>.png`` (class indices 0..K−1, i.e. without ADE's +1 submission offset). The model is put in
    eval mode and its previous mode restored.

    >>> from zoo import create_model                                                    # doctest: +SKIP
    >>> from eval.datasets import build_dataset                                         # doctest: +SKIP
    >>> model = create_model("isanet_r50-d8_512x1024_40k_cityscapes", weights="auto")   # doctest: +SKIP
    >>> evaluate(model, build_dataset("cityscapes", "data/cityscapes"), dtype="bf16")["mIoU"]  # doctest: +SKIP
    78.49...
    """
    if getattr(dataset, "transforms", None) is not None:
        raise ValueError(f"evaluate() needs the raw images and masks, but {dataset!r} has transforms; build the "
                         "evaluation dataset without transforms (the test resize happens inside evaluate)")
    if isinstance(model, Segmenter):
        inner = model.model
        settings = settings or model.settings
        dtype = parse_dtype(dtype, default=model.dtype)
        device = device or model.device
    else:
        inner = unwrap(model)
        settings = settings or TestSettings.from_model(inner)
        dtype = parse_dtype(dtype)
    model_classes = getattr(inner, "num_classes", None)
    if model_classes is not None and model_classes != dataset.num_classes:
        raise ValueError(f"the model predicts {model_classes} classes but {dataset!r} has {dataset.num_classes}; "
                         "evaluate a model built for this dataset (zoo.create_model(..., num_classes=...))")
    if device is None:
        param = next(inner.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)

    indices = list(range(len(dataset) if max_images is None else min(max_images, len(dataset))))
    rank, world = _rank_world()
    mine = indices[rank::world]
    loader = DataLoader(Subset(dataset, mine), batch_size=1, shuffle=False, num_workers=num_workers,
                        collate_fn=_first, pin_memory=device.type == "cuda")
    metric = IoUMetric(dataset.num_classes, dataset.ignore_index, reduce_zero_label=False)
    out_dir = Path(save_preds) if save_preds is not None else None
    was_training = inner.training
    inner.eval()
    try:
        bar = tqdm(loader, total=len(mine), desc="eval" + (" ms+flip" if tta else ""), unit="img",
                   disable=not progress or rank != 0, dynamic_ncols=True)
        for image, mask, meta in bar:
            labels = predict_label_map(inner, image, settings, tta=tta, dtype=dtype, device=device)
            metric.update(labels, mask.as_subclass(torch.Tensor).to(device, non_blocking=True))
            if out_dir is not None:
                save_png(label_png(labels, dataset.palette), out_dir / f"{meta['name']}.png")
    finally:
        inner.train(was_training)
    result = metric.compute()
    areas = metric.areas()
    result.update({
        "classes": list(dataset.classes),
        "areas": {key: value.tolist() for key, value in areas.items()},
        "num_images": len(indices),
        "tta": bool(tta),
        "dtype": dtype_name(dtype),
        "scale_wh": list(settings.scale_wh),
        "test_mode": settings.mode,
    })
    return result
