"""The training pipeline's native loops: `train/native.c`, compiled on first use with the system C
compiler (as Triton builds its launchers) into `$ISA_HOME/native/` and loaded with ctypes.

`library()` is the loaded library, or None when there is no compiler, the build fails, or
`ISA_NATIVE=0`; the pipeline then runs its PyTorch code, which gives the same pixels, more slowly.
`why_not()` says why it is None. The build is keyed by the source, compiler, flags and CPU, takes
about a second, and is written atomically (workers and ranks may race to build it).

Example:
    >>> lib = library()           # doctest: +SKIP
    >>> lib is not None or why_not()  # doctest: +SKIP
    True
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

from zoo.hub import get_cache_dir

SOURCE = Path(__file__).with_name("native.c")
# -ffp-contract=off: no fused multiply-adds where the reference rounds twice (see native.c)
FLAGS = ("-O3", "-std=c99", "-shared", "-fPIC", "-ffp-contract=off", "-fno-math-errno")
# for the machine it runs on, as PyTorch Inductor's C++ builds are (AVX2 + FMA: 1.6x on the resize);
# a compiler that refuses it gets FLAGS alone
TUNING = ("-march=native",)
ENV_SWITCH = "ISA_NATIVE"

_P, _I = ctypes.c_void_p, ctypes.c_int64
_C = ctypes.c_int
_SIGNATURES = {
    "png_unfilter": (_I, [_P, _I, _I, _I, _P, _P]),
    "nearest_index": (None, [_I, _I, _I, _I, _I, _P]),
    "linear_coeffs": (None, [_I, _I, _I, _I, _I, _P, _P, _P, _P]),
    "mask_last_row": (_I, [_I, _I, _I, _I]),
    "mask_window": (_I, [_P, _I, _I, _I, _I, _I, _I, _I, _I, _I, _C, _P, _P, _I, _P]),
    "hsv_roundtrip": (None, [_P, _I, _I, _P, _C, _C, _P, _P, _P]),
    "resize_last_row": (_I, [_I, _I, _I, _I]),
    "resize_distort": (_I, [_P, _I, _I, _I, _I, _I, _I, _I, _I, _I, _I, _I, _C, _P, _P, _C, _C, _P, _C, _P, _P,
                            _P, _I, _I]),
}
_why_not: Optional[str] = None


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu() -> bytes:
    """What -march=native depends on: the CPU's feature flags (Linux), else the platform's name for it."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            for line in f:
                if line.startswith((b"flags", b"Features")):
                    return line
    except OSError:
        pass
    return platform.processor().encode()


def build(cache_dir: Optional[Path] = None) -> Path:
    """Compile `native.c` (if not cached) and return the shared library's path; raises OSError or
    CalledProcessError with the compiler's message."""
    cc = _compiler()
    if cc is None:
        raise OSError("no C compiler found (set CC, or install cc / gcc / clang)")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, cc.encode(), " ".join(FLAGS + TUNING).encode(),
                                     platform.machine().encode(), _cpu()])).hexdigest()[:16]
    out_dir = Path(cache_dir) if cache_dir is not None else get_cache_dir() / "native"
    target = out_dir / f"isa_data_{key}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        built = Path(tmp) / target.name
        for flags in (FLAGS + TUNING, FLAGS):
            command = [cc, *flags, "-o", str(built), str(SOURCE), "-lm"]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode == 0:
                break
        done.check_returncode()
        os.replace(built, target)  # atomic: a racing build of the same key writes the same bytes
    return target


def load(path: Path) -> ctypes.CDLL:
    """A built library, its functions typed."""
    lib = ctypes.CDLL(str(path))
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


@functools.lru_cache(maxsize=1)
def library() -> Optional[ctypes.CDLL]:
    """The compiled loops, or None (then `why_not()` says why)."""
    global _why_not
    if os.environ.get(ENV_SWITCH, "1") == "0":
        _why_not = f"{ENV_SWITCH}=0"
        return None
    try:
        lib = load(build())
        _why_not = None
        return lib
    except subprocess.CalledProcessError as err:
        _why_not = f"compiling {SOURCE.name} failed: {(err.stderr or '').strip()[-500:]}"
    except OSError as err:
        _why_not = str(err)
    return None


def why_not() -> Optional[str]:
    """Why `library()` is None (None when it is loaded or not tried yet)."""
    return _why_not
