"""The recipe training pipeline, fast: the same random draws and the same pixels as `train.transforms`
(the reference implementation, spec §4.1), for a fraction of the work.

`RecipePipeline(crop, scale)(image, mask) -> (image_u8 (3, h, w), label_i16 (h, w))`, both padded to the
crop. `image` is a uint8 (3, H, W) tensor or `train.decode.PngRows` (a PNG decoded as far as the crop
needs); `mask` a (H, W) tensor or `Labels` (stored values, the reader's mapping as a table, and the values
allowed). Where the time went and what replaces it:

- Ratio resize of the whole image (4096x2048 at ratio 2 to keep 512x1024 of it): the crop is chosen on
  the mask first (nearest neighbour is a gather, so each candidate window of the resized mask is read on
  its own, with MMSeg's cat_max_ratio redraws), then only the kept window of the image is resized, and
  only the rows of the files down to the last one a window reads are decoded. Its values are PyTorch's
  bilinear kernel's (`F.interpolate`, the reference's resize) to the bit. The flip is the window's
  column order.
- Photometric distortion: brightness and contrast are 256-entry tables; OpenCV's 8-bit HSV round trips
  are its integer / float32 arithmetic, per pixel.
- Both run in `train/native.c` (`train.native`: compiled on first use with the system C compiler), a
  row at a time: resize, distortion and the planes' layout in one pass, no float image in memory. Where
  it cannot be built, the same steps run as PyTorch code: the window resize as a float32 estimate,
  exact to a few ulps, rounded, with the few pixels within 1e-3 of a rounding tie (about 0.1 %)
  recomputed with the kernel's own arithmetic (its fused multiply-adds emulated in float64); the HSV
  round trips as two whole-colour-space tables built once per process from the reference conversions.
- Normalisation and padding move to the training step (`normalize_batch`, on the device, as MMSeg's data
  preprocessor does): the worker hands over uint8 (a quarter of float32's bytes) and labels as int16 with
  `PAD_LABEL` (-1) where the crop was padded, so padded pixels still end up exactly 0 after normalisation
  and 255 in the labels, as in the reference.

Example:
    >>> import torch
    >>> p = RecipePipeline(crop_size_hw=(64, 64), img_scale_wh=(256, 64))
    >>> img = torch.randint(0, 256, (3, 90, 120), dtype=torch.uint8)
    >>> mask = torch.randint(0, 3, (90, 120), dtype=torch.uint8)
    >>> torch.manual_seed(0) and None
    >>> x, y = p(img, mask)
    >>> tuple(x.shape), x.dtype, tuple(y.shape), y.dtype
    ((3, 64, 64), torch.uint8, (64, 64), torch.int16)
"""
from __future__ import annotations

import dataclasses
import functools
import sys
import warnings
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from zoo.transforms import normalize

from . import native
from .decode import PngRows
from .transforms import (_HDIV180, _SDIV, IGNORE_INDEX, CatMaxRandomCrop, PhotoMetricDistortion, RandomRescale,
                         _convert, hsv_to_rgb_uint8, rgb_to_hsv_uint8, resize_image_exact)

PAD_LABEL = -1  # label of padded pixels in the worker's int16 labels; `normalize_batch` turns it into 255
_TIE = 1e-3  # estimates this close to a rounding tie are recomputed exactly (the estimate errs by ~1e-4)
_F32, _F64 = torch.float32, torch.float64


# --------------------------------------------------------------------------------------------------
# resize: index maps and the window of PyTorch's bilinear kernel

@functools.lru_cache(maxsize=256)
def _nearest_index(in_size: int, out_size: int) -> torch.Tensor:
    """Source index of each output index of the reference's nearest mask resize, asked of PyTorch itself
    (a ramp through `F.interpolate`, exact below 2**24), so the rule cannot drift from the kernel's."""
    ramp = torch.arange(in_size, dtype=_F32).view(1, 1, in_size, 1)
    out = F.interpolate(ramp, size=(out_size, 1), mode="nearest")
    return out.view(out_size).to(torch.int64)


