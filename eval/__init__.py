"""Evaluation: dataset readers, MMSegmentation's mIoU / mDice / mFscore, the evaluation loop, reports.

>>> from eval import EvalReport, IoUMetric, build_dataset, evaluate
"""

from eval.datasets import (ADE20KDataset, CityscapesDataset, DatasetError, FolderDataset, SegDataset, VOCDataset,
                           build_dataset, read_mask)
from eval.evaluate import evaluate
from eval.metrics import IoUMetric
from eval.report import EvalReport

__all__ = [
    "ADE20KDataset", "CityscapesDataset", "DatasetError", "EvalReport", "FolderDataset", "IoUMetric", "SegDataset",
    "VOCDataset", "build_dataset", "evaluate", "read_mask",
]
