"""Weights: validate checkpoints against a variant, convert them to .safetensors, save and load them.

safetensors is the zoo's format; every file it writes carries `zoo.metadata.ModelMeta`. Checkpoints
are read by `zoo.reader` (safely: no pickled code runs, non-finite weights are refused).

Every key and shape is checked against the variant's own model (`ISANet(get_config(name))`), so the
model file is the single source of truth for the state_dict layout (spec §2.2).
"""
from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .metadata import MetadataError, ModelMeta
from .reader import CheckpointError, read_checkpoint, read_metadata, sha256_file, sniff_format
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
    state, meta, source_sha256 = read_checkpoint(src)
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
    extra = {f"source_{k}": meta[k] for k in ("mmseg_version", "mmcv_version", "exp_name")
             if isinstance(meta.get(k), str)}
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
        if sniff_format(path) != "safetensors" and path.suffix != ".safetensors":
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
    state, metadata, _ = read_checkpoint(path)
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
