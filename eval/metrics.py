"""mIoU exactly as MMSegmentation computes it (spec §6), from a confusion matrix built with ``torch.bincount``.

MMSegmentation's per-image step keeps the pixels whose label is not ``ignore_index`` and takes
``torch.histc(bins=K, min=0, max=K-1)`` of (pred where pred == label), pred, and label; a value outside
0..K-1 falls out of that histogram only. A (K+1)×(K+1) confusion matrix whose last row/column collects the
out-of-range values gives the same three histograms:

* intersect_c = M[c, c]; label_c = Σ_j M[c, j] (all predictions, in range or not);
  pred_c = Σ_i M[i, c] (all non-ignored labels, in range or not); union = pred + label − intersect.

Totals are summed over the dataset (not averaged per image), then aAcc = Σ intersect / Σ label,
IoU_c = intersect_c / union_c, Acc_c = intersect_c / label_c (NaN where the denominator is 0), and
mIoU / mAcc = NaN-ignoring means. Counts are int64 (exact); MMSegmentation sums float32 histograms, which
differs from exact counts by far less than 0.01 mIoU. ``compute`` returns unrounded percentages;
:func:`round_like_mmseg` gives MMSegmentation's 2-decimal report.

``metrics`` picks MMSegmentation 1.x's ``IoUMetric(iou_metrics=...)`` groups: ``mIoU`` (IoU, Acc), ``mDice``
(Dice = 2I / (P + L), Acc) and ``mFscore`` (Precision = I / P, Recall = I / L, Fscore = (1 + β²)PR / (β²P + R),
which is NaN — not 0 — where the intersection is 0, so mFscore ≠ mDice even at β = 1). ``nan_to_num``
replaces NaN per class (and in aAcc) before the means, as ``np.nan_to_num`` does there. ``fwIoU`` (frequency-
weighted IoU, Σ_c L_c / ΣL · IoU_c) and each class's ``Share`` of the labelled pixels come on top.

>>> import torch
>>> from eval.metrics import IoUMetric
>>> metric = IoUMetric(num_classes=2)
>>> metric.update(torch.tensor([[0, 1], [1, 1]]), torch.tensor([[0, 1], [0, 255]]))
>>> result = metric.compute()
>>> round(result["mIoU"], 4), result["IoU"]
(50.0, [50.0, 50.0])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def reduce_zero_label_(label: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """MMSegmentation's ``reduce_zero_label``: 0 → ignore, k → k − 1, and an ignored pixel stays ignored.

    Works on a copy in a signed dtype wide enough for the −1 step; returns the new tensor.

    >>> import torch
    >>> reduce_zero_label_(torch.tensor([0, 1, 150, 255], dtype=torch.uint8)).tolist()
    [255, 0, 149, 255]
    """
    out = label.to(torch.int64)
    was_zero = out == 0
    was_ignored = out == ignore_index
    out = out - 1
    # mmseg: label[label == 0] = 255; label -= 1; label[label == 254] = 255 — i.e. 0 and 255 both → 255.
    out[was_zero | was_ignored] = ignore_index
    fits = label.dtype != torch.uint8 or 0 <= ignore_index <= 255
    return out.to(label.dtype) if fits else out


class IoUMetric:
    """Dataset-level IoU / accuracy accumulator with MMSegmentation's arithmetic; DDP-aware.

    ``update(pred, label)`` takes integer tensors of the same shape, (H, W) or batched (N, H, W), on any
    device (the matrix lives where the first update's tensors live). ``reduce_zero_label=True`` applies
    0 → ignore, k → k−1 to ``label`` first (0.x ``intersect_and_union(..., reduce_zero_label=True)``);
    leave it False when the dataset already did it (the readers in :mod:`eval.datasets` do).
    ``compute()`` sums the matrix over ranks when ``torch.distributed`` is initialised.

    >>> import torch
    >>> m = IoUMetric(3)
    >>> m.update(torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, 4, 4, dtype=torch.long))
    >>> r = m.compute(); r["aAcc"], r["IoU"][1]
    (100.0, nan)
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, reduce_zero_label: bool = False, *,
                 metrics: Sequence[str] | str = ("mIoU",), beta: float = 1.0, nan_to_num: float | None = None
                 ) -> None:
        if num_classes < 1:
            raise ValueError(f"IoUMetric: num_classes must be ≥ 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.reduce_zero_label = bool(reduce_zero_label)
        self.metrics = check_metric_names(metrics)
        if not beta > 0:
            raise ValueError(f"IoUMetric: beta must be > 0 (the F-score's recall weight), got {beta}")
        self.beta = float(beta)
        self.nan_to_num = None if nan_to_num is None else float(nan_to_num)
        self.num_images = 0
        self.confusion: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self.num_images = 0
        self.confusion = None

    @torch.no_grad()
    def update(self, pred: torch.Tensor, label: torch.Tensor, per_image: bool = False) -> torch.Tensor | None:
        """Add one prediction/label pair (H, W) or a batch (N, H, W) of them.

        With ``per_image`` returns each image's own (K+1)×(K+1) confusion matrix, (N, K+1, K+1) int64 — the
        counts that were added, from the same single ``bincount``.
        """
        if pred.shape != label.shape:
            raise ValueError(f"IoUMetric.update: pred shape {tuple(pred.shape)} != label shape "
                             f"{tuple(label.shape)}; resize the prediction to the label's size first")
        if pred.dim() not in (2, 3):
            raise ValueError(f"IoUMetric.update: expected (H, W) or (N, H, W), got {tuple(pred.shape)}")
        if pred.is_floating_point() or label.is_floating_point():
            raise TypeError("IoUMetric.update: pred and label must be integer class maps (argmax the logits)")
        k = self.num_classes
        batch = 1 if pred.dim() == 2 else pred.shape[0]
        label = label.to(pred.device)
        if self.reduce_zero_label:
            label = reduce_zero_label_(label, self.ignore_index)
        label = label.reshape(batch, -1).to(torch.int64)
        pred = pred.reshape(batch, -1).to(torch.int64)
        # Bucket k collects everything histc(min=0, max=k-1) would drop.
        cells = torch.where((label >= 0) & (label < k), label, k) * (k + 1)
        cells += torch.where((pred >= 0) & (pred < k), pred, k)
        if per_image:  # one bincount over (image, cell): the per-image matrices and their sum in one pass
            cells += torch.arange(batch, device=cells.device).view(-1, 1) * (k + 1) ** 2
        cells = cells[label != self.ignore_index]
        size = (batch if per_image else 1) * (k + 1) ** 2
        images = torch.bincount(cells, minlength=size).view(-1, k + 1, k + 1)
        counts = images.sum(dim=0)
        if self.confusion is None:
            self.confusion = counts
        else:
            self.confusion += counts.to(self.confusion.device)
        self.num_images += batch
        return images if per_image else None

    def _reduced_confusion(self) -> torch.Tensor:
        k = self.num_classes
        confusion = self.confusion if self.confusion is not None else torch.zeros(k + 1, k + 1, dtype=torch.int64)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = confusion.device
            if dist.get_backend() == "nccl" and device.type != "cuda":
                device = torch.device("cuda", torch.cuda.current_device())
            confusion = confusion.to(device, copy=True)
            dist.all_reduce(confusion, op=dist.ReduceOp.SUM)
        return confusion.cpu()

    def areas(self) -> dict[str, torch.Tensor]:
        """Dataset totals per class (int64, length K): ``intersect``, ``union``, ``pred``, ``label``."""
        k = self.num_classes
        m = self._reduced_confusion()
        intersect = torch.diagonal(m)[:k].clone()
        area_label = m.sum(dim=1)[:k]
        area_pred = m.sum(dim=0)[:k]
        return {"intersect": intersect, "union": area_pred + area_label - intersect,
                "pred": area_pred, "label": area_label}

    def compute(self) -> dict[str, Any]:
        """Summary and per-class values (percent, unrounded; NaN where undefined) of the chosen ``metrics``.

        Keys in MMSegmentation's order: ``aAcc``, then per group its per-class lists (``IoU``, ``Acc``; ``Dice``;
        ``Fscore``, ``Precision``, ``Recall``) and their NaN-ignoring means (``mIoU``, ``mAcc``, ...), then
        ``fwIoU`` and ``Share`` (each class's percent of the labelled pixels).
        """
        return metrics_from_areas(self.areas(), self.metrics, beta=self.beta, nan_to_num=self.nan_to_num)


METRIC_NAMES = ("mIoU", "mDice", "mFscore")
# the per-class values each group adds, in MMSegmentation's order (total_area_to_metrics)
_GROUPS = {"mIoU": ("IoU", "Acc"), "mDice": ("Dice", "Acc"), "mFscore": ("Fscore", "Precision", "Recall")}


def check_metric_names(metrics: Sequence[str] | str) -> tuple[str, ...]:
    """The metric groups as a tuple, refusing names MMSegmentation's IoUMetric does not know."""
    names = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    bad = [m for m in names if m not in METRIC_NAMES]
    if bad or not names:
        raise ValueError(f"metrics {bad or '(none)'} not supported; choose from {', '.join(METRIC_NAMES)} "
                         "(MMSegmentation's iou_metrics names)")
    return tuple(dict.fromkeys(names))


def per_class_values(areas: dict[str, torch.Tensor], metrics: Sequence[str] = ("mIoU",), beta: float = 1.0
                     ) -> dict[str, torch.Tensor]:
    """Per-class fractions (float64, NaN where a denominator is 0) of the metric groups, in MMSeg's key order."""
    intersect, union = areas["intersect"].double(), areas["union"].double()
    pred, label = areas["pred"].double(), areas["label"].double()
    out: dict[str, torch.Tensor] = {}
    for name in check_metric_names(metrics):
        if name == "mIoU":
            out["IoU"] = _divide(intersect, union)
            out["Acc"] = _divide(intersect, label)
        elif name == "mDice":
            out["Dice"] = _divide(2 * intersect, pred + label)
            out["Acc"] = _divide(intersect, label)
        else:
            precision, recall = _divide(intersect, pred), _divide(intersect, label)
            b2 = beta * beta
            # MMSeg's f_score divides without a guard: 0/0 (no intersection) and NaN inputs give NaN
            out["Fscore"] = (1 + b2) * (precision * recall) / (b2 * precision + recall)
            out["Precision"] = precision
            out["Recall"] = recall
    return out


def metrics_from_areas(areas: dict[str, torch.Tensor], metrics: Sequence[str] = ("mIoU",), *, beta: float = 1.0,
                       nan_to_num: float | None = None) -> dict[str, Any]:
    """``IoUMetric.compute`` from dataset totals (``intersect``, ``union``, ``pred``, ``label`` per class)."""
    values = per_class_values(areas, metrics, beta)
    label = areas["label"].double()
    total_label = float(label.sum())
    aacc = float(areas["intersect"].double().sum()) / total_label if total_label > 0 else math.nan
    if nan_to_num is not None:
        values = {key: torch.nan_to_num(v, nan=nan_to_num) for key, v in values.items()}
        aacc = nan_to_num if math.isnan(aacc) else aacc
    result: dict[str, Any] = {"aAcc": aacc * 100.0}
    for key, value in values.items():
        result["m" + key] = _nanmean(value) * 100.0
    for key, value in values.items():
        result[key] = [float(v) * 100.0 for v in value]
    iou = _divide(areas["intersect"].double(), areas["union"].double())
    freq = label / total_label if total_label > 0 else torch.full_like(label, math.nan)
    # classes without labelled pixels weigh 0 (their IoU is 0 or NaN): a plain sum over labelled classes
    result["fwIoU"] = float((freq[label > 0] * iou[label > 0]).sum()) * 100.0 if total_label > 0 else math.nan
    result["Share"] = [float(v) * 100.0 for v in freq]
    return result


def _divide(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    out = torch.full_like(num, math.nan)
    nonzero = den > 0
    out[nonzero] = num[nonzero] / den[nonzero]
    return out


def _nanmean(values: torch.Tensor) -> float:
    """``np.nanmean``: the mean over non-NaN entries, NaN when there are none."""
    finite = values[~torch.isnan(values)]
    return float(finite.mean()) if finite.numel() else math.nan


def round_like_mmseg(result: dict[str, Any], decimals: int = 2) -> dict[str, Any]:
    """Round every number to ``decimals`` places, as MMSegmentation's report does (``np.round(v * 100, 2)``).

    >>> round_like_mmseg({"mIoU": 78.4949, "IoU": [float("nan"), 12.346]})
    {'mIoU': 78.49, 'IoU': [nan, 12.35]}
    """
    def r(v: Any) -> Any:
        if isinstance(v, float):
            # np.round (scale, round half to even, unscale), not Python's round, as MMSegmentation uses it.
            return float(np.round(v, decimals))
        if isinstance(v, list):
            return [r(x) for x in v]
        return v
    return {key: r(value) for key, value in result.items()}
