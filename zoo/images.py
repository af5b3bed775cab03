"""The one way in for pixels: every image and mask the program reads (train, eval, predict, check-data,
bench) enters through `read_image` / `probe` here; arrays and tensors through `to_rgb_tensor`.

What the reader owns (the fast decoders in `train.decode` run only on what it validated, and give the
same pixels or decline to it):

- **Format by content**, not by suffix (PNG, JPEG, BMP, WebP, TIFF, GIF by their magic bytes; Pillow
  is only asked for the format found).
- **One pixel limit** (`MAX_PIXELS`, Pillow's decompression-bomb limit, 89.5 megapixels; `max_pixels=`,
  `--max-pixels`; 0: none) for images and masks, checked from the header before anything is decoded.
- **Orientation as MMSegmentation loads data**: images upright (EXIF orientation applied, as OpenCV's
  `IMREAD_COLOR` does in `LoadImageFromFile`: from the EXIF block, not from XMP), masks as stored
  (`LoadAnnotations` does not rotate).
- **Strict PNG**: exactly one IHDR first, every chunk's CRC, IDATs consecutive, PLTE where a palette
  image needs it (and nowhere else), no unknown critical chunk, IEND present, and the zlib stream
  complete and as long as the image: a truncated file is refused, never zero-filled.
- **Masks are lossless**: a JPEG (or lossy WebP) mask is refused whatever its suffix, since its
  compression artefacts would become class ids.
- **Errors name the file**: every failure is an `ImageError` (a ValueError) with the path and the fix.

16-bit images are reduced to their high byte (what OpenCV's `IMREAD_COLOR` gives MMSegmentation); a
16-bit mask keeps its values (they are checked against the classes).

>>> import numpy as np
>>> to_rgb_tensor(np.zeros((4, 6, 3), dtype=np.uint8)).shape
torch.Size([3, 4, 6])
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import struct
import threading
import zlib
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageFile

try:  # ISA-L: the same CRC and inflate as zlib's, about 3x faster
    from isal import isal_zlib as _zlib
except ImportError:  # pragma: no cover - isal is a dependency
    _zlib = zlib  # type: ignore[assignment]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MAX_PIXELS = int(Image.MAX_IMAGE_PIXELS or 89_478_485)
KINDS = ("image", "mask")
# what a mask may be: integer indices (grey, palette, 16/32-bit) or colours a palette maps; not float, CMYK, YCbCr
MASK_MODES = ("1", "L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N", "LA", "PA", "RGB", "RGBA", "RGBX")

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never zero-filled pixels

PathLike = Union[str, "os.PathLike[str]"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# colour type -> (allowed bit depths, samples per pixel, Pillow mode at 8 bits)
_PNG_COLOUR = {0: ((1, 2, 4, 8, 16), 1, "L"), 2: ((8, 16), 3, "RGB"), 3: ((1, 2, 4, 8), 1, "P"),
               4: ((8, 16), 2, "LA"), 6: ((8, 16), 4, "RGBA")}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_MAX_CHUNK = (1 << 31) - 1
_MAX_PNG_CHUNKS = 1 << 12  # non-IDAT chunks; an editor's PNG has tens (text, colour profile, time, ...)


class ImageError(ValueError):
    """An image or mask that cannot be read or used; the message names the file and the fix."""


@dataclass(frozen=True)
class PngHeader:
    """A PNG whose chunk structure `png_header` checked: IHDR fields, palette size, and the IDAT spans."""

    width: int
    height: int
    depth: int
    colour: int
    interlace: int
    palette_entries: int
    idat: Tuple[Tuple[int, int], ...]  # (start, end) of each IDAT payload in the file's bytes
    orientation_chunks: bool = False  # an eXIf chunk: the file may carry an EXIF orientation

    @property
    def channels(self) -> int:
        return _PNG_COLOUR[self.colour][1]

    def idat_bytes(self, data: bytes) -> bytes:
        """The zlib stream: the IDAT payloads joined (one copy: the slices are views)."""
        view = memoryview(data)
        return b"".join([view[a:b] for a, b in self.idat])

    def raw_size(self) -> int:
        """Bytes of the filtered scanlines the zlib stream must hold (filter byte + packed samples per row)."""
        bits = self.depth * self.channels
        if not self.interlace:
            return self.height * (1 + (self.width * bits + 7) // 8)
        total = 0
        for x0, y0, dx, dy in _ADAM7:
            w, h = (self.width - x0 + dx - 1) // dx, (self.height - y0 + dy - 1) // dy
            if w > 0 and h > 0:
                total += h * (1 + (w * bits + 7) // 8)
        return total


@dataclass(frozen=True)
class ImageInfo:
    """What `probe` reads from a header: ``format`` ("PNG", "JPEG", "BMP", "WEBP", "TIFF", "GIF"), the
    stored ``width`` / ``height``, the EXIF ``orientation`` (1-8; 1: as stored), Pillow's ``mode`` and
    whether the compression is ``lossy``."""

    format: str
    width: int
    height: int
    orientation: int
    mode: str
    lossy: bool

    @property
    def upright_hw(self) -> Tuple[int, int]:
        """(height, width) once the EXIF orientation is applied (5-8 swap the sides)."""
        return (self.width, self.height) if self.orientation in (5, 6, 7, 8) else (self.height, self.width)


# ---------------------------------------------------------------------------------------------- limits

_LIMIT_LOCK = threading.Lock()
_limit_users = 0
_limit_saved: Optional[int] = None


@contextlib.contextmanager
def _pixel_limit(max_pixels: Optional[int]) -> Iterator[None]:
    # Pillow's guard is a module global; ours is checked first (from the header, or from the size Pillow opened
    # before it decodes), so Pillow's is lifted while any read is under way and restored by the last to end:
    # reads in several threads, each saving and restoring the global, could leave it lifted for good
    global _limit_users, _limit_saved
    with _LIMIT_LOCK:
        if _limit_users == 0:
            _limit_saved = Image.MAX_IMAGE_PIXELS
        _limit_users += 1
        Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        with _LIMIT_LOCK:
            _limit_users -= 1
            if _limit_users == 0:
                Image.MAX_IMAGE_PIXELS = _limit_saved


def check_pixels(width: int, height: int, max_pixels: Optional[int], source: Any) -> None:
    """Refuse an image above `max_pixels` (None or 0: no limit) with the size and the fix."""
    if max_pixels and width * height > max_pixels:
        raise ImageError(
            f"image {source} is {width}x{height} = {width * height / 1e6:.1f} megapixels, above the limit of "
            f"{max_pixels / 1e6:.1f} (Pillow's decompression-bomb guard); if you trust it, raise the limit with "
            f"--max-pixels {width * height} (max_pixels= in Python; 0 for none)")


# ---------------------------------------------------------------------------------------------- headers

def sniff(data: bytes) -> Optional[str]:
    """The format of a file's bytes by its magic number (None: not one we read)."""
    if data[:8] == PNG_SIGNATURE:
        return "PNG"
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:2] == b"BM":
        return "BMP"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    return None


