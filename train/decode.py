"""Fast decoding for the training pipeline, behind the one reader (`zoo.images`).

Every file is first checked by the reader's header checks (`zoo.images.png_header`: the PNG chunk
structure, every CRC, PLTE, IEND and the pixel limit; `zoo.images.jpeg_header`: the JPEG frame header
against the pixel limit); only then does a fast decoder see it, and it gives the reader's pixels or
declines (None) so that the caller reads the file with `zoo.images.read_image` (Pillow, named errors).
No decoder that can crash on bad input is used: torchvision's PNG decoder is not used at all, and its
JPEG decoder sees only a file whose frame header was checked.

- `PngRows`: an 8-bit, non-interlaced PNG (grey, palette indices or RGB) decoded a few rows at a time,
  as far as asked (a training crop needs the rows down to its last source row): the zlib stream is
  inflated up to those rows (with ISA-L's inflate, `isal`, about 3x zlib's speed) and the scanlines
  are unfiltered by `train/native.c`. The pixels are the file's, as Pillow gives them. When the last
  row is read, the stream must end there (a short or overlong stream raises).
- `open_image`: a training image: `PngRows` of an RGB PNG, or torchvision's JPEG decode (libjpeg-turbo,
  bit for bit Pillow's here) turned upright by its EXIF orientation (`zoo.images.orient`).
- `open_mask`: a training mask: `PngRows` of an 8-bit grey / palette PNG, or the reader's array.

Example:
    >>> rows = PngRows.open("mask.png")   # doctest: +SKIP
    >>> rows.size_hw, rows.rows(100).shape  # doctest: +SKIP
    ((1024, 2048), torch.Size([100, 2048, 1]))
"""
from __future__ import annotations

import functools
import io
import warnings
import zlib
from typing import Any, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image

from zoo import images
from zoo.images import MAX_PIXELS, ImageError, PngHeader

from . import native

try:  # ISA-L's inflate: the same output as zlib's, about 3x faster
    from isal import isal_zlib as _inflate
except ImportError:  # pragma: no cover - isal is a dependency; zlib is the fallback
    _inflate = zlib


class PngRows:
    """An 8-bit non-interlaced PNG, decoded on demand: `rows(n)` is the top n rows, (n, W, C) uint8.

    Built only from a file `zoo.images.png_header` accepted. `open` / `from_bytes` return None for a PNG
    this path does not decode (16-bit, interlaced, with alpha, another colour type, an orientation tag)
    or when the native loops are unavailable, and raise `ImageError` for a file the reader refuses; a
    corrupt zlib stream raises ValueError when the rows reach it.
    """

    def __init__(self, data: bytes, header: PngHeader, source: Any = "(bytes)"):
        self.size_hw = (header.height, header.width)
        self.channels = header.channels
        self.source = source
        self._data = header.idat_bytes(data)  # the concatenated IDAT payloads
        self._rowbytes = header.width * header.channels
        self._pixels = torch.empty((header.height, header.width, header.channels), dtype=torch.uint8)
        self._done = 0
        self._inflater = _inflate.decompressobj()

    @classmethod
    def open(cls, path: Any, colour_types: Tuple[int, ...] = (0, 2, 3),
             max_pixels: Optional[int] = MAX_PIXELS) -> Optional["PngRows"]:
        """The file's rows, or None if it is not an 8-bit non-interlaced PNG of one of `colour_types`."""
        if native.library() is None:
            return None
        return cls.from_bytes(images.read_file(path), colour_types, path, max_pixels)

    @classmethod
    def from_bytes(cls, data: bytes, colour_types: Tuple[int, ...] = (0, 2, 3), source: Any = "(bytes)",
                   max_pixels: Optional[int] = MAX_PIXELS) -> Optional["PngRows"]:
        """`open` of a file's bytes."""
        if native.library() is None or data[:8] != images.PNG_SIGNATURE:
            return None
        header = images.png_header(data, source, max_pixels)  # raises ImageError: the reader's refusal
        if header.depth != 8 or header.interlace or header.colour not in colour_types or header.orientation_chunks:
            return None
        return cls(data, header, source)

    def rows(self, n: int) -> torch.Tensor:
        """The top `n` rows (clipped to the height), decoding those not decoded yet."""
        height = self.size_hw[0]
        n = min(int(n), height)
        if n > self._done:
            stride = 1 + self._rowbytes  # each scanline starts with its filter type
            want = (n - self._done) * stride
            try:
                raw = self._inflater.decompress(self._data, want)
                self._data = self._inflater.unconsumed_tail
                if n == height:  # the stream must end with the last row: nothing left, nothing missing
                    extra = self._inflater.decompress(self._data, 1) if not self._inflater.eof else b""
                    if extra or not self._inflater.eof:
                        raise ValueError(f"corrupt PNG {self.source}: the pixel data "
                                         f"{'is longer than the image' if extra else 'does not end'}")
            except (zlib.error, _inflate.error) as err:
                raise ValueError(f"corrupt PNG {self.source}: {err}") from err
            if len(raw) != want:
                raise ValueError(f"corrupt PNG {self.source}: the pixel data ends after "
                                 f"{self._done + len(raw) // stride} of {height} rows")
            prev = self._pixels[self._done - 1].data_ptr() if self._done else None
            bad = native.library().png_unfilter(raw, n - self._done, self._rowbytes, self.channels, prev,
                                                self._pixels[self._done].data_ptr())
            if bad:
                raise ValueError(f"corrupt PNG {self.source}: row {self._done + bad - 1} has an unknown filter type")
            self._done = n
        return self._pixels[:n]


