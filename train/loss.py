"""ISANet's training loss as MMSegmentation 0.x computes it (spec §4.3).

Each head's 1/8-resolution logits are upsampled bilinearly to the label size with the variant's
`align_corners`, then cross-entropy with `ignore_index=255`. MMSeg 0.x (which trained the published
weights) averages over *all* pixels, ignored ones included (`avg_non_ignore=False`); with
`avg_non_ignore=True` the sum is divided by the number of non-ignored pixels (mmseg >= 0.23 option).
Total = decode + 0.4 * aux. Logits are upsampled and reduced in float32 whatever the autocast dtype.

Example:
    >>> import torch
    >>> logits = torch.zeros(1, 3, 2, 2); target = torch.tensor([[[0, 1, 2, 255]] * 4])
    >>> round(seg_cross_entropy(logits, target, align_corners=False).item(), 4)  # 12 of 16 pixels count
    0.824
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = 255


def upsample_logits(logits: torch.Tensor, size_hw: Sequence[int], align_corners: bool) -> torch.Tensor:
    """Bilinear resize of (N, K, h, w) logits to `size_hw` in float32 (MMSeg's `resize`)."""
    logits = logits.float()
    if tuple(logits.shape[-2:]) == tuple(size_hw):
        return logits
    return F.interpolate(logits, size=tuple(size_hw), mode="bilinear", align_corners=align_corners)


def _check(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if target.dim() == 4 and target.shape[1] == 1:
        target = target[:, 0]
    if target.dim() != 3 or logits.dim() != 4 or logits.shape[0] != target.shape[0]:
        raise ValueError(f"expected logits (N, K, h, w) and labels (N, H, W), got {tuple(logits.shape)} "
                         f"and {tuple(target.shape)}")
    return target.long()


def _cross_entropy(full: torch.Tensor, target: torch.Tensor, avg_non_ignore: bool, ignore_index: int) -> torch.Tensor:
    per_pixel = F.cross_entropy(full, target, reduction="none", ignore_index=ignore_index)
    if not avg_non_ignore:
        return per_pixel.mean()  # ignored pixels contribute 0 but stay in the denominator
    valid = (target != ignore_index).sum()
    # mmseg divides by (count + eps) so an all-ignored batch gives 0, not NaN
    return per_pixel.sum() / (valid.to(per_pixel.dtype) + torch.finfo(torch.float32).eps)


@torch.no_grad()
def _accuracy(full: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    valid = target != ignore_index
    if not bool(valid.any()):
        return torch.zeros((), device=full.device)
    return (full.argmax(dim=1)[valid] == target[valid]).float().mean() * 100.0


def seg_cross_entropy(logits: torch.Tensor, target: torch.Tensor, align_corners: bool,
                      avg_non_ignore: bool = False, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Pixel cross-entropy of (N, K, h, w) logits against (N, H, W) labels, MMSeg's averaging."""
    target = _check(logits, target)
    full = upsample_logits(logits, target.shape[-2:], align_corners)
    return _cross_entropy(full, target, avg_non_ignore, ignore_index)


def pixel_accuracy(logits: torch.Tensor, target: torch.Tensor, align_corners: bool,
                   ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Top-1 accuracy in percent over non-ignored pixels (MMSeg's logged `acc_seg`)."""
    target = _check(logits, target)
    return _accuracy(upsample_logits(logits.detach(), target.shape[-2:], align_corners), target, ignore_index)


def isanet_loss(outputs: Tuple[torch.Tensor, torch.Tensor], target: torch.Tensor, align_corners: bool,
                aux_weight: float = 0.4, avg_non_ignore: bool = False,
                ignore_index: int = IGNORE_INDEX, criterion: Optional[Any] = None) -> Dict[str, torch.Tensor]:
    """Decode + weighted auxiliary loss; returns `loss` (to backprop) and MMSeg's logged terms.

    Keys: `loss`, `decode.loss_ce`, `aux.loss_ce` (already multiplied by `aux_weight`),
    `decode.acc_seg`, `aux.acc_seg` (percent, detached). With `criterion` (`train.tuning.HeadLosses`: the
    fine-tuning losses of `train.losses`) each head's terms come from its module instead, under their names
    (`decode.loss_dice`, ...), and `aux_weight` / `avg_non_ignore` are the modules' own.
    """
    if not (isinstance(outputs, (tuple, list)) and len(outputs) == 2):
        raise ValueError("expected the train-mode model output (decode_logits, aux_logits); call "
                         "model.train() before the forward pass")
    out: Dict[str, torch.Tensor] = {}
    total = None
    if criterion is not None:
        for name, logits, module in (("decode", outputs[0], criterion.decode), ("aux", outputs[1], criterion.aux)):
            labels = _check(logits, target)
            full = upsample_logits(logits, labels.shape[-2:], align_corners)
            for key, loss in module(full, labels).items():
                out[f"{name}.{key}"] = loss
                total = loss if total is None else total + loss
            out[f"{name}.acc_seg"] = _accuracy(full.detach(), labels, ignore_index)
        return {"loss": total, **out}
    for name, logits, weight in (("decode", outputs[0], 1.0), ("aux", outputs[1], aux_weight)):
        labels = _check(logits, target)
        full = upsample_logits(logits, labels.shape[-2:], align_corners)  # once for the loss and the accuracy
        loss = _cross_entropy(full, labels, avg_non_ignore, ignore_index)
        loss = loss * weight if weight != 1.0 else loss
        out[f"{name}.loss_ce"] = loss
        out[f"{name}.acc_seg"] = _accuracy(full.detach(), labels, ignore_index)
        total = loss if total is None else total + loss
    return {"loss": total, **out}
