"""The optimizer and learning-rate schedule of a run: the recipe's SGD + poly, or the fine-tuning options.

- The recipe (no option given): `torch.optim.SGD(model.parameters(), lr, momentum, weight_decay)` and
  `PolyLR` - the very calls the training loop always made, so such a run is bit-identical to before.
- `optimizer="adamw"`: `torch.optim.AdamW(betas=(0.9, 0.999), eps=1e-8)` with `lr` / `weight_decay` as
  given; left unset they are 6e-5 / 0.01, MMSegmentation's SegFormer setting (`train.config.OPTIMIZER_DEFAULTS`,
  the same for `isa train --optimizer adamw`, `finetune(..., optimizer="adamw")` and `TrainConfig`).
- `no_decay_norm_bias`: weight decay 0 for normalisation weights and biases and for every bias, as
  MMSegmentation's `paramwise_cfg=dict(norm_decay_mult=0., bias_decay_mult=0.)`.
- `head_lr_mult`: the learning rate (and its poly curve) of `decode_head.*` and `auxiliary_head.*` times
  this, as `paramwise_cfg=dict(custom_keys={'head': dict(lr_mult=10.)})`.
- `warmup` W iterations: the poly rate times a linear factor from `warmup_start_factor` at iteration 0 to
  1 at iteration W-1, as mmengine's `LinearLR(start_factor, by_epoch=False, begin=0, end=W)` (its closed
  form: `start + (1 - start) * min(t, W - 1) / (W - 1)`), laid over the recipe's poly curve (as mmcv's
  `PolyLrUpdaterHook(warmup='linear')` lays it); from W on the poly curve itself.

Example:
    >>> import torch
    >>> sched_lr = [warmup_factor(t, 5, 0.1) for t in range(6)]
    >>> [round(v, 3) for v in sched_lr]
    [0.1, 0.325, 0.55, 0.775, 1.0, 1.0]
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
import torch.nn as nn

from .schedule import PolyLR, poly_lr

OPTIMIZERS = ("sgd", "adamw")
HEAD_KEYS = ("decode_head.", "auxiliary_head.")


def _is_recipe(cfg: Any) -> bool:
    return (getattr(cfg, "optimizer", "sgd") == "sgd" and float(getattr(cfg, "head_lr_mult", 1.0)) == 1.0
            and not getattr(cfg, "no_decay_norm_bias", False))


def param_groups(model: nn.Module, lr: float, weight_decay: float, head_lr_mult: float = 1.0,
                 no_decay_norm_bias: bool = False) -> List[Dict[str, Any]]:
    """Parameter groups by (lr multiplier, decay multiplier), in the model's parameter order.

    Each group carries `lr_mult` and `decay_mult` (plain numbers, so the optimizer state stays loadable
    with `weights_only=True`)."""
    inner = model.module if hasattr(model, "module") else model
    norm_params = set()
    for m in inner.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)):
            norm_params.update(id(p) for p in m.parameters(recurse=False))
    groups: Dict[Tuple[float, float], Dict[str, Any]] = {}
    for name, p in inner.named_parameters():
        lr_mult = float(head_lr_mult) if name.startswith(HEAD_KEYS) else 1.0
        decay_mult = 0.0 if no_decay_norm_bias and (id(p) in norm_params or name.endswith(".bias")) else 1.0
        group = groups.setdefault((lr_mult, decay_mult), {"params": [], "lr": lr * lr_mult,
                                                          "weight_decay": weight_decay * decay_mult,
                                                          "lr_mult": lr_mult, "decay_mult": decay_mult})
        group["params"].append(p)
    return list(groups.values())


def build_optimizer(cfg: Any, model: nn.Module) -> torch.optim.Optimizer:
    """The run's optimizer (see the module docstring); the recipe's SGD call when no option is set."""
    kind = getattr(cfg, "optimizer", "sgd")
    if kind not in OPTIMIZERS:
        raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {kind!r}")
    if _is_recipe(cfg):
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    groups = param_groups(model, cfg.lr, cfg.weight_decay, cfg.head_lr_mult, cfg.no_decay_norm_bias)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)


def warmup_factor(iteration: int, warmup: int, start_factor: float) -> float:
    """LinearLR's factor at 0-based `iteration` of a `warmup`-iteration warm-up (1.0 after it)."""
    if warmup <= 0 or iteration >= warmup - 1:
        return 1.0
    return start_factor + (1.0 - start_factor) * max(iteration, 0) / (warmup - 1)


class WarmupPolyLR(PolyLR):
    """Poly decay times a linear warm-up factor over the first `warmup` iterations (see the module docstring)."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_iters: int, power: float = 0.9, min_lr: float = 1e-4,
                 warmup: int = 0, start_factor: float = 1e-6, last_epoch: int = -1):
        self.warmup = int(warmup)
        self.start_factor = float(start_factor)
        super().__init__(optimizer, max_iters, power=power, min_lr=min_lr, last_epoch=last_epoch)

    def get_lr(self) -> List[float]:
        factor = warmup_factor(self.last_epoch, self.warmup, self.start_factor)
        return [poly_lr(self.last_epoch, self.max_iters, base, self.power, self.min_lr) * factor
                for base in self.base_lrs]


def build_scheduler(cfg: Any, optimizer: torch.optim.Optimizer) -> PolyLR:
    """PolyLR as the recipe has it, or WarmupPolyLR with `--warmup`."""
    warmup = int(getattr(cfg, "warmup", 0) or 0)
    if warmup <= 0:
        return PolyLR(optimizer, cfg.iters, power=cfg.power, min_lr=cfg.min_lr)
    return WarmupPolyLR(optimizer, cfg.iters, power=cfg.power, min_lr=cfg.min_lr, warmup=warmup,
                        start_factor=cfg.warmup_start_factor)