@functools.lru_cache(maxsize=256)
def _linear_coeffs(in_size: int, out_size: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(i0, i1, l0, l1) of PyTorch's CPU bilinear kernel along one axis (align_corners=False).

    The kernel computes src = fma(in/out, dst + 0.5, -0.5) in float32 (the compiler fuses it; float64
    holds the product exactly, so one rounding to float32 reproduces the fused result), clamps at 0,
    i0 = min(floor(src), in - 1), l1 = clamp(src - i0, 0, 1), l0 = 1 - l1; equal sizes copy.
    """
    if in_size == out_size:
        index = torch.arange(out_size)
        return index, index, torch.ones(out_size, dtype=_F32), torch.zeros(out_size, dtype=_F32)
    scale = torch.tensor(in_size, dtype=_F32) / torch.tensor(out_size, dtype=_F32)
    dst = torch.arange(out_size, dtype=_F32) + 0.5
    src = (scale.to(_F64) * dst.to(_F64) - 0.5).to(_F32).clamp_(min=0)
    i0 = src.floor().to(torch.int64).clamp_(max=in_size - 1)
    l1 = (src - i0.to(_F32)).clamp_(0, 1)
    i1 = i0 + (i0 < in_size - 1).to(torch.int64)
    return i0, i1, 1 - l1, l1


def _fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    # float32 fused multiply-add: a * b is exact in float64 here (8-bit or 24-bit times 24-bit
    # significands), so the float64 sum rounded once to float32 is the fused result
    return (a.to(_F64) * b.to(_F64) + c.to(_F64)).to(_F32)


def resize_window(image: torch.Tensor, size_hw: Tuple[int, int], top: int, left: int, height: int, width: int,
                  flip: bool = False) -> torch.Tensor:
    """`resize_image_exact(image, size_hw)[:, top:top + height, left:left + width]` (columns reversed when
    `flip`), computing only that window. uint8 (3, H, W) in, uint8 (3, height, width) out."""
    out_h, out_w = size_hw
    in_h, in_w = image.shape[-2:]
    if (out_h, out_w) == (in_h, in_w):
        out = image[:, top:top + height, left:left + width]
        return (out.flip(-1) if flip else out).contiguous()
    cols = torch.arange(left, left + width)
    if flip:
        cols = cols.flip(0)
    rows = torch.arange(top, top + height)
    if out_h + out_w <= 128:  # PyTorch picks another kernel for small outputs; small enough to do whole
        return resize_image_exact(image, size_hw).index_select(1, rows).index_select(2, cols)
    y0, y1, h0, h1 = (t[rows] for t in _linear_coeffs(in_h, out_h))
    x0, x1, w0, w1 = (t[cols] for t in _linear_coeffs(in_w, out_w))
    # only the source rows and columns the window touches
    r_lo, r_hi = int(y0.min()), int(y1.max()) + 1
    c_lo, c_hi = int(torch.minimum(x0, x1).min()), int(torch.maximum(x0, x1).max()) + 1
    src = image[:, r_lo:r_hi, c_lo:c_hi]
    y0, y1, x0, x1 = y0 - r_lo, y1 - r_lo, x0 - c_lo, x1 - c_lo
    # The estimate (any float32 order errs by a few ulps): vertical pass on whole rows (row gathers are
    # copies), then the horizontal pass on the transposed result, so that its column gathers are row
    # copies too.
    vertical = src.index_select(1, y0).to(_F32).mul_(h0.view(1, -1, 1))
    vertical.add_(src.index_select(1, y1).to(_F32).mul_(h1.view(1, -1, 1)))
    columns = vertical.permute(2, 0, 1).contiguous()  # (source columns, 3, height)
    est = columns.index_select(0, x0).mul_(w0.view(-1, 1, 1))
    est.add_(columns.index_select(0, x1).mul_(w1.view(-1, 1, 1)))
    est.add_(0.5 + _TIE)  # (width, 3, height): v + 0.5 + _TIE
    out = est.to(torch.uint8)  # floor(v + 0.5), as the reference rounds, wherever v is not near a tie
    near_tie = (torch.frac_(est) < 2 * _TIE).nonzero(as_tuple=True)  # v within _TIE of k + 0.5
    if len(near_tie[0]):
        wi, ci, hi = near_tie
        exact = _exact_pixels(src, ci, y0[hi], y1[hi], h0[hi], h1[hi], x0[wi], x1[wi], w0[wi], w1[wi])
        out[wi, ci, hi] = torch.floor(exact + 0.5).clamp_(0, 255).to(torch.uint8)
    return out.permute(1, 2, 0).contiguous()


def _exact_pixels(src: torch.Tensor, c: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor, h0: torch.Tensor,
                  h1: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    """PyTorch's generic bilinear kernel for a few pixels: per source row t = fma(x0, w0, x1 * w1), then
    fma(t_top, h0, t_bottom * h1), all float32 (the channel and the weights name each pixel)."""
    def s(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return src[c, y, x].to(_F32)

    t_top = _fma(s(y0, x0), w0, s(y0, x1) * w1)
    t_bottom = _fma(s(y1, x0), w0, s(y1, x1) * w1)
    return _fma(t_top, h0, t_bottom * h1)


def mask_window(mask: torch.Tensor, size_hw: Tuple[int, int], top: int, left: int, height: int,
                width: int) -> torch.Tensor:
    """The window of the reference's nearest resize of `mask` (H, W) to `size_hw`, gathered directly."""
    rows = _nearest_index(mask.shape[-2], size_hw[0])[top:top + height]
    cols = _nearest_index(mask.shape[-1], size_hw[1])[left:left + width]
    return mask.index_select(0, rows).index_select(1, cols)


# --------------------------------------------------------------------------------------------------
# photometric distortion on tables

@functools.lru_cache(maxsize=1)
def _hsv_tables() -> Tuple[torch.Tensor, torch.Tensor]:
    """(rgb_to_hsv, hsv_to_rgb) as int32 tables over packed colours (r << 16 | g << 8 | b, and
    h << 16 | s << 8 | v with h < 180), computed with the reference conversions (their vector path)."""
    levels = torch.arange(256, dtype=torch.int32)
    to_hsv = _table(1 << 24)
    to_rgb = _table(180 << 16)
    for first in range(0, 256, 16):  # 16 values of the first component at a time (1M colours)
        a = torch.arange(first, first + 16, dtype=torch.int32).view(16, 1, 1).expand(16, 256, 256)
        b = levels.view(1, 256, 1).expand(16, 256, 256)
        c = levels.view(1, 1, 256).expand(16, 256, 256)
        rgb = torch.stack([a, b, c]).reshape(3, 16 * 256, 256).to(torch.uint8)
        to_hsv[first << 16:(first + 16) << 16] = _pack(rgb_to_hsv_uint8(rgb)).reshape(-1)
        if first < 180:
            n = min(16, 180 - first)
            rgb_out = hsv_to_rgb_uint8(rgb[:, :n * 256])  # width 256: OpenCV's vector path throughout
            to_rgb[first << 16:(first + n) << 16] = _pack(rgb_out).reshape(-1)
    return to_hsv, to_rgb


def _table(numel: int) -> torch.Tensor:
    """An int32 table, on Linux backed by 2 MB pages where the kernel allows it (`madvise`, before the
    first write): the lookups are random over tens of MB, and 4 KB pages made them TLB-bound (2x slower)."""
    table = torch.empty(numel, dtype=torch.int32)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            huge = 2 << 20
            start = (table.data_ptr() + huge - 1) // huge * huge
            length = (table.data_ptr() + 4 * numel - start) // huge * huge
            if length > 0:
                ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), 14)  # MADV_HUGEPAGE
        except (OSError, AttributeError):
            pass  # a hint only
    return table


