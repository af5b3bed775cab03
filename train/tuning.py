"""Fine-tuning options of a run, kept out of the loop: class weights, the loss, freezing, accumulation's
batches and TensorBoard. The training loop calls these hooks; with none of the options set each hook is a
no-op (or returns None), so the recipe's run is unchanged.

- Class weights (`--class-weights auto|FILE|w1,w2,...`): `auto` is median-frequency balancing (Eigen &
  Fergus 2015) over the train split's pixel counts - those `isa check-data` counts: `w_c = median(f) / f_c`
  with `f_c` class c's share of the labelled pixels (the median over classes that occur); a class with no
  pixel gets 1.0. A FILE holds the numbers (JSON list, or whitespace / comma separated). The weights go to
  every loss term that takes one and to the auxiliary head's cross-entropy.
- The loss (`--loss`, `--ohem`): `train.losses.build_loss` for the decode head; the auxiliary head keeps the
  recipe's cross-entropy (times `aux_weight`, 0.4), with the class weights.
- `--freeze-bn`: every BatchNorm in eval mode (running statistics frozen) with its weight and bias frozen,
  whatever `model.train()` later asks (MMSegmentation's `norm_eval=True` plus frozen affine).
- `--freeze-backbone S`: ResNet's `frozen_stages=S`: the stem and layers 1..S in eval mode, no gradients.
"""
from __future__ import annotations

import json
import logging
import math
import types
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

TB_HINT = ("--tensorboard needs the tensorboard package: pip install 'isa-triton[tensorboard]' "
           "(or pip install tensorboard)")


# ---------------------------------------------------------------------------------------------- class weights

def median_frequency_weights(pixels: Dict[int, int], num_classes: int) -> List[float]:
    """Median-frequency class weights from per-class pixel counts (ignored pixels not among the keys 0..K-1)."""
    counts = [int(pixels.get(c, 0)) for c in range(num_classes)]
    total = sum(counts)
    if total == 0:
        raise ValueError("--class-weights auto: the train split has no labelled pixel")
    freqs = [n / total for n in counts]
    present = sorted(f for f in freqs if f > 0)
    mid = len(present) // 2
    median = present[mid] if len(present) % 2 else 0.5 * (present[mid - 1] + present[mid])
    return [median / f if f > 0 else 1.0 for f in freqs]


def _parse_weights(text: str, where: str) -> List[float]:
    text = text.strip()
    try:
        values = json.loads(text) if text.startswith("[") else [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"{where}: cannot read class weights from {text[:60]!r}; give numbers, e.g. "
                         "--class-weights 1,2.5,0.8 or a file holding them") from None
    if not isinstance(values, list) or not values or not all(isinstance(v, (int, float)) for v in values):
        raise ValueError(f"{where}: class weights must be a non-empty list of numbers")
    values = [float(v) for v in values]
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"{where}: class weights must be finite and >= 0, got {values}")
    return values


def resolve_class_weights(spec: Any, cfg: Any, num_classes: int, classes: Sequence[str]) -> Optional[List[float]]:
    """The weights `spec` (`auto`, a file, `w1,w2,...` or a list) names, one per class; None without spec.

    Raises ValueError before training when the count differs from the class count or the file is bad."""
    if spec is None or spec == "":
        return None
    if isinstance(spec, (list, tuple)):
        weights = _parse_weights(json.dumps([float(v) for v in spec]), "--class-weights")
    elif str(spec).lower() == "auto":
        if cfg.dataset != "folder":
            raise ValueError("--class-weights auto counts the pixels of a folder dataset (--model ... --data DIR); "
                             "for a recipe dataset pass the weights: --class-weights w1,w2,... or a file")
        from eval.checks import check_dataset

        report = check_dataset(cfg.data_root, [cfg.train_split], num_classes)
        split = next((s for s in report.splits if s.name == cfg.train_split), None)
        if split is None:
            raise ValueError(f"--class-weights auto: no train split {cfg.train_split!r} in {cfg.data_root}")
        weights = median_frequency_weights(split.pixels, num_classes)
        absent = [classes[c] for c in range(num_classes) if not split.pixels.get(c)]
        if absent:
            log.warning("--class-weights auto: no pixel of %s in the train split; weight 1.0", ", ".join(absent))
    elif Path(str(spec)).is_file():
        path = Path(str(spec))
        weights = _parse_weights(path.read_text(), f"--class-weights {path}")
    else:
        weights = _parse_weights(str(spec), "--class-weights")
    if len(weights) != num_classes:
        raise ValueError(f"--class-weights: {len(weights)} weights for {num_classes} classes "
                         f"({', '.join(classes)}); give one weight per class")
    return weights


def format_class_weights(weights: Sequence[float], classes: Sequence[str]) -> str:
    """One line per class: name and weight (what a run prints)."""
    width = max(len(c) for c in classes)
    return "\n".join(f"  {name:<{width}}  {w:8.4f}" for name, w in zip(classes, weights))


# ---------------------------------------------------------------------------------------------- the loss

def needs_criterion(cfg: Any, class_weights: Optional[Sequence[float]]) -> bool:
    """Whether the run's loss differs from the recipe's (else the loop keeps `isanet_loss`'s own path)."""
    return bool(getattr(cfg, "loss", None) or getattr(cfg, "ohem", None) or class_weights)


