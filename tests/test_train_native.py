"""train/native.c and train/decode.py: the PNG row decoder against hand-filtered scanlines and Pillow, the
native HSV steps against the reference conversions, label windows against the readers, and the build's
fallbacks. (The whole pipeline on both backends is in test_train_pipeline.py.)"""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from eval.datasets import CityscapesDataset, DatasetError
from train import native
from train import transforms as T
from train.data import TrainSet
from train.decode import PngRows
from train.pipeline import RecipePipeline
from zoo.images import ImageError


@pytest.fixture(params=["tuned", "baseline"])
def lib(request):
    """The loops as built for this machine (-march=native), and without tuning (no FMA instructions)."""
    if request.param == "baseline":
        return request.getfixturevalue("baseline_library")
    lib = native.library()
    if lib is None:
        pytest.fail(f"the native loops did not build: {native.why_not()}")
    return lib


# --------------------------------------------------------------------------------------------------
# PNG rows

def _paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def _filter_rows(pixels: np.ndarray, filters) -> bytes:
    """PNG's forward filters (spec section 9), written from the spec, one filter type per row."""
    h, w, bpp = pixels.shape
    rows = pixels.reshape(h, w * bpp).astype(np.int64)
    out = bytearray()
    for y in range(h):
        ftype = filters[y % len(filters)]
        line, up = rows[y], rows[y - 1] if y else np.zeros(w * bpp, np.int64)
        left = np.concatenate([np.zeros(bpp, np.int64), line[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int64), up[:-bpp]])
        if ftype == 0:
            pred = np.zeros_like(line)
        elif ftype == 1:
            pred = left
        elif ftype == 2:
            pred = up
        elif ftype == 3:
            pred = (left + up) // 2
        else:
            pred = np.array([_paeth(a, b, c) for a, b, c in zip(left, up, upleft)])
        out.append(ftype)
        out += ((line - pred) % 256).astype(np.uint8).tobytes()
    return bytes(out)


def _png(pixels: np.ndarray, filters, colour: int, chunk: int = 97, scanlines: bytes = None,
         interlace: int = 0) -> bytes:
    """A PNG file around the filtered rows (or the given `scanlines`), its stream split over several IDAT
    chunks."""
    def chunk_bytes(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w = pixels.shape[:2]
    stream = zlib.compress(scanlines if scanlines is not None else _filter_rows(pixels, filters), 6)
    out = b"\x89PNG\r\n\x1a\n" + chunk_bytes(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, interlace))
    if colour == 3:
        out += chunk_bytes(b"PLTE", bytes(range(256)) * 3)
    for i in range(0, len(stream), chunk):
        out += chunk_bytes(b"IDAT", stream[i:i + chunk])
    return out + chunk_bytes(b"IEND", b"")


@pytest.mark.parametrize("colour,channels", [(2, 3), (0, 1), (3, 1)])
def test_png_rows_undo_every_filter_type_and_read_as_pillow(tmp_path, lib, colour, channels):
    rng = np.random.default_rng(colour)
    pixels = rng.integers(0, 256, (23, 17, channels), dtype=np.uint8)
    pixels[5:12] //= 7  # small residuals too
    path = tmp_path / "x.png"
    path.write_bytes(_png(pixels, [0, 1, 2, 3, 4, 4, 3, 1], colour))
    rows = PngRows.open(path)
    assert rows.size_hw == (23, 17) and rows.channels == channels
    assert np.array_equal(rows.rows(5).numpy(), pixels[:5])  # part, then the rest on demand
    assert np.array_equal(rows.rows(100).numpy(), pixels)
    pil = np.asarray(Image.open(path))
    assert np.array_equal(pil.reshape(pixels.shape), pixels)


def test_png_rows_read_pillows_own_files(tmp_path, lib):
    rng = np.random.default_rng(0)
    photo = np.cumsum(rng.integers(-3, 4, (64, 80, 3)), axis=1).clip(0, 255).astype(np.uint8)
    for name, image in [("rgb.png", Image.fromarray(photo)), ("l.png", Image.fromarray(photo[..., 0])),
                        ("p.png", Image.fromarray(photo).convert("P"))]:
        image.save(tmp_path / name)
        want = np.asarray(Image.open(tmp_path / name))
        got = PngRows.open(tmp_path / name).rows(64).numpy()
        assert np.array_equal(got.reshape(want.shape), want), name


