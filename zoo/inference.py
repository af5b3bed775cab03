"""From raw images to label maps exactly as MMSegmentation 0.x does it (spec §3.1–3.3): the one inference path.

Single scale (0.x ``simple_test``): keep-ratio resize to the test scale → normalize → the network, whole
image or sliding windows (§3.2) → bilinear resize of the logits to the original size with the variant's
``align_corners`` → softmax → argmax.

Multi-scale + flip (0.x ``tools/test.py --aug-test``, ``tta=True`` here): for each ratio r in 0.5…1.75 the
target is ``(int(W·r), int(H·r))`` of the *config* scale, then keep-ratio resized (so for ADE/VOC it is not
r × the image); each scale runs plain and horizontally flipped; every view's logits are resized to the
original size, softmaxed and un-flipped, and the 12 probability maps are averaged (in 0.x's order: r0,
r0-flip, r1, …) before the argmax. 1.x's TTA, which scales the original image instead, gives different
sizes for ADE/VOC and is *not* what the published ms+flip numbers used.

Memory is bounded by the network's working size, not by the photo: the network's logits stay at the
resized scale, and the resize to the original size, the softmax, the view average and the argmax run in
bands of output rows (`band_elements` floats a band), so a 48-megapixel photo never needs full-size
per-class maps unless probabilities are asked for. The resize reproduces ``F.interpolate``'s source
indices and weights; its rounding may differ from it by one ulp (as PyTorch's own NCHW and channels_last
kernels differ from each other), and the single-scale label map is the argmax of the resized logits
(softmax is monotonic), so labels can differ from 0.x's only where two classes tie to the last bit.

>>> import torch
>>> from zoo.inference import TestSettings, view_plan
>>> s = TestSettings(scale_wh=(2048, 512))
>>> [(hw, flip) for hw, flip in view_plan((375, 500), s, tta=True)][:3]
[((256, 341), False), ((256, 341), True), ((384, 512), False)]
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .transforms import normalize, rescale_size, resize_image, scaled_pair
from .utils import IMAGENET_MEAN, IMAGENET_STD, parse_dtype

MS_FLIP_RATIOS: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
BAND_ELEMENTS = 1 << 24  # floats per band buffer (64 MB): the full-size working set of one view

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------------
# the network at the working scale: whole image or sliding windows (spec §3.2)


def slide_windows(h: int, w: int, crop_hw: Sequence[int], stride_hw: Sequence[int]
                  ) -> List[Tuple[int, int, int, int]]:
    """Window boxes (y1, y2, x1, x2) in MMSeg's order; windows are shifted back inside the image.

    Example:
        >>> [(y1, x1) for y1, _, x1, _ in slide_windows(1025, 2049, (769, 769), (513, 513))]
        [(0, 0), (0, 513), (0, 1026), (0, 1280), (256, 0), (256, 513), (256, 1026), (256, 1280)]
    """
    crop_h, crop_w = crop_hw
    stride_h, stride_w = stride_hw
    h_grids = max(h - crop_h + stride_h - 1, 0) // stride_h + 1
    w_grids = max(w - crop_w + stride_w - 1, 0) // stride_w + 1
    boxes = []
    for r in range(h_grids):
        for c in range(w_grids):
            y1, x1 = r * stride_h, c * stride_w
            y2, x2 = min(y1 + crop_h, h), min(x1 + crop_w, w)
            y1, x1 = max(y2 - crop_h, 0), max(x2 - crop_w, 0)
            boxes.append((y1, y2, x1, x2))
    return boxes


def slide_inference(fn: LogitsFn, x: torch.Tensor, crop_hw: Sequence[int], stride_hw: Sequence[int],
                    align_corners: bool = False, window_batch: int = 1) -> torch.Tensor:
    """Average of the window logits on a zero canvas (spec §3.2); returns (N, K, H, W).

    `fn` returns logits at its input size (e.g. `ISANet.encode_decode`); a lower-resolution output is
    resized to the window with `align_corners`. Every window of an image has the same size
    (min(crop, image) per side), so up to `window_batch` images' worth of windows run through `fn` as one
    batch (at least one window per image of `x`); the canvas adds them in MMSeg's window order.
    """
    n, _, h, w = x.shape
    canvas = None
    count = x.new_zeros((1, 1, h, w))
    boxes = slide_windows(h, w, crop_hw, stride_hw)
    step = max(1, int(window_batch) // max(1, n))
    for start in range(0, len(boxes), step):
        chunk = boxes[start:start + step]
        crops = [x[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk]
        out = fn(crops[0] if len(crops) == 1 else torch.cat(crops))
        for j, (y1, y2, x1, x2) in enumerate(chunk):
            logits = out[j * n:(j + 1) * n]
            if logits.shape[2:] != (y2 - y1, x2 - x1):
                logits = F.interpolate(logits, size=(y2 - y1, x2 - x1), mode="bilinear",
                                       align_corners=align_corners)
            if canvas is None:
                canvas = logits.new_zeros((n, logits.shape[1], h, w))
            # MMSeg pads each window's logits into the full canvas; adding in place is the same sum
            canvas[:, :, y1:y2, x1:x2] += logits
            count[:, :, y1:y2, x1:x2] += 1
    return canvas / count.to(canvas.dtype)


@dataclass(frozen=True)
class TestSettings:
    """The test pipeline of a model: scale, normalisation, whole/slide, ``align_corners``, TTA ratios."""

    __test__ = False  # not a pytest class, despite the name

    scale_wh: Tuple[int, int]
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    align_corners: bool = False
    ratios: Tuple[float, ...] = MS_FLIP_RATIOS
    flip: bool = True
    mode: str = "whole"
    crop_hw: Optional[Tuple[int, int]] = None
    stride_hw: Optional[Tuple[int, int]] = None

    def __post_init__(self) -> None:
        if self.mode not in ("whole", "slide"):
            raise ValueError(f"test mode must be 'whole' or 'slide', got {self.mode!r}")
        if self.mode == "slide" and (self.crop_hw is None or self.stride_hw is None):
            raise ValueError("slide mode needs crop_hw and stride_hw")

    @classmethod
    def from_config(cls, config: Any, scale_wh: Optional[Sequence[int]] = None) -> "TestSettings":
        """Settings of a ``zoo.VariantConfig``; ``scale_wh`` overrides the test scale.

        >>> from zoo import get_config
        >>> TestSettings.from_config(get_config("isanet_r50-d8_769x769_40k_cityscapes")).scale_wh
        (2049, 1025)
        """
        scale = scale_wh if scale_wh is not None else config.test_img_scale_wh
        return cls(scale_wh=(int(scale[0]), int(scale[1])), mean=tuple(config.mean), std=tuple(config.std),
                   align_corners=bool(config.align_corners), ratios=tuple(config.ms_flip_ratios or MS_FLIP_RATIOS),
                   mode=config.test_mode, crop_hw=config.test_crop_size_hw, stride_hw=config.test_stride_hw)

    @classmethod
    def from_model(cls, model: torch.nn.Module, scale_wh: Optional[Sequence[int]] = None) -> "TestSettings":
        """Settings of a zoo model: its ``test_settings`` (from its weights' metadata) or its config's."""
        model = unwrap(model)
        settings = getattr(model, "test_settings", None) or cls.from_config(model.config)
        if scale_wh is not None:
            settings = replace(settings, scale_wh=(int(scale_wh[0]), int(scale_wh[1])))
        align = bool(getattr(model, "align_corners", settings.align_corners))
        return settings if align == settings.align_corners else replace(settings, align_corners=align)

    def to_dict(self) -> dict:
        """Plain JSON types."""
        return {"scale_wh": list(self.scale_wh), "mean": list(self.mean), "std": list(self.std),
                "align_corners": self.align_corners, "ratios": list(self.ratios), "flip": self.flip,
                "mode": self.mode, "crop_hw": list(self.crop_hw) if self.crop_hw else None,
                "stride_hw": list(self.stride_hw) if self.stride_hw else None}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel / DataParallel wrapper (or the model itself)."""
    return model.module if isinstance(getattr(model, "module", None), torch.nn.Module) else model


def network_logits(model: Union[torch.nn.Module, LogitsFn], x: torch.Tensor, settings: TestSettings,
                   window_batch: int = 1) -> torch.Tensor:
    """Logits at x's size of a normalised batch, whole image or sliding windows as `settings` say
    (`window_batch`: windows per forward pass, see `slide_inference`)."""
    if settings.mode == "slide":
        return slide_inference(model, x, settings.crop_hw, settings.stride_hw, settings.align_corners,
                               window_batch=window_batch)
    return model(x)


def view_plan(image_hw: Sequence[int], settings: TestSettings, tta: bool = False
              ) -> List[Tuple[Tuple[int, int], bool]]:
    """The (resized (h, w), flipped) views 0.x runs for one image, in its order."""
    if not tta:
        return [(rescale_size(image_hw, settings.scale_wh), False)]
    views = []
    for ratio in settings.ratios:
        size = rescale_size(image_hw, scaled_pair(settings.scale_wh, ratio))
        views.append((size, False))
        if settings.flip:
            views.append((size, True))
    return views


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """torch.autocast to `dtype`, or nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def view_logits(model: torch.nn.Module, images: torch.Tensor, settings: TestSettings, *, tta: bool = False,
                dtype: torch.dtype = torch.float32, window_batch: int = 1) -> List[Tuple[torch.Tensor, bool]]:
    """[(float32 logits (N, K, h, w) at the view's size, flipped)] of a uint8 batch (N, 3, H, W) on the
    model's device, one entry per view of `view_plan`; the network runs under autocast to `dtype`
    (slide mode: `window_batch` windows per forward pass)."""
    out = []
    memory_format = torch.channels_last if _is_channels_last(model) else torch.contiguous_format
    for size_hw, flip in view_plan(images.shape[-2:], settings, tta):
        x = normalize(resize_image(images, size_hw), settings.mean, settings.std)
        if flip:
            x = x.flip(-1)
        x = x.contiguous(memory_format=memory_format)
        with autocast(images.device, dtype):
            logits = network_logits(model, x, settings, window_batch)
        out.append((logits.float().contiguous(memory_format=torch.channels_last), flip))  # what class_maps reads
    return out


def _is_channels_last(model: Any) -> bool:
    weight = next((p for p in model.parameters() if p.dim() == 4), None) if isinstance(model, torch.nn.Module) else None
    return weight is not None and weight.is_contiguous(memory_format=torch.channels_last) and weight.shape[-1] > 1


# --------------------------------------------------------------------------------------------------
# back to the original size, in bands of output rows


def _source_rows(out_size: int, in_size: int, align_corners: bool
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """F.interpolate's bilinear (index0, index1, weight of index1) for each output row (upsample_bilinear2d's
    area_pixel_compute_scale / compute_source_index_and_lambda, in float32)."""
    if out_size == in_size:
        index = torch.arange(out_size)
        return index, index, torch.zeros(out_size)
    dst = torch.arange(out_size, dtype=torch.float64)
    if align_corners:
        scale = float(torch.tensor((in_size - 1) / (out_size - 1) if out_size > 1 else 0.0, dtype=torch.float32))
        real = (scale * dst).float()
    else:
        scale = float(torch.tensor(in_size / out_size, dtype=torch.float32))
        real = (scale * (dst + 0.5) - 0.5).float().clamp_(min=0)
    index0 = real.floor().long().clamp_(max=in_size - 1)
    lam = (real - index0.float()).clamp_(0, 1)
    index1 = torch.where(index0 < in_size - 1, index0 + 1, index0)
    return index0, index1, lam


def _width_resized(logits: torch.Tensor, lo: int, hi: int, out_w: int, align_corners: bool) -> torch.Tensor:
    """Source rows lo..hi of channels_last `logits` (N, K, h, w) resized to `out_w` columns (F.interpolate: an
    identity along the height), as (N, rows, out_w, K): classes innermost, for fast per-pixel reductions."""
    rows = F.interpolate(logits[:, :, lo:hi + 1], size=(hi - lo + 1, out_w), mode="bilinear",
                         align_corners=align_corners)
    return rows.permute(0, 2, 3, 1)  # channels_last in memory: a contiguous view


def _blend_rows(top: torch.Tensor, bottom: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Output rows between two width-resized source rows (…, W, C): top * (1 - lam) + bottom * lam, one row
    per weight in `lam`, returned as (…, rows, W, C)."""
    lam = lam.to(top.device).view(-1, 1, 1)
    return top.unsqueeze(-3) * (1 - lam) + bottom.unsqueeze(-3) * lam


def _resize_band(logits: torch.Tensor, out_w: int, rows: Tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                 align_corners: bool) -> torch.Tensor:
    """Rows of the bilinear resize of channels_last `logits` for the given (index0, index1, weight) rows,
    as (N, rows, out_w, K)."""
    index0, index1, lam = rows
    lo, hi = int(index0.min()), int(index1.max())
    src = _width_resized(logits, lo, hi, out_w, align_corners)
    lam = lam.to(src.device).view(1, -1, 1, 1)
    return src[:, (index0 - lo).to(src.device)] * (1 - lam) + src[:, (index1 - lo).to(src.device)] * lam


def _upsampled_argmax(logits: torch.Tensor, out_hw: Sequence[int], align_corners: bool, out: torch.Tensor,
                      band_elements: int = BAND_ELEMENTS, candidates: int = 8) -> torch.Tensor:
    """argmax over classes of the bilinearly resized channels_last logits, written into `out` (N, H, W),
    without evaluating every class at every output pixel.

    Output rows between two source rows blend the same two width-resized rows A and B, so a class's score
    there lies in [min(A, B), max(A, B)]: only the classes whose maximum reaches the largest minimum can win
    (a few, for a trained model). Each pair of rows evaluates its `candidates` classes of largest maximum
    with the arithmetic of the dense path, taking the argmax among them in class order; columns with more
    contenders evaluate every class, and so does a pair whose logits are flat (an untrained model). The
    result equals the dense argmax exactly.
    """
    n, k, h, _ = logits.shape
    out_h, out_w = int(out_hw[0]), int(out_hw[1])
    index0, index1, lam = _source_rows(out_h, h, align_corners)
    take = min(k, candidates)
    chunk = max(2, band_elements // max(1, n * k * out_w))  # width-resized source rows held at once
    cache_lo, cache = -1, None
    starts = torch.nonzero(torch.diff(index0, prepend=torch.tensor([-1]))).flatten().tolist() + [out_h]
    for y0, y1 in zip(starts[:-1], starts[1:]):  # output rows sharing one pair of source rows
        r0, r1 = int(index0[y0]), int(index1[y0])
        if cache is None or r1 >= cache_lo + cache.shape[1]:
            cache_lo = r0
            cache = _width_resized(logits, r0, min(h - 1, r0 + chunk - 1), out_w, align_corners)
        top, bottom = cache[:, r0 - cache_lo], cache[:, r1 - cache_lo]  # (N, W, K)
        lams = lam[y0:y1]
        high = torch.maximum(top, bottom)
        floor = torch.minimum(top, bottom).amax(dim=-1, keepdim=True)
        # a class whose maximum is below every blend of the best minimum cannot win (margin: rounding)
        contenders = (high >= floor - 1e-5 * (floor.abs() + 1)).sum(dim=-1)  # (N, W)
        crowded = contenders > take
        if take == k or float(crowded.float().mean()) > 0.25:
            out[:, y0:y1] = _blend_rows(top, bottom, lams).argmax(dim=-1)
            continue
        pick = high.topk(take, dim=-1).indices.sort(dim=-1).values  # (N, W, take), in class order
        scores = _blend_rows(top.gather(-1, pick), bottom.gather(-1, pick), lams)  # (N, rows, W, take)
        best = scores.argmax(dim=-1, keepdim=True)
        labels = pick.unsqueeze(1).expand(-1, y1 - y0, -1, -1).gather(-1, best).squeeze(-1)  # (N, rows, W)
        if bool(crowded.any()):
            for b in range(n):
                cols = crowded[b].nonzero().flatten()
                if cols.numel():
                    labels[b][:, cols] = _blend_rows(top[b][cols], bottom[b][cols], lams).argmax(dim=-1)
        out[:, y0:y1] = labels
    return out


def class_maps(views: Sequence[Tuple[torch.Tensor, bool]], out_hw: Sequence[int], align_corners: bool, *,
               probs: bool = False, band_elements: int = BAND_ELEMENTS) -> torch.Tensor:
    """Label maps (N, H, W) — or, with `probs`, averaged probabilities (N, K, H, W) — at `out_hw` from the
    views' logits, computed in bands of output rows. Labels are uint8 when K <= 256, else int64."""
    views = [(logits.contiguous(memory_format=torch.channels_last), flip) for logits, flip in views]
    first = views[0][0]
    n, k = first.shape[:2]
    out_h, out_w = int(out_hw[0]), int(out_hw[1])
    device = first.device
    if len(views) == 1 and not probs:  # softmax is monotonic: the argmax of the logits is the argmax of the probs
        labels = torch.empty((n, out_h, out_w), dtype=torch.uint8 if k <= 256 else torch.int64, device=device)
        return _upsampled_argmax(first, out_hw, align_corners, labels, band_elements)
    if probs:  # (N, H, W, K) in memory, seen as (N, K, H, W): channels_last
        result = torch.empty((n, out_h, out_w, k), dtype=torch.float32, device=device).permute(0, 3, 1, 2)
    else:
        result = torch.empty((n, out_h, out_w), dtype=torch.uint8 if k <= 256 else torch.int64, device=device)
    band = max(1, band_elements // max(1, n * k * out_w))
    plans = [_source_rows(out_h, logits.shape[2], align_corners) for logits, _ in views]
    for y0 in range(0, out_h, band):
        y1 = min(out_h, y0 + band)
        total = None
        for (logits, flip), (i0, i1, lam) in zip(views, plans):
            p = _resize_band(logits, out_w, (i0[y0:y1], i1[y0:y1], lam[y0:y1]), align_corners).softmax(dim=-1)
            if flip:
                p = p.flip(2)
            total = p if total is None else total.add_(p)
        if len(views) > 1:
            total /= len(views)
        if probs:
            result[:, :, y0:y1] = total.permute(0, 3, 1, 2)
        else:
            result[:, y0:y1] = total.argmax(dim=-1)
    return result


# --------------------------------------------------------------------------------------------------
# one image


def _prepare(model: torch.nn.Module, image: torch.Tensor, settings: Optional[TestSettings],
             device: Union[str, torch.device, None]) -> Tuple[torch.nn.Module, torch.Tensor, TestSettings]:
    model = unwrap(model)
    settings = settings or TestSettings.from_model(model)
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected one RGB image (3, H, W), got shape {tuple(image.shape)}")
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else image.device
    return model, image.as_subclass(torch.Tensor).to(device).unsqueeze(0), settings


@torch.inference_mode()
def segment_probs(model: torch.nn.Module, image: torch.Tensor, settings: Optional[TestSettings] = None, *,
                  tta: bool = False, dtype: Union[str, torch.dtype, None] = None,
                  device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """Class probabilities (1, K, H, W) float32 at the image's original size, as 0.x's ``inference``.

    ``image``: uint8 RGB (3, H, W) as read from disk. ``model`` maps a normalised batch to logits at its
    size (any zoo model, or a plain module) and is used in whatever mode it is in — call ``model.eval()``
    first. ``dtype`` runs the network under autocast; resizes and softmax stay float32.
    """
    model, batch, settings = _prepare(model, image, settings, device)
    views = view_logits(model, batch, settings, tta=tta, dtype=parse_dtype(dtype))
    return class_maps(views, image.shape[-2:], settings.align_corners, probs=True)


@torch.inference_mode()
def predict_label_map(model: torch.nn.Module, image: torch.Tensor, settings: Optional[TestSettings] = None, *,
                      tta: bool = False, dtype: Union[str, torch.dtype, None] = None,
                      device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """The final label map (H, W) of one uint8 RGB image (3, H, W), as 0.x produces it (uint8 for up to
    256 classes), with memory bounded by the network's working size.

    >>> import torch
    >>> from zoo import create_model
    >>> model = create_model("isanet_r50-d8_512x1024_40k_cityscapes").eval()
    >>> image = torch.randint(0, 256, (3, 40, 80), dtype=torch.uint8)
    >>> settings = TestSettings.from_model(model, scale_wh=(128, 64))   # small scale: a quick CPU run
    >>> predict_label_map(model, image, settings).shape
    torch.Size([40, 80])
    """
    model, batch, settings = _prepare(model, image, settings, device)
    views = view_logits(model, batch, settings, tta=tta, dtype=parse_dtype(dtype))
    return class_maps(views, image.shape[-2:], settings.align_corners)[0]
