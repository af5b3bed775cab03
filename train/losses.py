"""MMSegmentation 1.2.2's segmentation losses and OHEM pixel sampler, by name, for fine-tuning.

`build_loss(spec, num_classes)` returns a module that takes full-resolution `(logits (N, K, H, W), labels
(N, H, W))` and returns a dict of named losses (`loss_ce`, `loss_dice`, `loss_focal`, `loss_lovasz`: the
keys MMSegmentation logs; two terms with one name are summed, as `decode_head.loss_decode` does). `spec`
is what `decode_head.loss_decode` lists (`{"type": "DiceLoss", "loss_weight": 3.0, ...}` or a list of
them) or the command line's short form `"ce:1.0 dice:3.0"`. Each type computes what MMSegmentation's
module of that name computes (checked against MMSegmentation 1.2.2 itself: tools/mmseg_loss_reference.py,
tests/test_train_losses.py), except where 1.2.2 is broken; there it computes what the code intends:

- `CrossEntropyLoss(class_weight, avg_non_ignore, loss_weight)`. With class weights 1.2.2 indexes the
  weights with every label, 255 included, and raises IndexError on any ignored pixel (open-mmlab/
  mmsegmentation #3734, #3492); here the mean divides by the sum of the class weights of the
  non-ignored pixels (the fix of PR #3457), with or without `avg_non_ignore`. Without class weights
  the mean divides by all pixels, or by the non-ignored ones with `avg_non_ignore`.
- `DiceLoss(use_sigmoid=True, activate, naive_dice, eps, ignore_index, loss_weight)`, exactly 1.2.2's:
  sigmoid by default, one Dice per image over all classes and pixels flattened together, ignored pixels
  keep their predictions but have an all-zero target, and `ignore_index` drops that *class channel*
  (with 255 and fewer classes it drops nothing). The short name `mmseg_dice` is this loss.
- `SoftmaxDiceLoss(eps=1.0, loss_weight)` (this project's; the short name `dice`): the Dice most users
  mean - softmax probabilities, ignored pixels removed, one Dice per class over the batch, averaged over
  the classes present in the labels; `(2 sum(p t) + eps) / (sum p + sum t + eps)`.
- `FocalLoss(gamma=2.0, alpha=0.5, class_weight, loss_weight)`: the CUDA path of 1.2.2 (mmcv's
  `sigmoid_focal_loss` on the one-hot target of each pixel, ignored pixels masked, mean over all pixels
  times classes). Its CPU path takes `one_hot[:, num_classes]` (one column) instead of `[:, :num_classes]`
  as the target and fails with a shape error (RuntimeError) on any real input; that is not reproduced.
- `LovaszLoss(classes='present', per_image=False, class_weight, loss_weight, reduction)`: multi-class
  Lovasz-softmax. 1.2.2 asserts `reduction='none'` when `per_image=False` although the loss is then one
  number; any reduction is accepted here and means the same.

`OHEMPixelSampler(thresh, min_kept)` weights the pixels each loss sees (MMSeg's decode head `sampler`):
with `thresh`, the valid pixels whose softmax probability of their label is below max(thresh, the
`min_kept * N`-th smallest probability); without, the `min_kept * N` valid pixels of highest loss (the sum
of the loss terms per pixel). As in MMSegmentation the weights multiply per-pixel terms: the cross-entropy
keeps its mean over all (or all valid) pixels; Lovasz ignores them; Dice and Focal cannot take them
(1.2.2 raises) and are refused with a sampler.

Example:
    >>> import torch
    >>> criterion = build_loss("ce:1.0 dice:3.0", num_classes=3)
    >>> out = criterion(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))
    >>> sorted(out), round(out["loss_ce"].item(), 4)
    (['loss_ce', 'loss_dice'], 1.0986)
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = 255
_EPS = torch.finfo(torch.float32).eps  # mmseg's weight_reduce_loss: sum / (avg_factor + eps)

# the command line's short names -> the loss types they build
SHORT_NAMES: Dict[str, str] = {"ce": "CrossEntropyLoss", "dice": "SoftmaxDiceLoss", "mmseg_dice": "DiceLoss",
                               "focal": "FocalLoss", "lovasz": "LovaszLoss"}
WeightList = Optional[Sequence[float]]


def _reduce(loss: torch.Tensor, weight: Optional[torch.Tensor], reduction: str,
            avg_factor: Optional[Any] = None) -> torch.Tensor:
    """mmseg's `weight_reduce_loss`."""
    if weight is not None:
        loss = loss * weight
    if reduction == "none":
        return loss
    if avg_factor is None:
        return loss.mean() if reduction == "mean" else loss.sum()
    if reduction != "mean":
        raise ValueError("avg_factor can not be used with reduction='sum'")
    return loss.sum() / (avg_factor + _EPS)


