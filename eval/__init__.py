"""Evaluation: dataset readers, MMSegmentation's mIoU, 0.x inference (single scale, ms+flip), isa eval / predict.

>>> from eval import IoUMetric, build_dataset, evaluate, predict_label_map, rescale_size, TestTransform
"""

from eval.classes import DatasetMeta, dataset_meta
from eval.datasets import (ADE20KDataset, CityscapesDataset, DatasetError, FolderDataset, SegDataset, VOCDataset,
                           build_dataset, read_image, read_mask)
from eval.evaluate import evaluate
from eval.inference import TestSettings, predict_label_map, segment_probs
from eval.metrics import IoUMetric
from eval.transforms import TestTransform, rescale_size, resize_image, resize_mask

__all__ = [
    "ADE20KDataset", "CityscapesDataset", "DatasetError", "DatasetMeta", "FolderDataset", "IoUMetric",
    "SegDataset", "TestSettings", "TestTransform", "VOCDataset", "build_dataset", "dataset_meta", "evaluate",
    "predict_label_map", "read_image", "read_mask", "rescale_size", "resize_image", "resize_mask",
    "segment_probs",
]
