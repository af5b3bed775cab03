"""torchrun plumbing: process group from the environment, rank helpers, SyncBatchNorm on CUDA and CPU.

`torchrun --nproc_per_node=G -m train ...` sets RANK / WORLD_SIZE / LOCAL_RANK; without them the run
is a single process. NCCL on CUDA, gloo on CPU. MMSeg trains with SyncBN across GPUs (spec §4.2):
`convert_sync_batchnorm` uses `torch.nn.SyncBatchNorm` on CUDA and, because that class refuses CPU
tensors, `GlooSyncBatchNorm` (same arithmetic, differentiable all-reduce of the statistics) on CPU,
which is what lets a 2-process CPU run reproduce a single-process step exactly.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from zoo.utils import resolve_device


@dataclass
class DistContext:
    """Where this process sits: rank, world size, local rank and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> DistContext:
    """Join the torchrun process group if the environment defines one; pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)  # the one device picker (zoo.utils)
    ctx = DistContext(rank, world_size, local_rank, dev)
    if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        # long timeout: rank 0 evaluates the whole val set while the others wait at a barrier
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=60))
        ctx.initialized_here = True
    elif dev.type == "cuda":
        torch.cuda.set_device(dev)
    return ctx


def cleanup(ctx: DistContext) -> None:
    """Leave the process group if `setup` created it."""
    if ctx.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def all_reduce_mean(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Mean of a small tensor over ranks (the tensor is detached)."""
    values = values.detach().clone()
    if ctx.distributed:
        dist.all_reduce(values)
        values /= ctx.world_size
    return values


def all_gather_object(obj: Any, ctx: DistContext) -> List[Any]:
    """Every rank's `obj`, indexed by rank (a one-element list without a process group)."""
    if not ctx.distributed:
        return [obj]
    out: List[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's `obj` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class _SyncBatchNormFunction(torch.autograd.Function):
    """Batch norm over every rank's pixels, with the fused backward torch's SyncBatchNorm uses.

    Per-channel sums are accumulated in float64 and all-reduced; the backward all-reduces
    sum(dy) and sum(dy * xhat) so each rank gets the gradient of the sum of all ranks' losses
    (DDP then averages the parameter gradients), exactly like the CUDA implementation.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, group):  # type: ignore[override]
        c = x.shape[1]
        x64 = x.double()
        count = torch.tensor([x.numel() / c], dtype=torch.float64)
        stats = torch.cat([x64.sum(dim=(0, 2, 3)), count])
        dist.all_reduce(stats, group=group)
        total = stats[-1]
        mean = stats[:c] / total
        centred = x64 - mean.view(1, c, 1, 1)
        sq = (centred * centred).sum(dim=(0, 2, 3))
        dist.all_reduce(sq, group=group)
        var = sq / total
        invstd = torch.rsqrt(var + eps)
        xhat = centred * invstd.view(1, c, 1, 1)
        y = xhat
        if weight is not None:
            y = y * weight.double().view(1, c, 1, 1) + bias.double().view(1, c, 1, 1)
        ctx.save_for_backward(xhat.to(x.dtype), invstd, weight)
        ctx.total, ctx.group = total, group
        return y.to(x.dtype), mean, var, total

    @staticmethod
    def backward(ctx, grad_y, _gm, _gv, _gt):  # type: ignore[override]
        xhat, invstd, weight = ctx.saved_tensors
        c = grad_y.shape[1]
        g = grad_y.double()
        xh = xhat.double()
        sum_dy = g.sum(dim=(0, 2, 3))
        sum_dy_xhat = (g * xh).sum(dim=(0, 2, 3))
        grad_weight = grad_bias = None
        if weight is not None:
            grad_weight, grad_bias = sum_dy_xhat.to(weight.dtype), sum_dy.to(weight.dtype)  # local: DDP averages
        both = torch.cat([sum_dy, sum_dy_xhat])
        dist.all_reduce(both, group=ctx.group)
        mean_dy, mean_dy_xhat = both[:c] / ctx.total, both[c:] / ctx.total
        scale = invstd * (weight.double() if weight is not None else 1.0)
        grad_x = (g - mean_dy.view(1, c, 1, 1) - xh * mean_dy_xhat.view(1, c, 1, 1)) * scale.view(1, c, 1, 1)
        return grad_x.to(grad_y.dtype), grad_weight, grad_bias, None, None


class GlooSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics span all ranks (CPU / gloo stand-in for SyncBatchNorm).

    Same state_dict as BatchNorm2d. Batch mean and biased variance over every rank's N*H*W pixels
    normalise; the running variance gets the unbiased estimate, as `F.batch_norm` does.
    """

    process_group: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group) > 1):
            return super().forward(x)
        y, mean, var, total = _SyncBatchNormFunction.apply(x, self.weight if self.affine else None,
                                                           self.bias if self.affine else None, self.eps,
                                                           self.process_group)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum)
                unbiased = var * (total / max(float(total) - 1.0, 1.0))
                self.running_mean.mul_(1 - momentum).add_(mean.to(self.running_mean.dtype), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.to(self.running_var.dtype), alpha=momentum)
        return y


def convert_sync_batchnorm(model: nn.Module, device: torch.device,
                           process_group: Optional[Any] = None) -> nn.Module:
    """BatchNorm -> SyncBatchNorm (CUDA) or GlooSyncBatchNorm (CPU), weights and buffers kept."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
    group = process_group if process_group is not None else dist.new_group(backend="gloo")
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            # swap the class in place: same parameters, buffers and state_dict keys
            module.__class__ = GlooSyncBatchNorm
            module.process_group = group
    return model