def png_header(data: bytes, source: Any = "(bytes)", max_pixels: Optional[int] = MAX_PIXELS) -> PngHeader:
    """Check a PNG's chunk structure as a careful decoder does and return its header; raise `ImageError`.

    Checked: the signature, exactly one IHDR (first, 13 bytes, valid fields), every chunk's CRC, no
    unknown critical chunk, PLTE (once, before the IDATs, whole entries, only for colour images; required
    for palette images), consecutive IDATs, IEND, and the pixel limit. The zlib stream is checked by
    `check_png_stream` (or, on the fast path, as it is inflated).
    """
    def bad(why: str) -> ImageError:
        return ImageError(f"corrupt PNG {source}: {why}; re-save or re-export the file")

    if data[:8] != PNG_SIGNATURE:
        raise bad("no PNG signature")
    if len(data) < 33 or data[12:16] != b"IHDR" or data[8:12] != b"\x00\x00\x00\x0d":
        raise bad("the first chunk is not a 13-byte IHDR")
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", data[16:29])
    if not (0 < width <= _MAX_CHUNK and 0 < height <= _MAX_CHUNK):
        raise bad(f"image size {width}x{height}")
    if colour not in _PNG_COLOUR or depth not in _PNG_COLOUR[colour][0]:
        raise bad(f"bit depth {depth} with colour type {colour}")
    if compression or filtering or interlace > 1:
        raise bad(f"unknown compression/filter/interlace method {compression}/{filtering}/{interlace}")
    check_pixels(width, height, max_pixels, source)
    pos, crc32, view = 8, _zlib.crc32, memoryview(data)  # CRCs over views: no copy of the pixel data
    idat: List[Tuple[int, int]] = []
    palette, after_idat, ended, meta, others = -1, False, False, False, 0
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        end = pos + 8 + length
        if length > _MAX_CHUNK or end + 4 > len(data):
            raise bad(f"chunk {kind!r} at byte {pos} runs past the end of the file (truncated)")
        if not kind.isalpha():  # ASCII letters only (bytes.isalpha)
            raise bad(f"invalid chunk name {kind!r} at byte {pos}")
        if crc32(view[pos + 4:end]) != int.from_bytes(data[end:end + 4], "big"):
            raise bad(f"chunk {kind.decode()} at byte {pos} fails its CRC")
        if kind != b"IDAT":
            others += 1
            if others > _MAX_PNG_CHUNKS:  # each costs a Python step here and in Pillow: seconds per MB of them
                raise bad(f"over {_MAX_PNG_CHUNKS} chunks besides the pixel data")
        if kind == b"IHDR" and pos != 8:
            raise bad(f"a second IHDR chunk at byte {pos}")
        elif kind == b"PLTE":
            if palette >= 0 or idat or colour in (0, 4) or length % 3 or not 3 <= length <= 768:
                raise bad(f"misplaced or malformed PLTE chunk at byte {pos} ({length} bytes)")
            palette = length // 3
            if colour == 3 and palette > 1 << depth:
                raise bad(f"PLTE of {palette} entries for a {depth}-bit palette image")
        elif kind == b"IDAT":
            if after_idat:
                raise bad(f"IDAT chunks are not consecutive (another at byte {pos})")
            idat.append((pos + 8, end))
        elif kind == b"IEND":
            ended = True
            break
        elif kind == b"eXIf":  # OpenCV's orientation source; XMP and "Raw profile" text chunks are not
            meta = True
        elif kind[0] < 97 and kind != b"IHDR":  # upper case first letter: critical, and unknown
            raise bad(f"unknown critical chunk {kind.decode()} at byte {pos}")
        if idat and kind != b"IDAT":
            after_idat = True
        pos = end + 4
    if not ended:
        raise bad("no IEND chunk (the file is truncated)")
    if not idat:
        raise bad("no IDAT chunk (no pixel data)")
    if colour == 3 and palette < 0:
        raise bad("a palette image without a PLTE chunk")
    return PngHeader(width, height, depth, colour, interlace, max(palette, 0), tuple(idat), meta)