def _pack(img: torch.Tensor) -> torch.Tensor:
    """(3, H, W) uint8 -> (H, W) int32 a << 16 | b << 8 | c."""
    a, b, c = img.to(torch.int32).unbind(0)
    return (a << 16) | (b << 8) | c


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed >> 16, (packed >> 8) & 255, packed & 255]).to(torch.uint8)


def _lut(alpha: float = 1.0, beta: float = 0.0) -> torch.Tensor:
    """The reference's `_convert` (float32 x * alpha + beta, clip, truncate) on all 256 levels."""
    return _convert(torch.arange(256, dtype=torch.uint8), alpha, beta)


def _apply_lut(img: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    return lut.index_select(0, img.reshape(-1).to(torch.int32)).view(img.shape)


# Below this many pixels a crop converts HSV with the reference arithmetic: building the tables (a few
# seconds, once per process) pays off only for recipe-sized crops.
TABLE_MIN_PIXELS = 256 * 256


def distortion_tables(params: Dict[str, Any]) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[int],
                                                       Optional[torch.Tensor]]:
    """`PhotoMetricDistortion` params as (pre, sat, hue, post): 256-entry uint8 tables for brightness then
    contrast-first, for the saturation of S, and for contrast-last, and the hue shift; None: step skipped."""
    pre = sat = post = None
    if params.get("brightness") is not None:
        pre = _lut(beta=params["brightness"])
    if params["contrast_first"] and params.get("contrast") is not None:
        contrast = _lut(alpha=params["contrast"])
        pre = contrast if pre is None else contrast.index_select(0, pre.to(torch.int32))
    if params.get("saturation") is not None:
        sat = _lut(alpha=params["saturation"])
    if not params["contrast_first"] and params.get("contrast") is not None:
        post = _lut(alpha=params["contrast"])
    return pre, sat, params.get("hue"), post


