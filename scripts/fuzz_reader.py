"""Fuzz the one reader (zoo.images) and the training decoders behind it for N seconds.

    python scripts/fuzz_reader.py --seconds 60 [--seed 0] [--work DIR] [--asan]

Seeds: every hostile case of `tests/corpus.py` (an interlaced PNG among them) plus valid PNG (grey, RGB,
palette, RGBA, 16-bit), JPEG (baseline, progressive, EXIF-rotated), BMP, WebP and GIF files. Each round mutates
seeds (bit flips, random bytes, truncation, chunk duplication, inserted bytes; PNG chunk CRCs recomputed
on half of them so that the zlib streams and scanline filters are reached, JPEG frame sizes patched)
and runs every mutant through `probe`, `read_image` as an image and as a mask, and the training path
(`train.decode.open_image` / `open_mask`, all PNG rows). A named refusal (`ImageError` / ValueError) is
the expected end; anything else is reported: a signal (the batch runs in a child process, so a segfault
or an AddressSanitizer abort is seen and the file kept under WORK/crashes/), or another exception type
(kept under WORK/unnamed/). `--asan` builds `train/native.c` with AddressSanitizer and runs the children
with it preloaded. Exit code 1 when anything was found.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def seeds(seed: int) -> list:
    """The files mutations start from: the hostile corpus and valid files of every format."""
    import io

    import numpy as np
    from PIL import Image

    from corpus import make_corpus, photo

    rng = np.random.default_rng(seed)
    rgb = photo(rng, 24, 31)
    out = [c.data for c in make_corpus(seed)]

    def save(image, fmt, **kw):
        buffer = io.BytesIO()
        image.save(buffer, fmt, **kw)
        out.append(buffer.getvalue())

    exif = Image.Exif()
    exif[0x0112] = 6
    save(Image.fromarray(rgb), "PNG")
    save(Image.fromarray(rgb[..., 0]), "PNG")
    save(Image.fromarray(rgb).convert("P"), "PNG")
    save(Image.fromarray(rgb).convert("RGBA"), "PNG")
    save(Image.fromarray(rgb[..., 0].astype(np.uint16) * 200), "PNG")
    save(Image.fromarray(rgb), "JPEG", quality=90, exif=exif.tobytes())
    save(Image.fromarray(rgb), "JPEG", quality=70, progressive=True)
    save(Image.fromarray(rgb), "BMP")
    save(Image.fromarray(rgb), "WEBP", lossless=True)
    save(Image.fromarray(rgb), "GIF")
    return out


def _fix_png_crcs(data: bytearray) -> bytearray:
    pos = 8
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        end = pos + 8 + length
        if end + 4 > len(data):
            break
        data[end:end + 4] = struct.pack(">I", zlib.crc32(bytes(data[pos + 4:end])) & 0xFFFFFFFF)
        pos = end + 4
    return data


def mutate(data: bytes, rnd: random.Random) -> bytes:
    """One mutant of `data`."""
    out = bytearray(data)
    for _ in range(rnd.randint(1, 4)):
        op = rnd.randrange(6)
        if not out:
            out = bytearray(rnd.randbytes(rnd.randint(1, 64)))
        elif op == 0:  # bit flips
            for _ in range(rnd.randint(1, 8)):
                out[rnd.randrange(len(out))] ^= 1 << rnd.randrange(8)
        elif op == 1:  # random bytes
            at = rnd.randrange(len(out))
            out[at:at + 4] = rnd.randbytes(4)
        elif op == 2:  # truncation
            del out[rnd.randrange(len(out)):]
        elif op == 3:  # duplicate a slice (chunks, markers)
            a = rnd.randrange(len(out))
            b = min(len(out), a + rnd.randint(1, 200))
            out[a:a] = out[a:b]
        elif op == 4:  # inserted bytes
            at = rnd.randrange(len(out))
            out[at:at] = rnd.randbytes(rnd.randint(1, 16))
        else:  # large sizes in headers
            at = rnd.randrange(len(out))
            out[at:at + 4] = struct.pack(">I", rnd.choice([0, 1, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 65500 << 16]))
    if out[:8] == b"\x89PNG\r\n\x1a\n" and rnd.random() < 0.5:
        out = _fix_png_crcs(out)  # past the CRCs: the zlib stream and the filters are reached
    return bytes(out)


# ------------------------------------------------------------------------------------------------ child

def child(folder: Path, asan_library: str) -> None:
    """Run every file of `folder` through the readers; print one JSON line per file before and after."""
    import resource

    from train import native
    from train.decode import PngRows, open_image, open_mask
    from zoo.images import ImageError, probe, read_image

    if asan_library:
        lib = native.load(Path(asan_library))
        native.library = lambda: lib  # type: ignore[assignment]
    for path in sorted(folder.iterdir()):
        print(json.dumps({"start": path.name}), flush=True)
        unnamed = []
        steps = [lambda: probe(path), lambda: read_image(path, "image"), lambda: read_image(path, "mask"),
                 lambda: open_image(path), lambda: open_mask(path)]
        for step in steps:
            try:
                got = step()
                if isinstance(got, PngRows):
                    got.rows(got.size_hw[0])
            except (ImageError, ValueError):
                pass  # a named refusal
            except Exception as exc:  # noqa: BLE001 - what the fuzzer is for
                unnamed.append(f"{type(exc).__name__}: {exc}"[:300])
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps({"done": path.name, "unnamed": unnamed, "peak_rss": peak}), flush=True)


def _asan_build(work: Path) -> tuple:
    from train import native

    cc = shutil.which(os.environ.get("CC", "cc")) or "cc"
    target = work / "native_asan.so"
    subprocess.run([cc, *native.FLAGS, "-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer", "-o",
                    str(target), str(native.SOURCE), "-lm"], check=True)
    # libstdc++ preloaded with the ASan runtime: its __cxa_throw interceptor needs it (C++ extensions throw)
    runtime = " ".join(subprocess.run([cc, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
                       for name in ("libasan.so", "libstdc++.so.6"))
    return str(target), runtime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=500, help="files per child process")
    parser.add_argument("--work", type=Path, help="folder for batches and findings [a temporary one]")
    parser.add_argument("--asan", action="store_true", help="run train/native.c built with AddressSanitizer")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--asan-library", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.asan_library)
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="fuzz_reader_"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    extra = []
    if args.asan:
        library, runtime = _asan_build(work)
        env.update(LD_PRELOAD=runtime, ASAN_OPTIONS="detect_leaks=0:abort_on_error=1")
        extra = ["--asan-library", library]
    rnd = random.Random(args.seed)
    pool = seeds(args.seed)
    started, total, crashes, unnamed, peak, round_ = time.monotonic(), 0, [], [], 0, 0
    while time.monotonic() - started < args.seconds:
        batch = work / f"batch_{round_:05d}"
        batch.mkdir(exist_ok=True)
        for i in range(args.batch):
            (batch / f"{round_:05d}_{i:04d}.bin").write_bytes(
                mutate(rnd.choice(pool), rnd) if i else rnd.choice(pool))
        pending = sorted(p.name for p in batch.iterdir())
        while pending:
            proc = subprocess.run([sys.executable, __file__, "--child", str(batch), *extra], env=env,
                                  capture_output=True, text=True,
                                  timeout=max(60.0, args.seconds * 2))
            started_names, done = [], set()
            for line in proc.stdout.splitlines():
                record = json.loads(line) if line.startswith("{") else {}
                if "start" in record:
                    started_names.append(record["start"])
                elif "done" in record:
                    done.add(record["done"])
                    peak = max(peak, record["peak_rss"])
                    for message in record["unnamed"]:
                        unnamed.append((record["done"], message))
                        (work / "unnamed").mkdir(exist_ok=True)
                        shutil.copy(batch / record["done"], work / "unnamed" / record["done"])
            total += len(done)
            if proc.returncode != 0:  # a signal or an abort: the file that started and did not finish
                culprit = next((n for n in started_names if n not in done), None)
                crashes.append((culprit, proc.returncode, proc.stderr[-500:]))
                (work / "crashes").mkdir(exist_ok=True)
                if culprit is not None:
                    shutil.copy(batch / culprit, work / "crashes" / culprit)
                    (batch / culprit).unlink()
                    total += 1
            for name in done:
                (batch / name).unlink()
            pending = sorted(p.name for p in batch.iterdir())
            if proc.returncode != 0 and (not pending or culprit is None):
                break
        shutil.rmtree(batch, ignore_errors=True)
        round_ += 1
    elapsed = time.monotonic() - started
    print(f"fuzz_reader: {total} files in {elapsed:.0f} s{' (ASan)' if args.asan else ''}, {len(crashes)} crashes, "
          f"{len(unnamed)} unnamed exceptions, peak RSS of a child {peak / 2**20:.0f} MiB; findings under {work}")
    for name, code, tail in crashes:
        print(f"crash: {name or '(before any file: the child itself)'} (exit {code}): {tail.strip()[-300:]}")
    for name, message in unnamed[:20]:
        print(f"unnamed: {name}: {message}")
    return 1 if crashes or unnamed else 0


if __name__ == "__main__":
    sys.exit(main())
