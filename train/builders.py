"""The pieces a training run is built from: its datasets (and their checks), its model (published,
ImageNet-backbone or random start), and the checks that a resumed run is the same run."""
from __future__ import annotations

import logging
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch.nn as nn

from . import distributed as D
from .config import TrainConfig

log = logging.getLogger(__name__)


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


def check_folder_data(cfg: TrainConfig) -> None:
    """The data checks of `isa check-data` on a folder dataset: print the table, raise on errors."""
    from eval.checks import check_dataset
    from eval.datasets import DatasetError

    splits = [cfg.train_split] + ([cfg.val_split] if cfg.val_split else [])
    report = check_dataset(cfg.data_root, splits, cfg.num_classes, crop_size=cfg.crop_size)
    if not report.ok:
        raise DatasetError(f"the data checks found problems (--no-check-data skips them):\n{report.format()}")
    log.info("data checks:\n%s", report.format())


def load_backbone_weights(model: nn.Module, path: str) -> List[str]:
    """Load ImageNet ResNetV1c weights (mmcv's `resnet50_v1c` keys: no `backbone.` prefix) into the backbone.

    Read with the zoo's safe reader; the ImageNet classifier (`fc.*`) is ignored; every backbone
    tensor must be present with the right shape. Returns the ignored keys.
    """
    from zoo.reader import read_state_dict

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


def build_model(cfg: TrainConfig, num_classes: int, pretrained: bool = True) -> nn.Module:
    """zoo model with the requested init; only the classifiers are re-initialised for a new K.

    `pretrained=False` skips `cfg.weights` and `cfg.backbone_weights` (a resumed run loads its own)."""
    from zoo import create_model
    from zoo.hub import backbone_weights

    weights = cfg.weights if pretrained else None
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


def fetch_on_main_first(cfg: TrainConfig, ctx: D.DistContext) -> None:
    """Download 'auto' weights on rank 0 only, so that the other ranks find them in the cache."""
    from zoo.hub import backbone_weights, resolve_weights

    if ctx.is_main:
        if cfg.weights == "auto":
            resolve_weights(cfg.model, "auto", progress=cfg.progress)
        if cfg.backbone_weights == "auto":
            backbone_weights(cfg.model, progress=cfg.progress)
    D.barrier(ctx)


def check_resume_config(saved: Dict[str, Any], cfg: TrainConfig, ctx: D.DistContext) -> None:
    """Refuse a resume whose settings differ from the checkpoint's, naming each field (see
    `TrainConfig.resume_differences`); log the allowed changes; warn where exactness is lost."""
    if not saved:
        return
    refused, allowed = cfg.resume_differences(saved)
    if refused:
        raise ValueError("--resume: these settings differ from the run being resumed: " + "; ".join(refused)
                         + ". Resume with the run's settings (its config.json), or start a new run with "
                         "--work-dir NEW_DIR (or --overwrite to move the old outputs aside)")
    if allowed and ctx.is_main:
        log.info("--resume: changed %s", "; ".join(allowed))
    saved_world = saved.get("_world_size")
    if saved_world is not None and saved_world != ctx.world_size and ctx.is_main:
        warnings.warn(f"--resume: the checkpoint was written with {saved_world} processes, this run has "
                      f"{ctx.world_size}; the data order and RNG streams differ from an uninterrupted run",
                      RuntimeWarning, stacklevel=3)
