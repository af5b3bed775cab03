"""Weights: read MMSegmentation checkpoints safely, validate them, convert to .safetensors, load.

safetensors is the zoo's format. An MMSeg `.pth` (`{'meta', 'state_dict'}`, `{'model': ...}` or a bare
state_dict, optionally with `module.` prefixes) is read with `torch.load(weights_only=True)`, never
`weights_only=False`: a pickle that references anything but tensors and containers is refused
before any of its code can run. The only extra types allowed are plain numpy scalars and dtypes,
which training scripts leave in `meta` (e.g. a numpy `seed`).

Every key and shape is checked against the variant's own model (`ISANet(get_config(name))`), so the
model file is the single source of truth for the state_dict layout (spec §2.2).
"""
from __future__ import annotations

import errno
import hashlib
import logging
import pickle
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .metadata import SCHEMA_VERSION, MetadataError, ModelMeta
from .registry import get_config
from .utils import PathLike, atomic_write

log = logging.getLogger(__name__)

Shape = Tuple[int, ...]


CLASSIFIER_KEYS = (
    "decode_head.conv_seg.weight",
    "decode_head.conv_seg.bias",
    "auxiliary_head.conv_seg.weight",
    "auxiliary_head.conv_seg.bias",
)
"""The only tensors whose shape depends on num_classes (spec §2.2)."""

_NBT = "num_batches_tracked"
_MAX_MODULE_LINES = 12  # per section of a mismatch report; a wrong-depth file would list ~100
# tools/publish_model.py names files <stem>-<first 8 hex of sha256>.pth (spec §7 "publish hash")
_PUBLISH_HASH = re.compile(r"-([0-9a-f]{8})\.pth$")


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


def _sniff(path: Path) -> str:
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
    match = _PUBLISH_HASH.search(path.name)
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


