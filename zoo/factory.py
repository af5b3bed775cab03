"""`create_model`: a variant by name, or a self-describing weights file, with random, file or cached weights."""
from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Optional, Union

from .model import ISANet
from .registry import get_config

log = logging.getLogger(__name__)


def create_model(name: Optional[str] = None, weights: Union[None, str, os.PathLike] = None,
                 num_classes: Optional[int] = None, backend: str = "auto") -> ISANet:
    """Build variant `name`; `weights` is None (random init), a .safetensors/.pth path, or "auto".

    "auto" takes the cached MMSegmentation weights, downloading them on first use (`isa download`).
    A .safetensors file written by this project describes itself (variant, classes, palette, test
    settings: `model.meta`), so `name` may be left out. With `num_classes` different from the
    weights', both classifiers (`conv_seg`) are re-initialised and everything else loads.

    Example:
        >>> model = create_model("isanet_r50-d8_512x1024_40k_cityscapes", num_classes=4).eval()
        >>> model(torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 4, 64, 64])
        >>> tuned = create_model(weights="runs/mine/model.safetensors")   # a fine-tuned model, by its file
    """
    from .hub import resolve_weights
    from .weights import load_weights, read_model_meta

    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if name is None and (weights is None or weights == "auto"):
        raise ValueError("create_model needs a variant name (zoo.list_models()) or a weights file that names it")
    path = None if weights is None else resolve_weights(name, weights)
    meta = read_model_meta(path) if path is not None else None
    if name is None:
        if meta is None:
            raise ValueError(f"{path} does not say which variant it is (no isa-triton metadata, e.g. a .pth or "
                             "another tool's file); pass the variant name: --model NAME / create_model(NAME, ...)")
        name = meta.variant
    config = get_config(name)
    if meta is not None and meta.variant != config.name:
        log.info("%s was written for %s; building %s with it", path, meta.variant, config.name)
        meta = replace(meta, variant=config.name)
    if meta is not None and num_classes is not None and num_classes != meta.num_classes:
        meta = None  # fine-tuning to another class count: the file's classes no longer apply
    k = num_classes if num_classes is not None else (meta.num_classes if meta is not None else None)
    model = ISANet(config, num_classes=k, backend=backend, meta=meta)
    if path is not None:
        reinitialised = load_weights(model, path)
        if reinitialised:
            log.warning("re-initialised %s for num_classes=%d", ", ".join(reinitialised), model.num_classes)
    return model
