"""The training loop: MMSegmentation's ISANet recipe, iteration-based, DDP-aware, exactly resumable.

One `TrainConfig` describes a run; `train(cfg)` runs it and returns the final metrics and paths.
`TrainConfig.from_recipe(name, data_root)` reproduces a published variant (spec §4: dataset, crop,
iterations, global batch, SGD 0.01/0.9/5e-4, poly 0.9 to 1e-4, eval and checkpoint every T/10);
`TrainConfig.for_finetune(...)` adapts a model to a custom folder dataset.

Per iteration: next batch -> forward (autocast if --amp) -> MMSeg loss -> finite check -> backward
-> SGD step -> poly step. Rank 0 logs to `log.jsonl`, shows tqdm, writes checkpoints, the final
`model.safetensors` and `curves.png`; evaluation runs on every rank (the metric all-reduces).

Example (a few CPU iterations on a custom folder dataset):
    >>> cfg = TrainConfig.for_finetune("isanet_r50-d8_512x512_20k_voc12aug", "my_data",   # doctest: +SKIP
    ...                                work_dir="runs/demo", iters=20, crop_size_hw=(64, 64),
    ...                                batch_size=2, weights=None, device="cpu")
    >>> result = train(cfg)                                                                # doctest: +SKIP
    >>> sorted(result)                                                                     # doctest: +SKIP
    ['checkpoint', 'classes', 'curves', 'final_loss', 'history', 'iterations', 'log', 'metrics', ...]
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import resource
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from tqdm import tqdm

from . import checkpoint as ckpt
from . import distributed as D
from .data import IterationBatchSampler, TrainSet, build_loader
from .loss import isanet_loss
from .plot import plot_curves, read_log
from .schedule import PolyLR
from .transforms import build_train_transforms

log = logging.getLogger(__name__)

# dataset_type in variants.json -> (eval.datasets reader, train split, val split, workers per GPU)
RECIPE_DATASETS = {
    "CityscapesDataset": ("cityscapes", "train", "val", 2),
    "ADE20KDataset": ("ade20k", "train", "val", 4),
    "PascalVOCDataset": ("voc", "train+aug", "val", 4),
}
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the iteration and the last good checkpoint."""


