"""Evaluation: dataset readers, MMSegmentation's mIoU, the evaluation loop, reports.

>>> from eval import IoUMetric, build_dataset, evaluate
"""

from eval.datasets import (ADE20KDataset, CityscapesDataset, DatasetError, FolderDataset, SegDataset, VOCDataset,
                           build_dataset, read_mask)
from eval.evaluate import evaluate
from eval.metrics import IoUMetric

__all__ = [
    "ADE20KDataset", "CityscapesDataset", "DatasetError", "FolderDataset", "IoUMetric", "SegDataset", "VOCDataset",
    "build_dataset", "evaluate", "read_mask",
]