def test_png_rows_decline_what_they_do_not_read_and_name_a_broken_stream(tmp_path, lib):
    rgb = np.zeros((8, 8, 3), np.uint8)
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.zeros((8, 8), np.uint16)).save(tmp_path / "16.png")
    (tmp_path / "short.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    (tmp_path / "interlaced.png").write_bytes(_png(rgb, [0], 2, interlace=1))
    for name in ("rgba.png", "16.png", "interlaced.png"):
        assert PngRows.open(tmp_path / name) is None, name
    assert PngRows.open(tmp_path / "rgba.png", colour_types=(2,)) is None
    good = _png(np.arange(64 * 3, dtype=np.uint8).reshape(8, 8, 3), [1], 2)
    (tmp_path / "cut.png").write_bytes(good[:len(good) // 2])
    # what the reader refuses from the chunk structure is refused before any row, naming the file
    for name, why in (("short.png", "13-byte IHDR"), ("missing.png", "cannot read"), ("cut.png", "truncated")):
        with pytest.raises(ImageError) as refused:
            PngRows.open(tmp_path / name)
        assert name in str(refused.value) and why in str(refused.value)
    scanlines = bytearray(_filter_rows(np.zeros((4, 4, 3), np.uint8), [0]))
    scanlines[2 * (1 + 4 * 3)] = 9  # row 2's filter type
    (tmp_path / "filter.png").write_bytes(_png(np.zeros((4, 4, 3), np.uint8), [0], 2, scanlines=bytes(scanlines)))
    with pytest.raises(ValueError, match="row 2 has an unknown filter type"):
        PngRows.open(tmp_path / "filter.png").rows(4)


# --------------------------------------------------------------------------------------------------
# HSV steps

@pytest.mark.parametrize("width", [31, 64, 100])
@pytest.mark.parametrize("sat,hue", [(0.6, None), (1.45, None), (None, -18), (None, 17), (1.2, 5)])
def test_native_hsv_steps_equal_the_reference_conversions(lib, width, sat, hue):
    """Columns past the last full block of 32 take OpenCV's scalar rounding: widths 31 and 100 test it."""
    g = torch.Generator().manual_seed(width)
    img = torch.randint(0, 256, (3, 40, width), dtype=torch.uint8, generator=g)
    want = img
    if sat is not None:
        hsv = T.rgb_to_hsv_uint8(want)
        hsv[1] = T._convert(hsv[1], alpha=sat)
        want = T.hsv_to_rgb_uint8(hsv)
    if hue is not None:
        hsv = T.rgb_to_hsv_uint8(want)
        hsv[0] = torch.remainder(hsv[0].to(torch.int64) + hue, 180).to(torch.uint8)
        want = T.hsv_to_rgb_uint8(hsv)
    rgb = img.contiguous()
    out = torch.empty_like(rgb)
    sat_lut = None if sat is None else T._convert(torch.arange(256, dtype=torch.uint8), alpha=sat)
    sdiv, hdiv = T._SDIV.contiguous(), T._HDIV180.contiguous()
    lib.hsv_roundtrip(rgb.data_ptr(), 40 * width, width, None if sat_lut is None else sat_lut.data_ptr(),
                      int(hue is not None), int(hue or 0), sdiv.data_ptr(), hdiv.data_ptr(), out.data_ptr())
    assert torch.equal(out, want)


# --------------------------------------------------------------------------------------------------
# resize indices

@pytest.mark.parametrize("in_size,out_size", [(512, 700), (683, 1365), (100, 200), (1024, 512), (97, 97), (2048, 4093),
                                              (7, 300), (300, 7), (1024, 1536), (1000, 1333)])
def test_native_resize_indices_are_pytorchs(lib, in_size, out_size):
    """nearest_index against PyTorch's own nearest resize (P._nearest_index asks F.interpolate), linear_coeffs
    against the Python port, forwards and flipped (step -1)."""
    from train.pipeline import _linear_coeffs, _nearest_index

    idx = torch.empty(out_size, dtype=torch.int64)
    lib.nearest_index(in_size, out_size, 0, out_size, 1, idx.data_ptr())
    assert torch.equal(idx, _nearest_index(in_size, out_size))
    lib.nearest_index(in_size, out_size, out_size - 1, out_size, -1, idx.data_ptr())
    assert torch.equal(idx, _nearest_index(in_size, out_size).flip(0))
    i0, i1 = torch.empty(out_size, dtype=torch.int64), torch.empty(out_size, dtype=torch.int64)
    l0, l1 = torch.empty(out_size), torch.empty(out_size)
    lib.linear_coeffs(in_size, out_size, 0, out_size, 1, i0.data_ptr(), i1.data_ptr(), l0.data_ptr(), l1.data_ptr())
    for got, want in zip((i0, i1, l0, l1), _linear_coeffs(in_size, out_size)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("size_hw", [(61, 97), (150, 260), (96, 192), (47, 90), (48, 96), (200, 97)])
@pytest.mark.parametrize("flip", [False, True])
def test_label_windows_equal_the_window_of_pytorchs_nearest_resize(lib, size_hw, flip):
    """Histogram and labels of a window of the resized mask, against the resize done whole by
    torchvision (the reference pipeline's mask resize), upscaled, downscaled, same size and doubled."""
    from train.pipeline import Labels

    g = torch.Generator().manual_seed(size_hw[0])
    mask = torch.randint(0, 6, (48, 96), dtype=torch.uint8, generator=g)
    mask[10:20, 30:70] = 7
    lut = torch.arange(256, dtype=torch.uint8).roll(3)  # some mapping, as reduce_zero_label's table is
    whole = T.RandomRescale((96, 48)).transform(tv_tensors.Mask(mask[None]), {"size_hw": size_hw})[0]
    for top, left, height, width in [(0, 0, size_hw[0], size_hw[1]), (5, 7, 20, 33), (size_hw[0] - 9, size_hw[1] - 11, 9, 11)]:
        want = whole[top:top + height, left:left + width]
        want = want.flip(-1) if flip else want
        for table in (None, lut):
            out = torch.full((height + 2, width + 3), -1, dtype=torch.int16)
            hist = Labels(mask, table).window(lib, size_hw, (top, left, height, width), flip, out)
            labels = want if table is None else table[want.long()]
            assert torch.equal(out[:height, :width], labels.to(torch.int16))
            assert (out[height:] == -1).all() and (out[:, width:] == -1).all()
            assert torch.equal(hist, torch.bincount(labels.reshape(-1).long(), minlength=256))


# --------------------------------------------------------------------------------------------------
# labels, the build

def test_a_stored_value_outside_the_classes_still_gets_the_readers_named_error(tmp_path, lib):
    root = tmp_path
    for split_dir in ("leftImg8bit/train/c", "gtFine/train/c"):
        (root / split_dir).mkdir(parents=True)
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(root / "leftImg8bit/train/c/c_0_leftImg8bit.png")
    mask = np.zeros((40, 60), np.uint8)
    mask[:, 30:] = 1
    mask[0, 0] = 77  # not a Cityscapes trainId
    Image.fromarray(mask).save(root / "gtFine/train/c/c_0_gtFine_labelTrainIds.png")
    ts = TrainSet(CityscapesDataset(root, "train"), RecipePipeline((32, 32), (60, 40)))
    with pytest.raises(DatasetError, match=r"values outside 0..18 .*\{77: 1\}"):
        ts[(0, 1)]


def test_the_build_is_cached_and_the_pipeline_says_why_it_runs_without_it(tmp_path, monkeypatch):
    first = native.build(tmp_path)
    assert native.build(tmp_path) == first and [p.name for p in tmp_path.iterdir()] == [first.name]
    monkeypatch.setattr(native, "TUNING", ("-fno-such-flag",))  # a compiler that refuses it: FLAGS alone
    assert native.load(native.build(tmp_path)).png_unfilter is not None and len(list(tmp_path.iterdir())) == 2
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    with pytest.raises(OSError, match="no C compiler"):
        native.build(tmp_path / "other")
    native.library.cache_clear()
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    try:
        assert native.library() is None and native.why_not() == "ISA_NATIVE=0"
        with pytest.warns(RuntimeWarning, match=r"native loops are unavailable \(ISA_NATIVE=0\).*PyTorch code"):
            RecipePipeline((32, 32), (60, 40)).warm_up()
    finally:
        native.library.cache_clear()