def _check_reduction(reduction: str) -> str:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return reduction


def check_class_weight(class_weight: WeightList, owner: str) -> Optional[List[float]]:
    """`class_weight` as floats; ValueError naming the class index and value when one is NaN, infinite or
    negative (such a weight turns the loss into NaN or rewards the wrong class without any other sign)."""
    if class_weight is None:
        return None
    values = [float(w) for w in class_weight]
    for i, w in enumerate(values):
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"{owner}: class weight {i} is {w}; class weights must be finite and >= 0 - fix "
                             "--class-weights (or the loss's class_weight), e.g. 1.0 for a class to weigh as usual")
    return values


class _Loss(nn.Module):
    loss_name: str
    accepts_pixel_weight = True  # whether an OHEM weight map can multiply its per-pixel terms

    def check_classes(self, num_classes: int) -> None:
        """Raise ValueError when a per-class option does not fit `num_classes` classes (none here)."""

    def _class_weight(self, ref: torch.Tensor) -> Optional[torch.Tensor]:
        cw = getattr(self, "class_weight", None)
        return None if cw is None else ref.new_tensor(cw)


class CrossEntropyLoss(_Loss):
    """MMSeg's softmax `CrossEntropyLoss` (use_sigmoid / use_mask are not supported)."""

    def __init__(self, class_weight: WeightList = None, avg_non_ignore: bool = False, loss_weight: float = 1.0,
                 reduction: str = "mean", loss_name: str = "loss_ce", use_sigmoid: bool = False,
                 use_mask: bool = False):
        super().__init__()
        if use_sigmoid or use_mask:
            raise ValueError("CrossEntropyLoss: only the softmax form is supported (use_sigmoid/use_mask=False)")
        self.class_weight = check_class_weight(class_weight, "CrossEntropyLoss")
        self.avg_non_ignore = bool(avg_non_ignore)
        self.loss_weight = float(loss_weight)
        self.reduction = _check_reduction(reduction)
        self.loss_name = loss_name

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, weight: Optional[torch.Tensor] = None,
                ignore_index: int = IGNORE_INDEX, reduction: Optional[str] = None) -> torch.Tensor:
        reduction = reduction or self.reduction
        cw = self._class_weight(logits)
        per_pixel = F.cross_entropy(logits, labels, weight=cw, reduction="none", ignore_index=ignore_index)
        avg_factor = None
        if reduction == "mean":
            valid = labels != ignore_index
            if cw is None:
                avg_factor = int(valid.sum()) if self.avg_non_ignore else labels.numel()
            else:  # PR #3457: the weights of the non-ignored pixels (1.2.2 raises IndexError here)
                avg_factor = cw[labels[valid]].sum()
        return self.loss_weight * _reduce(per_pixel, None if weight is None else weight.float(), reduction,
                                          avg_factor)


