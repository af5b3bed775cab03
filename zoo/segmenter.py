"""`Segmenter`: photos in, label maps out, with MMSegmentation's test pipeline — the one inference path.

`ISANet.forward` maps a *normalised batch* to logits at its size. A `Segmenter` takes what users have
(paths, PIL images, H×W×3 uint8 arrays or tensors, or lists of them) and runs the whole test pipeline
of the weights: keep-ratio resize to the test scale, normalisation, whole image or sliding windows,
back to each image's original size (optionally 0.x's multi-scale + flip), on the fast inference copy
of the model (BatchNorm folded, channels_last, `torch.inference_mode`, bf16 autocast on GPUs that
have it). Memory is bounded by the network's working size, not by the photo (`zoo.inference`).

Example:
    >>> seg = Segmenter("isanet_r50-d8_512x1024_40k_cityscapes", weights="auto")   # doctest: +SKIP
    >>> labels = seg("street.jpg")                    # (H, W) class indices at the photo's size
    >>> seg.overlay("street.jpg", labels).save("street_overlay.png")              # with a legend
    >>> tuned = Segmenter(weights="runs/mine/model.safetensors")   # a fine-tuned model, by its file
"""
from __future__ import annotations

import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

import torch
from PIL import Image

from .factory import create_model
from .fuse import optimize_for_inference
from .images import MAX_PIXELS, to_rgb_tensor
from .inference import class_maps, view_logits
from .metadata import ModelMeta
from .model import ISANet
from .utils import parse_dtype, resolve_device
from .visualize import overlay_with_legend

ImageLike = Union[str, "os.PathLike[str]", Image.Image, Any]


RANDOM_WEIGHTS = ("none", "random")  # the explicit spellings of random init (--weights none)


def pick_runtime(weights: Any, runtime: str = "auto") -> str:
    """The runtime a weights file needs: onnxruntime for .onnx, torch otherwise; a .pt2 package, or a file
    the chosen runtime cannot run, is refused naming the flag to use."""
    suffix = Path(str(weights)).suffix.lower() if weights is not None else ""
    if suffix == ".pt2":
        raise ValueError(f"{weights} is a torch.export/AOTInductor package (isa export --format pt2), which runs "
                         "outside this project (torch._inductor.aoti_load_package); to predict here pass the "
                         ".safetensors weights it was exported from, or an .onnx export (isa export --format onnx "
                         "--dynamic)")
    if runtime == "auto":
        return "onnxruntime" if suffix == ".onnx" else "torch"
    if runtime == "torch" and suffix == ".onnx":
        raise ValueError(f"{weights} is an ONNX export: run it with --runtime onnxruntime (runtime='onnxruntime'), "
                         "or pass the .safetensors weights it was exported from")
    return runtime


