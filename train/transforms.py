"""MMSegmentation's training pipeline (spec §4.1) as torchvision.transforms.v2 transforms.

Order: ratio resize -> random crop (cat_max_ratio) -> horizontal flip -> photometric distortion ->
normalize -> pad to the crop. Stock v2 transforms are used where MMSeg's step has an exact stock
equivalent (flip, dtype, normalize); the rest are small custom `v2.Transform`s:

- `RandomRescale`: mmcv's ratio-range resize with the keep-ratio rule (no stock transform samples a
  `(W, H)` scale and then fits the image inside it).
- `CatMaxRandomCrop`: the crop that redraws up to 10 times while one class covers >= 75 %.
- `PhotoMetricDistortion`: brightness, contrast (first or last), saturation, hue, on uint8 with
  OpenCV's 8-bit HSV arithmetic (MMSeg calls `mmcv.bgr2hsv` on uint8 images). Given the same draws
  it was checked bit-exact against mmseg 1.2.2's transform with cv2 5.0 (x86-64).
- `PadToSize`: bottom/right pad to the crop, image 0 (after normalization) and mask 255.

All randomness comes from torch's global CPU generator; `train.data.TrainSet` runs the pipeline
under `torch.random.fork_rng` seeded per sample, so a sample's augmentation depends only on
(seed, epoch, position) and not on the worker, the rank or what ran before.

Example:
    >>> import torch
    >>> from torchvision import tv_tensors
    >>> t = build_train_transforms(crop_size_hw=(64, 64), img_scale_wh=(256, 64))
    >>> img = tv_tensors.Image(torch.randint(0, 256, (3, 90, 120), dtype=torch.uint8))
    >>> mask = tv_tensors.Mask(torch.randint(0, 3, (90, 120), dtype=torch.uint8))
    >>> x, y = t(img, mask)
    >>> tuple(x.shape), x.dtype, tuple(y.shape)
    ((3, 64, 64), torch.float32, (64, 64))
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torchvision.transforms.v2 as v2
import torchvision.transforms.v2.functional as TF
from torchvision import tv_tensors

from zoo.transforms import rescale_size, resize_image
from zoo.utils import IMAGENET_MEAN, IMAGENET_STD

IGNORE_INDEX = 255


class _Transform(v2.Transform):
    """v2.Transform that also works with torchvision < 0.21 (private `_get_params`/`_transform`)."""

    def _get_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:  # torchvision < 0.21
        return self.make_params(flat_inputs)

    def _transform(self, inpt: Any, params: Dict[str, Any]) -> Any:  # torchvision < 0.21
        return self.transform(inpt, params)


def _find(flat_inputs: List[Any], kind: type) -> Optional[torch.Tensor]:
    for x in flat_inputs:
        if isinstance(x, kind):
            return x
    return None


def resize_image_exact(image: torch.Tensor, size_hw: Sequence[int]) -> torch.Tensor:
    """The train pipeline's image resize: (3, H, W) uint8 -> uint8, the test pipeline's resize
    (`zoo.transforms.resize_image`: cv2 INTER_LINEAR semantics, uint8 rounding), so train and test images
    are resampled the same way.

    The channels go through `F.interpolate` as a batch of three one-channel images: for a 3-channel
    image on one thread PyTorch switches to another bilinear kernel whose float32 rounding differs
    (a handful of pixels by one grey level), so resizing the channels separately keeps the result the
    same whatever the thread count (a DataLoader worker runs one thread).
    """
    return resize_image(image.unsqueeze(1), list(size_hw)).squeeze(1).to(torch.uint8)


class RandomRescale(_Transform):
    """mmseg 0.x `Resize(img_scale, ratio_range, keep_ratio=True)`.

    r ~ U[lo, hi); target = (int(W_s * r), int(H_s * r)); the image is rescaled with the keep-ratio
    rule (`zoo.transforms.rescale_size`) into that target with the test pipeline's resize
    (`zoo.transforms.resize_image`: cv2 INTER_LINEAR semantics on uint8), masks nearest.
    """

    def __init__(self, img_scale_wh: Sequence[int], ratio_range: Sequence[float] = (0.5, 2.0)):
        super().__init__()
        if len(img_scale_wh) != 2 or min(img_scale_wh) <= 0:
            raise ValueError(f"img_scale_wh must be two positive ints (W, H), got {img_scale_wh}")
        lo, hi = ratio_range
        if not 0 < lo <= hi:
            raise ValueError(f"ratio_range must satisfy 0 < lo <= hi, got {ratio_range}")
        self.img_scale_wh = (int(img_scale_wh[0]), int(img_scale_wh[1]))
        self.ratio_range = (float(lo), float(hi))

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        return self.draw(*v2.query_size(flat_inputs))

    def draw(self, h: int, w: int) -> Dict[str, Any]:
        """The ratio and the resized size of an (h, w) image (one draw of the RNG)."""
        lo, hi = self.ratio_range
        ratio = torch.rand((), dtype=torch.float64).item() * (hi - lo) + lo  # numpy random_sample rule
        target_wh = (int(self.img_scale_wh[0] * ratio), int(self.img_scale_wh[1] * ratio))
        if min(h, w) <= 0 or min(target_wh) <= 0:
            raise ValueError(f"cannot rescale an image of {h}x{w} (h x w) to the scale {self.img_scale_wh} (w, h) "
                             f"times ratio {ratio:.4g} (ratio range {self.ratio_range}): a side would be 0")
        try:
            size_hw = rescale_size((h, w), target_wh)
        except ValueError as err:  # a side of 0: say which draw of which range
            raise ValueError(f"{err} (img_scale {self.img_scale_wh} (w, h) times ratio {ratio:.4g} of the ratio range "
                             f"{self.ratio_range})") from err
        return {"ratio": ratio, "size_hw": size_hw}

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        size = list(params["size_hw"])
        if isinstance(inpt, tv_tensors.Image) and inpt.dtype == torch.uint8:
            return tv_tensors.wrap(resize_image_exact(inpt.as_subclass(torch.Tensor), size), like=inpt)
        # masks: nearest (torchvision's kernel for Mask, cv2 INTER_NEAREST's floor rule)
        return TF.resize(inpt, size, interpolation=v2.InterpolationMode.BILINEAR, antialias=False)


def crop_is_acceptable(mask_crop: torch.Tensor, cat_max_ratio: float, ignore_index: int = IGNORE_INDEX) -> bool:
    """MMSeg's crop check: > 1 non-ignored class and the largest class share < cat_max_ratio."""
    flat = mask_crop.reshape(-1)
    counts = torch.bincount(flat if flat.dtype == torch.uint8 else flat.to(torch.int64), minlength=ignore_index + 1)
    return histogram_is_acceptable(counts, cat_max_ratio, ignore_index)


