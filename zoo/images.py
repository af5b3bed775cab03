"""Images in: files, PIL images, arrays and tensors to one uint8 RGB (3, H, W) tensor.

Decoding is Pillow's; 0.x decoded with cv2, which for JPEG may differ by a grey level on some pixels
(different libjpeg builds). Images above `MAX_PIXELS` (Pillow's decompression-bomb limit, 89.5
megapixels) are refused before decoding with a message naming the size and the way to allow them.

>>> import numpy as np
>>> to_rgb_tensor(np.zeros((4, 6, 3), dtype=np.uint8)).shape
torch.Size([3, 4, 6])
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MAX_PIXELS = int(Image.MAX_IMAGE_PIXELS or 89_478_485)

PathLike = Union[str, "os.PathLike[str]"]


class ImageError(ValueError):
    """An image that cannot be read or used; the message names the file and the fix."""


@contextlib.contextmanager
def _pixel_limit(max_pixels: Optional[int]) -> Iterator[None]:
    # Pillow's guard is a module global; ours is checked first, so Pillow's is lifted while we decode
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None if not max_pixels else max(max_pixels, old or 0)
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def check_pixels(width: int, height: int, max_pixels: Optional[int], source: Any) -> None:
    """Refuse an image above `max_pixels` (None or 0: no limit) with the size and the fix."""
    if max_pixels and width * height > max_pixels:
        raise ImageError(
            f"image {source} is {width}x{height} = {width * height / 1e6:.1f} megapixels, above the limit of "
            f"{max_pixels / 1e6:.1f} (Pillow's decompression-bomb guard); if you trust it, raise the limit with "
            f"--max-pixels {width * height} (max_pixels= in Python; 0 for none)")


def read_image(path: PathLike, exif_transpose: bool = False, max_pixels: Optional[int] = MAX_PIXELS) -> torch.Tensor:
    """Decode an image file to a uint8 RGB tensor (3, H, W) (alpha dropped, grey/palette expanded).

    ``exif_transpose`` turns camera photos upright (for predictions); datasets keep the stored pixel
    order so that images stay aligned with their masks.

    >>> import tempfile, os
    >>> from PIL import Image
    >>> p = os.path.join(tempfile.mkdtemp(), "x.png"); Image.new("L", (5, 3), 7).save(p)
    >>> read_image(p).shape
    torch.Size([3, 3, 5])
    """
    try:
        with _pixel_limit(max_pixels), Image.open(path) as pil:
            check_pixels(pil.width, pil.height, max_pixels, path)
            if exif_transpose:
                ImageOps.exif_transpose(pil, in_place=True)  # in place: no second decoded copy
            array = np.array(pil if pil.mode == "RGB" else pil.convert("RGB"))
    except ImageError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(f"cannot read image {path}: {err}") from err
    # (3, H, W) as a view of the (H, W, 3) pixels: no second copy of a large photo
    return torch.from_numpy(array).permute(2, 0, 1)


def to_rgb_tensor(image: Any, max_pixels: Optional[int] = MAX_PIXELS) -> torch.Tensor:
    """One image as a uint8 RGB (3, H, W) CPU tensor, from a path, a PIL image, an (H, W, 3) / (H, W)
    uint8 array, or a uint8 tensor (H, W, 3) or (3, H, W). Paths are EXIF-rotated upright."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(image, exif_transpose=True, max_pixels=max_pixels)
    if isinstance(image, Image.Image):
        check_pixels(image.width, image.height, max_pixels, "(PIL image)")
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).contiguous()
    if isinstance(image, np.ndarray):
        if not image.flags.writeable or any(stride < 0 for stride in image.strides):
            image = image.copy()  # read-only (np.asarray of a PIL image) or flipped views: torch takes neither
        image = torch.from_numpy(image)
        channels_first = False
    elif isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        channels_first = image.dim() == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3)
    else:
        raise TypeError(f"expected a path, PIL image, numpy array or tensor, got {type(image).__name__}")
    if image.dtype != torch.uint8:
        raise ImageError(f"expected uint8 pixels 0..255, got dtype {image.dtype}; convert with "
                         "(x * 255).round().clamp(0, 255).to(torch.uint8) if it is a 0..1 float image")
    if image.dim() == 2:
        image = image.unsqueeze(-1)
    if image.dim() != 3:
        raise ImageError(f"expected an (H, W, 3) image, got shape {tuple(image.shape)}")
    if not channels_first:
        image = image.permute(2, 0, 1)
    if image.shape[0] == 4:
        image = image[:3]  # drop alpha
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    if image.shape[0] != 3:
        raise ImageError(f"expected 1, 3 or 4 channels, got shape {tuple(image.shape)}")
    check_pixels(image.shape[2], image.shape[1], max_pixels, f"(array {tuple(image.shape)})")
    return image.contiguous()