def photometric(img: torch.Tensor, params: Dict[str, Any], use_tables: Optional[bool] = None) -> torch.Tensor:
    """`PhotoMetricDistortion.apply(img, params)` on tables: (3, H, W) uint8 in and out, same pixels.

    `use_tables` None: the HSV tables for crops of `TABLE_MIN_PIXELS` or more, the reference's
    arithmetic below."""
    pre, sat, hue, post = distortion_tables(params)
    if pre is not None:
        img = _apply_lut(img, pre)
    steps = []
    if sat is not None:
        sat32 = sat.to(torch.int32)
        steps.append(lambda hsv: (hsv & 0xFF00FF) | (sat32.index_select(0, ((hsv >> 8) & 255).reshape(-1)).view(hsv.shape) << 8))
    if hue is not None:
        shift = torch.remainder(torch.arange(180) + hue, 180).to(torch.int32)
        steps.append(lambda hsv: (shift.index_select(0, (hsv >> 16).reshape(-1)).view(hsv.shape) << 16) | (hsv & 0xFFFF))
    if steps:
        if use_tables is None:
            use_tables = img.shape[-2] * img.shape[-1] >= TABLE_MIN_PIXELS
        img = _hsv_steps(img, steps, use_tables)
    if post is not None:
        img = _apply_lut(img, post)
    return img


