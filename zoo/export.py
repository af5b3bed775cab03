"""Export the eval-mode network to ONNX or to a torch.export / AOTInductor package (`isa export`).

What is exported is `ISANet`'s eval-mode forward: a normalised float32 batch (N, 3, H, W) -> logits
(N, K, H, W) at the input size, with ISA's zero padding of the 1/8 feature map and both sparse
attentions inside the graph (eager permute + matmul + softmax path). The test pipeline stays outside:
keep-ratio resize, normalisation with `meta.test.mean/std`, sliding windows, multi-scale + flip and the
resize back to the photo are the caller's (`zoo.Segmenter` does them around an ONNX file too).

The weights' `zoo.metadata.ModelMeta` travels with the file, in the project's one schema
(`ModelMeta.to_metadata()` plus `export_*` entries): ONNX `metadata_props`, or a JSON file beside a
`.pt2` (`model.pt2` -> `model.json`). Nothing half-written is left at the destination: files are
written under a temporary name and renamed into place.

- ONNX: `torch.onnx.export(dynamo=True)`, opset 18 by default. `dynamic=True` makes N, H and W dynamic.
- pt2: `torch.export` + `torch._inductor.aoti_compile_and_package`; load it with
  `torch._inductor.aoti_load_package(path)` in any process with the same torch, without this project.

Tested on the CPU only (torch 2.14, onnxruntime 1.32). A CUDA package would differ: see `export_model`.

Example:
    >>> model = zoo.create_model("isanet_r50-d8_512x1024_40k_cityscapes", weights="auto")  # doctest: +SKIP
    >>> export_model(model, "r50.onnx", size=(512, 1024), dynamic=True)                     # doctest: +SKIP
    >>> logits = OnnxRuntimeModel("r50.onnx")(torch.randn(1, 3, 512, 1024))                # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from .inference import TestSettings
from .metadata import ModelMeta
from .model import MIN_INPUT_SIZE, ISANet
from .utils import PathLike, resolve_device, write_error

FORMATS = ("onnx", "pt2")
ONNX_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "image", "logits"
# the ResNet-D8 backbone's three stride-2 stages: the ISA head sees ceil(H / 8) x ceil(W / 8)
OUTPUT_STRIDE = 8
# the attention backends each format is tested with; triton is a CUDA custom op that neither an ONNX
# graph nor a self-contained package can hold today (see export_model for what a CUDA package would need)
EXPORTABLE_BACKENDS = {"onnx": ("eager",), "pt2": ("eager",)}


class ExportError(RuntimeError):
    """An export that could not be done; the message names the stage, the cause and the fix."""


def sidecar_path(package: PathLike) -> Path:
    """The metadata JSON written beside a `.pt2` package (`model.pt2` -> `model.json`)."""
    return Path(package).with_suffix(".json")


def format_from_path(path: PathLike) -> str:
    """'onnx' or 'pt2' from a destination's suffix; ValueError naming the fix otherwise."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        raise ValueError(f"cannot tell the export format from {path}: end it with .onnx or .pt2, or pass "
                         f"--format {'|'.join(FORMATS)}")
    return suffix