# --------------------------------------------------------------------------------------------------
# a training image and mask

def open_image(path: Any, max_pixels: Optional[int] = MAX_PIXELS) -> Optional[Union[PngRows, torch.Tensor]]:
    """A training image for the fast pipeline, the file read once and checked by the reader's header
    checks: an 8-bit RGB PNG as `PngRows`, a 3-component JPEG decoded by torchvision and turned upright;
    None where only `zoo.images.read_image` reads it (other files, or a decoder's failure). Raises
    `ImageError` for a file the reader refuses from its header."""
    data = images.read_file(path)
    rows = PngRows.from_bytes(data, (2,), path, max_pixels)
    return rows if rows is not None else _decode_jpeg(data, path, max_pixels)


def open_mask(path: Any, max_pixels: Optional[int] = MAX_PIXELS) -> Optional[Union[PngRows, torch.Tensor]]:
    """A training mask, as stored: an 8-bit grey / palette PNG as `PngRows`, else the reader's 8-bit
    (H, W) array as a tensor; None for a mask that is not 8-bit single-channel. Raises `ImageError`."""
    data = images.read_file(path, "mask")
    rows = PngRows.from_bytes(data, (0, 3), path, max_pixels)
    if rows is not None:
        return rows
    array = images.read_image(data, "mask", max_pixels, source=path)
    return torch.from_numpy(np.array(array)) if array.dtype == np.uint8 and array.ndim == 2 else None


def decode_image_fast(path: Any, max_pixels: Optional[int] = MAX_PIXELS) -> Optional[torch.Tensor]:
    """A 3-component JPEG decoded with torchvision.io (libjpeg-turbo: faster than Pillow, the same pixels
    here) and turned upright, as uint8 (3, H, W); None for any other file or any decoder failure."""
    return _decode_jpeg(images.read_file(path), path, max_pixels)


def _decode_jpeg(data: bytes, source: Any, max_pixels: Optional[int]) -> Optional[torch.Tensor]:
    if images.sniff(data) != "JPEG":
        return None
    frame = images.jpeg_header(data, source, max_pixels)  # the size is checked before anything allocates
    if frame.components != 3 or frame.precision != 8:
        return None
    try:
        tio = _torchvision_io()
        buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its decoders in favour of TorchCodec; they are what is fast here
            warnings.simplefilter("ignore", DeprecationWarning)
            image = tio.decode_jpeg(buffer, mode=tio.ImageReadMode.RGB)
    except (ImportError, AttributeError, OSError, RuntimeError, ValueError, IndexError):
        return None  # the reader decodes it, or names what is wrong
    if tuple(image.shape[-2:]) != (frame.height, frame.width):
        return None
    orientation = exif_orientation(data, frame.scan_at)
    return image if orientation == 1 else images.orient(image, orientation)


def exif_orientation(data: bytes, scan_at: Optional[int] = None) -> int:
    """The EXIF orientation of a JPEG as the reader reads it (`zoo.images.exif_orientation_of`: the EXIF
    block, not XMP); `scan_at`: where the first scan starts (`zoo.images.jpeg_header`), the end of the headers."""
    head = data[:scan_at] if scan_at else data
    if b"Exif" not in head:
        return 1  # no EXIF block in the headers: nothing to parse
    try:
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as pil:
            return images.exif_orientation_of(pil)
    except Exception:  # noqa: BLE001 - the reader sees the same unreadable file: as stored
        return 1


@functools.lru_cache(maxsize=1)
def _torchvision_io() -> Any:
    import torchvision.io as tio

    return tio


__all__ = ["PngRows", "open_image", "open_mask", "decode_image_fast", "exif_orientation", "ImageError"]
