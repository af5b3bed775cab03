"""What a set of weights is: the one metadata schema of every .safetensors file the project writes.

`convert`, `download` and training all write `ModelMeta.to_metadata()` into the file's header, so a file
describes itself: variant, classes (names and palette), label conventions, normalisation, the test
pipeline it was validated with, its provenance and the project version. `create_model(weights=FILE)`
builds the model from it without a name; files without it (other tools' exports) still load when a
variant name is given, with the variant's own settings. Values are JSON in safetensors' str -> str header.

>>> from zoo.registry import get_config
>>> meta = ModelMeta.for_variant(get_config("isanet_r50-d8_512x512_20k_voc12aug"))
>>> meta.num_classes, meta.classes[:2], ModelMeta.from_metadata(meta.to_metadata()) == meta
(21, ('background', 'aeroplane'), True)
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from .classes import dataset_meta, default_palette
from .inference import TestSettings
from .registry import VariantConfig, get_config

SCHEMA_VERSION = 2
"""Version of the metadata schema (1: variant, num_classes, classes, source only); bump on incompatible change."""


class MetadataError(ValueError):
    """Metadata that is malformed or contradicts itself or the tensors; the message names the key and the fix."""


def project_version() -> str:
    """The installed isa-triton version (``unknown`` when run from a source tree that is not installed)."""
    try:
        from importlib.metadata import version

        return version("isa-triton")
    except Exception:
        return "unknown"


@dataclass(frozen=True)
class ModelMeta:
    """Everything needed to use a set of weights besides the tensors."""

    variant: str
    num_classes: int
    classes: Tuple[str, ...]
    palette: Tuple[Tuple[int, int, int], ...]
    test: TestSettings
    ignore_index: int = 255
    reduce_zero_label: bool = False
    source_file: Optional[str] = None
    source_sha256: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)  # e.g. train_iters, best_iter, best_mIoU, mmseg_version
    class_weights: Optional[Tuple[float, ...]] = None  # the loss's class weights a training run used (optional)

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise MetadataError(f"num_classes must be >= 1, got {self.num_classes}")
        if len(self.classes) != self.num_classes:
            raise MetadataError(f"'classes' lists {len(self.classes)} names but num_classes is {self.num_classes}")
        if len(self.palette) != self.num_classes:
            raise MetadataError(f"'palette' has {len(self.palette)} colours but num_classes is {self.num_classes}")
        if 0 <= self.ignore_index < self.num_classes:
            raise MetadataError(f"ignore_index {self.ignore_index} is also a class index (0..{self.num_classes - 1})")
        if self.class_weights is not None and len(self.class_weights) != self.num_classes:
            raise MetadataError(f"'class_weights' has {len(self.class_weights)} values but num_classes is "
                                f"{self.num_classes}")

    @classmethod
    def for_variant(cls, config: VariantConfig, num_classes: Optional[int] = None,
                    classes: Optional[Sequence[str]] = None, palette: Optional[Sequence[Sequence[int]]] = None,
                    **changes: Any) -> "ModelMeta":
        """The variant's own meta (its dataset's classes and palette, its test pipeline); a different
        `num_classes` without names gets `class_<i>` and a generated palette. Keyword changes win."""
        k = int(num_classes or (len(classes) if classes else config.num_classes))
        if classes is None:
            classes = dataset_meta(config.dataset).classes if k == config.num_classes else \
                tuple(f"class_{i}" for i in range(k))
        if palette is None:
            palette = dataset_meta(config.dataset).palette if k == config.num_classes and \
                len(dataset_meta(config.dataset).palette) == k else default_palette(k)
        values: Dict[str, Any] = dict(variant=config.name, num_classes=k, classes=tuple(classes),
                                      palette=tuple(tuple(int(v) for v in c) for c in palette),
                                      test=TestSettings.from_config(config),
                                      reduce_zero_label=bool(config.reduce_zero_label and k == config.num_classes))
        values.update(changes)
        return cls(**values)

    @property
    def config(self) -> VariantConfig:
        """The variant's registry config."""
        return get_config(self.variant)

    def to_metadata(self) -> Dict[str, str]:
        """The safetensors header entries (str -> str)."""
        out = {
            "format": "pt",  # safetensors' convention for torch tensors
            "format_version": str(SCHEMA_VERSION),
            "isa_triton_version": project_version(),
            "variant": self.variant,
            "num_classes": str(self.num_classes),
            "classes": json.dumps(list(self.classes)),
            "palette": json.dumps([list(c) for c in self.palette]),
            "ignore_index": str(self.ignore_index),
            "reduce_zero_label": json.dumps(self.reduce_zero_label),
            "mean": json.dumps(list(self.test.mean)),
            "std": json.dumps(list(self.test.std)),
            "align_corners": json.dumps(self.test.align_corners),
            "test_mode": self.test.mode,
            "test_scale_wh": json.dumps(list(self.test.scale_wh)),
            "test_crop_hw": json.dumps(list(self.test.crop_hw) if self.test.crop_hw else None),
            "test_stride_hw": json.dumps(list(self.test.stride_hw) if self.test.stride_hw else None),
            "ms_flip_ratios": json.dumps(list(self.test.ratios)),
        }
        if self.source_file:
            out["source_file"] = self.source_file
        if self.source_sha256:
            out["source_sha256"] = self.source_sha256
        if self.class_weights is not None:
            out["class_weights"] = json.dumps([float(w) for w in self.class_weights])
        for key, value in self.extra.items():
            out[key] = value if isinstance(value, str) else json.dumps(value)
        return out

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], where: str = "metadata") -> "ModelMeta":
        """Parse and check a safetensors header (schema 1 or 2); missing test settings come from the variant.

        Raises MetadataError naming `where` and the key for anything malformed or contradictory.
        """
        if not metadata.get("variant"):
            raise MetadataError(f"{where}: no 'variant' entry, so the file does not say which model it is; "
                                "pass the variant name (--model NAME / create_model(NAME, weights=...))")
        try:
            config = get_config(metadata["variant"])
        except KeyError as exc:
            raise MetadataError(f"{where}: 'variant' {metadata['variant']!r} is not a known model ({exc.args[0]})") \
                from None

        def read(key: str, default: Any = None, kind: type = object) -> Any:
            if key not in metadata:
                return default
            raw = metadata[key]
            try:
                value = json.loads(raw) if kind is not str else raw
            except ValueError:
                raise MetadataError(f"{where}: entry {key!r} is not valid JSON: {raw[:80]!r}") from None
            return value

        try:
            num_classes = int(read("num_classes", config.num_classes))
        except (TypeError, ValueError):
            raise MetadataError(f"{where}: 'num_classes' must be an integer, got {metadata['num_classes']!r}") \
                from None
        classes = read("classes")
        if classes is not None and (not isinstance(classes, list) or not all(isinstance(c, str) for c in classes)):
            raise MetadataError(f"{where}: 'classes' must be a JSON list of names")
        palette = read("palette")
        if palette is not None and (not isinstance(palette, list) or not all(
                isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
                for c in palette)):
            raise MetadataError(f"{where}: 'palette' must be a JSON list of [r, g, b] (0..255)")
        base = TestSettings.from_config(config)
        try:
            test = dataclasses.replace(
                base,
                scale_wh=tuple(read("test_scale_wh", base.scale_wh)),
                mean=tuple(float(v) for v in read("mean", base.mean)),
                std=tuple(float(v) for v in read("std", base.std)),
                align_corners=bool(read("align_corners", base.align_corners)),
                ratios=tuple(float(v) for v in read("ms_flip_ratios", base.ratios)),
                mode=read("test_mode", base.mode, str),
                crop_hw=_opt_pair(read("test_crop_hw", base.crop_hw)),
                stride_hw=_opt_pair(read("test_stride_hw", base.stride_hw)))
        except (TypeError, ValueError) as exc:
            raise MetadataError(f"{where}: bad test settings: {exc}") from None
        known = {"format", "format_version", "isa_triton_version", "variant", "num_classes", "classes", "palette",
                 "ignore_index", "reduce_zero_label", "mean", "std", "align_corners", "test_mode", "test_scale_wh",
                 "test_crop_hw", "test_stride_hw", "ms_flip_ratios", "source_file", "source_sha256", "depth",
                 "class_weights"}
        extra = {k: v for k, v in metadata.items() if k not in known}
        class_weights = read("class_weights")
        if class_weights is not None and (not isinstance(class_weights, list) or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) for w in class_weights)):
            raise MetadataError(f"{where}: 'class_weights' must be a JSON list of numbers")
        try:
            return cls.for_variant(
                config, num_classes, classes, palette, test=test,
                ignore_index=int(read("ignore_index", 255)),
                reduce_zero_label=bool(read("reduce_zero_label", config.reduce_zero_label and
                                            num_classes == config.num_classes)),
                source_file=metadata.get("source_file"), source_sha256=metadata.get("source_sha256"), extra=extra,
                class_weights=None if class_weights is None else tuple(float(w) for w in class_weights))
        except MetadataError as exc:
            raise MetadataError(f"{where}: {exc}") from None


def _opt_pair(value: Any) -> Optional[Tuple[int, int]]:
    return None if value is None else (int(value[0]), int(value[1]))
