"""Presenting results: the per-class table, JSON-safe values, JSON files written atomically."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from zoo.utils import write_bytes_atomic


def format_table(result: dict[str, Any], classes: Sequence[str]) -> str:
    """The per-class IoU/Acc table and the summary line, 2 decimals like MMSegmentation's log.

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
    rule = f"+-{'-' * width}-+--------+--------+"
    lines = [rule, f"| {'Class':<{width}} |    IoU |    Acc |", rule]
    for name, iou, acc in zip(names, result["IoU"], result["Acc"]):
        lines.append(f"| {name:<{width}} | {_fmt(iou):>6} | {_fmt(acc):>6} |")
    lines.append(rule)
    lines.append(f"aAcc {_fmt(result['aAcc'])}  mIoU {_fmt(result['mIoU'])}  mAcc {_fmt(result['mAcc'])}")
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