def _one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, H, W) -> (N, K, H, W); values outside 0..K-1 (ignored pixels) give an all-zero column."""
    clamped = labels.clamp(min=0, max=num_classes)
    return F.one_hot(clamped, num_classes + 1)[..., :num_classes].permute(0, 3, 1, 2)


class DiceLoss(_Loss):
    """MMSeg 1.2.2's `DiceLoss`, exactly (see the module docstring for what it does with ignored pixels)."""

    accepts_pixel_weight = False

    def __init__(self, use_sigmoid: bool = True, activate: bool = True, reduction: str = "mean",
                 naive_dice: bool = False, loss_weight: float = 1.0, ignore_index: Optional[int] = IGNORE_INDEX,
                 eps: float = 1e-3, loss_name: str = "loss_dice"):
        super().__init__()
        self.use_sigmoid, self.activate, self.naive_dice = bool(use_sigmoid), bool(activate), bool(naive_dice)
        self.reduction = _check_reduction(reduction)
        self.loss_weight, self.eps = float(loss_weight), float(eps)
        self.ignore_index = ignore_index
        self.loss_name = loss_name

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, weight: Optional[torch.Tensor] = None,
                ignore_index: int = IGNORE_INDEX, reduction: Optional[str] = None) -> torch.Tensor:
        reduction = reduction or self.reduction
        target = labels if labels.shape == logits.shape else _one_hot(labels, logits.shape[1])
        pred = logits
        if self.activate:
            if self.use_sigmoid:
                pred = pred.sigmoid()
            elif pred.shape[1] != 1:
                pred = pred.softmax(dim=1)
        if self.ignore_index is not None:  # a class channel, not pixels (mmseg's semantics)
            keep = torch.arange(pred.shape[1], device=pred.device) != self.ignore_index
            pred, target = pred[:, keep], target[:, keep]
            if pred.shape[1] == 0:
                raise ValueError("DiceLoss: ignore_index removes the only class")
        pred, target = pred.flatten(1), target.flatten(1).to(pred.dtype)
        a = (pred * target).sum(1)
        if self.naive_dice:
            d = (2 * a + self.eps) / (pred.sum(1) + target.sum(1) + self.eps)
        else:
            d = 2 * a / (((pred * pred).sum(1) + self.eps) + ((target * target).sum(1) + self.eps))
        if weight is not None and weight.dim() != 1:
            raise ValueError("DiceLoss takes one weight per image, not a pixel weight map (an OHEM sampler); "
                             "MMSegmentation 1.2.2 raises here too")
        return self.loss_weight * _reduce(1 - d, weight, reduction)


class SoftmaxDiceLoss(_Loss):
    """Softmax Dice over the non-ignored pixels, per class over the batch, mean over the present classes."""

    accepts_pixel_weight = False

    def __init__(self, eps: float = 1.0, loss_weight: float = 1.0, loss_name: str = "loss_dice"):
        super().__init__()
        self.eps, self.loss_weight, self.loss_name = float(eps), float(loss_weight), loss_name

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, weight: Optional[torch.Tensor] = None,
                ignore_index: int = IGNORE_INDEX, reduction: Optional[str] = None) -> torch.Tensor:
        if weight is not None:
            raise ValueError("SoftmaxDiceLoss takes no pixel weights (an OHEM sampler)")
        k = logits.shape[1]
        valid = (labels != ignore_index).unsqueeze(1)
        prob = logits.softmax(dim=1) * valid
        target = _one_hot(torch.where(valid[:, 0], labels, 0), k).to(prob.dtype) * valid
        dims = (0, 2, 3)
        inter, p_sum, t_sum = (prob * target).sum(dims), prob.sum(dims), target.sum(dims)
        dice = (2 * inter + self.eps) / (p_sum + t_sum + self.eps)
        present = t_sum > 0
        if not bool(present.any()):
            return logits.sum() * 0.0
        return self.loss_weight * (1 - dice[present]).mean()


