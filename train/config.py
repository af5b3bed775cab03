"""`TrainConfig`: everything one training run needs, under the names of `isa train`'s flags.

`TrainConfig.from_recipe(name, data_root)` is a published variant's recipe (spec §4: dataset, crop,
iterations, global batch, SGD 0.01/0.9/5e-4, poly 0.9 to 1e-4, evaluation and checkpoint every T/10);
`TrainConfig.for_finetune(model, data)` adapts a variant to a custom folder dataset with the variant's
optimiser and schedule. Field names are the flags' (`crop_size` is `--crop-size H W`, `img_scale` is
`--img-scale W H`, ...), so a command line, a Python call and the saved `config.json` read the same.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

AMP_CHOICES = ("bf16", "fp16")

# Without an explicit --eval-interval / --checkpoint-interval a run evaluates and checkpoints every iters/10
# iterations but never more often than every INTERVAL_FLOOR: an evaluation costs about as much as tens of
# training iterations (every val image at the test scale), so a short fine-tune (--iters 10) spends its time
# training, not evaluating. The last iteration always evaluates and checkpoints.
INTERVAL_FLOOR = 50

# checkpoints a run keeps unless told (--keep-checkpoints); a resume without the flag keeps its run's own setting,
# so that resuming a run started with --keep-checkpoints all (or before this default) deletes none of them
KEEP_CHECKPOINTS = 2

# fields a --resume may change: they decide how long the run goes on and what it reports, not what one
# iteration computes (a longer --iters stretches the rest of the poly schedule). Any other difference from
# the checkpoint's config is refused, naming the field.
RESUME_MAY_CHANGE = ("iters", "eval_interval", "checkpoint_interval", "eval_max_images", "early_stop",
                     "log_interval", "keep_checkpoints", "workers", "threads", "progress", "check_data",
                     "tensorboard")
# lr and weight decay where neither the caller nor a recipe gives them: the recipe's SGD values, and for AdamW
# MMSegmentation's usual fine-tuning setting (its SegFormer configs). One table for the CLI and Python alike.
OPTIMIZER_DEFAULTS: Dict[str, Dict[str, float]] = {"sgd": {"lr": 0.01, "weight_decay": 5e-4},
                                                   "adamw": {"lr": 6e-5, "weight_decay": 0.01}}

# not compared at all: where the run lives and how it was started (a resumed run reads no initial weights)
RESUME_IGNORED = ("work_dir", "resume", "overwrite", "weights", "backbone_weights")


@dataclass
class TrainConfig:
    """One training run; plain values only (it is stored in every checkpoint and in config.json)."""

    model: str
    data_root: str
    dataset: str = "folder"  # the reader: folder, cityscapes, ade20k, voc
    train_split: str = "train"
    val_split: Optional[str] = "val"
    work_dir: str = "work_dirs/isanet"
    weights: Optional[str] = None
    backbone_weights: Optional[str] = None
    num_classes: Optional[int] = None
    iters: int = 40000
    batch_size: int = 8
    crop_size: Tuple[int, int] = (512, 1024)  # (H, W)
    img_scale: Tuple[int, int] = (2048, 1024)  # (W, H) of the ratio resize
    ratio_range: Tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    test_scale: Optional[Tuple[int, int]] = None  # (W, H) of evaluation; None: the recipe's, or img_scale
    lr: Optional[float] = None  # None: OPTIMIZER_DEFAULTS[optimizer] (the recipes set their own)
    momentum: float = 0.9
    weight_decay: Optional[float] = None  # None: OPTIMIZER_DEFAULTS[optimizer]
    power: float = 0.9
    min_lr: float = 1e-4
    aux_weight: float = 0.4
    avg_non_ignore: bool = False
    # fine-tuning options (train.losses, train.optim, train.tuning); the defaults are the recipe's
    loss: Optional[Any] = None  # "ce:1.0 dice:3.0" or train.losses dicts; None: the recipe's cross-entropy
    ohem: Optional[List[Any]] = None  # [thresh or None, min_kept]: MMSeg's OHEMPixelSampler on the decode head
    class_weights: Optional[Any] = None  # "auto" (median frequency), a file, "w1,w2,..." or a list
    freeze_bn: bool = False  # BatchNorm in eval mode, statistics and affine frozen (norm_eval)
    freeze_backbone: Optional[int] = None  # ResNet frozen_stages: stem + layers 1..S
    accum_steps: int = 1  # micro-batches of batch_size per optimizer step
    optimizer: str = "sgd"  # sgd | adamw
    no_decay_norm_bias: bool = False  # weight decay 0 for norm layers and biases
    warmup: int = 0  # linear warm-up iterations (LinearLR)
    warmup_start_factor: float = 1e-6
    head_lr_mult: float = 1.0  # lr multiplier of decode_head.* and auxiliary_head.*
    tensorboard: bool = False  # scalars to WORK_DIR/tensorboard
    eval_interval: Optional[int] = None
    checkpoint_interval: Optional[int] = None
    eval_max_images: Optional[int] = None
    early_stop: Optional[int] = None  # stop after this many evaluations without a better val mIoU
    log_interval: int = 50
    seed: int = 0
    device: str = "auto"
    amp: Optional[str] = None
    backend: str = "auto"
    workers: Optional[int] = None
    threads: Optional[int] = None
    resume: bool = False
    dropout: Optional[float] = None
    # the newest N complete checkpoints stay (best.safetensors besides); 0: all; None: KEEP_CHECKPOINTS, or on
    # --resume the resumed run's own setting (resolve_keep_checkpoints)
    keep_checkpoints: Optional[int] = None
    overwrite: bool = False  # move an earlier run's outputs to WORK_DIR/previous-<time>/ instead of refusing
    check_data: bool = True
    progress: bool = True
    recipe: Optional[str] = None

    def __post_init__(self) -> None:
        # 'none' (the flags' word for "no weights") has one meaning everywhere: None
        if self.weights in ("", "none"):
            self.weights = None
        if self.backbone_weights in ("", "none"):
            self.backbone_weights = None
        self._resolve_optimizer_defaults()

    def _resolve_optimizer_defaults(self) -> None:
        # lr / weight decay left unset take the optimizer's defaults, so that config.json records the values used
        defaults = OPTIMIZER_DEFAULTS.get(self.optimizer, OPTIMIZER_DEFAULTS["sgd"])
        if self.lr is None:
            self.lr = defaults["lr"]
        if self.weight_decay is None:
            self.weight_decay = defaults["weight_decay"]

    @classmethod
    def from_recipe(cls, name: str, data_root: str, **overrides: Any) -> "TrainConfig":
        """The published recipe of variant `name` (spec §4, variants.json); keyword overrides win.

        An override of None is kept (e.g. `val_split=None` turns evaluation off).

        Example:
            >>> cfg = TrainConfig.from_recipe("isanet_r50-d8_512x1024_40k_cityscapes", "data/cityscapes")
            >>> cfg.iters, cfg.batch_size, cfg.crop_size, cfg.eval_interval, cfg.train_split
            (40000, 8, (512, 1024), 4000, 'train')
        """
        from zoo import get_config

        vc = get_config(name)
        values: Dict[str, Any] = dict(
            model=name, data_root=str(data_root), dataset=vc.dataset, train_split=vc.train_split,
            val_split=vc.val_split, work_dir=f"work_dirs/{name}", iters=vc.iters, batch_size=vc.total_batch_size,
            crop_size=vc.crop_size_hw, img_scale=vc.train_img_scale_wh, ratio_range=vc.ratio_range,
            cat_max_ratio=vc.cat_max_ratio, momentum=vc.momentum, power=vc.power, min_lr=vc.min_lr,
            aux_weight=vc.auxiliary_head.loss_weight,
            eval_interval=vc.eval_interval, checkpoint_interval=vc.checkpoint_interval, recipe=name)
        if overrides.get("optimizer", "sgd") == "sgd":  # the recipe's SGD values; another optimizer takes its own
            values.update(lr=vc.lr, weight_decay=vc.weight_decay)
        values.update(overrides)
        return cls(**values)

    @classmethod
    def for_finetune(cls, model: str, data: str, **overrides: Any) -> "TrainConfig":
        """Fine-tuning on a custom folder dataset with the variant's optimiser and schedule.

        Defaults: published weights ("auto"), 2000 iterations, the variant's crop, global batch 8, train
        scale (4 * crop width, crop height) as ADE20K/VOC use (2048, 512) for 512x512 crops.
        """
        from zoo import get_config

        vc = get_config(model)
        values: Dict[str, Any] = dict(
            model=model, data_root=str(data), dataset="folder", weights="auto", iters=2000, batch_size=8,
            crop_size=vc.crop_size_hw, momentum=vc.momentum, power=vc.power, min_lr=vc.min_lr,
            aux_weight=vc.auxiliary_head.loss_weight, work_dir=f"work_dirs/{model}_finetune", log_interval=10)
        if overrides.get("optimizer", "sgd") == "sgd":  # the variant's SGD values; AdamW takes OPTIMIZER_DEFAULTS
            values.update(lr=vc.lr, weight_decay=vc.weight_decay)
        values.update(overrides)
        if overrides.get("img_scale") is None:
            h, w = values["crop_size"]
            values["img_scale"] = (4 * int(w), int(h))
        return cls(**values)

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON types (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def validate(self) -> "TrainConfig":
        """Normalise tuples and raise ValueError naming the field and the fix for bad values."""
        self.crop_size = tuple(int(v) for v in self.crop_size)  # type: ignore[assignment]
        self.img_scale = tuple(int(v) for v in self.img_scale)  # type: ignore[assignment]
        self.ratio_range = tuple(float(v) for v in self.ratio_range)  # type: ignore[assignment]
        if self.test_scale is not None:
            self.test_scale = tuple(int(v) for v in self.test_scale)  # type: ignore[assignment]
        if len(self.crop_size) != 2 or min(self.crop_size) < 32:
            raise ValueError(f"--crop-size must be two ints >= 32 (H W), got {self.crop_size}")
        for name in ("iters", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.amp not in (None,) + AMP_CHOICES:
            raise ValueError(f"--amp must be one of {', '.join(AMP_CHOICES)}, got {self.amp!r}")
        self._resolve_optimizer_defaults()
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --work-dir, --overwrite moves it aside to start afresh: "
                             "choose one")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 0:
            raise ValueError(f"--keep-checkpoints must be >= 0 (0 or 'all' keeps every checkpoint), got "
                             f"{self.keep_checkpoints}")
        if self.accum_steps < 1:
            raise ValueError(f"--accum-steps must be >= 1, got {self.accum_steps}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"--optimizer must be sgd or adamw, got {self.optimizer!r}")
        if self.warmup < 0 or not 0.0 <= self.warmup_start_factor <= 1.0:
            raise ValueError(f"--warmup must be >= 0 iterations and its start factor in [0, 1], got {self.warmup} "
                             f"and {self.warmup_start_factor}")
        if self.head_lr_mult <= 0:
            raise ValueError(f"--head-lr-mult must be positive, got {self.head_lr_mult}")
        if self.freeze_backbone is not None and not -1 <= self.freeze_backbone <= 4:
            raise ValueError(f"--freeze-backbone takes 0 (stem) to 4 (stem and layers 1-4), got {self.freeze_backbone}")
        # plain types only: the config rides in every checkpoint, which is read back with weights_only=True (a
        # Path or an array there makes every checkpoint of the run unreadable) and compared on --resume
        for name in ("class_weights", "weights", "backbone_weights"):
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))
        if self.class_weights is not None and not isinstance(self.class_weights, str):
            try:
                self.class_weights = [float(v) for v in self.class_weights]
            except (TypeError, ValueError):
                raise ValueError(f"--class-weights must be auto, a file or numbers, got {self.class_weights!r}") \
                    from None
        if self.ohem is not None:
            self.ohem = list(self.ohem) + [None, 100000][len(self.ohem):] if len(self.ohem) < 2 else list(self.ohem)
            if len(self.ohem) != 2:
                raise ValueError(f"--ohem takes [THRESH] [MIN_KEPT], got {self.ohem}")
        for name in ("eval_interval", "checkpoint_interval", "early_stop"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
        return self

    @property
    def eval_every(self) -> int:
        """--eval-interval, else iters/10 but at least INTERVAL_FLOOR (the last iteration evaluates anyway)."""
        return self.eval_interval or max(self.iters // 10, INTERVAL_FLOOR)

    @property
    def checkpoint_every(self) -> int:
        """--checkpoint-interval, else iters/10 but at least INTERVAL_FLOOR (the last iteration saves anyway)."""
        return self.checkpoint_interval or max(self.iters // 10, INTERVAL_FLOOR)

    def resolve_keep_checkpoints(self, saved: Optional[Dict[str, Any]] = None) -> int:
        """Set and return `keep_checkpoints`: as given, else the resumed run's (`saved`: its checkpoint's config),
        else KEEP_CHECKPOINTS."""
        if self.keep_checkpoints is None:
            value = (saved or {}).get("keep_checkpoints")
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
            self.keep_checkpoints = value if ok else KEEP_CHECKPOINTS
        return int(self.keep_checkpoints)

    def resume_differences(self, saved: Dict[str, Any]) -> Tuple[List[str], List[str]]:
        """(refused, allowed): 'field: old -> new' for each field that differs from `saved` (a checkpoint's
        config); allowed ones are RESUME_MAY_CHANGE. Fields `saved` lacks (older runs) are not compared."""
        from pathlib import Path

        now = self.to_dict()
        refused, allowed = [], []
        for key, value in now.items():
            if key in RESUME_IGNORED or key not in saved or saved[key] == value:
                continue
            if key == "data_root" and Path(str(saved[key])).resolve() == Path(str(value)).resolve():
                continue
            line = f"{key}: {saved[key]!r} -> {value!r}"
            (allowed if key in RESUME_MAY_CHANGE else refused).append(line)
        return refused, allowed

    @property
    def eval_scale(self) -> Optional[Tuple[int, int]]:
        """The evaluation scale (W, H): --test-scale, else the recipe's (None), else the training scale."""
        return self.test_scale or (None if self.recipe else self.img_scale)
