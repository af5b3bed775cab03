"""Presenting results: :class:`EvalReport` (what ``evaluate`` returns), the per-class table, CSV and JSON files.

>>> import torch
>>> from eval.metrics import IoUMetric
>>> metric = IoUMetric(2, metrics=["mIoU", "mDice"])
>>> _ = metric.update(torch.tensor([[0, 1], [1, 1]]), torch.tensor([[0, 1], [0, 255]]))
>>> report = EvalReport.from_metric(metric, ["road", "sky"])
>>> round(report["mDice"], 4), report.confusion[:2, :2].tolist()
(66.6667, [[1, 1], [0, 1]])
>>> print(report.to_markdown().splitlines()[2])
| road | 50.00 | 50.00 | 66.67 | 66.67 |
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from eval.metrics import IoUMetric, metrics_from_areas
from zoo.utils import write_bytes_atomic

# per-class columns in the order tables show them (those a report has)
PER_CLASS_KEYS = ("IoU", "Acc", "Dice", "Fscore", "Precision", "Recall", "Share")


@dataclass(eq=False)
class EvalReport(Mapping):
    """An evaluation's results: MMSegmentation's metrics, the confusion matrix, per-image scores.

    ``confusion`` is the (K+1)×(K+1) int64 matrix the metric accumulated (rows: labels, columns: predictions;
    index K collects values outside 0..K−1, which MMSegmentation's histograms drop); :attr:`matrix` is its
    K×K part. ``values`` holds what :meth:`IoUMetric.compute` returns (percent, unrounded, NaN where
    undefined). ``per_image`` has one record per image (``name``, ``pixels`` labelled, ``aAcc``, ``mIoU``).
    ``info`` carries how the evaluation ran (test scale, dtype, TTA). The report reads like the dict
    ``evaluate`` used to return: ``report["mIoU"]``, ``report["IoU"]``, ``"areas" in report``.
    """

    classes: list[str]
    confusion: torch.Tensor
    values: dict[str, Any]
    metrics: tuple[str, ...] = ("mIoU",)
    beta: float = 1.0
    nan_to_num: float | None = None
    num_images: int = 0
    per_image: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    palette: list[list[int]] | None = None
    error_pictures: list[str] = field(default_factory=list)

    @classmethod
    def from_metric(cls, metric: IoUMetric, classes: Sequence[str], **kwargs: Any) -> "EvalReport":
        """The report of a metric's totals (summed over ranks under torch.distributed)."""
        confusion = metric._reduced_confusion()
        areas = areas_from_confusion(confusion)
        values = metrics_from_areas(areas, metric.metrics, beta=metric.beta, nan_to_num=metric.nan_to_num)
        kwargs.setdefault("num_images", metric.num_images)
        return cls(list(classes), confusion, values, metric.metrics, metric.beta, metric.nan_to_num, **kwargs)

    # --- the dict view (training, the demo and scripts read results by key)
    def to_dict(self) -> dict[str, Any]:
        """Everything as plain values (what ``--out results.json`` holds, NaN as None there)."""
        return {**self.values, "classes": list(self.classes),
                "areas": {key: value.tolist() for key, value in self.areas.items()},
                "num_images": self.num_images, "metrics": list(self.metrics), "beta": self.beta,
                "nan_to_num": self.nan_to_num, **self.info,
                "confusion": self.confusion.tolist(), "top_confused": self.top_confused(),
                "per_image": list(self.per_image)}

    def __getitem__(self, key: str) -> Any:
        if key in self.values:
            return self.values[key]
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())

    # --- derived views
    @property
    def matrix(self) -> torch.Tensor:
        """The K×K confusion counts (rows: labels, columns: predictions), int64."""
        k = len(self.classes)
        return self.confusion[:k, :k]

    @property
    def areas(self) -> dict[str, torch.Tensor]:
        """Per-class totals the metric divides: ``intersect``, ``union``, ``pred``, ``label`` (int64)."""
        return areas_from_confusion(self.confusion)

    def per_class_keys(self) -> list[str]:
        """The per-class columns this report has, in table order."""
        return [key for key in PER_CLASS_KEYS if key in self.values]

    def summary_keys(self) -> list[str]:
        """``aAcc``, the chosen means (``mIoU``, ``mAcc``, ``mDice``, ...) and ``fwIoU``."""
        return ["aAcc"] + [f"m{key}" for key in self.per_class_keys() if key != "Share"] + ["fwIoU"]

    def top_confused(self, n: int = 10) -> list[dict[str, Any]]:
        """The ``n`` largest off-diagonal cells: label class, predicted class, pixels, percent of the label's pixels."""
        return top_confused_pairs(self.matrix, self.classes, n)

    # --- text
    def format_table(self) -> str:
        """The per-class table and the summary line (2 decimals, as MMSegmentation's log)."""
        return format_table(self.values, self.classes)

    def to_markdown(self) -> str:
        """The per-class table and the summary as Markdown (2 decimals; NaN as "nan")."""
        keys = self.per_class_keys()
        lines = ["| Class | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
        for c, name in enumerate(self.classes):
            lines.append(f"| {name.strip() or repr(name)} | " + " | ".join(_fmt(self.values[k][c]) for k in keys)
                         + " |")
        lines.append("")
        lines.append("| " + " | ".join(self.summary_keys()) + " |")
        lines.append("|" + "---:|" * len(self.summary_keys()))
        lines.append("| " + " | ".join(_fmt(self.values[k]) for k in self.summary_keys()) + " |")
        return "\n".join(lines)

    def to_csv(self) -> str:
        """The per-class CSV (``per_class.csv``): class, index, each chosen metric (percent, empty for NaN),
        share of labelled pixels, labelled / predicted / correct pixel counts."""
        keys = self.per_class_keys()
        areas = self.areas
        rows = [["class", "index", *keys, "label_pixels", "pred_pixels", "correct_pixels"]]
        for c, name in enumerate(self.classes):
            rows.append([name, c, *(_csv_number(self.values[k][c]) for k in keys), int(areas["label"][c]),
                         int(areas["pred"][c]), int(areas["intersect"][c])])
        return _csv_text(rows)

    def confusion_csv(self) -> str:
        """Raw counts, rows = labels, columns = predictions; an ``(out of range)`` row/column when any value
        fell outside 0..K−1 (MMSegmentation's histograms drop those)."""
        k = len(self.classes)
        m = self.confusion
        extra = bool(m[k].sum() or m[:, k].sum())
        size = k + 1 if extra else k
        names = list(self.classes) + (["(out of range)"] if extra else [])
        rows = [["label \\ prediction", *names]]
        for i in range(size):
            rows.append([names[i], *(int(v) for v in m[i, :size])])
        return _csv_text(rows)

    def per_image_csv(self) -> str:
        """One row per image: name, labelled pixels, aAcc, mIoU (percent; empty when undefined)."""
        rows = [["name", "labelled_pixels", "aAcc", "mIoU"]]
        for record in self.per_image:
            rows.append([record["name"], record["pixels"], _csv_number(record["aAcc"]),
                         _csv_number(record["mIoU"])])
        return _csv_text(rows)

    def write(self, out: str | Path, extra: Mapping[str, Any] | None = None) -> list[Path]:
        """``out`` (JSON) plus, beside it, ``per_class.csv``, ``per_image.csv``, ``confusion.csv`` and the
        ``confusion.png`` heat map; all atomically. Returns the paths written."""
        from eval.confusion import heatmap

        out = Path(out)
        folder = out.parent
        write_json_atomic(out, {**(extra or {}), **self.to_dict()})
        paths = [out]
        for name, text in (("per_class.csv", self.to_csv()), ("per_image.csv", self.per_image_csv()),
                           ("confusion.csv", self.confusion_csv())):
            write_bytes_atomic(folder / name, text.encode())
            paths.append(folder / name)
        from zoo.visualize import save_png
        paths.append(save_png(heatmap(self.matrix, self.classes), folder / "confusion.png"))
        return paths


def areas_from_confusion(confusion: torch.Tensor) -> dict[str, torch.Tensor]:
    """``intersect`` (diagonal), ``label`` (row sums), ``pred`` (column sums), ``union`` of a (K+1)×(K+1) matrix.

    >>> areas_from_confusion(torch.tensor([[3, 1, 0], [2, 4, 1], [0, 0, 0]]))["union"].tolist()
    [6, 8]
    """
    k = confusion.shape[0] - 1
    intersect = torch.diagonal(confusion)[:k].clone()
    label, pred = confusion.sum(dim=1)[:k], confusion.sum(dim=0)[:k]
    return {"intersect": intersect, "union": pred + label - intersect, "pred": pred, "label": label}


def top_confused_pairs(matrix: torch.Tensor, classes: Sequence[str], n: int = 10) -> list[dict[str, Any]]:
    """The ``n`` largest off-diagonal counts of a K×K confusion matrix, largest first (ties: label, prediction).

    >>> top_confused_pairs(torch.tensor([[5, 2], [7, 1]]), ["a", "b"], 1)
    [{'label': 'b', 'prediction': 'a', 'pixels': 7, 'percent_of_label': 87.5}]
    """
    k = matrix.shape[0]
    off = matrix.clone().long()
    off.fill_diagonal_(0)
    flat = off.flatten().tolist()
    order = sorted((i for i, v in enumerate(flat) if v > 0), key=lambda i: (-flat[i], i))[:n]
    rows = matrix.sum(dim=1).tolist()
    return [{"label": classes[i // k], "prediction": classes[i % k], "pixels": int(flat[i]),
             "percent_of_label": flat[i] / rows[i // k] * 100.0} for i in order]


def format_confused(pairs: Sequence[Mapping[str, Any]]) -> str:
    """Lines "label -> prediction: pixels (percent of the label's pixels)"."""
    if not pairs:
        return "no confusions"
    width = max(len(str(p["label"]).strip()) for p in pairs)
    return "\n".join(f"  {str(p['label']).strip():<{width}} -> {str(p['prediction']).strip()}: {p['pixels']} px "
                     f"({p['percent_of_label']:.2f}% of {str(p['label']).strip()})" for p in pairs)


def _csv_number(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and not math.isfinite(value)) else repr(float(value))


def _csv_text(rows: Sequence[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def format_table(result: Mapping[str, Any], classes: Sequence[str]) -> str:
    """The per-class table (IoU/Acc and whatever else ``result`` has) and the summary line, 2 decimals.

    >>> print(format_table({"IoU": [50.0, float("nan")], "Acc": [100.0, float("nan")],
    ...                     "aAcc": 75.0, "mIoU": 50.0, "mAcc": 100.0}, ["road", "sky"]))
    +-------+--------+--------+
    | Class |    IoU |    Acc |
    +-------+--------+--------+
    | road  |  50.00 | 100.00 |
    | sky   |    nan |    nan |
    +-------+--------+--------+
    aAcc 75.00  mIoU 50.00  mAcc 100.00
    """
    names = [repr(c) if c != c.strip() else c for c in classes]  # show ADE's "bed " for what it is
    width = max([5] + [len(n) for n in names])
    keys = [key for key in PER_CLASS_KEYS if key in result]
    cols = [max(6, len(key)) for key in keys]
    rule = f"+-{'-' * width}-+" + "".join("-" * (c + 2) + "+" for c in cols)
    lines = [rule, f"| {'Class':<{width}} |" + "".join(f" {k:>{c}} |" for k, c in zip(keys, cols)), rule]
    for i, name in enumerate(names):
        lines.append(f"| {name:<{width}} |" + "".join(f" {_fmt(result[k][i]):>{c}} |" for k, c in zip(keys, cols)))
    lines.append(rule)
    summary = ["aAcc"] + [f"m{k}" for k in keys if k != "Share" and f"m{k}" in result] + ["fwIoU"]
    lines.append("  ".join(f"{key} {_fmt(result[key])}" for key in summary if key in result))
    return "\n".join(lines)


def _fmt(value: float) -> str:
    return "nan" if value is None or math.isnan(value) else f"{value:.2f}"


def json_ready(value: Any) -> Any:
    """Replace NaN/inf by None (JSON has no NaN), tuples by lists, tensors by lists, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, torch.Tensor):
        return json_ready(value.tolist())
    if isinstance(value, Path):
        return str(value)
    return value


def write_json_atomic(path: str | Path, payload: Any) -> None:
    """Pretty JSON (NaN written as null), atomically."""
    text = json.dumps(json_ready(payload), indent=2, allow_nan=False) + "\n"
    write_bytes_atomic(path, text.encode())
