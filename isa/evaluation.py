"""`isa eval`, `isa predict` and `isa check-data`.

    isa eval --model isanet_r50-d8_512x1024_40k_cityscapes --weights auto --data-root data/cityscapes
    isa eval --weights runs/mine/model.safetensors --data my_data      # a fine-tuned model, by its file
    isa predict --weights runs/mine/model.safetensors photos/ --out-dir seg/
    isa check-data my_data
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional

from isa import UsageError
from zoo.utils import DTYPE_CHOICES


def add_model_args(parser: argparse.ArgumentParser, dtype_default: str = "auto") -> None:
    """--model / --weights / --device / --dtype / --backend / --tta / --test-scale, shared by eval and predict."""
    parser.add_argument("--model", help="variant name (`isa list`); optional when --weights is a file this "
                                        "project wrote (it names its variant)")
    parser.add_argument("--weights", help="a .safetensors/.pth file, 'auto' (the published checkpoint, "
                                          "downloaded on first use; the default with --model) or 'none' "
                                          "(random init, for smoke tests)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... [auto: cuda when available]")
    parser.add_argument("--dtype", default=dtype_default, choices=("auto",) + DTYPE_CHOICES,
                        help=f"autocast dtype of the network; resizes and softmax stay float32 [{dtype_default}"
                             + (": bf16 on GPUs with native bf16, else float32" if dtype_default == "auto" else "")
                             + "]")
    parser.add_argument("--tta", "--aug-test", dest="tta", action="store_true",
                        help="multi-scale (0.5-1.75 x the test scale) + flip, softmax averaged (the ms+flip column)")
    parser.add_argument("--test-scale", "--img-scale", dest="test_scale", type=int, nargs=2, metavar=("W", "H"),
                        help="replace the test scale of the weights (quick checks; published numbers need theirs)")
    parser.add_argument("--backend", default="auto", choices=("auto", "triton", "eager", "sdpa"),
                        help="attention backend [auto]")


def add_parsers(subparsers: Any) -> None:
    """Register `isa eval`, `isa predict` and `isa check-data`."""
    from eval.datasets import DATASET_NAMES
    from zoo.images import MAX_PIXELS

    p = subparsers.add_parser(
        "eval", help="mIoU of a model on a dataset split (MMSegmentation's metric)",
        description="Evaluate a model exactly as MMSegmentation 0.x tools/test.py does, at the test scale its "
                    "weights carry (the published variant's, or the one a fine-tuning run validated with).")
    add_model_args(p, dtype_default="float32")
    p.add_argument("--data", metavar="DIR", help="a folder dataset (DIR/images/<split>, DIR/masks/<split>, "
                                                 "DIR/dataset.json) [the one a fine-tuning run recorded]")
    p.add_argument("--data-root", metavar="DIR", help="a benchmark dataset in MMSegmentation's layout [the variant's "
                                                      "data_root, e.g. data/cityscapes/]")
    p.add_argument("--dataset", choices=DATASET_NAMES, help="layout of --data-root [the variant's dataset]")
    p.add_argument("--split", default="val", help="split name [val]; VOC takes split-file names joined by '+'")
    p.add_argument("--out", type=Path, metavar="FILE", help="write the results as JSON here")
    p.add_argument("--out-dir", "--save-preds", dest="out_dir", type=Path, metavar="DIR",
                   help="write each prediction as a palette PNG here")
    p.add_argument("--max-images", type=int, metavar="N", help="evaluate only the first N images")
    p.add_argument("--workers", "--num-workers", dest="workers", type=int, default=2,
                   help="DataLoader workers decoding the next images while the network runs [2]")
    p.add_argument("--batch-size", type=int, default=4, metavar="N",
                   help="images of the same size per forward pass; in slide mode also windows per pass "
                        "(the logits of 1 up to fp32 rounding) [4]")
    p.add_argument("--metrics", nargs="+", default=["mIoU"], choices=("mIoU", "mDice", "mFscore"),
                   help="MMSegmentation's IoUMetric groups: mIoU (IoU, Acc), mDice (Dice, Acc), mFscore "
                        "(Fscore, Precision, Recall); fwIoU and class shares always [mIoU]")
    p.add_argument("--beta", type=float, default=1.0, help="F-score's weight of recall (mFscore) [1]")
    p.add_argument("--nan-to-num", type=float, default=None, metavar="V",
                   help="count classes without pixels as V in the means, as MMSegmentation's nan_to_num "
                        "[off: they are left out]")
    p.add_argument("--save-errors", type=int, default=0, metavar="N",
                   help="write the N images of lowest mIoU as pictures (image | ground truth | prediction | "
                        "errors, with a legend) to --errors-dir")
    p.add_argument("--errors-dir", type=Path, metavar="DIR",
                   help="folder for --save-errors pictures [errors/ beside --out]")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, metavar="N",
                   help=f"refuse larger images and masks (decompression-bomb guard) [{MAX_PIXELS}; 0: no limit]")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_eval)

    p = subparsers.add_parser(
        "predict", help="segment images: colour masks and overlays with a legend",
        description="Write <name>_mask.png (palette PNG of class indices) and <name>_overlay.png (image + "
                    "colours + legend) per image, with the class names and colours the weights carry.")
    add_model_args(p)
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders of images")
    p.add_argument("--out-dir", "--out", dest="out_dir", type=Path, required=True, metavar="DIR",
                   help="output folder")
    p.add_argument("--classes", type=Path, metavar="DATASET_JSON",
                   help="replace the class names/palette (a folder dataset's dataset.json)")
    p.add_argument("--alpha", type=float, default=0.5, help="mask opacity in the overlay [0.5]")
    p.add_argument("--runtime", default="auto", choices=("auto", "torch", "onnxruntime"),
                   help="onnxruntime runs --weights FILE.onnx written by `isa export --dynamic` on the CPU without "
                        "the PyTorch model (pip install -e '.[export]'); auto: onnxruntime for an .onnx file, else "
                        "torch [auto]")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, metavar="N",
                   help=f"refuse larger images (decompression-bomb guard) [{MAX_PIXELS}; 0: no limit]")
    p.add_argument("--batch-size", type=int, default=4, metavar="N",
                   help="consecutive images of the same size per forward pass (photos over 8 megapixels run "
                        "alone); in slide mode also windows per pass [4]")
    p.add_argument("--workers", "--num-workers", dest="workers", type=int, default=2,
                   help="DataLoader workers decoding the next images while the network runs [2]")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first unreadable image [default: skip it with one line, name every skipped "
                        "file at the end and exit 1]")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_predict)

    p = subparsers.add_parser(
        "check-data", help="check a folder dataset for the classic mistakes before training",
        description="Reads every image header and mask of each split of a folder dataset (DIR/images/<split>, "
                    "DIR/masks/<split>, DIR/dataset.json) and prints the share of pixels per class, then errors "
                    "(missing masks or images, size mismatches, values outside the classes, 0/255 binary masks, "
                    "unreadable files) and warnings (classes without pixels, mostly ignored splits). `isa train` "
                    "runs the same checks first. Exit code 1 when there are errors.")
    p.add_argument("data", metavar="DIR", help="the dataset folder")
    p.add_argument("--splits", nargs="+", default=["train", "val"], help="splits to check [train val]")
    p.add_argument("--num-classes", type=int, metavar="K", help="class count when there is no dataset.json")
    p.add_argument("--crop-size", type=int, nargs=2, metavar=("H", "W"),
                   help="the training crop: named when it is larger than every train image")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, metavar="N",
                   help=f"refuse larger images and masks (decompression-bomb guard) [{MAX_PIXELS}; 0: no limit]")
    p.set_defaults(func=run_check_data)


def segmenter_from_args(args: argparse.Namespace, **kwargs: Any):
    """The `zoo.Segmenter` that --model / --weights / --device / --dtype / --test-scale describe."""
    from zoo import Segmenter

    weights = args.weights
    if args.model is None and weights in (None, "auto", "none"):
        raise UsageError("name the model: --model NAME (with --weights auto|FILE|none), or --weights FILE "
                         "written by this project (it names its variant)")
    if weights is None:
        weights = "auto"
    return Segmenter(args.model, weights=weights, device=args.device,
                     dtype=args.dtype, backend=args.backend, scale_wh=args.test_scale,
                     runtime=getattr(args, "runtime", "auto"), **kwargs)


def _random_init(args: argparse.Namespace) -> bool:
    return str(args.weights).lower() == "none"


def _dataset(args: argparse.Namespace, meta: Any):
    """The dataset --data / --data-root / --dataset name, checked against the model's classes (`meta`)."""
    from eval.datasets import build_dataset
    from zoo.classes import dataset_meta

    config = meta.config
    if args.data and (args.data_root or args.dataset not in (None, "folder")):
        raise UsageError("--data is a folder dataset; for a benchmark layout use --data-root DIR [--dataset NAME]")
    if args.data or args.dataset == "folder":
        name, root = "folder", args.data or args.data_root
    elif args.data_root or args.dataset:
        name, root = args.dataset or config.dataset, args.data_root or config.data_root
    elif meta.extra.get("data"):  # a fine-tuning run recorded its dataset
        name, root = "folder", meta.extra["data"]
        print(f"dataset: {root} (recorded in the weights by the run that wrote them; --data DIR for another)")
    elif meta.classes == dataset_meta(config.dataset).classes:
        name, root = config.dataset, config.data_root
    else:
        raise UsageError(f"these weights have {meta.num_classes} classes of their own: pass the dataset with "
                         "--data DIR")
    if root is None:
        raise UsageError("--dataset folder needs --data DIR")
    from zoo.images import MAX_PIXELS

    dataset = build_dataset(name, root, args.split, num_classes=meta.num_classes,
                            max_pixels=getattr(args, "max_pixels", MAX_PIXELS))
    if dataset.num_classes != meta.num_classes and not _random_init(args):
        raise ValueError(f"the model predicts {meta.num_classes} classes ({meta.variant}) but {dataset!r} has "
                         f"{dataset.num_classes}; evaluate weights trained for this dataset")
    return name, root, dataset