class FocalLoss(_Loss):
    """MMSeg's sigmoid `FocalLoss` with the semantics of its CUDA path (see the module docstring)."""

    accepts_pixel_weight = False

    def __init__(self, use_sigmoid: bool = True, gamma: float = 2.0, alpha: Union[float, Sequence[float]] = 0.5,
                 reduction: str = "mean", class_weight: WeightList = None, loss_weight: float = 1.0,
                 loss_name: str = "loss_focal"):
        super().__init__()
        if not use_sigmoid:
            raise ValueError("FocalLoss: only the sigmoid focal loss exists (as in MMSegmentation)")
        self.gamma = float(gamma)
        self.alpha = [float(a) for a in alpha] if isinstance(alpha, (list, tuple)) else float(alpha)
        self.reduction = _check_reduction(reduction)
        self.class_weight = check_class_weight(class_weight, "FocalLoss")
        self.loss_weight, self.loss_name = float(loss_weight), loss_name

    def check_classes(self, num_classes: int) -> None:
        """A list `alpha` holds one value per class."""
        if isinstance(self.alpha, list) and len(self.alpha) != num_classes:
            raise ValueError(f"FocalLoss: alpha has {len(self.alpha)} values ({self.alpha}) for {num_classes} "
                             f"classes; give one per class or a single number (e.g. alpha=0.5)")

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, weight: Optional[torch.Tensor] = None,
                ignore_index: int = IGNORE_INDEX, reduction: Optional[str] = None) -> torch.Tensor:
        reduction = reduction or self.reduction
        self.check_classes(logits.shape[1])
        if weight is not None:
            raise ValueError("FocalLoss takes no pixel weight map (an OHEM sampler); MMSegmentation 1.2.2 raises "
                             "here too")
        n, k = logits.shape[:2]
        if k < 2:
            raise ValueError("FocalLoss here needs at least 2 classes")
        pred = logits.transpose(0, 1).reshape(k, -1).transpose(0, 1)  # (P, K) in mmseg's pixel order
        flat = labels.reshape(-1)
        valid = (flat != ignore_index).view(-1, 1)
        target = F.one_hot(torch.where(flat == ignore_index, 0, flat), k + 1)[:, :k].to(pred.dtype)
        p = pred.sigmoid()
        one_minus_pt = (1 - p) * target + p * (1 - target)
        alpha = pred.new_tensor(self.alpha) if isinstance(self.alpha, list) else self.alpha
        focal_weight = (alpha * target + (1 - alpha) * (1 - target)) * one_minus_pt.pow(self.gamma)
        loss = F.binary_cross_entropy_with_logits(pred, target, reduction="none") * focal_weight
        final_weight = torch.ones(1, k, dtype=loss.dtype, device=loss.device)
        cw = self._class_weight(pred)
        if cw is not None:
            final_weight = final_weight * cw
        final_weight = final_weight * valid
        out = self.loss_weight * _reduce(loss, final_weight, reduction)
        if reduction == "none":
            out = out.transpose(0, 1).reshape(k, n, *logits.shape[2:]).transpose(0, 1).contiguous()
        return out


