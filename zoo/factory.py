"""`create_model`: a variant by name, with random, file or cached weights."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Union

from .model import ISANet
from .registry import get_config

log = logging.getLogger(__name__)


def create_model(name: str, weights: Union[None, str, os.PathLike] = None,
                 num_classes: Optional[int] = None, backend: str = "auto") -> ISANet:
    """Build variant `name`; `weights` is None (random init), a .safetensors/.pth path, or "auto".

    "auto" takes the cached MMSegmentation weights, downloading them on first use (`isa download`).
    With `num_classes` different from the variant's, both classifiers (`conv_seg`) are re-initialised
    and everything else loads.

    Example:
        >>> model = create_model("isanet_r50-d8_512x1024_40k_cityscapes", num_classes=4).eval()
        >>> model(torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 4, 64, 64])
    """
    config = get_config(name)
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    model = ISANet(config, num_classes=num_classes, backend=backend)
    if weights is None:
        return model
    from .hub import resolve_weights
    from .weights import load_weights

    path = resolve_weights(name, weights)
    reinitialised = load_weights(model, Path(path))
    if reinitialised:
        log.warning("re-initialised %s for num_classes=%d", ", ".join(reinitialised), model.num_classes)
    return model
