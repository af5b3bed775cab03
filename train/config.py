"""`TrainConfig`: everything one training run needs, under the names of `isa train`'s flags.

`TrainConfig.from_recipe(name, data_root)` is a published variant's recipe (spec §4: dataset, crop,
iterations, global batch, SGD 0.01/0.9/5e-4, poly 0.9 to 1e-4, evaluation and checkpoint every T/10);
`TrainConfig.for_finetune(model, data)` adapts a variant to a custom folder dataset with the variant's
optimiser and schedule. Field names are the flags' (`crop_size` is `--crop-size H W`, `img_scale` is
`--img-scale W H`, ...), so a command line, a Python call and the saved `config.json` read the same.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

AMP_CHOICES = ("bf16", "fp16")


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
    keep_checkpoints: int = 0
    check_data: bool = True
    progress: bool = True
    recipe: Optional[str] = None

    def __post_init__(self) -> None:
        # 'none' (the flags' word for "no weights") has one meaning everywhere: None
        if self.weights in ("", "none"):
            self.weights = None
        if self.backbone_weights in ("", "none"):
            self.backbone_weights = None

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
            cat_max_ratio=vc.cat_max_ratio, lr=vc.lr, momentum=vc.momentum, weight_decay=vc.weight_decay,
            power=vc.power, min_lr=vc.min_lr, aux_weight=vc.auxiliary_head.loss_weight,
            eval_interval=vc.eval_interval, checkpoint_interval=vc.checkpoint_interval, recipe=name)
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
            crop_size=vc.crop_size_hw, lr=vc.lr, momentum=vc.momentum, weight_decay=vc.weight_decay,
            power=vc.power, min_lr=vc.min_lr, aux_weight=vc.auxiliary_head.loss_weight,
            work_dir=f"work_dirs/{model}_finetune", log_interval=10)
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
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        for name in ("eval_interval", "checkpoint_interval", "early_stop"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
        return self

    @property
    def eval_every(self) -> int:
        return self.eval_interval or max(self.iters // 10, 1)

    @property
    def checkpoint_every(self) -> int:
        return self.checkpoint_interval or max(self.iters // 10, 1)

    @property
    def eval_scale(self) -> Optional[Tuple[int, int]]:
        """The evaluation scale (W, H): --test-scale, else the recipe's (None), else the training scale."""
        return self.test_scale or (None if self.recipe else self.img_scale)
