"""MMSegmentation's poly learning-rate policy, per iteration (spec §4.2).

lr(t) = (base_lr - min_lr) * (1 - t / T) ** power + min_lr for iteration t = 0 .. T-1 (mmcv's
`PolyLrUpdaterHook(by_epoch=False)` sets it before each iteration; 1.x `PolyLR(eta_min)` is the
same curve). No warm-up.

Example:
    >>> poly_lr(0, 40000), round(poly_lr(20000, 40000), 6), round(poly_lr(39999, 40000), 6)
    (0.01, 0.005405, 0.000101)
"""
from __future__ import annotations

from typing import List

import torch


def poly_lr(iteration: int, max_iters: int, base_lr: float = 0.01, power: float = 0.9,
            min_lr: float = 1e-4) -> float:
    """The poly learning rate used during 0-based `iteration` of a `max_iters` run."""
    if max_iters <= 0:
        raise ValueError(f"max_iters must be positive, got {max_iters}")
    progress = min(max(iteration, 0), max_iters) / max_iters
    return (base_lr - min_lr) * (1.0 - progress) ** power + min_lr


class PolyLR(torch.optim.lr_scheduler.LRScheduler):
    """Poly decay to `min_lr` over `max_iters`; call `step()` once after every iteration.

    Each param group's own initial lr is its base lr. The state is plain numbers, so it saves in
    checkpoints loadable with `torch.load(weights_only=True)`.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_iters: int, power: float = 0.9,
                 min_lr: float = 1e-4, last_epoch: int = -1):
        if max_iters <= 0:
            raise ValueError(f"max_iters must be positive, got {max_iters}")
        self.max_iters = int(max_iters)
        self.power = float(power)
        self.min_lr = float(min_lr)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> List[float]:
        # last_epoch counts finished iterations, i.e. the index of the iteration about to run
        return [poly_lr(self.last_epoch, self.max_iters, base, self.power, self.min_lr)
                for base in self.base_lrs]