def check_png_stream(header: PngHeader, data: bytes, source: Any = "(bytes)") -> None:
    """Inflate the whole zlib stream (a MiB at a time, nothing kept) and refuse one that is corrupt, ends
    early or is shorter than the image needs: decoders would zero-fill the missing rows."""
    inflater, want, got, view = _zlib.decompressobj(), header.raw_size(), 0, memoryview(data)
    try:
        for a, b in header.idat:
            chunk = view[a:b]
            while chunk and got <= want:
                got += len(inflater.decompress(chunk, 1 << 20))
                chunk = inflater.unconsumed_tail
        while not inflater.eof and got <= want:
            out = inflater.decompress(b"", 1 << 20)
            if not out:
                break
            got += len(out)
    except (zlib.error, _zlib.error) as err:
        raise ImageError(f"corrupt PNG {source}: the compressed pixel data is damaged ({err}); re-save the file") \
            from err
    if got != want or not inflater.eof:
        raise ImageError(f"corrupt PNG {source}: its pixel data {'ends early' if got < want else 'is too long'} "
                         f"({got} of {want} bytes{'' if inflater.eof else ', stream unfinished'}): the file is "
                         "truncated or damaged; re-save it")


@dataclass(frozen=True)
class JpegHeader:
    """The frame header (SOFn) of a JPEG: size, components, precision, and whether it is progressive."""

    width: int
    height: int
    components: int
    precision: int
    marker: int
    scan_at: int = 0  # where the first scan (SOS) starts: the APP segments (EXIF, XMP) are before it