def build_criterion(cfg: Any, num_classes: int, class_weights: Optional[Sequence[float]]) -> Optional[nn.Module]:
    """The decode and auxiliary heads' loss modules, or None for the recipe's cross-entropy."""
    if not needs_criterion(cfg, class_weights):
        return None
    from .losses import build_loss

    spec = cfg.loss or "ce"
    ohem = list(cfg.ohem) if cfg.ohem else None
    decode = build_loss(spec, num_classes, class_weight=class_weights, avg_non_ignore=cfg.avg_non_ignore, ohem=ohem)
    aux = build_loss({"type": "CrossEntropyLoss", "loss_weight": cfg.aux_weight}, num_classes,
                     class_weight=class_weights, avg_non_ignore=cfg.avg_non_ignore)
    return HeadLosses(decode, aux)


class HeadLosses(nn.Module):
    """The decode head's terms and the auxiliary head's, as `train.loss.isanet_loss(criterion=...)` uses them."""

    def __init__(self, decode: nn.Module, aux: nn.Module):
        super().__init__()
        self.decode, self.aux = decode, aux


# ---------------------------------------------------------------------------------------------- freezing

def _frozen_train(self: nn.Module, mode: bool = True) -> nn.Module:
    # model.train() reaches here through its children: stay in eval mode
    return nn.Module.train(self, False)


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)
    module.train = types.MethodType(_frozen_train, module)  # type: ignore[method-assign]
    module.eval()


def apply_freezing(model: nn.Module, freeze_bn: bool = False, freeze_backbone: Optional[int] = None) -> List[str]:
    """Freeze BatchNorm (`norm_eval` + affine) and / or the first backbone stages; returns what was frozen."""
    frozen: List[str] = []
    if freeze_backbone is not None and freeze_backbone >= 0:
        backbone = model.backbone
        stages = [("stem", backbone.stem)] + [(f"layer{i}", getattr(backbone, f"layer{i}"))
                                             for i in range(1, int(freeze_backbone) + 1)]
        for name, stage in stages:
            _freeze(stage)
            frozen.append(f"backbone.{name}")
    if freeze_bn:
        count = 0
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                _freeze(m)
                count += 1
        frozen.append(f"{count} BatchNorm layers")
    return frozen


# ---------------------------------------------------------------------------------------------- accumulation

def next_batches(batches: Iterator[Any], accum_steps: int) -> Tuple[Any, Any]:
    """The next batch (images, labels), or with accumulation lists of `accum_steps` micro-batches."""
    if accum_steps <= 1:
        return next(batches)
    micro = [next(batches) for _ in range(accum_steps)]
    return [m[0] for m in micro], [m[1] for m in micro]


# ---------------------------------------------------------------------------------------------- TensorBoard

def check_tensorboard() -> None:
    """Raise a one-line install hint when the tensorboard package is missing."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ValueError(TB_HINT) from None


class TensorBoardLog:
    """Scalars to WORK_DIR/tensorboard: every train record's losses and lr, every evaluation's metrics and
    per-class IoU / Acc (tags `val/IoU/<class>`), each at its iteration.

    `purge_step`: on --resume, the first iteration the resumed run writes (the checkpoint's + 1). The killed
    run's points from there on, which log.jsonl drops too, are dropped by TensorBoard's readers (a SessionLog
    START at that step), so no curve shows them twice."""

    def __init__(self, work_dir: Path, classes: Sequence[str], purge_step: Optional[int] = None):
        check_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(work_dir) / "tensorboard"), purge_step=purge_step)
        self.classes = list(classes)

    def record(self, record: Dict[str, Any]) -> None:
        """Write one log.jsonl record's numbers (and per-class lists) as scalars at its iteration."""
        step = int(record.get("iter", 0))
        mode = record.get("mode", "train")
        for key, value in record.items():
            if key in ("mode", "iter", "best"):
                continue
            if isinstance(value, list) and len(value) == len(self.classes):
                for name, v in zip(self.classes, value):
                    if isinstance(v, (int, float)) and v is not None:
                        self.writer.add_scalar(f"{mode}/{key}/{name}", float(v), step)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{mode}/{key}", float(value), step)
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()


def resolved_config(cfg: Any, class_weights: Optional[Sequence[float]], criterion: Optional[nn.Module]
                    ) -> Dict[str, Any]:
    """config.json's resolved view of these options: the class weights' values, each head's loss terms."""
    out: Dict[str, Any] = {"class_weight_values": list(class_weights) if class_weights else None,
                           "effective_batch_size": int(cfg.batch_size) * int(cfg.accum_steps)}
    if criterion is None:
        out["loss_terms"] = {"decode": [{"type": "CrossEntropyLoss", "loss_weight": 1.0}],
                             "aux": [{"type": "CrossEntropyLoss", "loss_weight": float(cfg.aux_weight)}]}
    else:
        out["loss_terms"] = {head: [{"type": type(m).__name__, "loss_name": m.loss_name,
                                     "loss_weight": m.loss_weight} for m in getattr(criterion, head).losses]
                             for head in ("decode", "aux")}
        sampler = criterion.decode.sampler
        if sampler is not None:
            out["loss_terms"]["decode_sampler"] = {"type": "OHEMPixelSampler", "thresh": sampler.thresh,
                                                   "min_kept": sampler.min_kept}
    return out
