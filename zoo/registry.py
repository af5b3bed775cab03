"""The 16 published ISANet variants as typed configs (one row of variants.json each)."""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

_VARIANTS_JSON = Path(__file__).with_name("variants.json")


@dataclass(frozen=True)
class VariantConfig:
    """Every setting of one MMSegmentation ISANet variant, under variants.json's field names."""

    name: str
    mmseg_1x_config_name: str
    backbone: str
    backbone_type: str
    depth: int
    pretrained: str
    pretrained_url: str
    dataset: str
    dataset_type: str
    num_classes: int
    reduce_zero_label: bool
    data_root: str
    train_split: str
    val_split: str
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
    gpus_source: str
    optimizer: Dict[str, Any]
    lr_schedule: Dict[str, Any]
    norm: str
    fp16: bool
    decode_head: Dict[str, Any]
    auxiliary_head: Dict[str, Any]
    align_corners: bool
    test_mode: str
    test_crop_size_hw: Optional[Tuple[int, int]]
    test_stride_hw: Optional[Tuple[int, int]]
    test_img_scale_wh: Tuple[int, int]
    test_keep_ratio: bool
    ms_flip_ratios: Tuple[float, ...]
    ms_flip: bool
    img_norm: Dict[str, Any]
    checkpoint_url: str
    checkpoint_sha256_prefix: str
    training_log_url: str
    mIoU: float
    mIoU_ms_flip: float
    train_memory_gb: float
    inference_ms_per_img: float
    fps: float
    fps_hardware: str
    ms_flip_scales_note: str

    @property
    def block_size(self) -> Tuple[int, int]:
        """ISA's block (down_factor) as (height, width)."""
        bh, bw = self.decode_head["down_factor"]
        return int(bh), int(bw)

    def to_dict(self) -> Dict[str, Any]:
        """The config as plain JSON types, with variants.json's field names and order."""
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


_TUPLE_FIELDS = {f.name for f in dataclasses.fields(VariantConfig)
                 if str(f.type).startswith(("Tuple", "Optional[Tuple"))}


@lru_cache(maxsize=None)
def _variants() -> Dict[str, VariantConfig]:
    rows = json.loads(_VARIANTS_JSON.read_text())["variants"]
    out = {}
    for row in rows:
        row = {k: tuple(v) if k in _TUPLE_FIELDS and v is not None else v for k, v in row.items()}
        out[row["name"]] = VariantConfig(**row)
    return out


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
