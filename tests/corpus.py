"""A seeded corpus of hostile image and mask files (tens of them, tiny), and folder datasets around them.

Each case is one file a user might have (or an attacker might write): a PNG whose IDAT CRC is wrong,
whose deflate stream is broken (its CRCs recomputed, so only the zlib stream can tell), interlaced and
broken, truncated, with two IHDR chunks, without IEND, claiming 65500x65500 pixels, whose zlib stream
is complete but short (the rows a decoder would zero-fill), a palette PNG without PLTE; a JPEG of a few
hundred bytes claiming 65500x65500, a truncated JPEG, a BMP claiming a huge size, a text file and an
empty file named .png; an image of extreme aspect ratio (a resize to a side of 0); masks that are
JPEGs (named .png, or .jpg beside a .jpg image), oversized, short, doubled-IHDR, bad-CRC, truncated.

`make_corpus(seed)` returns the cases; `make_dataset(root, case)` writes a folder dataset whose train
and val splits hold the case's file as the sample "bad" (and a clean sample "a" in train);
`make_dataset(root, None)` is the same dataset with clean files. `python tests/corpus.py DIR` writes
every case's file to DIR (for `scripts/fuzz_reader.py` or a look by hand).
"""
from __future__ import annotations

import io
import json
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

SIZE_HW = (40, 48)
CLASSES = ["background", "thing"]


@dataclass(frozen=True)
class Case:
    """A hostile file: ``role`` "image" or "mask", its file ``suffix``, its bytes, and a word the refusal
    must contain (besides the file's name)."""

    name: str
    role: str
    suffix: str
    data: bytes
    expect: str


# ---------------------------------------------------------------------------------------------- PNG pieces

def chunk(kind: bytes, payload: bytes, crc: Optional[int] = None) -> bytes:
    """One PNG chunk (length, type, payload, CRC; `crc` overrides the right one)."""
    value = zlib.crc32(kind + payload) if crc is None else crc
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", value & 0xFFFFFFFF)


