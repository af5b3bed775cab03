"""`isa export`: the eval-mode network as an ONNX file or a torch.export / AOTInductor package.

    isa export isanet_r50-d8_512x1024_40k_cityscapes --format onnx --size 512x1024 --dynamic --out r50.onnx
    isa export --weights runs/mine/model.safetensors --format pt2 --size 512x1024 --out mine.pt2
    isa predict --runtime onnxruntime --weights r50.onnx photos/ --out-dir preds/
"""
from __future__ import annotations

import argparse
from typing import Any

from isa import UsageError

from .bench import _size  # the one HxW parser of the command line


def run_export(args: argparse.Namespace) -> int:
    """`isa export`: build the model (by name and/or weights file), export it, say what was written."""
    from zoo import create_model
    from zoo.export import check_export_args, export_model, format_from_path, sidecar_path

    if args.name and args.model and args.name != args.model:
        raise UsageError(f"two model names: {args.name} and --model {args.model}")
    name = args.name or args.model
    weights = args.weights
    if name is None and weights in (None, "auto", "none"):
        raise UsageError("name the model: isa export NAME [--weights auto|FILE|none], or --weights FILE written by "
                         "this project (it names its variant)")
    if weights is None:
        weights = "auto"
    fmt = args.format or format_from_path(args.out)
    # refuse bad sizes, formats and backends before loading (or downloading) any weights
    check_export_args(fmt, args.size, args.out, args.backend)
    model = create_model(name, weights=None if weights == "none" else weights, num_classes=args.num_classes)
    print(f"exporting {model.meta.variant} ({model.num_classes} classes) to {fmt}: input (N, 3, "
          f"{'H, W' if args.dynamic else '%d, %d' % tuple(args.size)}) {'dynamic' if args.dynamic else 'static'}, "
          f"{args.backend} attention ...", flush=True)
    out = export_model(model, args.out, fmt, args.size, dynamic=args.dynamic, backend=args.backend,
                       opset=args.opset, device=args.device, batch_size=args.batch_size)
    extra = f" and its metadata {sidecar_path(out)}" if fmt == "pt2" else " (metadata in metadata_props)"
    print(f"wrote {out}{extra}")
    print("input: normalised float32 RGB (N, 3, H, W) with the weights' mean/std; output: logits (N, K, H, W). "
          "Resize, normalisation, sliding windows and the resize back stay outside the graph.")
    return 0


def add_parser(subparsers: Any) -> None:
    """Register `isa export`."""
    from zoo.export import FORMATS, ONNX_OPSET

    p = subparsers.add_parser(
        "export", help="export a model to ONNX or a torch.export/AOTInductor .pt2 package",
        description="Export the eval-mode network: a normalised (N, 3, H, W) batch -> logits at the input size, "
                    "with ISA's padding and attention inside. The test pipeline (resize, normalisation, sliding "
                    "windows, multi-scale + flip) stays outside. The weights' metadata (variant, classes, palette, "
                    "mean/std, test settings) goes into the ONNX metadata_props, or a JSON beside the .pt2 "
                    "(model.pt2 -> model.json). ONNX needs `pip install -e '.[export]'`.")
    p.add_argument("name", nargs="?", help="variant name (`isa list`); optional with --weights FILE written by this "
                                           "project")
    p.add_argument("--model", help=argparse.SUPPRESS)  # the spelling eval/predict use
    p.add_argument("--weights", help="a .safetensors/.pth file, 'auto' (the published checkpoint; the default with "
                                     "NAME) or 'none' (random init)")
    p.add_argument("--num-classes", type=int, default=None, help="class count of a fine-tuned .pth [the weights']")
    p.add_argument("--format", choices=FORMATS, help="onnx or pt2 [from --out's suffix]")
    p.add_argument("--size", type=_size, required=True, metavar="HxW", help="input size traced, e.g. 512x1024")
    p.add_argument("--dynamic", action="store_true",
                   help="batch, height and width free at run time (any H, W >= 32); what `isa predict --runtime "
                        "onnxruntime` needs, since the test pipeline resizes each image to its own size")
    p.add_argument("--out", required=True, metavar="FILE", help="destination, ending in .onnx or .pt2")
    p.add_argument("--backend", default="eager", choices=("eager", "triton"),
                   help="attention in the graph: eager (permute + matmul + softmax) [eager]; triton (the fused "
                        "CUDA kernels) cannot be exported yet")
    p.add_argument("--opset", type=int, default=ONNX_OPSET, help=f"ONNX opset (>= 17) [{ONNX_OPSET}]")
    p.add_argument("--batch-size", type=int, default=1, help="batch size traced (static exports keep it) [1]")
    p.add_argument("--device", default="cpu", help="pt2: the device the package is compiled for [cpu]")
    p.set_defaults(func=run_export)
