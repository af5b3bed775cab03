"""One home for what every layer above needs: normalisation constants, dtype names, device choice,
atomic file writes (and the one-line error a failed write becomes).

Example:
    >>> parse_dtype("bf16"), resolve_device("cpu")
    (torch.bfloat16, device(type='cpu'))
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional, Union

import torch

PathLike = Union[str, "os.PathLike[str]"]

# MMSegmentation's img_norm for all 16 variants (RGB order, on 0..255 values; spec §3.1)
IMAGENET_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
IMAGENET_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
DTYPE_CHOICES = tuple(DTYPES)


def parse_dtype(dtype: Union[str, torch.dtype, None], default: torch.dtype = torch.float32) -> torch.dtype:
    """A torch dtype from a name ("float32", "bf16", ...), a torch dtype, or None (`default`).

    Example:
        >>> parse_dtype("fp16"), parse_dtype(None)
        (torch.float16, torch.float32)
    """
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; use one of float32, bfloat16, float16")
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_CHOICES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """'float32', 'bfloat16' or 'float16'."""
    return str(dtype).replace("torch.", "")


def resolve_device(device: Union[str, torch.device, None] = "auto", index: Optional[int] = None) -> torch.device:
    """'auto' (or None) -> CUDA when available, else CPU; 'cuda' -> cuda:`index` (torchrun's LOCAL_RANK).

    An explicit CUDA device on a machine without one is refused with the fix.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if isinstance(device, torch.device):
        device = str(device)
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {device}: PyTorch sees no CUDA GPU; use --device cpu (or auto)")
        if dev.index is None and index is not None:
            dev = torch.device("cuda", index)
    elif dev.type != "cpu":
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    return dev


class WriteError(OSError):
    """A file that could not be written (disk full, no permission, read-only); one line says which
    file, why, how much space is free and that the previous file, if any, was kept."""

    def __str__(self) -> str:
        return str(self.strerror)


def _free_bytes(folder: Path) -> Optional[int]:
    for candidate in (folder, *folder.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def _human(size: Optional[int]) -> str:
    if size is None:
        return "unknown"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"  # pragma: no cover


def write_error(path: PathLike, exc: OSError) -> WriteError:
    """The one-line error for an OSError met while writing `path` (ENOSPC, EACCES, EROFS, ...)."""
    path = Path(path)
    reason = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
              errno.EACCES: "permission denied", errno.EPERM: "permission denied",
              errno.EROFS: "the file system is read-only"}.get(exc.errno or -1, exc.strerror or str(exc))
    kept = "the previous version was kept" if path.exists() else "nothing was written"
    return WriteError(exc.errno, f"cannot write {path}: {reason} ({_human(_free_bytes(path.parent))} free in "
                                 f"{path.parent}); {kept}")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Callable[[BinaryIO], Any],
                 before_rename: Optional[Callable[[], None]] = None, mode: int = 0o644) -> Path:
    """Call `write(file)` on a temporary file beside `path`, fsync, then rename it onto `path`.

    Readers never see half a file; a failure (or a kill) leaves the previous `path` as it was and no
    temporary file behind (except after SIGKILL: `.NAME.tmp-PID` files are safe to delete). An
    OSError becomes a `WriteError` naming the file, the reason and the free space.

    Example:
        >>> import tempfile; p = Path(tempfile.mkdtemp()) / "x.txt"
        >>> atomic_write(p, lambda f: f.write(b"hi")).read_bytes()
        b'hi'
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except WriteError:
        raise
    except OSError as exc:
        raise write_error(path, exc) from exc
    except RuntimeError as exc:  # torch.save's zip writer reports a full disk as "unexpected pos ..."
        free = _free_bytes(path.parent)
        cause = errno.ENOSPC if free is not None and free < (64 << 20) else errno.EIO
        raise write_error(path, OSError(cause, str(exc).strip().splitlines()[0] if str(exc).strip() else
                                        type(exc).__name__)) from exc
    finally:
        if tmp.exists():
            try:
                tmp.unlink()
            except OSError:
                pass
    _fsync_dir(path.parent)
    return path


def write_bytes_atomic(path: PathLike, data: bytes) -> Path:
    """`atomic_write` of a bytes object."""
    return atomic_write(path, lambda f: f.write(data))