def histogram_is_acceptable(counts: torch.Tensor, cat_max_ratio: float, ignore_index: int = IGNORE_INDEX) -> bool:
    """`crop_is_acceptable` from the crop's label histogram (`counts[label]` pixels of each label)."""
    counts = counts.clone()
    counts[ignore_index] = 0
    counts = counts[counts > 0]
    return len(counts) > 1 and counts.max().item() / counts.sum().item() < cat_max_ratio


class CatMaxRandomCrop(_Transform):
    """mmseg `RandomCrop(crop_size, cat_max_ratio)`: offsets ~ U{0..max(H-h, 0)} x U{0..max(W-w, 0)}.

    With cat_max_ratio < 1 the box is checked up to 10 times and redrawn after each failure, so after
    10 failures the 11th box is used unchecked. Images smaller than the crop give a smaller crop.
    """

    def __init__(self, crop_size_hw: Sequence[int], cat_max_ratio: float = 0.75,
                 ignore_index: int = IGNORE_INDEX, max_checks: int = 10):
        super().__init__()
        self.crop_size_hw = (int(crop_size_hw[0]), int(crop_size_hw[1]))
        if min(self.crop_size_hw) <= 0:
            raise ValueError(f"crop_size_hw must be positive, got {crop_size_hw}")
        self.cat_max_ratio = float(cat_max_ratio)
        self.ignore_index = int(ignore_index)
        self.max_checks = int(max_checks)

    def _draw(self, h: int, w: int) -> Tuple[int, int, int, int]:
        ch, cw = self.crop_size_hw
        top = int(torch.randint(0, max(h - ch, 0) + 1, ()).item())
        left = int(torch.randint(0, max(w - cw, 0) + 1, ()).item())
        return top, left, min(ch, h - top), min(cw, w - left)

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        mask = _find(flat_inputs, tv_tensors.Mask)
        window = None if mask is None else (lambda top, left, ch, cw: mask[..., top:top + ch, left:left + cw])
        return self.choose_box(h, w, window)

    def choose_box(self, h: int, w: int, window: Optional[Callable[[int, int, int, int], torch.Tensor]],
                   histogram: bool = False) -> Dict[str, Any]:
        """The crop box of an (h, w) image; `window(top, left, height, width)` gives the mask inside a box
        (None: no mask, no check), or with `histogram` its label histogram. The fast pipeline passes a
        window that resizes only that box."""
        box = self._draw(h, w)
        checks = 0
        if self.cat_max_ratio < 1.0 and window is not None:
            accept = histogram_is_acceptable if histogram else crop_is_acceptable
            for _ in range(self.max_checks):
                checks += 1
                if accept(window(*box), self.cat_max_ratio, self.ignore_index):
                    break
                box = self._draw(h, w)
        return {"box": box, "checks": checks}

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        top, left, ch, cw = params["box"]
        return TF.crop(inpt, top, left, ch, cw)