def cpu_has_native_bf16() -> Optional[bool]:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX); None when it cannot be told
    (no /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return None
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def warn_emulated_bf16(device: torch.device, dtype: Optional[torch.dtype]) -> bool:
    """Warn (and return True) when bfloat16 would run emulated on a CPU without native bf16."""
    if device.type != "cpu" or dtype != torch.bfloat16 or cpu_has_native_bf16() is not False:
        return False
    warnings.warn("bfloat16 on this CPU (no AVX512-BF16 or AMX) is emulated: expect it to run several times slower "
                  "than float32 (R-50 at 512x1024 on a 2-thread AVX2 EPYC: 36.7 s against 4.5 s, 8x); use --dtype "
                  "float32 (or auto, which keeps float32 here)", RuntimeWarning, stacklevel=3)
    return True


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a CUDA GPU that computes it natively, float32 elsewhere (exact on the CPU)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


class Segmenter:
    """Segment images with a zoo model; see the module docstring.

    Args:
        model: a variant name, an `ISANet`, or None when `weights` is a self-describing file.
        weights: "auto" (the published weights, downloaded once into the cache; the default), a
            .safetensors/.pth file (an .onnx file runs with onnxruntime), "hf-hub:OWNER/REPO[@REV]" (a Hugging
            Face model repo, e.g. one `isa push` wrote), or "none" for random weights (an explicit choice: a
            smoke test, never a useful predictor; None still means random, with a warning). Ignored with an
            `ISANet` model. Offline, "auto" fails with a message saying where to put the file or how to ask
            for random weights.
        device: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
        dtype: "auto" (bf16 on GPUs with native bf16, else float32), or "float32", "bfloat16", "float16".
        scale_wh: replace the test scale (W, H) of the weights' test pipeline.
        batch_size: how many same-size images run through the network together.
        window_batch: slide mode: how many windows run through the network together (1: one at a time,
            the arithmetic of 0.x; more is faster, with labels that can differ only where two classes tie
            to fp32 rounding).
        max_pixels: refuse larger images (Pillow's decompression-bomb limit by default; 0: none).
        num_classes: another class count than the weights' (their classifiers are then re-initialised).
        runtime: "auto" (onnxruntime for an .onnx file, else torch), "torch", or "onnxruntime" to run an
            exported .onnx file (`weights`; `isa export`) on the CPU without building the PyTorch model:
            classes and test pipeline come from its metadata.
    """

    def __init__(self, model: Union[str, ISANet, None] = None, weights: Union[None, str, "os.PathLike[str]"] = "auto",
                 *, device: Union[str, torch.device] = "auto", dtype: Union[str, torch.dtype] = "auto",
                 backend: str = "auto", scale_wh: Optional[Sequence[int]] = None, batch_size: int = 4,
                 window_batch: int = 1,
                 max_pixels: Optional[int] = MAX_PIXELS, num_classes: Optional[int] = None,
                 runtime: str = "auto") -> None:
        runtime = pick_runtime(weights, runtime)
        if isinstance(model, ISANet) and str(weights) == "auto":
            weights = None  # the default: the model object brings its own weights
        elif weights is None and not isinstance(model, ISANet):
            warnings.warn("Segmenter(weights=None) builds random weights: its labels mean nothing. Pass "
                          "weights='auto' for the published ones, or weights='none' to ask for random ones",
                          UserWarning, stacklevel=2)
        elif str(weights).lower() in RANDOM_WEIGHTS:
            weights = None
        if runtime == "onnxruntime":
            from .export import OnnxRuntimeModel

            net = OnnxRuntimeModel.for_segmenter(model, weights, device=device, dtype=dtype, num_classes=num_classes)
            device = "cpu"
        elif runtime != "torch":
            raise ValueError(f"runtime must be 'auto', 'torch' or 'onnxruntime', got {runtime!r}")
        elif isinstance(model, ISANet):
            net = model
            if weights is not None:
                raise ValueError("pass either a model or weights to load, not both")
        else:
            net = create_model(model, weights=weights, num_classes=num_classes, backend=backend)
        self.device = resolve_device(device)
        self.dtype = default_dtype(self.device) if dtype == "auto" else parse_dtype(dtype)
        if runtime == "torch":
            warn_emulated_bf16(self.device, self.dtype)
        self.meta: ModelMeta = net.meta
        self.settings = net.test_settings
        if scale_wh is not None:
            self.settings = replace(self.settings, scale_wh=(int(scale_wh[0]), int(scale_wh[1])))
        self.batch_size = max(1, int(batch_size))
        self.window_batch = max(1, int(window_batch))
        self.max_pixels = max_pixels
        # either way a callable from a normalised batch to logits, which is all zoo.inference needs; a model
        # built here is converted in place (no second copy of the weights)
        self.model = net if runtime == "onnxruntime" else optimize_for_inference(
            net.eval().to(self.device), copy=isinstance(model, ISANet))

    classes = property(lambda self: self.meta.classes, doc="Class names, in label order.")
    palette = property(lambda self: self.meta.palette, doc="One (r, g, b) colour per class.")
    num_classes = property(lambda self: self.meta.num_classes)

    def __repr__(self) -> str:
        return (f"Segmenter({self.meta.variant!r}, {self.num_classes} classes, {self.settings.mode} "
                f"{self.settings.scale_wh}, {self.device}, {str(self.dtype).replace('torch.', '')})")

    @torch.inference_mode()
    def __call__(self, images: Union[ImageLike, Sequence[ImageLike]], *, probs: bool = False,
                 tta: bool = False) -> Union[torch.Tensor, List[torch.Tensor]]:
        """Label maps (H, W) at each image's original size (uint8 for up to 256 classes, else int64), on
        the CPU; with `probs`, class probabilities (K, H, W) float32. A list in gives a list out; images
        of the same size run as one batch. `tta`: 0.x's multi-scale (0.5-1.75) + flip, averaged."""
        single = not isinstance(images, (list, tuple))
        tensors = [self.load(image) for image in ([images] if single else images)]
        results: List[Optional[torch.Tensor]] = [None] * len(tensors)
        for indices in self._batches(tensors):
            batch = (tensors[indices[0]].unsqueeze(0) if len(indices) == 1 else
                     torch.stack([tensors[i] for i in indices])).to(self.device)
            views = view_logits(self.model, batch, self.settings, tta=tta, dtype=self.dtype,
                                window_batch=self.window_batch)
            maps = class_maps(views, batch.shape[-2:], self.settings.align_corners, probs=probs).cpu()
            for j, i in enumerate(indices):
                results[i] = maps[j]
        return results[0] if single else results  # type: ignore[return-value]

    def load(self, image: ImageLike) -> torch.Tensor:
        """One input as the uint8 RGB (3, H, W) tensor the pipeline reads (paths are EXIF-rotated)."""
        return to_rgb_tensor(image, self.max_pixels)

    def _batches(self, tensors: Sequence[torch.Tensor]) -> List[List[int]]:
        groups: dict = {}
        for i, t in enumerate(tensors):
            groups.setdefault(tuple(t.shape), []).append(i)
        return [ids[k:k + self.batch_size] for ids in groups.values() for k in range(0, len(ids), self.batch_size)]

    def overlay(self, image: ImageLike, labels: Optional[torch.Tensor] = None, alpha: float = 0.5) -> Image.Image:
        """The image blended with its label colours and a legend of the classes present (names from the
        weights' metadata); `labels` defaults to `self(image)`."""
        rgb = self.load(image)
        if labels is None:
            labels = self(rgb)
        return overlay_with_legend(rgb, labels, self.classes, self.palette, alpha)