def _read_checkpoint(path: PathLike, verify_hash: bool = True
                     ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any], Optional[str]]:
    """(state_dict, meta or safetensors metadata, sha256 of a .pth or None) — the one safe reader."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "checkpoint not found", str(path))
    kind = _sniff(path)
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
    return _read_checkpoint(path, verify_hash)[0]


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


# --------------------------------------------------------------------------------------------
# validation


@lru_cache(maxsize=8)
def expected_state(name: str, num_classes: Optional[int] = None) -> Dict[str, Tuple[Shape, torch.dtype]]:
    """Key -> (shape, dtype) of variant `name`'s state_dict, taken from the model itself.

    Example:
        >>> expected_state("isanet_r50-d8_512x1024_40k_cityscapes")["decode_head.conv_seg.weight"]
        ((19, 512, 1, 1), torch.float32)
    """
    from .model import ISANet
    from .registry import get_config

    model = ISANet(get_config(name), num_classes=num_classes)
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


@dataclass
class StateDictDiff:
    """Missing, unexpected and mismatched keys of a state_dict against an expected layout."""

    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, str]] = field(default_factory=list)  # (key, "shape ... in file, ... expected")
    hints: Dict[str, str] = field(default_factory=dict)  # module -> hint appended to its line
    notes: List[str] = field(default_factory=list)  # whole-file hints, printed last

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched)

    def format(self, indent: str = "  ") -> str:
        """The report, grouped by module (key minus its last component), one module a line."""
        lines = []
        mismatch_by_module: Dict[str, List[str]] = defaultdict(list)
        for key, what in self.mismatched:
            module, leaf = _split(key)
            mismatch_by_module[module].append(f"{leaf} {what}")
        sections = [
            ("shape mismatch", {m: "; ".join(v) for m, v in mismatch_by_module.items()}),
            ("missing in file", _group(self.missing)),
            ("unexpected in file", _group(self.unexpected)),
        ]
        for title, groups in sections:
            if not groups:
                continue
            lines.append(f"{indent}{title}:")
            for i, (module, text) in enumerate(groups.items()):
                if i == _MAX_MODULE_LINES:
                    rest = list(groups)[i:]
                    lines.append(f"{indent * 2}... and {len(rest)} more modules ({rest[0]} ... {rest[-1]})")
                    break
                hint = f" — {self.hints[module]}" if module in self.hints else ""
                lines.append(f"{indent * 2}{module}: {text}{hint}")
        lines += [f"{indent}hint: {note}" for note in self.notes]
        return "\n".join(lines)

    def summary(self) -> str:
        return (f"{len(self.mismatched)} mismatched, {len(self.missing)} missing, "
                f"{len(self.unexpected)} unexpected keys")


def _split(key: str) -> Tuple[str, str]:
    module, _, leaf = key.rpartition(".")
    return module or "<top>", leaf


def _group(keys: Sequence[str]) -> Dict[str, str]:
    groups: Dict[str, List[str]] = defaultdict(list)
    for key in keys:
        module, leaf = _split(key)
        groups[module].append(leaf)
    return {m: ", ".join(leaves) for m, leaves in groups.items()}


def _fmt_shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _layer3_blocks(keys) -> Optional[int]:
    blocks = {int(m.group(1)) for k in keys if (m := re.match(r"backbone\.layer3\.(\d+)\.", k))}
    return max(blocks) + 1 if blocks else None


def diff_state_dict(state: Mapping[str, torch.Tensor],
                    expected: Mapping[str, Tuple[Shape, torch.dtype]]) -> StateDictDiff:
    """Compare a state_dict with `expected` (key -> (shape, dtype)); `num_batches_tracked` may be absent.

    Example:
        >>> diff = diff_state_dict(read_state_dict("x.pth"), expected_state("isanet_r50-d8_512x1024_40k_cityscapes"))
        >>> print(diff.format()) if diff else None
    """
    diff = StateDictDiff()
    for key, (shape, dtype) in expected.items():
        if key not in state:
            # BN counters only matter for momentum=None; old or hand-made checkpoints may lack them
            if not key.endswith("." + _NBT):
                diff.missing.append(key)
            continue
        tensor = state[key]
        if tuple(tensor.shape) != tuple(shape):
            diff.mismatched.append(
                (key, f"shape {_fmt_shape(tensor.shape)} in file, {_fmt_shape(shape)} expected"))
        elif tensor.is_floating_point() != dtype.is_floating_point:
            diff.mismatched.append((key, f"dtype {tensor.dtype} in file, {dtype} expected"))
    diff.unexpected = [k for k in state if k not in expected]
    _add_hints(diff, state, expected)
    return diff


def _add_hints(diff: StateDictDiff, state: Mapping[str, torch.Tensor],
               expected: Mapping[str, Tuple[Shape, torch.dtype]]) -> None:
    from .registry import get_config, list_models

    depth_of = {6: 50, 23: 101}
    file_blocks, want_blocks = _layer3_blocks(state), _layer3_blocks(expected)
    file_depth = depth_of.get(file_blocks or -1)
    if file_blocks and want_blocks and file_blocks != want_blocks:
        which = f"a ResNet-{file_depth} variant" if file_depth else "another backbone"
        pattern = f"isanet_r{file_depth}*" if file_depth else "*"
        diff.notes.append(f"backbone.layer3 has {file_blocks} blocks in file, {want_blocks} expected: this "
                          f"checkpoint is for {which}; pick one from `isa list '{pattern}'`")
    key = "decode_head.conv_seg.weight"
    if key in state and key in expected and state[key].dim() == 4:
        file_classes, want_classes = int(state[key].shape[0]), expected[key][0][0]
        if file_classes != want_classes:
            depth = file_depth or {v: k for k, v in depth_of.items()}.get(want_blocks)
            fits = [n for n in list_models() if get_config(n).num_classes == file_classes
                    and (depth is None or get_config(n).depth == depth)]
            if fits:
                hint = (f"this checkpoint is for a {file_classes}-class variant; pass --model {fits[0]} "
                        f"or num_classes={file_classes}")
            else:
                hint = (f"this checkpoint has {file_classes} classes (a fine-tuned model?): convert it with "
                        f"`isa convert SRC DST --model NAME --num-classes {file_classes}` "
                        f"(num_classes={file_classes} in Python)")
            diff.hints["decode_head.conv_seg"] = hint


# --------------------------------------------------------------------------------------------
# conversion


def _owned_contiguous(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """safetensors refuses tensors that share storage or are views: copy exactly those."""
    seen = set()
    out = {}
    for key, t in tensors.items():
        storage = t.untyped_storage()
        whole = storage.nbytes() == t.numel() * t.element_size()
        if not t.is_contiguous() or not whole or storage.data_ptr() in seen:
            t = t.contiguous().clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def save_weights(state: Mapping[str, torch.Tensor], path: PathLike, meta: ModelMeta) -> Path:
    """Write a state_dict and its `ModelMeta` as the zoo's .safetensors, atomically (the one writer).

    Example:
        >>> model = create_model("isanet_r50-d8_512x1024_40k_cityscapes")
        >>> save_weights(model.state_dict(), "r50.safetensors", model.meta)
        PosixPath('r50.safetensors')
    """
    from safetensors.torch import save

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"destination {path} must end with .safetensors")
    tensors = _owned_contiguous({k: v.detach().cpu() for k, v in state.items()})
    classifier = tensors.get(CLASSIFIER_KEYS[0])
    if classifier is not None and int(classifier.shape[0]) != meta.num_classes:
        raise MetadataError(f"{path}: the classifier has {int(classifier.shape[0])} classes but the metadata says "
                            f"{meta.num_classes}")
    return atomic_write(path, lambda f: f.write(save(tensors, metadata=meta.to_metadata())))


def convert_checkpoint(src: PathLike, dst: PathLike, name: str, *,
                       num_classes: Optional[int] = None) -> Path:
    """Convert an MMSegmentation checkpoint for variant `name` to the zoo's .safetensors.

    Reads `src` safely, checks every key and shape against the variant's model (a mismatch raises
    CheckpointError grouped by module with the fix), keeps dtypes (int64 `num_batches_tracked`
    included; missing ones are written as 0) and writes `dst` atomically with the metadata schema of
    `zoo.metadata` (class names and palette from the checkpoint's meta when it has them, else the
    variant's dataset's; the source file and its sha256).

    Example:
        >>> convert_checkpoint("isanet_r50-d8_512x1024_40k_cityscapes_20210901_054739-981bd763.pth",
        ...                    "r50_cityscapes.safetensors", "isanet_r50-d8_512x1024_40k_cityscapes")
        PosixPath('r50_cityscapes.safetensors')
    """
    src, dst = Path(src), Path(dst)
    if dst.suffix != ".safetensors":
        raise ValueError(f"destination {dst} must end with .safetensors")
    config = get_config(name)  # KeyError with close matches for a typo
    state, meta, source_sha256 = _read_checkpoint(src)
    if source_sha256 is None:
        source_sha256 = sha256_file(src)
    expected = expected_state(name, num_classes)
    diff = diff_state_dict(state, expected)
    if diff:
        classes = expected["decode_head.conv_seg.weight"][0][0]
        raise CheckpointError(f"{src}: does not match {name} ({classes} classes): {diff.summary()}\n"
                              + diff.format())
    tensors: Dict[str, torch.Tensor] = {}
    for key, (shape, dtype) in expected.items():  # the model's order
        if key not in state:  # a missing BN counter (diff allows only those)
            tensors[key] = torch.zeros(shape, dtype=dtype)
        elif not dtype.is_floating_point and state[key].dtype != dtype:
            tensors[key] = state[key].to(dtype)  # e.g. int32 counters; values are small integers
        else:
            tensors[key] = state[key]
    classes = expected["decode_head.conv_seg.weight"][0][0]
    names, palette = meta.get("CLASSES"), meta.get("PALETTE")
    names = list(names) if isinstance(names, (list, tuple)) and len(names) == classes \
        and all(isinstance(n, str) for n in names) else None
    palette = [list(c) for c in palette] if isinstance(palette, (list, tuple)) and len(palette) == classes \
        and all(isinstance(c, (list, tuple)) and len(c) == 3 for c in palette) else None
    extra = {f"source_{k}": meta[k] for k in ("mmseg_version", "mmcv_version", "exp_name") if isinstance(meta.get(k), str)}
    model_meta = ModelMeta.for_variant(config, classes, names, palette, source_file=src.name,
                                       source_sha256=source_sha256, extra=extra)
    save_weights(tensors, dst, model_meta)
    log.info("wrote %s (%s, %d classes, %d tensors) from %s", dst, name, classes, len(tensors), src)
    return dst


def read_model_meta(path: PathLike, metadata: Optional[Mapping[str, str]] = None) -> Optional[ModelMeta]:
    """The `ModelMeta` a .safetensors file carries, or None when it has none (a .pth, another tool's file).

    Malformed or contradictory metadata raises MetadataError naming the file and the key.
    """
    path = Path(path)
    if metadata is None:
        if _sniff(path) != "safetensors" and path.suffix != ".safetensors":
            return None
        metadata = read_metadata(path)
    if not metadata.get("variant"):
        return None
    return ModelMeta.from_metadata(metadata, where=str(path))


# --------------------------------------------------------------------------------------------
# loading


def load_weights(model: nn.Module, path: PathLike, *, strict_classifier: bool = True) -> List[str]:
    """Load a .safetensors (or .pth, converted in memory) into an ISANet; returns re-initialised keys.

    Everything loads strictly except the two classifiers (`decode_head.conv_seg`,
    `auxiliary_head.conv_seg`): when the checkpoint's class count differs from the model's and the
    model was built with a non-default `num_classes` (fine-tuning) or `strict_classifier=False`,
    they are skipped and re-initialised with MMSeg's init (Normal std 0.01, bias 0). With the
    variant's own num_classes and `strict_classifier=True`, a class mismatch means the file belongs
    to another variant and raises CheckpointError naming the fix. A file whose metadata contradicts
    its tensors (class count) raises MetadataError.

    Example:
        >>> model = ISANet(get_config("isanet_r50-d8_512x1024_40k_cityscapes"), num_classes=5)
        >>> load_weights(model, "isanet_r50-d8_512x1024_40k_cityscapes.safetensors")
        ['decode_head.conv_seg.weight', 'decode_head.conv_seg.bias', 'auxiliary_head.conv_seg.weight', 'auxiliary_head.conv_seg.bias']
    """
    path = Path(path)
    state, metadata, _ = _read_checkpoint(path)
    file_weight = state.get(CLASSIFIER_KEYS[0])
    if metadata.get("num_classes", "").isdigit() and file_weight is not None \
            and int(metadata["num_classes"]) != int(file_weight.shape[0]):
        raise MetadataError(f"{path}: its metadata says num_classes={metadata['num_classes']} but the classifier "
                            f"{CLASSIFIER_KEYS[0]} has {int(file_weight.shape[0])}; the file was altered after it "
                            "was written: re-export it")
    target = model.state_dict()
    expected = {k: (tuple(v.shape), v.dtype) for k, v in target.items()}
    config = getattr(model, "config", None)
    model_classes = int(getattr(model, "num_classes", expected[CLASSIFIER_KEYS[0]][0][0]))
    deliberate = config is not None and model_classes != int(config.num_classes)

    skipped: List[str] = []
    if (file_weight is not None and CLASSIFIER_KEYS[0] in expected
            and tuple(file_weight.shape[:1]) != expected[CLASSIFIER_KEYS[0]][0][:1]
            and (deliberate or not strict_classifier)):
        skipped = [k for k in CLASSIFIER_KEYS if k in expected]
        state = {k: v for k, v in state.items() if k not in CLASSIFIER_KEYS}
        expected = {k: v for k, v in expected.items() if k not in CLASSIFIER_KEYS}

    diff = diff_state_dict(state, expected)
    if diff:
        variant = getattr(config, "name", type(model).__name__)
        raise CheckpointError(f"{path}: does not fit {variant} (num_classes={model_classes}): "
                              f"{diff.summary()}\n" + diff.format())
    if metadata.get("variant") and config is not None and metadata["variant"] != config.name:
        log.info("%s was written for %s; loading it into %s (same layout)", path,
                 metadata["variant"], config.name)

    result = model.load_state_dict(state, strict=False)
    leftover = [k for k in result.missing_keys if k not in skipped and not k.endswith("." + _NBT)]
    if leftover or result.unexpected_keys:  # diff_state_dict should have caught these
        raise CheckpointError(f"{path}: load_state_dict left missing {leftover}, "
                              f"unexpected {result.unexpected_keys}")
    if skipped:
        from .model import init_classifier

        for module_name in sorted({k.rsplit(".", 1)[0] for k in skipped}):
            init_classifier(model.get_submodule(module_name))
        log.info("%s: checkpoint has %d classes, model %d: re-initialised %s", path,
                 int(file_weight.shape[0]), model_classes, ", ".join(skipped))
    return skipped