_FILL = re.compile(rb"\xff+")
_MAX_JPEG_SEGMENTS = 1 << 16  # a camera's JPEG has tens; a hostile one, millions of 4-byte segments to walk


def jpeg_header(data: bytes, source: Any = "(bytes)", max_pixels: Optional[int] = MAX_PIXELS) -> JpegHeader:
    """Walk a JPEG's markers up to the first scan, check its single frame header against the pixel limit
    (before any decoder allocates for it) and return it; raise `ImageError`."""
    def bad(why: str) -> ImageError:
        return ImageError(f"corrupt JPEG {source}: {why}; re-save or re-export the file")

    if data[:2] != b"\xff\xd8":
        raise bad("no JPEG start marker")
    pos, frame = 2, None
    for _ in range(_MAX_JPEG_SEGMENTS):
        fill = _FILL.match(data, pos)  # fill bytes: a run of 0xFF, the last one starts the marker
        if fill:
            pos = fill.end() - 1
        if pos + 4 > len(data):
            raise bad("the headers end before the first scan (truncated)")
        if data[pos] != 0xFF:
            raise bad(f"no marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if marker in (0xD8, 0xD9):
            raise bad(f"marker {marker:#x} before the first scan")
        length = (data[pos + 2] << 8) | data[pos + 3]
        if length < 2 or pos + 2 + length > len(data):
            raise bad(f"marker {marker:#x} at byte {pos} runs past the end of the file (truncated)")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn
            if frame is not None:
                raise bad("two frame headers (SOF markers)")
            if length < 8:
                raise bad("a short frame header")
            precision, height, width, components = struct.unpack(">BHHB", data[pos + 4:pos + 10])
            if width == 0 or height == 0:
                raise bad(f"frame size {width}x{height} (a height given later by DNL is not supported)")
            check_pixels(width, height, max_pixels, source)
            frame = JpegHeader(width, height, components, precision, marker)
        elif marker == 0xDA:  # SOS: the entropy-coded data follows
            if frame is None:
                raise bad("a scan before any frame header")
            return JpegHeader(frame.width, frame.height, frame.components, frame.precision, frame.marker, pos)
        pos += 2 + length
    raise bad(f"over {_MAX_JPEG_SEGMENTS} marker segments before the first scan")


def _pil_open(data: bytes, fmt: str) -> Image.Image:
    return Image.open(io.BytesIO(data), formats=[fmt])


def exif_orientation_of(pil: Image.Image) -> int:
    """The EXIF orientation (1-8; 1: none, or unreadable) of an opened image from its EXIF block only (JPEG
    APP1, PNG eXIf, WebP EXIF, TIFF IFD0), as OpenCV's ``IMREAD_COLOR`` (MMSegmentation's LoadImageFromFile)
    and labelme apply it; Pillow's ``getexif`` / ``exif_transpose`` also obey an XMP ``tiff:Orientation``
    and a PNG "Raw profile type exif" text chunk, which they do not."""
    try:
        if pil.format == "PNG" and "exif" not in pil.info:
            pil.load()  # an eXIf chunk after the pixel data is read only then
        if pil.info.get("exif"):
            exif = Image.Exif()
            exif.load(pil.info["exif"])
            value = exif.get(0x0112, 1)
        else:
            value = pil.tag_v2.get(0x0112, 1) if hasattr(pil, "tag_v2") else 1  # TIFF: IFD0 is the EXIF
    except Exception:  # noqa: BLE001 - a broken EXIF block: as stored
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def read_file(path: PathLike, kind: str = "image") -> bytes:
    """A file's bytes, or `ImageError` naming it."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise ImageError(f"cannot read {kind} {path}: {err.strerror or err}") from err


def probe(path: Union[PathLike, bytes], max_pixels: Optional[int] = MAX_PIXELS, source: Any = None,
          kind: str = "image") -> ImageInfo:
    """The header of an image file (or its bytes): format, stored size, EXIF orientation, mode, lossy.

    Checks what can be checked without decoding: the format by content, the PNG chunk structure and
    CRCs (`png_header`), the JPEG frame header, and the pixel limit. Raises `ImageError`.
    """
    data = path if isinstance(path, (bytes, bytearray)) else read_file(path, kind)
    return _probe(bytes(data), _source(path, source), max_pixels, kind)[0]


def _source(path: Any, source: Any) -> Any:
    # what errors call the file: bytes are named by their length, never written out whole into the message
    if source is not None:
        return source
    return f"({len(path)} bytes)" if isinstance(path, (bytes, bytearray)) else path


def _probe(data: bytes, source: Any, max_pixels: Optional[int], kind: str = "image"
           ) -> Tuple[ImageInfo, Optional[PngHeader]]:
    fmt = sniff(data)
    if fmt is None:
        raise ImageError(f"cannot read {kind} {source}: it is not a PNG, JPEG, BMP, WebP, TIFF or GIF file (its "
                         f"first bytes are {data[:8]!r}); convert it to PNG")
    png = None
    try:
        if fmt == "PNG":
            png = png_header(data, source, max_pixels)
            mode = "1" if png.colour == 0 and png.depth == 1 else _PNG_COLOUR[png.colour][2]
            if png.depth == 16 and png.colour == 0:
                mode = "I;16"
            orientation = 1
            if png.orientation_chunks:  # rare: Pillow reads it (and may decode the file to find it)
                with _pixel_limit(max_pixels), _pil_open(data, fmt) as pil:
                    orientation = exif_orientation_of(pil)
            return ImageInfo(fmt, png.width, png.height, orientation, mode, False), png
        if fmt == "JPEG":
            frame = jpeg_header(data, source, max_pixels)
        with _pixel_limit(0), _pil_open(data, fmt) as pil:  # Pillow's own guard off: ours names the fix
            width, height = pil.size
            check_pixels(width, height, max_pixels, source)
            if fmt == "JPEG" and (width, height) != (frame.width, frame.height):
                raise ImageError(f"corrupt JPEG {source}: its headers disagree on the size")
            lossy = fmt == "JPEG" or (fmt == "WEBP" and _webp_lossy(data)) or (
                fmt == "TIFF" and pil.info.get("compression") in ("jpeg", "tiff_jpeg"))
            # Pillow opens a TIFF at its upright size and turns the pixels upright as it loads them: as stored, here
            orientation = 1 if fmt == "TIFF" else exif_orientation_of(pil)
            return ImageInfo(fmt, width, height, orientation, pil.mode, lossy), None
    except ImageError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure of a decoder on untrusted bytes is this file's fault
        raise ImageError(f"cannot read {kind} {source} ({fmt}): {type(err).__name__}: {err}") from err


def _webp_lossy(data: bytes, pos: int = 12, end: Optional[int] = None) -> bool:
    """Whether a WebP holds a lossy (VP8) bitstream: its RIFF chunks, the extended format's included, and
    the frames (ANMF chunks: a 16-byte frame header, then the frame's own chunks) of an animation."""
    top, end = end is None, len(data) if end is None else min(end, len(data))
    while pos + 8 <= end:
        fourcc, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        if fourcc == b"VP8 " or (top and fourcc == b"ANMF" and _webp_lossy(data, pos + 24, pos + 8 + size)):
            return True
        pos += 8 + size + (size & 1)
    return False


# ---------------------------------------------------------------------------------------------- decoding

def read_image(path: Union[PathLike, bytes], kind: str = "image", max_pixels: Optional[int] = MAX_PIXELS,
               source: Any = None) -> Any:
    """Decode an image or mask file (or its bytes) after `probe`'s checks.

    ``kind="image"``: a uint8 RGB tensor (3, H, W), upright (EXIF orientation applied), alpha dropped,
    grey/palette expanded, 16-bit reduced to the high byte. ``kind="mask"``: the stored values as a
    numpy array, not rotated: (H, W) for grey/palette/16-bit files (palette PNGs give their indices),
    (H, W, 3|4) for colour ones; a lossy (JPEG) mask is refused.

    >>> import tempfile, os
    >>> from PIL import Image
    >>> p = os.path.join(tempfile.mkdtemp(), "x.png"); Image.new("L", (5, 3), 7).save(p)
    >>> read_image(p).shape, read_image(p, "mask").shape
    (torch.Size([3, 3, 5]), (3, 5))
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    data = bytes(path) if isinstance(path, (bytes, bytearray)) else read_file(path, kind)
    source = _source(path, source)
    info, png = _probe(data, source, max_pixels, kind)
    if kind == "mask" and info.lossy:
        raise ImageError(
            f"mask {source} is a lossy {info.format} image: its compression artefacts would become class ids. "
            "Save masks losslessly as single-channel index PNGs (mode 'L' or 'P'), exported from the labels, "
            "not re-saved from the JPEG")
    if kind == "mask" and info.mode not in MASK_MODES:  # float values would be truncated to other labels
        raise ImageError(f"mask {source} is a {info.format} image of mode {info.mode!r}, not class indices: save masks "
                         "as single-channel index PNGs (mode 'L' or 'P'), exported from the labels")
    if png is not None:
        check_png_stream(png, data, source)
    try:
        with _pixel_limit(max_pixels), _pil_open(data, info.format) as pil:
            if kind == "mask":
                pil.load()
                return np.asarray(pil)
            array = _rgb_array(pil)
    except ImageError:
        raise
    except Exception as err:  # noqa: BLE001 - see _probe
        raise ImageError(f"cannot read {kind} {source}: {type(err).__name__}: {err}") from err
    # (3, H, W) as a view of the (H, W, 3) pixels: no second copy of a large photo unless it is turned upright
    # (by the orientation `probe` read, never Pillow's exif_transpose, which also obeys XMP)
    return orient(torch.from_numpy(array).permute(2, 0, 1), info.orientation)


def _rgb_array(pil: Image.Image) -> np.ndarray:
    if pil.mode == "RGB":
        return np.array(pil)
    if pil.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: the high byte, as OpenCV's IMREAD_COLOR
        grey = (np.asarray(pil).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.array(pil.convert("RGB"))


_TRANSPOSE = {2: ((-1,), False), 3: ((-2, -1), False), 4: ((-2,), False), 5: ((), True),
              6: ((-1,), True), 7: ((-2, -1), True), 8: ((-2,), True)}


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """An image (..., H, W) as stored, turned upright for its EXIF `orientation` (1-8): the same pixels as
    `PIL.ImageOps.exif_transpose` (flips and transposes only, exact)."""
    if orientation not in _TRANSPOSE:
        return image  # 1 (or unknown): as stored, not copied
    dims, transpose = _TRANSPOSE[orientation]
    if transpose:
        image = image.transpose(-2, -1)
    return (image.flip(dims) if dims else image).contiguous()


def to_rgb_tensor(image: Any, max_pixels: Optional[int] = MAX_PIXELS) -> torch.Tensor:
    """One image as a uint8 RGB (3, H, W) CPU tensor, from a path, a PIL image, an (H, W, 3) / (H, W)
    uint8 array, or a uint8 tensor (H, W, 3) or (3, H, W). Paths go through `read_image` (upright)."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(image, "image", max_pixels=max_pixels)
    if isinstance(image, Image.Image):
        check_pixels(image.width, image.height, max_pixels, "(PIL image)")
        # as read_image converts a file's pixels (16-bit grey: the high byte, where convert("RGB") clips at 255)
        return torch.from_numpy(np.ascontiguousarray(_rgb_array(image))).permute(2, 0, 1).contiguous()
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