def chunks(data: bytes) -> List[Tuple[bytes, bytes]]:
    """(type, payload) of each chunk of a well-formed PNG."""
    out, pos = [], 8
    while pos + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        out.append((kind, data[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return out


def assemble(parts: List[Tuple[bytes, bytes]]) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunk(k, p) for k, p in parts)


def encode(array: np.ndarray, fmt: str = "PNG", **kw: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **kw)
    return buffer.getvalue()


def photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth RGB picture with noise (compresses like a photo, not like a flat colour)."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y) * 7) % 256], -1)
    return (base + rng.integers(0, 24, (h, w, 3))).clip(0, 255).astype(np.uint8)


def label_map(h: int, w: int) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 1
    return mask


def _short_stream(array: np.ndarray, rows: int) -> bytes:
    """A PNG whose zlib stream is complete (its checksum right) but holds only `rows` scanlines."""
    parts = chunks(encode(array))
    channels = 1 if array.ndim == 2 else array.shape[2]
    raw = b"".join(b"\x00" + array[r].tobytes() for r in range(rows))
    assert channels in (1, 3)
    return assemble([p for p in parts if p[0] != b"IDAT"][:-1] + [(b"IDAT", zlib.compress(raw)), (b"IEND", b"")])


def _replace(parts: List[Tuple[bytes, bytes]], kind: bytes, payload: bytes) -> List[Tuple[bytes, bytes]]:
    return [(k, payload if k == kind else p) for k, p in parts]


def _png_cases(prefix: str, role: str, array: np.ndarray, rng: np.random.Generator) -> List[Case]:
    good = encode(array)
    parts = chunks(good)
    idat_at = good.index(b"IDAT")
    bad_crc = bytearray(good)
    bad_crc[idat_at + 4 + 10] ^= 0x55  # a flipped bit in the pixel data, the CRC left as it was
    ihdr = dict(parts)[b"IHDR"]
    huge = struct.pack(">II", 65500, 65500) + ihdr[8:]
    second = struct.pack(">II", SIZE_HW[1] // 2, SIZE_HW[0] // 2) + ihdr[8:]
    idat = dict(parts)[b"IDAT"]
    broken = bytes([idat[0] ^ 0x0F]) + idat[1:]  # the zlib header: no inflater gets past it
    cut = int(len(good) * (0.4 + 0.3 * rng.random()))
    cases = [
        Case(f"{prefix}_idat_crc", role, ".png", bytes(bad_crc), "CRC"),
        Case(f"{prefix}_bad_deflate", role, ".png", assemble(_replace(parts, b"IDAT", broken)), "corrupt PNG"),
        Case(f"{prefix}_truncated", role, ".png", good[:cut], "truncated"),
        Case(f"{prefix}_two_ihdr", role, ".png", assemble(parts[:1] + [(b"IHDR", second)] + parts[1:]), "IHDR"),
        Case(f"{prefix}_no_iend", role, ".png", assemble(parts[:-1]), "IEND"),
        Case(f"{prefix}_huge_ihdr", role, ".png", assemble(_replace(parts, b"IHDR", huge)), "megapixels"),
        Case(f"{prefix}_short_stream", role, ".png", _short_stream(array, 2), "ends early"),
    ]
    return cases


def _jpeg_huge(array: np.ndarray) -> bytes:
    data = bytearray(encode(array[:8, :8], "JPEG", quality=50))
    pos = 2
    while pos < len(data):  # patch the frame header's size: a few hundred bytes claiming 65500x65500
        marker, length = data[pos + 1], (data[pos + 2] << 8) | data[pos + 3]
        if 0xC0 <= marker <= 0xC2:
            data[pos + 5:pos + 9] = struct.pack(">HH", 65500, 65500)
            break
        pos += 2 + length
    return bytes(data)


def _bmp_huge() -> bytes:
    header = struct.pack("<2sIHHI", b"BM", 54 + 12, 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, 60000, 60000, 1, 24, 0, 12, 2835, 2835, 0, 0)
    return header + info + b"\0" * 12


def make_corpus(seed: int = 0) -> List[Case]:
    """Every hostile case, built from seeded pixels (tiny: 40x48)."""
    rng = np.random.default_rng(seed)
    h, w = SIZE_HW
    rgb = photo(rng, h, w)
    cases = _png_cases("png", "image", rgb, rng)
    interlaced = encode(rgb)
    inter_parts = chunks(interlaced)
    ihdr = bytearray(dict(inter_parts)[b"IHDR"])
    ihdr[12] = 1  # interlaced (Adam7), with a stream no inflater accepts
    idat = dict(inter_parts)[b"IDAT"]
    cases.append(Case("png_interlaced_bad_deflate", "image", ".png",
                      assemble(_replace(_replace(inter_parts, b"IHDR", bytes(ihdr)), b"IDAT",
                                        idat[:2] + bytes(rng.integers(0, 256, len(idat) - 2, dtype=np.uint8)))),
                      "corrupt PNG"))
    buffer = io.BytesIO()
    Image.fromarray(rgb).convert("P").save(buffer, "PNG")
    palette = chunks(buffer.getvalue())
    cases.append(Case("png_palette_without_plte", "image", ".png",
                      assemble([p for p in palette if p[0] != b"PLTE"]), "PLTE"))
    jpeg = encode(rgb, "JPEG", quality=90)
    cases += [
        Case("jpeg_huge_sof", "image", ".jpg", _jpeg_huge(rgb), "megapixels"),
        Case("jpeg_truncated", "image", ".jpg", jpeg[:len(jpeg) * 2 // 3], "truncated"),
        Case("bmp_huge", "image", ".png", _bmp_huge(), "megapixels"),
        Case("text_named_png", "image", ".png", b"this is not an image\n" * 4, "not a PNG"),
        Case("empty_file", "image", ".png", b"", "not a PNG"),
        Case("extreme_aspect", "image", ".png", encode(photo(rng, 1, 600)), "side of 0"),
    ]
    mask = label_map(h, w)
    cases += _png_cases("mask", "mask", mask, rng)
    cases += [
        Case("mask_jpeg_named_png", "mask", ".png", encode(mask * 200, "JPEG", quality=95), "lossy"),
        Case("mask_jpeg_suffix", "mask", ".jpg", encode(mask * 200, "JPEG", quality=95), "lossy"),
    ]
    return cases


# ---------------------------------------------------------------------------------------------- datasets

def make_dataset(root: Path, case: Optional[Case], seed: int = 0) -> Path:
    """A 2-class folder dataset: train {a, bad}, val {bad}; "bad" is the case's file (clean if None)."""
    rng = np.random.default_rng(seed + 1)
    h, w = SIZE_HW
    root = Path(root)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "masks" / split).mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps({"classes": CLASSES}))
    clean_image, clean_mask = encode(photo(rng, h, w)), encode(label_map(h, w))
    (root / "images/train/a.png").write_bytes(clean_image)
    (root / "masks/train/a.png").write_bytes(clean_mask)
    image_suffix = case.suffix if case is not None and case.role == "image" else ".png"
    image, mask, mask_suffix = clean_image, clean_mask, ".png"
    if case is not None and case.name == "extreme_aspect":
        mask = encode(label_map(1, 600))
    if case is not None and case.role == "image":
        image = case.data
    elif case is not None:
        mask, mask_suffix = case.data, case.suffix
        if mask_suffix == ".jpg":  # the .jpg-beside-.jpg case: the image is a JPEG too
            image, image_suffix = encode(photo(rng, h, w), "JPEG", quality=90), ".jpg"
    for split in ("train", "val"):
        (root / "images" / split / f"bad{image_suffix}").write_bytes(image)
        (root / "masks" / split / f"bad{mask_suffix}").write_bytes(mask)
    return root


def write_corpus(folder: Path, seed: int = 0) -> Dict[str, Path]:
    """Every case's file in `folder` (name + suffix); returns name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for case in make_corpus(seed):
        paths[case.name] = folder / f"{case.name}{case.suffix}"
        paths[case.name].write_bytes(case.data)
    return paths




# ---------------------------------------------------------------------------------------------- commands

MODEL = "isanet_r50-d8_512x512_20k_voc12aug"
COMMANDS = ("check-data", "train", "train-unchecked", "eval", "predict")


def argv_for(command: str, data: Path, work: Path) -> Optional[List[str]]:
    """The `isa` command line of `command` on the dataset `data` (tiny: crop 32, test scale 64x32, random
    weights, one iteration); None where the command does not read the dataset's files (predict: images)."""
    small = ["--device", "cpu", "--no-progress", "--test-scale", "64", "32"]
    if command == "check-data":
        return ["check-data", str(data)]
    if command.startswith("train"):
        return ["train", "--model", MODEL, "--data", str(data), "--weights", "none", "--backbone-weights", "none",
                "--iters", "1", "--crop-size", "32", "32", "--batch-size", "2", "--threads", "1",
                "--eval-interval", "100", "--work-dir", str(work), *small] + (
                    ["--no-check-data"] if command == "train-unchecked" else [])
    if command == "eval":
        return ["eval", "--model", MODEL, "--weights", "none", "--data", str(data), "--split", "val", *small]
    images = sorted((data / "images" / "val").iterdir())
    return ["predict", "--model", MODEL, "--weights", "none", *map(str, images), "--out-dir", str(work), *small]


def drive(commands: List[str], folder: Path, names: List[str]) -> None:
    """Run each `isa COMMAND` in this process on the clean dataset, then on each named case's dataset; print
    a JSON line per run: the command, the case, rc, the output's tail, an exception that escaped `isa` (with
    its traceback), and the peak RSS of the run (Linux: the high-water mark is reset before each run through
    /proc/self/clear_refs; elsewhere the process's peak so far). Run it in a child: a signal kills the
    child, and the test sees it."""
    import contextlib
    import re
    import resource
    import traceback

    def reset_peak() -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    def peak_rss() -> int:
        try:
            with open("/proc/self/status") as f:
                return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024
        except (OSError, AttributeError):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    from isa.cli import main

    cases = {c.name: c for c in make_corpus()}
    for name in ["clean"] + names:
        for command in commands:
            if command == "predict" and name != "clean" and cases[name].role == "mask":
                continue  # predict reads no mask
            root = folder / command / name
            data = make_dataset(root / "data", None if name == "clean" else cases[name])
            argv = argv_for(command, data, root / "work")
            out, escaped, rc = io.StringIO(), None, None
            reset_peak()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                try:
                    rc = main(argv)
                except SystemExit as exc:
                    rc = exc.code
                except BaseException:  # noqa: BLE001 - the test reports it as an unnamed exception
                    escaped = traceback.format_exc()
            print(json.dumps({"command": command, "case": name, "rc": rc, "out": out.getvalue()[-3000:],
                              "escaped": escaped, "peak_rss": peak_rss()}), flush=True)

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "drive":  # drive COMMAND FOLDER CASE...
        drive(sys.argv[2].split(","), Path(sys.argv[3]), sys.argv[4:])
    else:
        written = write_corpus(Path(sys.argv[1] if len(sys.argv) > 1 else "corpus"))
        print(f"wrote {len(written)} files")
