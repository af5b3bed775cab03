"""The one safe reader of checkpoints: .safetensors files and MMSegmentation / PyTorch .pth files.

An MMSeg `.pth` (`{'meta', 'state_dict'}`, `{'model': ...}` or a bare state_dict, optionally with
`module.` prefixes) is read with `torch.load(weights_only=True)`, never `weights_only=False`: a pickle
that references anything but tensors and containers is refused before any of its code can run. The
only extra types allowed are plain numpy scalars and dtypes, which training scripts leave in `meta`
(e.g. a numpy `seed`). Weights with NaN or infinite values are refused, naming the tensor.
"""
from __future__ import annotations

import errno
import hashlib
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from .metadata import SCHEMA_VERSION
from .utils import PathLike

# tools/publish_model.py names files <stem>-<first 8 hex of sha256>.pth (spec §7 "publish hash")
PUBLISH_HASH = re.compile(r"-([0-9a-f]{8})\.pth$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names file and fix."""


class UnsafeCheckpointError(CheckpointError):
    """A .pth whose pickle references code (anything beyond tensors, containers, numpy scalars)."""


# --------------------------------------------------------------------------------------------
# reading


def _numpy_safe_globals() -> list:
    """Plain numpy scalars and dtypes, under their numpy 1.x and 2.x pickle names.

    A numpy scalar pickles as `numpy.core.multiarray.scalar(dtype, raw bytes)` (numpy 2:
    `numpy._core...`); numpy 2 also needs the concrete dtype classes for the BUILD step. Object,
    void and string dtypes are left out: only numbers and bools, which carry no code.
    """
    try:
        import numpy as np
    except ImportError:  # numpy is a dependency, but a missing one should not break safetensors loading
        return []
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    allowed: list = [np.dtype, scalar, (scalar, "numpy.core.multiarray.scalar"),
                     (scalar, "numpy._core.multiarray.scalar")]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25
    for stem in ("Bool", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64",
                 "Byte", "UByte", "Short", "UShort", "Int", "UInt", "Long", "ULong", "LongLong",
                 "ULongLong", "Float16", "Float32", "Float64", "LongDouble", "Complex64",
                 "Complex128", "CLongDouble"):
        cls = getattr(dtypes, stem + "DType", None)
        if cls is not None and cls not in allowed:
            allowed.append(cls)
    return allowed


def _allowed_global_names() -> set:
    names = set()
    for entry in _numpy_safe_globals():
        if isinstance(entry, tuple):
            names.add(entry[1])
        else:
            names.add(f"{entry.__module__}.{entry.__qualname__}")
    return names


def sha256_file(path: PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed.

    Example:
        >>> sha256_file("model.pth")[:8]  # the suffix MMSeg's publish_model.py puts in file names
        '981bd763'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def sniff_format(path: Path) -> str:
    """'safetensors', 'torch' (zip or legacy pickle) or 'unknown', from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
    if not head:
        raise CheckpointError(f"{path}: file is empty (interrupted download or copy?)")
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    if len(head) == 9 and head[8:9] == b"{":  # u64 little-endian header length, then JSON
        return "safetensors"
    return "unknown"


def _check_publish_hash(path: Path, sha256: str) -> None:
    match = PUBLISH_HASH.search(path.name)
    if match and not sha256.startswith(match.group(1)):
        raise CheckpointError(
            f"{path}: sha256 starts with {sha256[:8]} but the file name says {match.group(1)} "
            "(MMSeg's publish convention): the file is corrupt or incomplete; download it again, "
            "or rename it if you changed it on purpose")


def _torch_load(path: Path) -> Any:
    """torch.load(weights_only=True) with numpy scalars allowed; code-carrying pickles refused."""
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()), warnings.catch_warnings():
            # a foreign or corrupt pickle would also warn about its protocol; the error says enough
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = _refused_globals(path, exc)
        # torch's own rebuild functions are allowed when intact: a refused `torch.*` name means a
        # truncated/corrupt pickle (e.g. "torch._utils._r"), not code; either way nothing ran
        if any(not (n == "torch" or n.startswith("torch.")) for n in refused):
            # one line on purpose: this is what a user sees for a malicious or foreign file
            raise UnsafeCheckpointError(
                f"{path}: refused to load: its pickle references {', '.join(refused)}, which could run "
                "code (only tensors, containers and numpy scalars are allowed); if you trust the file, "
                "re-save its state_dict alone in a trusted environment: "
                "torch.save(torch.load(SRC, weights_only=False)['state_dict'], DST)") from None
        raise CheckpointError(f"{path}: cannot read this PyTorch checkpoint (truncated or corrupt?): "
                              f"{_weights_only_reason(exc)}") from None
    except CheckpointError:
        raise
    except Exception as exc:  # zip/EOF/runtime errors from a truncated or foreign file
        raise CheckpointError(f"{path}: cannot read this PyTorch checkpoint (truncated or corrupt?): "
                              f"{_first_line(exc)}") from exc


def _refused_globals(path: Path, exc: BaseException) -> List[str]:
    """The globals and classes weights_only refused (read from opcodes or torch's message; nothing runs)."""
    try:  # zip checkpoints: every offending global, found by scanning the pickle's opcodes
        allowed = _allowed_global_names()
        refused = [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(path) if n not in allowed]
        if refused:
            return refused
    except Exception:  # legacy (non-zip) format or unreadable: fall back to torch's message
        pass
    message = str(exc)
    found = re.findall(r"GLOBAL ([\w.]+)", message) + re.findall(r"but got <class '([\w.]+)'>", message)
    return sorted(set(found))


def _weights_only_reason(exc: BaseException) -> str:
    """The specific line of torch's long weights_only error ('Unsupported operand 0', ...)."""
    match = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(exc))
    # first sentence only: torch goes on to suggest allowlisting, wrong advice for a damaged file
    return match.group(1).strip().split(". ")[0] if match else _first_line(exc)


def _unwrap(obj: Any, path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(state_dict without `module.` prefixes, meta) from any of the accepted containers."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state_dict "
                              "(expected {'state_dict': {...}}, {'model': {...}} or a name->tensor dict)")
    meta = obj.get("meta") if isinstance(obj.get("meta"), Mapping) else {}
    state = obj
    for wrapper in ("state_dict", "model"):
        if isinstance(obj.get(wrapper), Mapping):
            state = obj[wrapper]
            break
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        shown = ", ".join(repr(k) for k in not_tensors[:5])
        raise CheckpointError(
            f"{path}: entries {shown} are not tensors, so this is not a state_dict "
            "(expected {'state_dict': {...}}, {'model': {...}} or a name->tensor dict)")
    out: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        # DataParallel/DDP checkpoints prefix every key with `module.`
        name = key[len("module."):] if key.startswith("module.") else key
        if name in out:
            raise CheckpointError(f"{path}: key {name!r} appears both with and without 'module.'")
        out[name] = value
    return out, dict(meta)


def _read_safetensors(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    from safetensors import safe_open

    try:
        tensors = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except Exception as exc:  # SafetensorError: bad header, buffer shorter than the header says, ...
        raise CheckpointError(f"{path}: cannot read this .safetensors file (truncated or corrupt?): "
                              f"{_first_line(exc)}") from exc
    version = metadata.get("format_version")
    if version is not None and version.isdigit() and int(version) > SCHEMA_VERSION:
        raise CheckpointError(f"{path}: written with metadata schema {version} (isa-triton "
                              f"{metadata.get('isa_triton_version', '?')}), this isa-triton reads up to "
                              f"{SCHEMA_VERSION}; upgrade isa-triton")
    return tensors, metadata


def read_checkpoint(path: PathLike, verify_hash: bool = True
                     ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any], Optional[str]]:
    """(state_dict, meta or safetensors metadata, sha256 of a .pth or None) — the one safe reader."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "checkpoint not found", str(path))
    kind = sniff_format(path)
    if kind == "unknown" and path.suffix == ".safetensors":
        kind = "safetensors"
    if kind == "safetensors":
        tensors, metadata = _read_safetensors(path)
        state, _ = _unwrap(tensors, path)
        check_finite(state, path)
        return state, metadata, None
    if kind == "unknown":
        raise CheckpointError(f"{path}: neither a .safetensors file nor a PyTorch checkpoint "
                              "(unrecognised header; truncated or corrupt?)")
    sha256 = sha256_file(path)
    if verify_hash:
        _check_publish_hash(path, sha256)
    state, meta = _unwrap(_torch_load(path), path)
    check_finite(state, path)
    return state, meta, sha256


def check_finite(state: Mapping[str, torch.Tensor], path: PathLike) -> None:
    """Refuse weights with NaN or infinite values, naming the first bad tensor (a diverged or corrupt file
    would otherwise load silently and predict one class everywhere)."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            kind = "NaN" if bool(torch.isnan(tensor).any()) else "infinite"
            raise CheckpointError(f"{path}: tensor {key!r} has {bad} {kind} value(s) of {tensor.numel()}: the "
                                  "weights are corrupt or come from a diverged run; use an earlier checkpoint")


def read_state_dict(path: PathLike, *, verify_hash: bool = True) -> Dict[str, torch.Tensor]:
    """The state_dict of a .safetensors file or an MMSeg/PyTorch .pth, read safely.

    Accepts `{'state_dict': ...}`, `{'model': ...}` or a bare state_dict; strips `module.`;
    ignores `meta`/`optimizer`. A .pth named `...-<8 hex>.pth` must match that sha256 prefix
    (publish_model.py / torch.hub convention) unless `verify_hash=False`.
    Raises FileNotFoundError, CheckpointError (corrupt, not a state_dict) or UnsafeCheckpointError.

    Example:
        >>> sd = read_state_dict("resnet50_v1c-2cccc1ad.pth")  # ImageNet weights work too
        >>> sd["stem.0.weight"].shape
        torch.Size([32, 3, 3, 3])
    """
    return read_checkpoint(path, verify_hash)[0]


def read_metadata(path: PathLike) -> Dict[str, str]:
    """The metadata of a zoo .safetensors file (variant, num_classes, source_sha256, ...).

    Example:
        >>> read_metadata("isanet_r50-d8_512x1024_40k_cityscapes.safetensors")["num_classes"]
        '19'
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "checkpoint not found", str(path))
    return _read_safetensors(path)[1]
