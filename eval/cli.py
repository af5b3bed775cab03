"""``isa eval`` and ``isa predict``: argparse wiring around :func:`eval.evaluate.evaluate` and :mod:`eval.predict`.

zoo/cli.py calls :func:`add_eval_parser` and :func:`add_predict_parser` with its sub-parsers object.

    isa eval --model isanet_r50-d8_512x1024_40k_cityscapes --weights auto --data-root data/cityscapes \\
        --out results.json --save-preds preds/ --dtype bf16
    isa predict --model isanet_r50-d8_512x512_80k_ade20k --weights auto photos/ --out seg/
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from eval.classes import dataset_key, dataset_meta
from eval.datasets import DATASET_NAMES, build_dataset, parse_dataset_json

_DTYPE_CHOICES = ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="variant name (`isa list`)")
    parser.add_argument("--weights", default="auto",
                        help="a .safetensors/.pth file, 'auto' (cached published checkpoint, downloaded on first "
                             "use) or 'none' (random init, for smoke tests) [auto]")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, … ['auto': cuda when available]")
    parser.add_argument("--dtype", default="float32", choices=_DTYPE_CHOICES,
                        help="autocast dtype of the network; resizes and softmax stay float32 [float32]")
    parser.add_argument("--aug-test", action="store_true",
                        help="multi-scale (0.5–1.75 × the test scale) + flip, softmax averaged (the ms+flip column)")
    parser.add_argument("--img-scale", type=int, nargs=2, metavar=("W", "H"),
                        help="override the variant's test scale (quick checks; published numbers need the default)")
    parser.add_argument("--backend", default="auto", help="attention backend: auto, triton, eager, sdpa [auto]")


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``isa eval``."""
    p = subparsers.add_parser("eval", help="mIoU of a variant on a dataset split (MMSegmentation's metric)",
                              description="Evaluate a variant exactly as MMSegmentation 0.x tools/test.py does.")
    _add_model_args(p)
    p.add_argument("--data-root", help="dataset root [the variant's data_root, e.g. data/cityscapes/]")
    p.add_argument("--dataset", choices=DATASET_NAMES,
                   help="layout of --data-root [the variant's dataset]; 'folder' = ROOT/images/<split>, "
                        "ROOT/masks/<split>, optional ROOT/dataset.json")
    p.add_argument("--split", default="val", help="split name [val]; VOC takes split-file names joined by '+'")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--save-preds", type=Path, metavar="DIR", help="write each prediction as a palette PNG here")
    p.add_argument("--max-images", type=int, help="evaluate only the first N images")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers decoding images [2]")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_eval)
    return p


def add_predict_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``isa predict``."""
    p = subparsers.add_parser("predict", help="segment images: colour masks and overlays with a legend",
                              description="Write <name>_mask.png (palette PNG of class indices) and "
                                          "<name>_overlay.png (image + colours + legend) per image.")
    _add_model_args(p)
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders of images")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--classes", type=Path, metavar="DATASET_JSON",
                   help="class names/palette of a custom model (a folder dataset's dataset.json)")
    p.add_argument("--alpha", type=float, default=0.5, help="mask opacity in the overlay [0.5]")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_predict)
    return p


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _load_model(args: argparse.Namespace, num_classes: int | None, device: torch.device) -> torch.nn.Module:
    from zoo import create_model  # the zoo CLI imports us: import it late

    from zoo.fuse import optimize_for_inference

    from zoo.hub import resolve_weights
    from zoo.weights import load_weights

    model = create_model(args.model, num_classes=num_classes, backend=args.backend)
    if str(args.weights).lower() != "none":
        path = resolve_weights(args.model, args.weights)
        if load_weights(model, path):
            # fine-tuning may start from a re-initialised classifier; evaluating one is meaningless
            raise ValueError(f"{path} has a classifier for another class count than the dataset's "
                             f"{model.num_classes}: pass the fine-tuned weights (isa train writes "
                             "WORK_DIR/model.safetensors), or --weights none for a smoke test")
    return optimize_for_inference(model.to(device))


def run_eval(args: argparse.Namespace) -> int:
    """``isa eval``: build the dataset and model, evaluate, print the table, write JSON / PNGs."""
    from zoo import get_config
    from eval.evaluate import evaluate
    from eval.inference import TestSettings
    from eval.report import format_table, write_json_atomic

    config = get_config(args.model)
    name = args.dataset or dataset_key(config.dataset)
    root = args.data_root or config.data_root
    dataset = build_dataset(name, root, args.split, num_classes=config.num_classes)
    if name != "folder" and dataset.num_classes != config.num_classes:
        raise ValueError(f"{args.model} predicts {config.num_classes} classes but --dataset {name} has "
                         f"{dataset.num_classes}; pick the variant trained on {name}")
    device = _device(args.device)
    num_classes = dataset.num_classes if dataset.num_classes != config.num_classes else None
    model = _load_model(args, num_classes, device)
    settings = TestSettings.from_model(model, args.img_scale)
    print(f"evaluating {args.model} on {dataset!r}: scale {settings.scale_wh}, "
          f"{'ms+flip' if args.aug_test else 'single scale'}, {config.test_mode}, {args.dtype}, {device}")
    result = evaluate(model, dataset, settings=settings, aug_test=args.aug_test, dtype=args.dtype, device=device,
                      max_images=args.max_images, num_workers=args.num_workers, save_preds=args.save_preds,
                      progress=not args.no_progress)
    print(format_table(result, dataset.classes))
    published = config.mIoU_ms_flip if args.aug_test else config.mIoU
    full_run = (name == dataset_key(config.dataset) and args.split == "val" and args.max_images is None
                and args.img_scale is None)
    if full_run:
        print(f"published ({'ms+flip' if args.aug_test else 'single scale'}): mIoU {published:.2f}")
    if args.out is not None:
        write_json_atomic(args.out, {
            "model": args.model, "weights": str(args.weights), "dataset": name, "data_root": str(root),
            "split": args.split, "device": str(device), **result,
            "published_mIoU": published if full_run else None,
        })
        print(f"wrote {args.out}")
    if args.save_preds is not None:
        print(f"wrote {result['num_images']} predictions to {args.save_preds}/")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    """``isa predict``: segment the inputs and write masks and overlays."""
    from zoo import get_config
    from eval.inference import TestSettings
    from eval.predict import predict_files

    config = get_config(args.model)
    meta = parse_dataset_json(args.classes) if args.classes is not None else dataset_meta(config.dataset)
    device = _device(args.device)
    num_classes = meta.num_classes if meta.num_classes != config.num_classes else None
    model = _load_model(args, num_classes, device)
    settings = TestSettings.from_model(model, args.img_scale)
    records = predict_files(model, args.inputs, args.out, classes=meta.classes, palette=meta.palette,
                            settings=settings, aug_test=args.aug_test, dtype=args.dtype, device=device,
                            alpha=args.alpha, progress=not args.no_progress)
    print(f"wrote {2 * len(records)} files (<name>_mask.png, <name>_overlay.png) to {args.out}/")
    return 0
