"""The inference path: BatchNorm folded into the convolutions, channels_last, frozen."""
from __future__ import annotations

from copy import deepcopy

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def fold_batchnorm(module: nn.Module) -> int:
    """Fold every BatchNorm2d that directly follows a Conv2d among a module's children, in place.

    MMSeg's modules register each conv right before its BN (ConvModule conv/bn, Bottleneck
    conv1/bn1, the stem and downsample Sequentials), so "consecutive children" finds every pair.
    Returns the number of folded pairs; the module must be in eval mode.
    """
    folded = 0
    for parent in module.modules():
        children = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(parent, bn_name, nn.Identity())
                folded += 1
    return folded


def optimize_for_inference(model: nn.Module, channels_last: bool = True, copy: bool = True) -> nn.Module:
    """A frozen eval-mode copy with BN folded and channels_last weights; the original is untouched
    (`copy=False` converts `model` itself, for a caller that owns it).

    Example:
        >>> fast = optimize_for_inference(zoo.create_model("isanet_r50-d8_512x1024_40k_cityscapes"))
        >>> with torch.inference_mode():
        ...     logits = fast(torch.randn(1, 3, 64, 64).to(memory_format=torch.channels_last))
    """
    fast = (deepcopy(model) if copy else model).eval()
    fold_batchnorm(fast)
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
    for p in fast.parameters():
        p.requires_grad_(False)
    return fast