def check_export_args(format: str, size: Sequence[int], out: PathLike, backend: str) -> Tuple[int, int]:
    """Validate what `export_model` is asked before any work; returns (H, W). Errors name the fix."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; use one of {', '.join(FORMATS)}")
    if len(size) != 2:
        raise ValueError(f"size must be (H, W), got {tuple(size)}")
    h, w = int(size[0]), int(size[1])
    if h < MIN_INPUT_SIZE or w < MIN_INPUT_SIZE:
        raise ValueError(f"size {h}x{w} is too small: H and W must be at least {MIN_INPUT_SIZE} (the 1/8 feature "
                         f"map needs 4 pixels a side); e.g. --size 512x1024")
    if Path(out).suffix.lower() != f".{format}":
        raise ValueError(f"--out {out} must end with .{format} for --format {format}")
    if backend not in EXPORTABLE_BACKENDS[format]:
        if backend == "triton":
            raise ValueError(f"the triton attention backend cannot be exported to {format} here: its fused "
                             "kernels are a CUDA custom op that the exported graph cannot contain; export with "
                             "--backend eager (the same attention as permute + matmul + softmax)")
        raise ValueError(f"backend {backend!r} cannot be exported to {format}; use one of "
                         f"{', '.join(EXPORTABLE_BACKENDS[format])}")
    return h, w


def padded_trace_size(size: Sequence[int], block_size: Sequence[int] = (8, 8)) -> Tuple[int, int]:
    """`size`, moved by one feature-map pixel along each axis whose 1/8 map would need no ISA padding.

    A dynamic-shape trace keeps the branch of `ISAHead.forward` it ran: traced where the feature map
    needs padding on both axes, the graph holds the pad and crop with symbolic amounts (zero at sizes
    that need none), so it is right at every size; traced where it needs none, it would not pad at all.
    torch.export also records a guard for the branch (height padding != 0); the ONNX graph and the
    AOTInductor package do not check it, which the tests rely on and check at sizes with no, height-only,
    width-only and both paddings. A branch-free `ISAHead` padding would remove the guard (issue 13).

    Example:
        >>> padded_trace_size((512, 1024)), padded_trace_size((65, 97))
        ((520, 1032), (65, 97))
    """
    out = []
    for n, block in zip(size, block_size):
        n = int(n)
        if math.ceil(n / OUTPUT_STRIDE) % int(block) == 0:
            n += OUTPUT_STRIDE
        out.append(n)
    return out[0], out[1]


def export_metadata(meta: ModelMeta, format: str, size: Sequence[int], dynamic: bool,
                    **extra: Any) -> Dict[str, str]:
    """`meta.to_metadata()` (the project's one schema) plus what the exported file expects (`export_*`)."""
    info = {"export_format": format, "export_input": f"{INPUT_NAME}: normalised float32 RGB (N, 3, H, W), "
                                                     "mean/std as in 'mean'/'std'",
            "export_output": f"{OUTPUT_NAME}: float32 (N, num_classes, H, W) at the input size",
            "export_size_hw": [int(size[0]), int(size[1])], "export_dynamic": bool(dynamic),
            "export_torch_version": torch.__version__, **extra}
    return dataclasses.replace(meta, extra={**meta.extra, **info}).to_metadata()


def export_model(model: ISANet, out: PathLike, format: Optional[str] = None, size: Sequence[int] = (512, 1024),
                 *, dynamic: bool = False, backend: str = "eager", opset: int = ONNX_OPSET,
                 device: Union[str, torch.device] = "cpu", batch_size: int = 1) -> Path:
    """Write `model`'s eval-mode forward (normalised batch -> logits) as ONNX or a `.pt2` package.

    `format` defaults to `out`'s suffix. `size` (H, W) is the traced input size; with `dynamic`, N, H
    and W are free at run time (any H, W >= 32). The model is copied: `model` keeps its mode and
    backend. Returns `out`; for pt2 the metadata JSON is `sidecar_path(out)`.

    CPU packages (tested) run the eager attention. A CUDA package (`device="cuda"`; not tested: no GPU
    here) is compiled for that GPU's kernels, and fp32 selects the eager attention there too; putting the
    fused Triton attention into a package would need `isa_triton`'s custom op to be a
    `torch.library.triton_op` whose launches go through `wrap_triton`, so that AOTInductor compiles the
    user-defined kernels into the package instead of calling back into Python.

    Example:
        >>> export_model(zoo.create_model("isanet_r50-d8_512x1024_40k_cityscapes"), "r50.onnx",
        ...              size=(64, 96), dynamic=True)                                     # doctest: +SKIP
        PosixPath('r50.onnx')
    """
    out = Path(out)
    format = format or format_from_path(out)
    h, w = check_export_args(format, size, out, backend)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if format == "onnx" and opset < 17:
        raise ValueError(f"opset must be >= 17, got {opset}")
    dev = resolve_device(device)
    if format == "onnx" and dev.type != "cpu":
        raise ValueError("ONNX export traces on the CPU; the .onnx file runs on any onnxruntime device")
    net = copy.deepcopy(model).eval().to(dev).set_backend(backend)
    for p in net.parameters():
        p.requires_grad_(False)
    trace_hw = padded_trace_size((h, w), net.decode_head.down_factor) if dynamic else (h, w)
    # a batch of 1 would be specialised to 1 (torch.export's 0/1 rule); trace two when N is dynamic
    n = max(2, batch_size) if dynamic else batch_size
    example = torch.randn(n, 3, *trace_hw, generator=torch.Generator().manual_seed(0)).to(dev)
    metadata = export_metadata(net.meta, format, (h, w), dynamic,
                               **({"export_opset": opset} if format == "onnx" else {"export_device": str(dev)}))
    if format == "onnx":
        _export_onnx(net, example, out, dynamic, opset, metadata)
    else:
        _export_pt2(net, example, out, dynamic, metadata)
    return out


def _dynamic_shapes(dynamic: bool) -> Optional[Dict[str, Dict[int, Any]]]:
    if not dynamic:
        return None
    from torch.export import Dim

    # Dim.DYNAMIC, not named Dims: the head's `if pad_h or pad_w` adds a guard on the traced branch,
    # which named Dims would report as a constraint violation (padded_trace_size picks the branch)
    return {"x": {0: Dim.DYNAMIC, 2: Dim.DYNAMIC, 3: Dim.DYNAMIC}}


def _temporary(path: Path, suffix: str = "") -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")


@contextlib.contextmanager
def _writing(*paths: Path) -> Iterator[List[Path]]:
    """Temporary paths beside `paths`, renamed onto them when the block succeeds, removed otherwise."""
    temps = [_temporary(p, p.suffix) for p in paths]
    try:
        for p in paths:
            p.parent.mkdir(parents=True, exist_ok=True)
        yield temps
        for tmp, p in zip(temps, paths):
            os.replace(tmp, p)
    except OSError as exc:
        raise write_error(paths[0], exc) from exc
    finally:
        for tmp in temps:
            with contextlib.suppress(OSError):
                tmp.unlink()


def _failure(stage: str, out: Path, exc: BaseException) -> ExportError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ExportError(f"{stage} failed: {type(exc).__name__}: {first[:500]}; nothing was written to {out}")


def _export_onnx(net: ISANet, example: torch.Tensor, out: Path, dynamic: bool, opset: int,
                 metadata: Dict[str, str]) -> None:
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's translator)
    except ImportError:
        raise ExportError("ONNX export needs onnx and onnxscript: pip install -e '.[export]'") from None
    try:
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            program = torch.onnx.export(net, (example,), dynamo=True, opset_version=opset,
                                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        dynamic_shapes=_dynamic_shapes(dynamic), verbose=False)
    except Exception as exc:  # the exporter raises many kinds; all mean the same to the user
        raise _failure("ONNX export (torch.onnx.export)", out, exc) from exc
    program.model.metadata_props.update(metadata)
    with _writing(out) as (tmp,):
        program.save(tmp, external_data=False)


def _export_pt2(net: ISANet, example: torch.Tensor, out: Path, dynamic: bool, metadata: Dict[str, str]) -> None:
    import torch._inductor  # noqa: F401  (not imported by `import torch`)

    try:
        with torch.no_grad():
            program = torch.export.export(net, (example,), dynamic_shapes=_dynamic_shapes(dynamic), strict=False)
    except Exception as exc:
        raise _failure("torch.export", out, exc) from exc
    sidecar = sidecar_path(out)
    with _writing(out, sidecar) as (tmp, tmp_json):
        try:
            torch._inductor.aoti_compile_and_package(program, package_path=str(tmp))
        except Exception as exc:
            raise _failure("AOTInductor compilation (aoti_compile_and_package)", out, exc) from exc
        tmp_json.write_text(json.dumps(metadata, indent=1) + "\n")


# --------------------------------------------------------------------------------------------------
# running an exported ONNX file


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        # a RuntimeError, so `isa predict --runtime onnxruntime` prints the fix instead of a traceback
        raise RuntimeError("running an ONNX file needs onnxruntime: pip install -e '.[export]'") from None
    return onnxruntime


def read_onnx_meta(path: PathLike) -> ModelMeta:
    """The `ModelMeta` an exported ONNX file carries in its metadata_props (read through onnxruntime)."""
    session = _onnxruntime().InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return ModelMeta.from_metadata(session.get_modelmeta().custom_metadata_map, where=str(path))


class OnnxRuntimeModel:
    """An exported ONNX file run by onnxruntime on the CPU, as a callable: normalised batch -> logits.

    It is what `zoo.Segmenter(weights="model.onnx", runtime="onnxruntime")` runs instead of the PyTorch
    model; `meta` and `test_settings` come from the file's metadata. Static exports check the input
    shape and say how to re-export; a batch larger than a static batch of 1 runs image by image.

    Example:
        >>> runner = OnnxRuntimeModel("r50.onnx", threads=2)                      # doctest: +SKIP
        >>> runner(torch.randn(1, 3, 512, 1024)).shape                            # doctest: +SKIP
        torch.Size([1, 19, 512, 1024])
    """

    def __init__(self, path: PathLike, threads: int = 0, providers: Optional[Sequence[str]] = None) -> None:
        ort = _onnxruntime()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX file not found: {self.path} (write one with `isa export`)")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), options,
                                                providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as exc:  # onnxruntime's own exception types (InvalidGraph, Fail, ...)
            raise ValueError(f"{self.path} is not an ONNX model onnxruntime can load: {exc}") from None
        (inp,) = self.session.get_inputs()
        self.input_name = inp.name
        # None (or a name) for a dynamic axis, an int for a static one
        self.input_shape = tuple(d if isinstance(d, int) else None for d in inp.shape)
        self.meta = ModelMeta.from_metadata(self.session.get_modelmeta().custom_metadata_map, where=str(self.path))

    @property
    def test_settings(self) -> TestSettings:
        """The test pipeline the exported weights were validated with (`meta.test`)."""
        return self.meta.test

    def __repr__(self) -> str:
        shape = "x".join("?" if d is None else str(d) for d in self.input_shape)
        return f"OnnxRuntimeModel({str(self.path)!r}, {self.meta.variant}, input {shape})"

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"expected a batch (N, 3, H, W), got shape {tuple(x.shape)}")
        for axis, name in ((1, "channels"), (2, "height"), (3, "width")):
            want = self.input_shape[axis]
            if want is not None and want != x.shape[axis]:
                h, w = self.input_shape[2:]
                raise ValueError(f"{self.path} was exported for a fixed {h}x{w} input and got "
                                 f"{x.shape[2]}x{x.shape[3]} ({name} differs): the test pipeline resizes each image "
                                 "to its own size, so re-export with `isa export ... --dynamic`")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, K, H, W) float32 of a normalised batch, on `x`'s device."""
        self._check(x)
        fixed_batch = self.input_shape[0]
        if fixed_batch is not None and x.shape[0] != fixed_batch:
            if fixed_batch != 1:
                raise ValueError(f"{self.path} was exported for batches of {fixed_batch}, got {x.shape[0]}")
            return torch.cat([self(x[i:i + 1]) for i in range(x.shape[0])])
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits,) = self.session.run([OUTPUT_NAME], {self.input_name: array})
        return torch.from_numpy(logits).to(x.device)

    @classmethod
    def for_segmenter(cls, model: Any, weights: Any, *, device: Union[str, torch.device] = "auto",
                      dtype: Union[str, torch.dtype] = "auto", num_classes: Optional[int] = None,
                      threads: int = 0) -> "OnnxRuntimeModel":
        """Check `zoo.Segmenter`'s arguments for runtime='onnxruntime' and open the file."""
        if model is not None and not isinstance(model, str):
            raise ValueError("runtime='onnxruntime' runs an exported file: pass weights='model.onnx', not a model")
        if weights is None or str(weights) == "auto" or Path(weights).suffix.lower() != ".onnx":
            raise ValueError(f"runtime 'onnxruntime' needs an exported .onnx file as the weights, got {weights!r}; "
                             "write one with `isa export NAME --format onnx --dynamic --out model.onnx`")
        if str(device) not in ("auto", "cpu"):
            raise ValueError(f"runtime 'onnxruntime' runs on the CPU here; got device {device!r} (use --device cpu)")
        if dtype not in ("auto", "float32", "fp32", torch.float32):
            raise ValueError(f"an exported ONNX file computes in float32; got dtype {dtype!r} (use --dtype float32)")
        if num_classes is not None:
            raise ValueError("num_classes cannot change an exported file's classifier; export the model you want")
        runner = cls(weights, threads=threads)
        if model is not None and model != runner.meta.variant:
            raise ValueError(f"{weights} holds {runner.meta.variant}, not {model}; drop --model or pass that file")
        return runner