# --------------------------------------------------------------------------------------------
# OpenCV's 8-bit HSV conversions (hue range 180): cv::RGB2HSV_b (fixed point, 12-bit tables) and
# cv::HSV2RGB_b (float32 maths), the arithmetic `mmcv.bgr2hsv` / `mmcv.hsv2bgr` run on uint8 images.
# --------------------------------------------------------------------------------------------
_HSV_SHIFT = 12
_SDIV = torch.tensor([0] + [round((255 << _HSV_SHIFT) / (1.0 * i)) for i in range(1, 256)], dtype=torch.int32)
_HDIV180 = torch.tensor([0] + [round((180 << _HSV_SHIFT) / (6.0 * i)) for i in range(1, 256)], dtype=torch.int32)


def rgb_to_hsv_uint8(img: torch.Tensor) -> torch.Tensor:
    """(3, H, W) uint8 RGB -> uint8 HSV exactly as `cv2.cvtColor(bgr, COLOR_BGR2HSV)` (H in [0, 180))."""
    # int32 holds every intermediate: diff * sdiv < 2**28, |h| * hdiv < 2**28
    r, g, b = img.to(torch.int32).unbind(0)
    v = torch.maximum(torch.maximum(r, g), b)
    vmin = torch.minimum(torch.minimum(r, g), b)
    diff = v - vmin
    half = 1 << (_HSV_SHIFT - 1)
    s = (diff * _SDIV.index_select(0, v.reshape(-1)).view(v.shape) + half) >> _HSV_SHIFT  # floor division
    # OpenCV tests v == r first, then v == g
    h = torch.where(v == r, g - b, torch.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV180.index_select(0, diff.reshape(-1)).view(diff.shape) + half) >> _HSV_SHIFT  # arithmetic shift
    h = torch.where(h < 0, h + 180, h)
    return torch.stack([h, s, v]).to(torch.uint8)


_OPENCV_BLOCK = 32  # pixels per vector iteration of HSV2RGB_b in OpenCV's AVX2 build (4 x 8 floats)


