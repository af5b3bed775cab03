"""``evaluate(model, dataset)``: the whole evaluation loop as one Python call (``isa eval``, training, demo).

0.x tests one image per forward pass; here ``batch_size`` images of the same size run as one batch (and, in
slide mode, that many windows per forward pass). The network computes each image as alone, up to fp32
rounding (a batched convolution may sum in another order), so a label can differ from batch size 1 only
where two classes tie to that rounding (tests: none on their images). DataLoader workers decode the next
images while the network runs (``num_workers``, each with ``prefetch_factor`` batches ahead); resizing,
normalization and the network run on the model's device (:mod:`zoo.inference`).

One pass over the data fills everything: the metric's confusion matrix (which is the report's confusion
matrix), per-image scores from the same ``bincount``, and a heap of the ``save_errors`` worst images.
Under ``torch.distributed`` each rank takes every world-size-th image (no padding duplicates, unlike
``DistributedSampler``), the confusion matrix is summed across ranks and the per-image scores gathered, so
every rank returns the same report; each rank draws those of the globally worst images it holds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from eval.metrics import IoUMetric
from eval.pictures import WorstImages, error_picture
from eval.report import EvalReport
from zoo.inference import TestSettings, class_maps, unwrap, view_logits
from zoo.segmenter import Segmenter
from zoo.utils import dtype_name, parse_dtype
from zoo.visualize import label_png, save_png


def _as_list(batch: list) -> list:
    # samples of different sizes and meta dicts of paths: no stacking, no default_collate list-of-strings
    return batch


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def same_size_groups(shapes: Sequence[Sequence[int]]) -> list[list[int]]:
    """Indices grouped by shape, each group in its first member's order (a batch per group).

    >>> same_size_groups([(3, 4, 4), (3, 5, 4), (3, 4, 4)])
    [[0, 2], [1]]
    """
    groups: dict[tuple, list[int]] = {}
    for i, shape in enumerate(shapes):
        groups.setdefault(tuple(shape), []).append(i)
    return list(groups.values())


def _image_scores(confusion: torch.Tensor) -> tuple[int, float, float]:
    """(labelled pixels, aAcc %, mIoU % over the classes in the label or the prediction) of one image's
    (K+1)×(K+1) confusion matrix; NaN when nothing is labelled / no class present."""
    k = confusion.shape[0] - 1
    m = confusion.double()
    intersect = torch.diagonal(m)[:k]
    label, pred = m.sum(dim=1)[:k], m.sum(dim=0)[:k]
    union = label + pred - intersect
    pixels = int(m.sum())
    acc = float(intersect.sum()) / pixels * 100.0 if pixels else math.nan
    present = union > 0
    miou = float((intersect[present] / union[present]).mean()) * 100.0 if bool(present.any()) else math.nan
    return pixels, acc, miou


@torch.no_grad()
def evaluate(model: torch.nn.Module | Segmenter, dataset: Any, *, settings: TestSettings | None = None,
             tta: bool = False, dtype: str | torch.dtype | None = None,
             device: str | torch.device | None = None, max_images: int | None = None, num_workers: int = 2,
             batch_size: int = 1, prefetch_factor: int = 2, metrics: Sequence[str] | str = ("mIoU",),
             beta: float = 1.0, nan_to_num: float | None = None, save_preds: str | Path | None = None,
             save_errors: int = 0, errors_dir: str | Path | None = None, progress: bool = True) -> EvalReport:
    """Evaluate ``model`` on ``dataset`` (an :mod:`eval.datasets` reader) with 0.x's test procedure.

    ``model`` is a ``zoo.Segmenter`` (its fast model, test settings, dtype and device) or a zoo model as
    it is (training's periodic evaluation: no copy; ``dtype`` defaults to float32, ``device`` to the model's).
    ``metrics`` / ``beta`` / ``nan_to_num`` are MMSegmentation's ``IoUMetric`` options (``mIoU``, ``mDice``,
    ``mFscore``).

    Returns an :class:`eval.report.EvalReport`: ``report["mIoU"]``, ``report["IoU"]`` (percent, unrounded,
    NaN for a class absent from labels and predictions), ``report.confusion`` (the (K+1)×(K+1) tensor),
    ``report.per_image``, ``report.to_markdown()``, ``report.to_csv()``, ``report.write(path)``; its dict
    view also has ``classes``, ``areas``, ``num_images``, ``tta``, ``dtype``, ``scale_wh``. ``max_images``
    evaluates the first N images only (periodic checks during training). ``save_preds`` writes each label map
    as a palette PNG ``<dir>/<name>.png`` (class indices 0..K−1, i.e. without ADE's +1 submission offset).
    ``save_errors`` N writes the N images of lowest mIoU as error pictures (:func:`eval.pictures.error_picture`)
    ``<errors_dir>/<NNN>_<name>.png``, NNN = 001 for the worst. The model is put in eval mode and its
    previous mode restored.

    >>> from zoo import Segmenter                                                       # doctest: +SKIP
    >>> from eval.datasets import build_dataset                                         # doctest: +SKIP
    >>> seg = Segmenter("isanet_r50-d8_512x1024_40k_cityscapes", weights="auto")        # doctest: +SKIP
    >>> val = build_dataset("cityscapes", "data/cityscapes")                             # doctest: +SKIP
    >>> report = evaluate(seg, val, metrics=["mIoU", "mDice"], batch_size=4)            # doctest: +SKIP
    >>> report["mDice"], report.confusion.shape                                         # doctest: +SKIP
    """
    if getattr(dataset, "transforms", None) is not None:
        raise ValueError(f"evaluate() needs the raw images and masks, but {dataset!r} has transforms; build the "
                         "evaluation dataset without transforms (the test resize happens inside evaluate)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1 (--batch-size), got {batch_size}")
    if save_errors and errors_dir is None:
        raise ValueError("save_errors needs errors_dir, the folder for the pictures")
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
        param = next(inner.parameters(), None) if isinstance(inner, torch.nn.Module) else None
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)

    indices = list(range(len(dataset) if max_images is None else min(max_images, len(dataset))))
    rank, world = _rank_world()
    mine = indices[rank::world]
    loader = DataLoader(Subset(dataset, mine), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_as_list, pin_memory=device.type == "cuda",
                        prefetch_factor=prefetch_factor if num_workers > 0 else None)
    metric = IoUMetric(dataset.num_classes, dataset.ignore_index, reduce_zero_label=False, metrics=metrics,
                       beta=beta, nan_to_num=nan_to_num)
    out_dir = Path(save_preds) if save_preds is not None else None
    worst = WorstImages(save_errors)
    records: list[dict[str, Any]] = []
    was_training = getattr(inner, "training", False)
    if isinstance(inner, torch.nn.Module):
        inner.eval()
    position = 0
    try:
        bar = tqdm(total=len(mine), desc="eval" + (" ms+flip" if tta else ""), unit="img",
                   disable=not progress or rank != 0, dynamic_ncols=True, leave=None)  # nested: leaves no line
        for samples in loader:
            for group in same_size_groups([image.shape for image, _, _ in samples]):
                images = torch.stack([samples[i][0].as_subclass(torch.Tensor) for i in group])
                masks = torch.stack([samples[i][1].as_subclass(torch.Tensor) for i in group])
                images = images.to(device, non_blocking=True)
                views = view_logits(inner, images, settings, tta=tta, dtype=dtype, window_batch=batch_size)
                labels = class_maps(views, images.shape[-2:], settings.align_corners)
                del views
                per_image = metric.update(labels, masks.to(device, non_blocking=True), per_image=True).cpu()
                for j, i in enumerate(group):
                    meta = samples[i][2]
                    pixels, acc, miou = _image_scores(per_image[j])
                    records.append({"index": mine[position + i], "name": meta["name"], "pixels": pixels,
                                    "aAcc": acc, "mIoU": miou})
                    worst.offer(miou, (mine[position + i], meta["name"]),
                                lambda j=j, i=i: (samples[i][0].as_subclass(torch.Tensor).clone(),
                                                  samples[i][1].as_subclass(torch.Tensor).clone(),
                                                  labels[j].cpu().clone(), acc))
                    if out_dir is not None:
                        save_png(label_png(labels[j], dataset.palette), out_dir / f"{meta['name']}.png")
            position += len(samples)
            bar.update(len(samples))
        bar.close()
    finally:
        if isinstance(inner, torch.nn.Module):
            inner.train(was_training)
    records = _gather_records(records, world)
    pictures = _write_error_pictures(worst, save_errors, errors_dir, dataset, world) if save_errors else []
    return EvalReport.from_metric(
        metric, dataset.classes, num_images=len(indices), per_image=records, palette=list(dataset.palette),
        error_pictures=pictures,
        info={"tta": bool(tta), "dtype": dtype_name(dtype), "scale_wh": list(settings.scale_wh),
              "test_mode": settings.mode, "batch_size": int(batch_size)})


def _gather_records(records: list[dict[str, Any]], world: int) -> list[dict[str, Any]]:
    """Every rank's per-image records, in dataset order (the index field dropped)."""
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, records)
        records = [r for part in gathered for r in part]
    records.sort(key=lambda r: r["index"])
    return [{key: value for key, value in r.items() if key != "index"} for r in records]


def _write_error_pictures(worst: WorstImages, n: int, folder: str | Path, dataset: Any, world: int) -> list[str]:
    """Draw the globally worst ``n`` images each rank holds; every rank returns the full list of paths."""
    mine = worst.items()
    candidates = [(score, key) for score, key, _ in mine]
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, candidates)
        candidates = [c for part in gathered for c in part]
    chosen = sorted(candidates, key=lambda c: (c[0], c[1][0]))[:n]  # lowest mIoU, then dataset order
    rank_of = {key: rank for rank, (_, key) in enumerate(chosen)}
    folder = Path(folder)
    names = {}
    for _, key in chosen:
        names[key] = f"{rank_of[key] + 1:03d}_{key[1].replace('/', '_')}.png"
    for score, key, (image, label, pred, acc) in mine:
        if key in rank_of:
            title = f"{key[1]}   mIoU {score:.2f}   aAcc {acc:.2f}   (worst #{rank_of[key] + 1})"
            picture = error_picture(image, label, pred, dataset.classes, dataset.palette, dataset.ignore_index,
                                    title=title)
            save_png(picture, folder / names[key])
    return [str(folder / names[key]) for _, key in chosen]