@dataclass
class TrainConfig:
    """Everything one training run needs; plain values only (it is stored in every checkpoint)."""

    model: str
    data_root: str
    dataset: str = "folder"
    train_split: str = "train"
    val_split: Optional[str] = "val"
    work_dir: str = "work_dirs/isanet"
    weights: Optional[str] = None
    backbone_weights: Optional[str] = None
    num_classes: Optional[int] = None
    iters: int = 40000
    batch_size: int = 8
    crop_size_hw: Tuple[int, int] = (512, 1024)
    img_scale_wh: Tuple[int, int] = (2048, 1024)
    ratio_range: Tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    test_scale_wh: Optional[Tuple[int, int]] = None
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    power: float = 0.9
    min_lr: float = 1e-4
    aux_weight: float = 0.4
    avg_non_ignore: bool = False
    eval_interval: Optional[int] = None
    checkpoint_interval: Optional[int] = None
    eval_max_images: Optional[int] = None
    log_interval: int = 50
    seed: int = 0
    device: str = "auto"
    amp: Optional[str] = None
    backend: str = "auto"
    workers: Optional[int] = None
    threads: Optional[int] = None
    resume: bool = False
    dropout: Optional[float] = None
    keep_checkpoints: int = 0
    progress: bool = True
    recipe: Optional[str] = None

    # ----------------------------------------------------------------------------- constructors
    @classmethod
    def from_recipe(cls, name: str, data_root: str, **overrides: Any) -> "TrainConfig":
        """The published recipe of variant `name` (spec §4, variants.json); keyword overrides win.

        An override of None is kept (e.g. `val_split=None` turns evaluation off).

        Example:
            >>> cfg = TrainConfig.from_recipe("isanet_r50-d8_512x1024_40k_cityscapes", "data/cityscapes")
            >>> cfg.iters, cfg.batch_size, cfg.crop_size_hw, cfg.eval_interval, cfg.train_split
            (40000, 8, (512, 1024), 4000, 'train')
        """
        from zoo import get_config

        vc = get_config(name)
        if vc.dataset_type not in RECIPE_DATASETS:
            raise ValueError(f"{name}: no reader for dataset type {vc.dataset_type!r}")
        reader, train_split, val_split, _ = RECIPE_DATASETS[vc.dataset_type]
        values: Dict[str, Any] = dict(
            model=name, data_root=str(data_root), dataset=reader, train_split=train_split,
            val_split=val_split, work_dir=f"work_dirs/{name}", iters=vc.iters,
            batch_size=vc.total_batch_size, crop_size_hw=tuple(vc.crop_size_hw),
            img_scale_wh=tuple(vc.train_img_scale_wh), ratio_range=tuple(vc.ratio_range),
            cat_max_ratio=vc.cat_max_ratio, lr=vc.optimizer["lr"], momentum=vc.optimizer["momentum"],
            weight_decay=vc.optimizer["weight_decay"], power=vc.lr_schedule["power"],
            min_lr=vc.lr_schedule["min_lr"], aux_weight=vc.auxiliary_head["loss_weight"],
            eval_interval=vc.eval_interval, checkpoint_interval=vc.checkpoint_interval, recipe=name)
        values.update(overrides)
        return cls(**values)

    @classmethod
    def for_finetune(cls, model: str, data_root: str, **overrides: Any) -> "TrainConfig":
        """Fine-tuning on a custom folder dataset with the variant's optimiser and schedule.

        Defaults: published weights ("auto"), 2000 iterations, the variant's crop, global batch 8,
        train scale (4 * crop width, crop height) as ADE20K/VOC use (2048, 512) for 512x512 crops.
        """
        from zoo import get_config

        vc = get_config(model)
        values: Dict[str, Any] = dict(
            model=model, data_root=str(data_root), dataset="folder", weights="auto", iters=2000,
            batch_size=8, crop_size_hw=tuple(vc.crop_size_hw), lr=vc.optimizer["lr"],
            momentum=vc.optimizer["momentum"], weight_decay=vc.optimizer["weight_decay"],
            power=vc.lr_schedule["power"], min_lr=vc.lr_schedule["min_lr"],
            aux_weight=vc.auxiliary_head["loss_weight"], work_dir=f"work_dirs/{model}_finetune",
            log_interval=10)
        values.update(overrides)
        if overrides.get("img_scale_wh") is None:
            h, w = values["crop_size_hw"]
            values["img_scale_wh"] = (4 * int(w), int(h))
        return cls(**values)

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON types (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def validate(self) -> "TrainConfig":
        """Normalise tuples and raise ValueError naming the field and the fix for bad values."""
        self.crop_size_hw = tuple(int(v) for v in self.crop_size_hw)  # type: ignore[assignment]
        self.img_scale_wh = tuple(int(v) for v in self.img_scale_wh)  # type: ignore[assignment]
        self.ratio_range = tuple(float(v) for v in self.ratio_range)  # type: ignore[assignment]
        if self.test_scale_wh is not None:
            self.test_scale_wh = tuple(int(v) for v in self.test_scale_wh)  # type: ignore[assignment]
        if len(self.crop_size_hw) != 2 or min(self.crop_size_hw) < 32:
            raise ValueError(f"crop size must be two ints >= 32 (H W), got {self.crop_size_hw}")
        if self.iters <= 0:
            raise ValueError(f"iters must be positive, got {self.iters}")
        if self.batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {self.batch_size}")
        if self.amp not in (None, "bf16", "fp16"):
            raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {self.amp!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("eval_interval", "checkpoint_interval"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        return self

    @property
    def eval_every(self) -> int:
        return self.eval_interval or max(self.iters // 10, 1)

    @property
    def checkpoint_every(self) -> int:
        return self.checkpoint_interval or max(self.iters // 10, 1)


# --------------------------------------------------------------------------------------------------
# building blocks


def build_datasets(cfg: TrainConfig) -> Tuple[Any, Optional[Any]]:
    """The train reader and the val reader (None when the split does not exist for a folder dataset)."""
    from eval.datasets import DatasetError, build_dataset

    kwargs: Dict[str, Any] = {}
    if cfg.dataset == "folder" and cfg.num_classes is not None:
        kwargs["num_classes"] = cfg.num_classes
    train_set = build_dataset(cfg.dataset, cfg.data_root, cfg.train_split, **kwargs)
    val_set = None
    if cfg.val_split:
        try:
            val_set = build_dataset(cfg.dataset, cfg.data_root, cfg.val_split, **kwargs)
        except DatasetError as exc:
            if cfg.dataset != "folder":
                raise
            log.warning("no validation split (%s): training without periodic evaluation", exc)
    return train_set, val_set


def load_backbone_weights(model: nn.Module, path: str) -> List[str]:
    """Load ImageNet ResNetV1c weights (mmcv's `resnet50_v1c` keys: no `backbone.` prefix) into the backbone.

    Read with the zoo's safe reader; the ImageNet classifier (`fc.*`) is ignored; every backbone
    tensor must be present with the right shape. Returns the ignored keys.
    """
    from zoo.weights import read_state_dict

    state = read_state_dict(path)
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    target = model.backbone.state_dict()
    ignored = sorted(k for k in state if k not in target)
    missing = sorted(k for k in target if k not in state and not k.endswith("num_batches_tracked"))
    bad = sorted(k for k in target if k in state and tuple(state[k].shape) != tuple(target[k].shape))
    if missing or bad:
        detail = (f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "") + \
                 (f" {len(bad)} with wrong shapes (e.g. {bad[0]}: file {tuple(state[bad[0]].shape)} vs "
                  f"model {tuple(target[bad[0]].shape)})" if bad else "")
        depth = getattr(model.backbone, "depth", "?")
        raise ValueError(f"{path} does not fit the ResNet-{depth}V1c backbone: {detail.strip()}; pass "
                         f"mmcv's resnet{depth}_v1c ImageNet weights (open-mmlab://resnet{depth}_v1c)")
    model.backbone.load_state_dict({k: v for k, v in state.items() if k in target}, strict=False)
    if ignored:
        log.info("backbone weights %s: ignored %d keys not in the backbone (%s ...)", path, len(ignored),
                 ", ".join(ignored[:4]))
    return ignored


def _fetch_on_main_first(cfg: TrainConfig, ctx: D.DistContext) -> None:
    """Download 'auto' weights on rank 0 only, so that the other ranks find them in the cache."""
    from zoo.hub import backbone_weights, resolve_weights

    if ctx.is_main:
        if cfg.weights == "auto":
            resolve_weights(cfg.model, "auto", progress=cfg.progress)
        if cfg.backbone_weights == "auto":
            backbone_weights(cfg.model, progress=cfg.progress)
    D.barrier(ctx)


def build_model(cfg: TrainConfig, num_classes: int, pretrained: bool = True) -> nn.Module:
    """zoo model with the requested init; only the classifiers are re-initialised for a new K.

    `pretrained=False` skips `cfg.weights` and `cfg.backbone_weights` (a resumed run loads its own)."""
    from zoo import create_model
    from zoo.hub import backbone_weights

    weights = None if cfg.weights in (None, "", "none") or not pretrained else cfg.weights
    backbone = cfg.backbone_weights if pretrained else None
    model = create_model(cfg.model, weights=weights, num_classes=num_classes, backend=cfg.backend)
    if backbone == "auto":
        backbone = str(backbone_weights(cfg.model, progress=cfg.progress))
    if backbone:
        load_backbone_weights(model, backbone)
    if cfg.dropout is not None:
        for m in model.modules():
            if isinstance(m, nn.Dropout2d):
                m.p = float(cfg.dropout)
    return model


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _append_jsonl(path: Path, record: Dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def _truncate_log(path: Path, iteration: int) -> None:
    """On resume, drop records past the checkpoint (the killed run's tail) so the log has no repeats."""
    if not path.is_file():
        return
    kept = [json.dumps(r) for r in read_log(path) if int(r.get("iter", 0)) <= iteration]
    ckpt.atomic_write(path, lambda f: f.write(("\n".join(kept) + ("\n" if kept else "")).encode()))


def save_safetensors(model: nn.Module, path: Path, cfg: TrainConfig, classes: Sequence[str]) -> Path:
    """The final weights in the zoo's .safetensors layout (loadable with create_model(weights=path))."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    num_classes = int(tensors["decode_head.conv_seg.weight"].shape[0])
    metadata = {"format": "pt", "format_version": "1", "variant": cfg.model, "num_classes": str(num_classes),
                "classes": json.dumps(list(classes)), "source_file": "isa train",
                "train_iters": str(cfg.iters)}
    data = save(tensors, metadata=metadata)
    return ckpt.atomic_write(path, lambda f: f.write(data))


# --------------------------------------------------------------------------------------------------
# the run


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Run (or resume) one training run; returns final metrics and output paths (same on every rank).

    Returned keys: `iterations`, `final_loss`, `metrics` (last evaluation or None), `history` (all
    evaluations), `work_dir`, `log`, `checkpoint`, `weights` (model.safetensors), `curves`,
    `num_classes`, `classes`, `resumed_from`.
    """
    cfg = dataclasses.replace(cfg).validate()
    ctx = D.setup(cfg.device)
    try:
        return _run(cfg, ctx)
    finally:
        D.cleanup(ctx)


def _run(cfg: TrainConfig, ctx: D.DistContext) -> Dict[str, Any]:
    device = ctx.device
    work = Path(cfg.work_dir)
    log_path, curves_path, weights_path = work / "log.jsonl", work / "curves.png", work / "model.safetensors"
    if ctx.is_main:
        ckpt.checkpoint_dir(work).mkdir(parents=True, exist_ok=True)
        for stale in ckpt.remove_stale_temporaries(work):
            log.info("removed %s (left by a run killed while writing a checkpoint)", stale)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # MMSeg's cudnn_benchmark=True
    if cfg.batch_size % ctx.world_size:
        raise ValueError(f"global batch {cfg.batch_size} does not split over {ctx.world_size} processes; "
                         f"pass --batch-size as a multiple of {ctx.world_size}")
    per_gpu_batch = cfg.batch_size // ctx.world_size

    train_base, val_base = build_datasets(cfg)
    num_classes = int(train_base.num_classes)
    if cfg.num_classes is not None and cfg.num_classes != num_classes:
        raise ValueError(f"--num-classes {cfg.num_classes} disagrees with the dataset's {num_classes} classes "
                         f"({cfg.data_root}); drop --num-classes or fix dataset.json")
    classes = list(train_base.classes)

    # a resumed run takes every weight from its checkpoint: no initial weights to read or download
    found = ckpt.load_latest_checkpoint(work, map_location="cpu") if cfg.resume else None
    if found is None and ctx.distributed and "auto" in (cfg.weights, cfg.backbone_weights):
        _fetch_on_main_first(cfg, ctx)
    torch.manual_seed(cfg.seed)  # identical init on every rank (DDP also broadcasts rank 0's)
    model = build_model(cfg, num_classes, pretrained=found is None).to(device)
    align_corners = bool(model.align_corners)
    norm = model.config.img_norm
    transforms = build_train_transforms(cfg.crop_size_hw, cfg.img_scale_wh, cfg.ratio_range, cfg.cat_max_ratio,
                                        mean=norm["mean"], std=norm["std"])
    if ctx.distributed:
        model = D.convert_sync_batchnorm(model, device)
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                    else None)
    inner = model.module if ctx.distributed else model

    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    scheduler = PolyLR(optimizer, cfg.iters, power=cfg.power, min_lr=cfg.min_lr)
    amp_dtype = AMP_DTYPES.get(cfg.amp) if cfg.amp else None
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")

    start_iter, history, resumed_from = 0, [], None
    last_good: Optional[Path] = None
    rng_restore = None
    if cfg.resume:
        if found is None:
            if ctx.is_main:
                log.warning("--resume: no checkpoint in %s; starting from scratch", ckpt.checkpoint_dir(work))
        else:
            state, path = found
            _check_resume_config(state.get("config", {}), cfg, ctx, per_gpu_batch)
            inner.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            start_iter = int(state["iteration"])
            history = list(state.get("history", []))
            rngs = state.get("rng", [])
            rng_restore = rngs[ctx.rank] if ctx.rank < len(rngs) else None
            resumed_from = last_good = path
            if ctx.is_main:
                log.info("resumed from %s (iteration %d)", path, start_iter)
                _truncate_log(log_path, start_iter)
    elif ctx.is_main:
        if log_path.exists():
            log_path.unlink()  # a fresh run starts a fresh log
        if ckpt.list_checkpoints(work):
            log.warning("%s holds checkpoints of an earlier run; this run overwrites them as it reaches their "
                        "iterations (pass --resume to continue that run, or use a new --work-dir)",
                        ckpt.checkpoint_dir(work))
    D.barrier(ctx)

    # RNG last: nothing after this point but the loop draws random numbers (dropout)
    torch.manual_seed(cfg.seed + 1 + ctx.rank)
    if rng_restore is not None:
        ckpt.set_rng_state(rng_restore, device)

    sampler = IterationBatchSampler(len(train_base), per_gpu_batch, seed=cfg.seed, world_size=ctx.world_size,
                                    rank=ctx.rank, start_iteration=start_iter)
    workers = cfg.workers
    if workers is None and device.type == "cuda":
        # at least the recipe's 2 / 4 workers per GPU, more when the CPU has them: the pipeline costs
        # ~0.2-0.4 s per 2048x1024 image on one core, and augmentations do not depend on the count
        recipe_workers = RECIPE_DATASETS.get(_dataset_type(cfg), ("", "", "", 2))[3]
        workers = max(recipe_workers, min(8, (os.cpu_count() or 2) // ctx.world_size))
    elif workers is None:
        workers = 0
    loader = build_loader(TrainSet(train_base, transforms), sampler, num_workers=workers,
                          pin_memory=device.type == "cuda")
    batches = iter(loader)

    bar = tqdm(total=cfg.iters, initial=start_iter, disable=not (ctx.is_main and cfg.progress),
               dynamic_ncols=True, desc="train", unit="it")
    window: Dict[str, float] = {}
    window_n, window_time, window_data = 0, 0.0, 0.0
    final_loss = math.nan
    metrics = history[-1] if history else None
    model.train()
    t_last = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for it in range(start_iter, cfg.iters):
        n_done = it + 1
        images, labels = next(batches)
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        t_data = time.perf_counter() - t_last
        lr = optimizer.param_groups[0]["lr"]

        autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            outputs = model(images)
        losses = isanet_loss(outputs, labels, align_corners, aux_weight=cfg.aux_weight,
                             avg_non_ignore=cfg.avg_non_ignore)
        names = list(losses)
        logged = D.all_reduce_mean(torch.stack([losses[k].detach().float() for k in names]), ctx).tolist()
        values = dict(zip(names, logged))
        if not math.isfinite(values["loss"]):
            bar.close()
            where = (f"the last good checkpoint is {last_good}; resume from it with --resume (after "
                     "lowering --lr or changing --amp)") if last_good else "no checkpoint was written yet"
            raise TrainingDiverged(f"loss is {values['loss']} at iteration {n_done}/{cfg.iters} "
                                   f"(decode {values['decode.loss_ce']}, aux {values['aux.loss_ce']}); "
                                   f"training stopped, {where}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(losses["loss"]).backward()
        ckpt.fault_point("iter", n_done)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        final_loss = values["loss"]

        now = time.perf_counter()
        window_time += now - t_last
        window_data += t_data
        t_last = now
        window_n += 1
        for k, v in values.items():
            window[k] = window.get(k, 0.0) + v
        bar.update(1)
        if ctx.is_main and cfg.progress:
            bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)

        if ctx.is_main and (n_done % cfg.log_interval == 0 or n_done == cfg.iters or n_done == start_iter + 1):
            per_iter = window_time / window_n
            record = {"mode": "train", "iter": n_done, "lr": lr,
                      **{k: v / window_n for k, v in window.items()},
                      "time": per_iter, "data_time": window_data / window_n,
                      "memory_mb": round(_memory_mb(device), 1), "eta_s": round(per_iter * (cfg.iters - n_done), 1)}
            _append_jsonl(log_path, record)
        if n_done % cfg.log_interval == 0 or n_done == cfg.iters or n_done == start_iter + 1:
            window, window_n, window_time, window_data = {}, 0, 0.0, 0.0

        if val_base is not None and (n_done % cfg.eval_every == 0 or n_done == cfg.iters):
            metrics = _evaluate(model, val_base, cfg, device, amp_dtype, n_done, ctx)
            history.append(metrics)
            if ctx.is_main:
                _append_jsonl(log_path, metrics)
                bar.write(f"iter {n_done}: mIoU {metrics['mIoU']:.2f} aAcc {metrics['aAcc']:.2f} "
                          f"mAcc {metrics['mAcc']:.2f}")
            model.train()
            t_last = time.perf_counter()  # evaluation time is not iteration time

        if n_done % cfg.checkpoint_every == 0 or n_done == cfg.iters:
            last_good = _save(cfg, ctx, inner, optimizer, scheduler, scaler, n_done, sampler, history)
            t_last = time.perf_counter()
        if ctx.is_main and (n_done % cfg.eval_every == 0 or n_done == cfg.iters):
            _plot(log_path, curves_path, cfg)
    bar.close()

    if ctx.is_main:
        save_safetensors(inner, weights_path, cfg, classes)
        _plot(log_path, curves_path, cfg)
    D.barrier(ctx)
    if last_good is None:
        found = ckpt.list_checkpoints(work)
        last_good = found[0][1] if found else None
    return {
        "iterations": cfg.iters, "final_loss": final_loss, "metrics": metrics, "history": history,
        "work_dir": str(work), "log": str(log_path), "checkpoint": str(last_good) if last_good else None,
        "weights": str(weights_path), "curves": str(curves_path), "num_classes": num_classes,
        "classes": classes, "resumed_from": str(resumed_from) if resumed_from else None,
    }


def _dataset_type(cfg: TrainConfig) -> str:
    for key, (reader, *_rest) in RECIPE_DATASETS.items():
        if reader == cfg.dataset:
            return key
    return ""


def _check_resume_config(saved: Dict[str, Any], cfg: TrainConfig, ctx: D.DistContext, per_gpu_batch: int) -> None:
    """Refuse a resume that cannot continue the same run; warn where exactness is lost."""
    if not saved:
        return
    for key in ("model", "iters"):
        if key in saved and saved[key] != getattr(cfg, key):
            raise ValueError(f"--resume: the checkpoint was written by a run with {key}={saved[key]!r}, this "
                             f"run has {key}={getattr(cfg, key)!r}; use the same settings or a new --work-dir")
    for key in ("batch_size", "seed", "crop_size_hw", "lr"):
        now = cfg.to_dict()[key]
        if key in saved and saved[key] != now and ctx.is_main:
            warnings.warn(f"--resume: {key} was {saved[key]!r} and is now {now!r}; the run continues but is no "
                          "longer identical to an uninterrupted one", RuntimeWarning, stacklevel=3)
    saved_world = saved.get("_world_size")
    if saved_world is not None and saved_world != ctx.world_size and ctx.is_main:
        warnings.warn(f"--resume: the checkpoint was written with {saved_world} processes, this run has "
                      f"{ctx.world_size}; the data order and RNG streams differ from an uninterrupted run",
                      RuntimeWarning, stacklevel=3)


def _evaluate(model: nn.Module, dataset: Any, cfg: TrainConfig, device: torch.device,
              amp_dtype: Optional[torch.dtype], iteration: int, ctx: D.DistContext) -> Dict[str, Any]:
    from eval.evaluate import evaluate
    from eval.inference import TestSettings

    inner = model.module if hasattr(model, "module") else model
    settings = TestSettings.from_model(inner, scale_wh=cfg.test_scale_wh or
                                       (None if cfg.recipe else cfg.img_scale_wh))
    result = evaluate(model, dataset, settings=settings, dtype=amp_dtype, device=device,
                      max_images=cfg.eval_max_images, num_workers=0 if device.type == "cpu" else 2,
                      progress=cfg.progress and ctx.is_main)
    keep = ("aAcc", "mIoU", "mAcc", "IoU", "Acc", "num_images")
    return {"mode": "val", "iter": iteration, **{k: _finite(result[k]) for k in keep if k in result}}


def _finite(value: Any) -> Any:
    # JSON has no NaN; an absent class is null
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _save(cfg: TrainConfig, ctx: D.DistContext, inner: nn.Module, optimizer: torch.optim.Optimizer,
          scheduler: PolyLR, scaler: torch.amp.GradScaler, iteration: int, sampler: IterationBatchSampler,
          history: List[Dict[str, Any]]) -> Optional[Path]:
    rngs = D.all_gather_object(ckpt.rng_state(ctx.device), ctx)  # every rank's dropout stream
    path = None
    if ctx.is_main:
        epoch, offset = sampler.position(iteration)
        config = cfg.to_dict()
        config["_world_size"] = ctx.world_size
        state = {
            "model": inner.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "rng": [{k: v.cpu() for k, v in r.items()} for r in rngs],
            "data": {"iteration": iteration, "epoch": epoch, "offset": offset, "seed": cfg.seed,
                     "world_size": ctx.world_size, "per_gpu_batch": sampler.batch_size},
            "config": config, "history": history,
        }
        path = ckpt.save_checkpoint(state, cfg.work_dir, iteration)
        ckpt.prune_checkpoints(cfg.work_dir, cfg.keep_checkpoints)
    path = D.broadcast_object(str(path) if path else None, ctx)
    return Path(path) if path else None


def _plot(log_path: Path, curves_path: Path, cfg: TrainConfig) -> None:
    try:
        plot_curves(read_log(log_path) if log_path.is_file() else [], curves_path,
                    title=f"{cfg.recipe or cfg.model} - {cfg.data_root}")
    except OSError as exc:  # a plot must never stop training
        log.warning("could not write %s: %s", curves_path, exc)


def finetune(model: str, data: str, work_dir: str, *, iters: int = 2000, crop_size: Sequence[int] = (512, 512),
             batch_size: int = 8, num_classes: Optional[int] = None, weights: Optional[str] = "auto",
             lr: Optional[float] = None, device: str = "auto", seed: int = 0, checkpoint_interval: Optional[int] = None,
             eval_interval: Optional[int] = None, resume: bool = False, progress: bool = True,
             **overrides: Any) -> Dict[str, Any]:
    """Fine-tune zoo model `model` on a custom folder dataset (`data/images/train`, `data/masks/train`, ...).

    Only the classifiers are re-initialised when the dataset's class count differs. Returns what
    `train` returns (final `metrics` on the val split when there is one, `weights` path, ...).

    Example:
        >>> result = finetune("isanet_r50-d8_512x512_20k_voc12aug", "my_data", "runs/ft",  # doctest: +SKIP
        ...                   iters=50, crop_size=(64, 64), batch_size=2, weights=None, device="cpu")
        >>> result["metrics"]["mIoU"]                                                      # doctest: +SKIP
        41.3
    """
    if lr is not None:
        overrides["lr"] = lr
    cfg = TrainConfig.for_finetune(model, data, work_dir=work_dir, iters=iters, crop_size_hw=tuple(crop_size),
                                   batch_size=batch_size, num_classes=num_classes, weights=weights or "none",
                                   device=device, seed=seed, checkpoint_interval=checkpoint_interval,
                                   eval_interval=eval_interval, resume=resume, progress=progress, **overrides)
    return train(cfg)