def _lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovasz extension w.r.t. sorted errors (Berman et al. 2018, Alg. 1)."""
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1 - gt_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    if len(gt_sorted) > 1:
        jaccard[1:] = jaccard[1:] - jaccard[:-1]
    return jaccard


class LovaszLoss(_Loss):
    """MMSeg's multi-class `LovaszLoss` (Lovasz-softmax); the binary hinge form is not supported."""

    def __init__(self, loss_type: str = "multi_class", classes: Union[str, Sequence[int]] = "present",
                 per_image: bool = False, reduction: str = "mean", class_weight: WeightList = None,
                 loss_weight: float = 1.0, loss_name: str = "loss_lovasz"):
        super().__init__()
        if loss_type != "multi_class":
            raise ValueError("LovaszLoss: only loss_type='multi_class' is supported")
        if not (classes in ("all", "present") or (isinstance(classes, (list, tuple))
                                                  and all(isinstance(c, int) for c in classes))):
            raise ValueError(f"LovaszLoss: classes must be 'all', 'present' or a list of ints, got {classes!r}")
        self.classes = classes if isinstance(classes, str) else [int(c) for c in classes]
        self.per_image = bool(per_image)
        self.reduction = _check_reduction(reduction)
        self.class_weight = check_class_weight(class_weight, "LovaszLoss")
        self.loss_weight, self.loss_name = float(loss_weight), loss_name

    def check_classes(self, num_classes: int) -> None:
        """A list `classes` names class indices 0..num_classes-1."""
        if not isinstance(self.classes, str):
            bad = [c for c in self.classes if not 0 <= c < num_classes]
            if bad:
                raise ValueError(f"LovaszLoss: classes {bad} are out of range for {num_classes} classes; give "
                                 f"indices 0..{num_classes - 1}, or classes='present' / 'all'")

    def _flat(self, probs: torch.Tensor, labels: torch.Tensor, cw: Optional[torch.Tensor]) -> torch.Tensor:
        k = probs.shape[1]
        if probs.numel() == 0:
            return probs.sum() * 0.0
        losses = []
        for c in (range(k) if isinstance(self.classes, str) else self.classes):
            fg = (labels == c).to(probs.dtype)
            if self.classes == "present" and not bool(fg.any()):
                continue
            errors = (fg - probs[:, c]).abs()
            errors_sorted, perm = torch.sort(errors, 0, descending=True)
            loss = torch.dot(errors_sorted, _lovasz_grad(fg[perm]))
            losses.append(loss * cw[c] if cw is not None else loss)
        if not losses:  # no labelled pixel at all (1.2.2 raises on the empty stack)
            return probs.sum() * 0.0
        return torch.stack(losses).mean()

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, weight: Optional[torch.Tensor] = None,
                ignore_index: int = IGNORE_INDEX, reduction: Optional[str] = None) -> torch.Tensor:
        reduction = reduction or self.reduction
        self.check_classes(logits.shape[1])
        cw = self._class_weight(logits)
        probs = logits.softmax(dim=1)

        def flat(p: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
            p = p.permute(0, 2, 3, 1).reshape(-1, p.shape[1])
            lab = lab.reshape(-1)
            valid = lab != ignore_index
            return self._flat(p[valid], lab[valid], cw)

        if self.per_image:
            per = torch.stack([flat(p[None], lab[None]) for p, lab in zip(probs, labels)])
            return self.loss_weight * _reduce(per, None, reduction)
        return self.loss_weight * flat(probs, labels)  # one number whatever the reduction


LOSS_TYPES = {cls.__name__: cls for cls in (CrossEntropyLoss, DiceLoss, SoftmaxDiceLoss, FocalLoss, LovaszLoss)}


class OHEMPixelSampler(nn.Module):
    """MMSeg's `OHEMPixelSampler(thresh, min_kept)`: a 0/1 weight per pixel, the hard examples 1."""

    def __init__(self, thresh: Optional[float] = None, min_kept: int = 100000):
        super().__init__()
        if min_kept <= 1:
            raise ValueError(f"OHEM min_kept must be > 1, got {min_kept}")
        if thresh is not None and not 0.0 < float(thresh) <= 1.0:
            raise ValueError(f"OHEM thresh is a probability in (0, 1], got {thresh}")
        self.thresh = None if thresh is None else float(thresh)
        self.min_kept = int(min_kept)

    @torch.no_grad()
    def sample(self, logits: torch.Tensor, labels: torch.Tensor, losses: Sequence[_Loss] = (),
               ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
        """(N, H, W) weights for full-resolution `logits` and `labels`; `losses` rank pixels without `thresh`."""
        labels = labels.long()
        batch_kept = self.min_kept * labels.shape[0]
        valid = labels != ignore_index
        weight = logits.new_zeros(labels.shape)
        valid_weight = weight[valid]
        if self.thresh is not None:
            prob = logits.softmax(dim=1).gather(1, torch.where(valid, labels, 0).unsqueeze(1)).squeeze(1)
            sort_prob, _ = prob[valid].sort()
            min_threshold = sort_prob[min(batch_kept, sort_prob.numel() - 1)] if sort_prob.numel() else 0.0
            threshold = max(min_threshold, self.thresh)
            valid_weight[prob[valid] < threshold] = 1.0
        else:
            total = 0.0
            for loss in losses:
                total = total + loss(logits, labels, None, ignore_index=ignore_index, reduction="none")
            _, order = total[valid].sort(descending=True)
            valid_weight[order[:batch_kept]] = 1.0
        weight[valid] = valid_weight
        return weight


class SegLoss(nn.Module):
    """The loss terms of one head (and its optional OHEM sampler): `(logits, labels) -> {name: loss}`."""

    def __init__(self, losses: Sequence[_Loss], sampler: Optional[OHEMPixelSampler] = None,
                 ignore_index: int = IGNORE_INDEX):
        super().__init__()
        if not losses:
            raise ValueError("no loss given")
        self.losses = nn.ModuleList(losses)
        self.sampler = sampler
        self.ignore_index = ignore_index
        if sampler is not None:
            refused = [type(m).__name__ for m in losses if not m.accepts_pixel_weight]
            if refused:
                raise ValueError(f"--ohem weights pixels, which {', '.join(refused)} cannot take (MMSegmentation "
                                 "1.2.2 raises too); use OHEM with ce (and lovasz, which ignores it)")
            if sampler.thresh is None and not all(isinstance(m, CrossEntropyLoss) for m in losses):
                raise ValueError("OHEM without a threshold ranks pixels by the loss, which needs ce terms only; "
                                 "give a threshold (--ohem 0.7)")

    @property
    def loss_names(self) -> List[str]:
        """The keys `forward` returns, in order."""
        return list(dict.fromkeys(m.loss_name for m in self.losses))

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        if labels.dim() == 4 and labels.shape[1] == 1:
            labels = labels[:, 0]
        labels = labels.long()
        if logits.dim() != 4 or labels.shape != (logits.shape[0],) + tuple(logits.shape[2:]):
            raise ValueError(f"expected logits (N, K, H, W) and labels (N, H, W) of the same size, got "
                             f"{tuple(logits.shape)} and {tuple(labels.shape)}; upsample the logits first "
                             "(train.loss.upsample_logits)")
        weight = None
        if self.sampler is not None:
            weight = self.sampler.sample(logits, labels, list(self.losses), self.ignore_index)
        out: Dict[str, torch.Tensor] = {}
        for m in self.losses:
            value = m(logits, labels, weight, ignore_index=self.ignore_index)
            out[m.loss_name] = out[m.loss_name] + value if m.loss_name in out else value
        return out


_TERM = re.compile(r"^([a-z_]+)(?::([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?))?$")


def parse_loss_spec(spec: Union[str, Sequence[Any], Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """`"ce:1.0 dice:3.0"`, `["ce:1", "dice:3"]`, a dict or a list of dicts -> a list of loss dicts."""
    if isinstance(spec, Mapping):
        return [dict(spec)]
    items = spec.replace(",", " ").split() if isinstance(spec, str) else list(spec)
    out: List[Dict[str, Any]] = []
    for item in items:
        if isinstance(item, Mapping):
            out.append(dict(item))
            continue
        for word in str(item).replace(",", " ").split():
            m = _TERM.match(word.strip().lower())
            if not m or m.group(1) not in SHORT_NAMES:
                raise ValueError(f"--loss: cannot read {word!r}; write NAME[:WEIGHT] with NAME one of "
                                 f"{', '.join(SHORT_NAMES)}, e.g. --loss ce:1.0 dice:3.0")
            out.append({"type": SHORT_NAMES[m.group(1)],
                        "loss_weight": float(m.group(2)) if m.group(2) is not None else 1.0})
    if not out:
        raise ValueError("--loss: no loss given; e.g. --loss ce:1.0 dice:3.0")
    return out


def build_loss(spec: Union[str, Sequence[Any], Mapping[str, Any]], num_classes: int,
               class_weight: WeightList = None, avg_non_ignore: bool = False,
               ohem: Optional[Sequence[Any]] = None, ignore_index: int = IGNORE_INDEX) -> SegLoss:
    """The loss module `spec` names (see the module docstring) for `num_classes` classes.

    `class_weight` is given to every term that takes one (CrossEntropyLoss, FocalLoss, LovaszLoss) unless its
    dict sets its own; `avg_non_ignore` to the cross-entropy terms likewise; `ohem` is `(thresh, min_kept)`
    (thresh may be None). Raises ValueError naming the bad type, key or count.
    """
    terms = []
    for entry in parse_loss_spec(spec):
        kwargs = dict(entry)
        kind = kwargs.pop("type", None)
        if kind not in LOSS_TYPES:
            raise ValueError(f"loss type {kind!r} is not one of {', '.join(LOSS_TYPES)}")
        cls = LOSS_TYPES[kind]
        params = cls.__init__.__code__.co_varnames[1:cls.__init__.__code__.co_argcount]
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise ValueError(f"{kind} has no option {', '.join(unknown)} (options: {', '.join(params)})")
        if "class_weight" in params and kwargs.get("class_weight") is None and class_weight is not None:
            kwargs["class_weight"] = list(class_weight)
        if "avg_non_ignore" in params and "avg_non_ignore" not in kwargs:
            kwargs["avg_non_ignore"] = avg_non_ignore
        cw = kwargs.get("class_weight")
        if cw is not None and len(cw) != num_classes:
            raise ValueError(f"{kind}: {len(cw)} class weights for {num_classes} classes; give one per class")
        term = cls(**kwargs)
        term.check_classes(num_classes)  # before training, not at its first step
        terms.append(term)
    sampler = None
    if ohem is not None:
        thresh, min_kept = (list(ohem) + [None, 100000])[:2]
        sampler = OHEMPixelSampler(thresh, 100000 if min_kept is None else int(min_kept))
    return SegLoss(terms, sampler, ignore_index)