def run_eval(args: argparse.Namespace) -> int:
    """`isa eval`: build the model and dataset, evaluate, print the table, write JSON / CSV / PNGs.

    Under torchrun (`torchrun --nproc_per_node=G -m isa eval ...`) every rank evaluates its share of the
    images; the metric is summed over ranks and rank 0 prints and writes the results.
    """
    from train.distributed import cleanup, setup

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be ≥ 1, got {args.batch_size}")
    if args.save_errors < 0:
        raise UsageError(f"--save-errors takes a count of images ≥ 0, got {args.save_errors}")
    if args.save_errors and args.errors_dir is None and args.out is None:
        raise UsageError("--save-errors N needs a folder: --errors-dir DIR (or --out FILE: errors/ beside it)")
    ctx = setup(args.device)
    if ctx.distributed:
        args.device = str(ctx.device)  # this rank's device (LOCAL_RANK's GPU under torchrun)
    try:
        return _run_eval(args, ctx.is_main)
    finally:
        cleanup(ctx)


def _run_eval(args: argparse.Namespace, is_main: bool) -> int:
    from eval.evaluate import evaluate
    from eval.report import format_confused

    if _random_init(args):  # a smoke test: a random model with the dataset's classes
        from zoo import ModelMeta, get_config

        if args.model is None:
            raise UsageError("--weights none needs --model NAME")
        name, root, dataset = _dataset(args, ModelMeta.for_variant(get_config(args.model)))
        segmenter = segmenter_from_args(args, num_classes=dataset.num_classes)
    else:
        segmenter = segmenter_from_args(args)
        name, root, dataset = _dataset(args, segmenter.meta)
    config, settings = segmenter.meta.config, segmenter.settings
    say = print if is_main else (lambda *a, **k: None)
    say(f"evaluating {segmenter.meta.variant} on {dataset!r}: {settings.mode}, scale {settings.scale_wh}, "
        f"{'ms+flip' if args.tta else 'single scale'}, {str(segmenter.dtype).replace('torch.', '')}, "
        f"{segmenter.device}")
    errors_dir = args.errors_dir or (args.out.parent / "errors" if args.out is not None else None)
    report = evaluate(segmenter, dataset, tta=args.tta, max_images=args.max_images, num_workers=args.workers,
                      batch_size=args.batch_size, metrics=args.metrics, beta=args.beta, nan_to_num=args.nan_to_num,
                      save_preds=args.out_dir, save_errors=args.save_errors, errors_dir=errors_dir,
                      progress=not args.no_progress)
    if not is_main:
        return 0
    print(report.format_table())
    print("most confused (label -> prediction):")
    print(format_confused(report.top_confused(10)))
    published: Optional[float] = config.mIoU_ms_flip if args.tta else config.mIoU
    full_run = (name == config.dataset and args.split == "val" and args.max_images is None
                and tuple(settings.scale_wh) == tuple(config.test_img_scale_wh))
    if full_run:
        print(f"published ({'ms+flip' if args.tta else 'single scale'}): mIoU {published:.2f}")
    if args.out is not None:
        # the device type, not this rank's index: one process and torchrun write the same file
        paths = report.write(args.out, {
            "model": segmenter.meta.variant, "weights": str(args.weights), "dataset": name, "data_root": str(root),
            "split": args.split, "device": segmenter.device.type,
            "published_mIoU": published if full_run else None,
        })
        print(f"wrote {', '.join(str(p) for p in paths)}")
    if args.out_dir is not None:
        print(f"wrote {report['num_images']} predictions to {args.out_dir}/")
    if report.error_pictures:
        print(f"wrote {len(report.error_pictures)} error pictures to {errors_dir}/ (worst first)")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    """`isa predict`: segment the inputs and write masks and overlays; unreadable inputs are skipped (one line
    each, a summary, exit 1) unless --strict."""
    import sys

    from tqdm import tqdm

    from eval.datasets import parse_dataset_json
    from eval.predict import predict_files

    names = parse_dataset_json(args.classes) if args.classes is not None else None
    extra = {"num_classes": names.num_classes} if names is not None and _random_init(args) else {}
    segmenter = segmenter_from_args(args, max_pixels=args.max_pixels, **extra)
    classes = palette = None
    if names is not None:
        if names.num_classes != segmenter.num_classes:
            raise ValueError(f"{args.classes} lists {names.num_classes} classes, the model predicts "
                             f"{segmenter.num_classes}")
        classes, palette = names.classes, names.palette
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be ≥ 1, got {args.batch_size}")
    segmenter.batch_size = segmenter.window_batch = args.batch_size
    skipped: list = []

    def skip(path: Path, error: Exception) -> None:
        skipped.append(path)
        tqdm.write(f"isa predict: skipped {path}: {error}", file=sys.stderr)

    records = predict_files(segmenter, args.inputs, args.out_dir, tta=args.tta, alpha=args.alpha, classes=classes,
                            palette=palette, progress=not args.no_progress, num_workers=args.workers,
                            on_error=None if args.strict else skip)
    print(f"wrote {2 * len(records)} files (<name>_mask.png, <name>_overlay.png) to {args.out_dir}/")
    if skipped:
        print(f"isa predict: skipped {len(skipped)} unreadable file{'s' if len(skipped) > 1 else ''} of "
              f"{len(skipped) + len(records)}: {', '.join(map(str, skipped))} (--strict stops at the first)",
              file=sys.stderr)
        return 1
    return 0


def run_check_data(args: argparse.Namespace) -> int:
    """`isa check-data`: print the report; exit 1 on errors."""
    from eval.checks import check_dataset

    report = check_dataset(args.data, args.splits, args.num_classes, crop_size=args.crop_size,
                           max_pixels=args.max_pixels)
    print(report.format())
    return 0 if report.ok else 1
