"""The 16 published ISANet variants as typed configs: what code needs, from one row of variants.json each.

`VariantConfig` holds typed fields only (the dataset reader, its splits, the recipe, the heads, the
test pipeline, provenance and published numbers). The row itself, with its prose (how MMSeg names
the splits, where the GPU count comes from, ...), is `variant_row(name)`, what `isa info --json` prints.
"""
from __future__ import annotations

import copy
import difflib
import fnmatch
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

_VARIANTS_JSON = Path(__file__).with_name("variants.json")

# MMSeg's dataset_type -> (reader in eval.datasets, train split, val split, workers per GPU), as its configs say
_DATASETS = {
    "CityscapesDataset": ("cityscapes", "train", "val", 2),
    "ADE20KDataset": ("ade20k", "train", "val", 4),
    "PascalVOCDataset": ("voc", "train+aug", "val", 4),
}


@dataclass(frozen=True)
class ISAHeadConfig:
    """MMSeg's ISAHead settings (decode head)."""

    in_channels: int
    channels: int
    isa_channels: int
    down_factor: Tuple[int, int]
    dropout_ratio: float
    loss_weight: float


@dataclass(frozen=True)
class FCNHeadConfig:
    """MMSeg's FCNHead settings (auxiliary head on layer3, training only)."""

    in_channels: int
    channels: int
    dropout_ratio: float
    loss_weight: float


@dataclass(frozen=True)
class VariantConfig:
    """Every setting of one MMSegmentation ISANet variant that code consumes."""

    name: str
    depth: int
    # data
    dataset: str  # the reader: "cityscapes", "ade20k" or "voc"
    dataset_name: str  # as MMSeg's model zoo writes it, e.g. "Pascal VOC 2012 + Aug"
    num_classes: int
    reduce_zero_label: bool
    data_root: str
    train_split: str  # the reader's split names, e.g. "train+aug"
    val_split: str
    workers_per_gpu: int
    # the training recipe (spec §4)
    crop_size_hw: Tuple[int, int]
    train_img_scale_wh: Tuple[int, int]
    ratio_range: Tuple[float, float]
    cat_max_ratio: float
    iters: int
    eval_interval: int
    checkpoint_interval: int
    samples_per_gpu: int
    gpus: int
    total_batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    power: float
    min_lr: float
    pretrained: str
    pretrained_url: str
    # the model
    decode_head: ISAHeadConfig
    auxiliary_head: FCNHeadConfig
    align_corners: bool
    # the test pipeline (spec §3)
    test_mode: str  # "whole" or "slide"
    test_crop_size_hw: Optional[Tuple[int, int]]
    test_stride_hw: Optional[Tuple[int, int]]
    test_img_scale_wh: Tuple[int, int]
    ms_flip_ratios: Tuple[float, ...]
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    # provenance and published numbers
    mmseg_config: str
    checkpoint_url: str
    checkpoint_sha256_prefix: str
    training_log_url: str
    mIoU: float
    mIoU_ms_flip: float
    train_memory_gb: float
    inference_ms_per_img: float
    fps: float

    @property
    def block_size(self) -> Tuple[int, int]:
        """ISA's block (down_factor) as (height, width)."""
        return self.decode_head.down_factor


def _pair(value: Any, kind: type = int) -> Optional[tuple]:
    return None if value is None else tuple(kind(v) for v in value)