def hsv_to_rgb_uint8(hsv: torch.Tensor) -> torch.Tensor:
    """(3, H, W) uint8 HSV (H in [0, 180)) -> uint8 RGB as `cv2.cvtColor(hsv, COLOR_HSV2BGR)` computes it.

    OpenCV 4.x/5.x converts each row in blocks of 32 pixels with vector code (s, v scaled by 1/255.f,
    h by 6/180.f, sector = trunc(h), the `1 - s*h` terms fused into one rounding, outputs * 255.f
    truncated) and the last W mod 32 pixels of a row with scalar code (same maths, outputs rounded
    half to even). Checked bit-exact against cv2 5.0 (x86-64, AVX2) on random HSV images of widths
    53, 64, 100 and 1024.
    """
    f32, f64 = torch.float32, torch.float64
    h = hsv[0].to(f32) * torch.tensor(6.0 / 180.0, dtype=f32)
    s = hsv[1].to(f32) * torch.tensor(1.0 / 255.0, dtype=f32)
    v = hsv[2].to(f32) * torch.tensor(1.0 / 255.0, dtype=f32)
    sector = torch.trunc(h)
    frac = h - sector
    one = torch.tensor(1.0, dtype=f32)
    # fused multiply-subtract: s*frac is exact in float64, then one rounding to float32
    t2 = (1.0 - s.to(f64) * frac.to(f64)).to(f32)
    t3 = (1.0 - s.to(f64) * (one - frac).to(f64)).to(f32)
    tab = torch.stack([v, v * (one - s), v * t2, v * t3])  # (4, H, W)
    # OpenCV's sector_data: the (b, g, r) rows of `tab` for each of the 6 hue sectors
    sector_bgr = torch.tensor([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]]).T.contiguous()
    sectors = sector.to(torch.int32).clamp_(0, 5).reshape(-1)
    idx = torch.stack([row.index_select(0, sectors) for row in sector_bgr]).view(3, *hsv.shape[1:])
    bgr = torch.gather(tab, 0, idx) * torch.tensor(255.0, dtype=f32)  # (3, H, W)
    out = torch.trunc(bgr)
    tail = (hsv.shape[-1] // _OPENCV_BLOCK) * _OPENCV_BLOCK
    if tail < hsv.shape[-1]:
        out[..., tail:] = torch.round(bgr[..., tail:])  # saturate_cast: round half to even
    return out.clamp_(0, 255).to(torch.uint8).flip(0)  # BGR -> RGB


def _convert(img: torch.Tensor, alpha: float = 1.0, beta: float = 0.0) -> torch.Tensor:
    """MMSeg's `convert`: float32 img * alpha + beta, clip to [0, 255], truncate to uint8."""
    out = img.to(torch.float32) * torch.tensor(alpha, dtype=torch.float32) + torch.tensor(beta, dtype=torch.float32)
    return out.clamp_(0, 255).to(torch.uint8)


class PhotoMetricDistortion(_Transform):
    """mmseg `PhotoMetricDistortion` with its defaults; images only (uint8 RGB), masks pass through.

    Order: (a) brightness w.p. 1/2: + U(-32, 32); (b) mode = randint(2), mode 1 -> contrast now;
    (c) saturation w.p. 1/2: S *= U(0.5, 1.5) in OpenCV 8-bit HSV; (d) hue w.p. 1/2:
    H = (H + randint(-18, 18)) mod 180 with the upper bound exclusive (numpy's randint);
    (e) mode 0 -> contrast last (w.p. 1/2: * U(0.5, 1.5)). Each step clips and truncates to uint8.
    """

    def __init__(self, brightness_delta: int = 32, contrast_range: Sequence[float] = (0.5, 1.5),
                 saturation_range: Sequence[float] = (0.5, 1.5), hue_delta: int = 18):
        super().__init__()
        self.brightness_delta = int(brightness_delta)
        self.contrast_range = (float(contrast_range[0]), float(contrast_range[1]))
        self.saturation_range = (float(saturation_range[0]), float(saturation_range[1]))
        self.hue_delta = int(hue_delta)

    @staticmethod
    def _coin() -> bool:
        return bool(torch.randint(0, 2, ()).item())

    @staticmethod
    def _uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * torch.rand((), dtype=torch.float64).item()

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        # Draws in MMSeg's order; None means "step skipped".
        d = self.brightness_delta
        params: Dict[str, Any] = {"brightness": self._uniform(-d, d) if self._coin() else None}
        params["contrast_first"] = bool(torch.randint(0, 2, ()).item())  # mode == 1
        lo, hi = self.contrast_range
        contrast = None
        if params["contrast_first"] and self._coin():
            contrast = self._uniform(lo, hi)
        params["saturation"] = self._uniform(*self.saturation_range) if self._coin() else None
        params["hue"] = (int(torch.randint(-self.hue_delta, self.hue_delta, ()).item())
                         if self._coin() else None)
        if not params["contrast_first"] and self._coin():
            contrast = self._uniform(lo, hi)
        params["contrast"] = contrast
        return params

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        if not isinstance(inpt, tv_tensors.Image):
            return inpt
        if inpt.dtype != torch.uint8:
            raise ValueError(f"PhotoMetricDistortion expects a uint8 image, got {inpt.dtype}: put it "
                             "before ToDtype/Normalize as in MMSeg's pipeline")
        return tv_tensors.wrap(self.apply(inpt.as_subclass(torch.Tensor), params), like=inpt)

    @staticmethod
    def apply(img: torch.Tensor, params: Dict[str, Any]) -> torch.Tensor:
        """Apply the distortion with explicit `params` (as returned by `make_params`) to (3, H, W) uint8."""
        if params.get("brightness") is not None:
            img = _convert(img, beta=params["brightness"])
        if params["contrast_first"] and params.get("contrast") is not None:
            img = _convert(img, alpha=params["contrast"])
        if params.get("saturation") is not None:
            hsv = rgb_to_hsv_uint8(img)
            hsv[1] = _convert(hsv[1], alpha=params["saturation"])
            img = hsv_to_rgb_uint8(hsv)
        if params.get("hue") is not None:
            hsv = rgb_to_hsv_uint8(img)
            hsv[0] = torch.remainder(hsv[0].to(torch.int64) + params["hue"], 180).to(torch.uint8)
            img = hsv_to_rgb_uint8(hsv)
        if not params["contrast_first"] and params.get("contrast") is not None:
            img = _convert(img, alpha=params["contrast"])
        return img


class PadToSize(_Transform):
    """Pad bottom/right up to `size_hw`: images with `image_fill`, masks with `mask_fill` (255)."""

    def __init__(self, size_hw: Sequence[int], image_fill: float = 0.0, mask_fill: int = IGNORE_INDEX):
        super().__init__()
        self.size_hw = (int(size_hw[0]), int(size_hw[1]))
        self.image_fill = image_fill
        self.mask_fill = mask_fill

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        return {"pad_bottom": max(self.size_hw[0] - h, 0), "pad_right": max(self.size_hw[1] - w, 0)}

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        pb, pr = params["pad_bottom"], params["pad_right"]
        if not (pb or pr):
            return inpt
        fill = self.mask_fill if isinstance(inpt, tv_tensors.Mask) else self.image_fill
        return TF.pad(inpt, [0, 0, pr, pb], fill=fill)  # [left, top, right, bottom]


def build_train_transforms(crop_size_hw: Sequence[int], img_scale_wh: Sequence[int],
                           ratio_range: Sequence[float] = (0.5, 2.0), cat_max_ratio: float = 0.75,
                           flip_prob: float = 0.5, mean: Sequence[float] = IMAGENET_MEAN,
                           std: Sequence[float] = IMAGENET_STD, photometric: bool = True) -> v2.Compose:
    """MMSeg's train pipeline (spec §4.1 steps 3-8) for (Image uint8 RGB, Mask uint8) pairs."""
    steps: List[v2.Transform] = [
        RandomRescale(img_scale_wh, ratio_range),
        CatMaxRandomCrop(crop_size_hw, cat_max_ratio, IGNORE_INDEX),
        v2.RandomHorizontalFlip(flip_prob),
    ]
    if photometric:
        steps.append(PhotoMetricDistortion())
    steps += [
        v2.ToDtype(torch.float32, scale=False),  # images only: 0..255 floats as MMSeg's Normalize sees them
        v2.Normalize(list(mean), list(std)),
        PadToSize(crop_size_hw, image_fill=0.0, mask_fill=IGNORE_INDEX),
    ]
    return v2.Compose(steps)
