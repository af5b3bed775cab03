"""Decoding for the training pipeline: PNG rows on demand, and torchvision's JPEG / PNG decoders.

A training crop needs only the rows of the file down to the crop's last source row, and the crop is
chosen on the mask before the image is needed. `PngRows` decodes an 8-bit, non-interlaced PNG (grey,
palette indices or RGB) a few rows at a time, as far as asked: the zlib stream is inflated up to those
rows (with ISA-L's inflate, `isal`, about 3x zlib's speed, where it is installed) and the scanlines are
unfiltered by `train/native.c`. The pixels are the file's (PNG is lossless), as Pillow and libpng give
them. A file is not checked past the rows read: `isa check-data` (run before training) reads every file
whole.

Example:
    >>> rows = PngRows.open("mask.png")   # doctest: +SKIP
    >>> rows.size_hw, rows.rows(100).shape  # doctest: +SKIP
    ((1024, 2048), torch.Size([100, 2048, 1]))
"""
from __future__ import annotations

import functools
import struct
import warnings
import zlib
from typing import Any, Optional, Tuple, Union

import torch

from . import native

try:  # ISA-L's inflate: the same output as zlib's, about 3x faster
    from isal import isal_zlib as _inflate
except ImportError:  # pragma: no cover - isal is a dependency; zlib is the fallback
    _inflate = zlib

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 3: 1}  # colour type -> samples per pixel (grey, RGB, palette index)
_MAX_PIXELS = 1 << 28  # larger headers go to the reader (Pillow's decompression-bomb check names them)


class PngRows:
    """An 8-bit non-interlaced PNG, decoded on demand: `rows(n)` is the top n rows, (n, W, C) uint8.

    `open(path)` returns None for any other file (16-bit, interlaced, with alpha, not a PNG, unreadable)
    or when the native loops are unavailable; a corrupt stream raises ValueError when the rows reach it.
    """

    def __init__(self, data: bytes, width: int, height: int, channels: int):
        self.size_hw = (height, width)
        self.channels = channels
        self._data = data  # the concatenated IDAT payloads
        self._rowbytes = width * channels
        self._pixels = torch.empty((height, width, channels), dtype=torch.uint8)
        self._done = 0
        self._inflater = _inflate.decompressobj()

    @classmethod
    def open(cls, path: Any, colour_types: Tuple[int, ...] = (0, 2, 3)) -> Optional["PngRows"]:
        """The file's rows, or None if it is not an 8-bit non-interlaced PNG of one of `colour_types`."""
        data = _read(path) if native.library() is not None else None
        return None if data is None else cls.from_bytes(data, colour_types)

    @classmethod
    def from_bytes(cls, data: bytes, colour_types: Tuple[int, ...] = (0, 2, 3)) -> Optional["PngRows"]:
        """`open` of a file's bytes."""
        if native.library() is None or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR" or len(data) < 33:
            return None
        width, height, depth, colour, _compression, _filter, interlace = struct.unpack(">IIBBBBB", data[16:29])
        if depth != 8 or interlace != 0 or colour not in colour_types or not 0 < width * height <= _MAX_PIXELS:
            return None
        chunks, pos = [], 8
        while pos + 8 <= len(data):
            length, kind = struct.unpack(">I4s", data[pos:pos + 8])
            if kind == b"IDAT":
                chunks.append(data[pos + 8:pos + 8 + length])
            elif kind == b"IEND":
                break
            pos += 12 + length
        return cls(b"".join(chunks), width, height, _CHANNELS[colour])

    def rows(self, n: int) -> torch.Tensor:
        """The top `n` rows (clipped to the height), decoding those not decoded yet."""
        n = min(int(n), self.size_hw[0])
        if n > self._done:
            stride = 1 + self._rowbytes  # each scanline starts with its filter type
            want = (n - self._done) * stride
            try:
                raw = self._inflater.decompress(self._data, want)
            except (zlib.error, _inflate.error) as err:
                raise ValueError(f"corrupt PNG stream: {err}") from err
            self._data = self._inflater.unconsumed_tail
            if len(raw) != want:
                raise ValueError(f"PNG stream ends after {self._done + len(raw) // stride} of "
                                 f"{self.size_hw[0]} rows")
            prev = self._pixels[self._done - 1].data_ptr() if self._done else None
            bad = native.library().png_unfilter(raw, n - self._done, self._rowbytes, self.channels, prev,
                                                self._pixels[self._done].data_ptr())
            if bad:
                raise ValueError(f"PNG row {self._done + bad - 1} has an unknown filter type")
            self._done = n
        return self._pixels[:n]


# --------------------------------------------------------------------------------------------------
# whole images through torchvision.io

def open_image(path: Any) -> Optional[Union[PngRows, torch.Tensor]]:
    """A training image for the fast pipeline, the file read once: an 8-bit RGB PNG as `PngRows`, else
    `decode_image_fast`'s tensor; None where only the dataset reader can read it."""
    data = _read(path)
    if data is None:
        return None
    return PngRows.from_bytes(data, colour_types=(2,)) or _decode_bytes(data)


def decode_image_fast(path: Any) -> Optional[torch.Tensor]:
    """Decode an 8-bit RGB PNG or a 3-component JPEG with torchvision.io (libpng / libjpeg-turbo: faster
    than Pillow, the same pixels: PNG is lossless and the JPEG decoders agree bit for bit here) to a
    uint8 (3, H, W) tensor; None for any other file or any failure, so that the caller falls back to the
    dataset reader (Pillow, with its named errors)."""
    data = _read(path)
    return None if data is None else _decode_bytes(data)


def _read(path: Any) -> Optional[bytes]:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None  # the dataset reader names the problem


def _decode_bytes(data: bytes) -> Optional[torch.Tensor]:
    """`decode_image_fast` of a file's bytes."""
    try:
        tio = _torchvision_io()
        if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and data[24] == 8 and data[25] == 2:
            kind = "png"  # bit depth 8, colour type 2 (RGB): what libpng and Pillow read identically
        elif data[:2] == b"\xff\xd8" and _jpeg_components(data) == 3:
            kind = "jpeg"
        else:
            return None
        buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its decoders in favour of TorchCodec; they are what is fast
            # here, and a missing one falls back to Pillow
            warnings.simplefilter("ignore", DeprecationWarning)
            if kind == "png":
                return tio.decode_png(buffer, mode=tio.ImageReadMode.RGB)
            return tio.decode_jpeg(buffer, mode=tio.ImageReadMode.RGB)
    except (ImportError, AttributeError, OSError, RuntimeError, ValueError, IndexError):
        return None


@functools.lru_cache(maxsize=1)
def _torchvision_io() -> Any:
    import torchvision.io as tio

    return tio


def _jpeg_components(data: bytes) -> int:
    """Number of colour components in the JPEG's frame header (0 if not found)."""
    pos = 2
    while pos + 9 < len(data):
        if data[pos] != 0xFF:
            return 0
        marker = data[pos + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        length = (data[pos + 2] << 8) | data[pos + 3]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn
            return data[pos + 9]
        pos += 2 + length
    return 0