def _config(row: Dict[str, Any]) -> VariantConfig:
    dataset, train_split, val_split, workers = _DATASETS[row["dataset_type"]]
    dh, ah = row["decode_head"], row["auxiliary_head"]
    return VariantConfig(
        name=row["name"], depth=int(row["depth"]),
        dataset=dataset, dataset_name=row["dataset"], num_classes=int(row["num_classes"]),
        reduce_zero_label=bool(row["reduce_zero_label"]), data_root=row["data_root"], train_split=train_split,
        val_split=val_split, workers_per_gpu=workers,
        crop_size_hw=_pair(row["crop_size_hw"]), train_img_scale_wh=_pair(row["train_img_scale_wh"]),
        ratio_range=_pair(row["ratio_range"], float), cat_max_ratio=float(row["cat_max_ratio"]),
        iters=int(row["iters"]), eval_interval=int(row["eval_interval"]),
        checkpoint_interval=int(row["checkpoint_interval"]), samples_per_gpu=int(row["samples_per_gpu"]),
        gpus=int(row["gpus"]), total_batch_size=int(row["total_batch_size"]),
        lr=float(row["optimizer"]["lr"]), momentum=float(row["optimizer"]["momentum"]),
        weight_decay=float(row["optimizer"]["weight_decay"]), power=float(row["lr_schedule"]["power"]),
        min_lr=float(row["lr_schedule"]["min_lr"]), pretrained=row["pretrained"], pretrained_url=row["pretrained_url"],
        decode_head=ISAHeadConfig(int(dh["in_channels"]), int(dh["channels"]), int(dh["isa_channels"]),
                                  _pair(dh["down_factor"]), float(dh["dropout_ratio"]), float(dh["loss_weight"])),
        auxiliary_head=FCNHeadConfig(int(ah["in_channels"]), int(ah["channels"]), float(ah["dropout_ratio"]),
                                     float(ah["loss_weight"])),
        align_corners=bool(row["align_corners"]), test_mode=row["test_mode"],
        test_crop_size_hw=_pair(row["test_crop_size_hw"]), test_stride_hw=_pair(row["test_stride_hw"]),
        test_img_scale_wh=_pair(row["test_img_scale_wh"]), ms_flip_ratios=_pair(row["ms_flip_ratios"], float),
        mean=_pair(row["img_norm"]["mean"], float), std=_pair(row["img_norm"]["std"], float),
        mmseg_config=row["mmseg_1x_config_name"], checkpoint_url=row["checkpoint_url"],
        checkpoint_sha256_prefix=row["checkpoint_sha256_prefix"], training_log_url=row["training_log_url"],
        mIoU=float(row["mIoU"]), mIoU_ms_flip=float(row["mIoU_ms_flip"]),
        train_memory_gb=float(row["train_memory_gb"]), inference_ms_per_img=float(row["inference_ms_per_img"]),
        fps=float(row["fps"]))


@lru_cache(maxsize=None)
def _rows() -> Dict[str, Dict[str, Any]]:
    return {row["name"]: row for row in json.loads(_VARIANTS_JSON.read_text())["variants"]}


@lru_cache(maxsize=None)
def _variants() -> Dict[str, VariantConfig]:
    return {name: _config(row) for name, row in _rows().items()}


def list_models(pattern: str = "*") -> List[str]:
    """Names of the published variants matching an fnmatch `pattern`, in the table's order.

    Example:
        >>> list_models("isanet_r101*ade20k")
        ['isanet_r101-d8_512x512_80k_ade20k', 'isanet_r101-d8_512x512_160k_ade20k']
    """
    return [name for name in _variants() if fnmatch.fnmatchcase(name, pattern)]


def get_config(name: str) -> VariantConfig:
    """The typed config of variant `name`; an unknown name raises KeyError listing close matches.

    Example:
        >>> get_config("isanet_r50-d8_512x1024_40k_cityscapes").mIoU
        78.49
    """
    variants = _variants()
    if name not in variants:
        close = difflib.get_close_matches(name, list(variants), n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown model {name!r}.{hint} `isa list` shows all {len(variants)} names.")
    return variants[name]


def variant_row(name: str) -> Dict[str, Any]:
    """The variant's row of variants.json as published (a copy), prose included.

    Example:
        >>> variant_row("isanet_r50-d8_512x1024_40k_cityscapes")["dataset_type"]
        'CityscapesDataset'
    """
    return copy.deepcopy(_rows()[get_config(name).name])