def _hsv_steps(img: torch.Tensor, steps: Sequence[Any], use_tables: bool) -> torch.Tensor:
    """Each step: RGB -> HSV, change HSV, -> RGB (the packed RGB is the next step's table key). OpenCV
    converts the last W mod 32 pixels of a row with scalar code that rounds instead of truncating, so
    those columns go through the reference conversion (and every column does without tables)."""
    width = img.shape[-1]
    main = (width // 32) * 32 if use_tables else 0
    out = torch.empty_like(img)
    if main:
        to_hsv, to_rgb = _hsv_tables()
        packed = _pack(img[..., :main].contiguous())
        for step in steps:
            hsv = to_hsv.index_select(0, packed.reshape(-1)).view(packed.shape)
            packed = to_rgb.index_select(0, step(hsv).reshape(-1)).view(packed.shape)
        out[..., :main] = _unpack(packed)
    if main < width:
        rest = img[..., main:]
        for step in steps:
            # hsv_to_rgb_uint8 sees the full width, or the tail alone (< 32 wide: the scalar path)
            rest = hsv_to_rgb_uint8(_unpack(step(_pack(rgb_to_hsv_uint8(rest)))))
        out[..., main:] = rest
    return out


# --------------------------------------------------------------------------------------------------
# the pipeline

class RecipePipeline:
    """MMSeg's train pipeline (spec §4.1 steps 3-6, 8) on uint8: ratio resize, crop (cat_max_ratio),
    flip, photometric distortion, pad; normalisation is `normalize_batch`'s, on the device.

    Draws the same random numbers in the same order as `build_train_transforms` and gives the same
    pixels: `normalize_batch` of its output equals the reference pipeline's output for the same seed.
    """

    def __init__(self, crop_size_hw: Sequence[int], img_scale_wh: Sequence[int],
                 ratio_range: Sequence[float] = (0.5, 2.0), cat_max_ratio: float = 0.75, flip_prob: float = 0.5,
                 photometric: bool = True, ignore_index: int = IGNORE_INDEX):
        self.rescale = RandomRescale(img_scale_wh, ratio_range)
        self.crop = CatMaxRandomCrop(crop_size_hw, cat_max_ratio, ignore_index)
        self.flip_prob = float(flip_prob)
        self.distortion = PhotoMetricDistortion() if photometric else None
        self.crop_size_hw = self.crop.crop_size_hw

    def warm_up(self) -> None:
        """Load the native loops (building them on first use), or else build the HSV tables if crops will
        use them: in the main process, so that forked workers share them."""
        if native.library() is not None:
            return
        warnings.warn(f"training data: the native loops are unavailable ({native.why_not()}); the same pipeline "
                      "runs as PyTorch code, 3-4x slower", RuntimeWarning, stacklevel=2)
        if self.distortion is not None and self.crop_size_hw[0] * self.crop_size_hw[1] >= TABLE_MIN_PIXELS:
            _hsv_tables()

    def __call__(self, image: Union[torch.Tensor, PngRows], mask: Union[torch.Tensor, "Labels"]
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(3, H, W) uint8 RGB (or its PNG rows) and (H, W) labels (or `Labels`) -> (3, h, w) uint8 and
        (h, w) int16 (`PAD_LABEL` where padded). Raises `InvalidLabels` for a stored mask value `Labels`
        does not allow (in a window the pipeline reads)."""
        labels = mask if isinstance(mask, Labels) else Labels(mask)
        if isinstance(image, torch.Tensor) and (image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3):
            raise TypeError(f"RecipePipeline takes a uint8 RGB image (3, H, W), got {image.dtype} "
                            f"{tuple(image.shape)}: pass the decoded image before any ToDtype/Normalize")
        lib = native.library()
        if lib is not None:
            return self._native(lib, image, labels)
        image = image.as_subclass(torch.Tensor) if isinstance(image, torch.Tensor) else _planes(image)
        mask = labels.whole()
        size_hw = self.rescale.draw(*mask.shape[-2:])["size_hw"]

        def window(top: int, left: int, height: int, width: int) -> torch.Tensor:
            return mask_window(mask, size_hw, top, left, height, width)

        top, left, height, width = self.crop.choose_box(size_hw[0], size_hw[1], window)["box"]
        flip = bool(torch.rand(1) < self.flip_prob)  # v2.RandomHorizontalFlip's draw
        label = window(top, left, height, width)
        if flip:
            label = label.flip(-1)
        img = resize_window(image, size_hw, top, left, height, width, flip)
        if self.distortion is not None:
            img = photometric(img, self.distortion.make_params([]))
        return pad_to(img, label, self.crop_size_hw)

    def _native(self, lib: Any, image: Union[torch.Tensor, PngRows], labels: "Labels"
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """`__call__` with the loops in `train/native.c`: the same draws in the same order, and only the
        rows of the files down to the last one a window reads are decoded."""
        in_hw = labels.size_hw
        size_hw = self.rescale.draw(*in_hw)["size_hw"]

        def histogram(top: int, left: int, height: int, width: int) -> torch.Tensor:
            return labels.window(lib, size_hw, (top, left, height, width))

        box = self.crop.choose_box(size_hw[0], size_hw[1], histogram, histogram=True)["box"]
        flip = bool(torch.rand(1) < self.flip_prob)  # v2.RandomHorizontalFlip's draw
        top, left, height, width = box
        label = torch.empty(self.crop_size_hw, dtype=torch.int16)
        img = torch.empty((3, *self.crop_size_hw), dtype=torch.uint8)
        if (height, width) != self.crop_size_hw:  # padded: the loops write the crop's corner only
            label.fill_(PAD_LABEL)
            img.zero_()
        labels.window(lib, size_hw, box, flip, label)
        params = self.distortion.make_params([]) if self.distortion is not None else None
        if sum(size_hw) > 128:
            _resize_distort(lib, image, in_hw, size_hw, box, flip, params, img)
        else:  # PyTorch resizes small outputs with another kernel: `resize_window` knows it
            planes = image.as_subclass(torch.Tensor) if isinstance(image, torch.Tensor) else _planes(image)
            small = resize_window(planes, size_hw, top, left, height, width, flip)
            img[:, :height, :width] = small if params is None else photometric(small, params)
        return img, label


class InvalidLabels(ValueError):
    """A mask holds a stored value its dataset does not allow (the reader's `load_mask` names it)."""


@dataclasses.dataclass
class Labels:
    """A mask for the pipeline: its stored 8-bit values (a (H, W) tensor, or PNG rows read on demand),
    `lut` (256 uint8) from stored values to labels (None: the same), and `valid` (256 bool): the stored
    values allowed (None: all)."""

    stored: Union[torch.Tensor, PngRows]
    lut: Optional[torch.Tensor] = None
    valid: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if isinstance(self.stored, torch.Tensor):  # once, not at every window: uint8 rows, unit column stride
            stored = self.stored.as_subclass(torch.Tensor)
            if stored.dtype != torch.uint8 or stored.stride(-1) != 1:
                stored = stored.to(torch.uint8).contiguous()
            self.stored = stored

    @property
    def size_hw(self) -> Tuple[int, int]:
        if isinstance(self.stored, PngRows):
            return self.stored.size_hw
        return (int(self.stored.shape[-2]), int(self.stored.shape[-1]))

    def whole(self) -> torch.Tensor:
        """The whole label map (H, W), checked and mapped."""
        stored = self.stored if isinstance(self.stored, torch.Tensor) else self.stored.rows(self.size_hw[0])[..., 0]
        if self.valid is not None:
            self._check(torch.bincount(stored.reshape(-1).to(torch.int64), minlength=256))
        if self.lut is None:
            return stored
        return self.lut.index_select(0, stored.reshape(-1).to(torch.int32)).view(stored.shape)

    def window(self, lib: Any, size_hw: Tuple[int, int], box: Tuple[int, int, int, int], flip: bool = False,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Histogram (256) of the labels in `box` of the nearest resize to `size_hw`, written (columns
        reversed when `flip`) to the top-left corner of `out` (int16) if given."""
        (in_h, in_w), (top, left, height, width) = self.size_hw, box
        stored = self.stored
        if isinstance(stored, PngRows):
            stored = stored.rows(lib.mask_last_row(in_h, size_hw[0], top, height) + 1)[..., 0]
        stored_hist = torch.zeros(256, dtype=torch.int64)
        if lib.mask_window(stored.data_ptr(), stored.stride(0), in_h, in_w, size_hw[0], size_hw[1], top, left, height,
                           width, int(flip), None if self.lut is None else self.lut.data_ptr(),
                           None if out is None else out.data_ptr(), 0 if out is None else out.stride(0),
                           stored_hist.data_ptr()):
            raise MemoryError("mask_window: out of memory")
        if self.valid is not None:
            self._check(stored_hist)
        if self.lut is None:
            return stored_hist
        return torch.zeros(256, dtype=torch.int64).index_add_(0, self.lut.to(torch.int64), stored_hist)

    def _check(self, stored_hist: torch.Tensor) -> None:
        bad = ((stored_hist > 0) & ~self.valid).nonzero().flatten().tolist()
        if bad:
            raise InvalidLabels(f"stored mask values {bad} are not classes of this dataset")


def _planes(rows: PngRows) -> torch.Tensor:
    """All of a PNG's rows as (C, H, W)."""
    return rows.rows(rows.size_hw[0]).permute(2, 0, 1)


def _resize_distort(lib: Any, image: Union[torch.Tensor, PngRows], in_hw: Tuple[int, int], size_hw: Tuple[int, int],
                    box: Tuple[int, int, int, int], flip: bool, params: Optional[Dict[str, Any]],
                    out: torch.Tensor) -> None:
    """The crop `box` of the image resized to `size_hw` (flipped), distorted with `params`, into the
    top-left corner of `out` (3, ch, cw) uint8."""
    top, left, height, width = box
    if isinstance(image, PngRows):
        src = image.rows(lib.resize_last_row(in_hw[0], size_hw[0], top, height) + 1)  # (rows, W, 3)
        sy, sx, sc = src.stride()
    else:
        src = image.as_subclass(torch.Tensor)
        sc, sy, sx = src.stride()
    pre, sat, hue, post = distortion_tables(params) if params is not None else (None, None, None, None)
    ptr = (lambda t: None if t is None else t.data_ptr())  # every table is held by a name until the call returns
    if lib.resize_distort(src.data_ptr(), sy, sx, sc, in_hw[0], in_hw[1], size_hw[0], size_hw[1], top, left, height,
                          width, int(flip), ptr(pre), ptr(sat), int(hue is not None), int(hue or 0), ptr(post),
                          int(params is not None), _SDIV.data_ptr(), _HDIV180.data_ptr(), out.data_ptr(),
                          out.stride(0), out.stride(1)):
        raise MemoryError("resize_distort: out of memory")


def pad_to(image: torch.Tensor, label: torch.Tensor, size_hw: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pad bottom/right to `size_hw`: image with 0 (normalize_batch zeroes it anyway), label with PAD_LABEL."""
    h, w = label.shape
    out_img = image.new_zeros((3, size_hw[0], size_hw[1]))
    out_img[:, :h, :w] = image
    out_label = torch.full((size_hw[0], size_hw[1]), PAD_LABEL, dtype=torch.int16)
    out_label[:h, :w] = label
    return out_img, out_label


def normalize_batch(images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float],
                    std: Sequence[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 3, H, W) and int16 labels -> float32 normalised images and int64 labels.

    The reference's arithmetic (v2.ToDtype then v2.Normalize: (x - mean) / std in float32), then padded
    pixels (label PAD_LABEL) set to 0 and their labels to 255, as the reference pads after normalising.
    """
    x = normalize(images, mean, std)
    if labels.dtype == torch.int64:
        return x, labels  # already final (the reference pipeline's labels)
    pad = labels < 0
    x.masked_fill_(pad.unsqueeze(1), 0.0)
    return x, labels.masked_fill(pad, IGNORE_INDEX).to(torch.int64)
