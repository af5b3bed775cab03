"""`isa train`: reproduce a published recipe or fine-tune on a custom dataset.

Reproduction:  isa train --recipe NAME --data-root DIR   (ImageNet backbone fetched like MMSeg's)
Fine-tuning:   isa train --model NAME --data DIR [--weights W] [--num-classes K] --iters N
                         --crop-size H W --batch-size B --work-dir OUT [--resume] ...
Multi-GPU:     torchrun --nproc_per_node=G -m isa train ...

--batch-size is the *global* batch: it is split over the processes, so a recipe's 8 or 16 images
per step hold on any number of GPUs. Every flag is a `train.TrainConfig` field of the same name.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from typing import Any, Dict

from isa import UsageError

HELP_EPILOG = """examples:
  isa train --recipe isanet_r50-d8_512x1024_40k_cityscapes --data-root data/cityscapes
  torchrun --nproc_per_node=4 -m isa train --recipe isanet_r50-d8_512x512_80k_ade20k \\
            --data-root data/ade/ADEChallengeData2016 --backbone-weights resnet50_v1c-2cccc1ad.pth
  isa train --model isanet_r50-d8_512x512_20k_voc12aug --data my_data --iters 2000 \\
            --crop-size 512 512 --batch-size 8 --work-dir runs/my_data
"""

# flags whose value goes to the TrainConfig field of the same name when given
_FIELDS = ("iters", "batch_size", "lr", "work_dir", "crop_size", "img_scale", "ratio_range", "test_scale",
           "eval_interval", "checkpoint_interval", "eval_max_images", "early_stop", "keep_checkpoints",
           "avg_non_ignore", "dropout", "resume", "seed", "device", "amp", "backend", "workers", "threads",
           "log_interval", "num_classes", "weights", "backbone_weights", "overwrite")


def _keep(text: str) -> int:
    """--keep-checkpoints: a count, or 'all' (stored as 0)."""
    if text.strip().lower() == "all":
        return 0
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or 'all', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a count >= 0 or 'all', got {value}")
    return value


# fine-tuning options (train.losses, train.optim, train.tuning): TrainConfig fields of the same name
_TUNING_FIELDS = ("class_weights", "freeze_bn", "freeze_backbone", "accum_steps", "optimizer", "no_decay_norm_bias",
                  "warmup", "warmup_start_factor", "head_lr_mult", "weight_decay", "tensorboard")


def _add_tuning_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fine-tuning options (defaults: the recipe's; all are stored in config.json)")
    g.add_argument("--loss", nargs="+", metavar="NAME[:WEIGHT]",
                   help="decode-head loss terms, summed with their weights, e.g. --loss ce:1.0 dice:3.0. NAME: ce "
                        "(cross-entropy), dice (softmax Dice over the labelled pixels, per class, mean over the "
                        "classes present - the Dice most people mean; NOT MMSegmentation's sigmoid DiceLoss), "
                        "mmseg_dice (MMSegmentation's DiceLoss exactly), focal (sigmoid focal loss), lovasz "
                        "(Lovasz-softmax). The aux head keeps cross-entropy x 0.4 [ce:1.0]")
    g.add_argument("--ohem", nargs="*", metavar="ARG",
                   help="--ohem [THRESH [MIN_KEPT]]: online hard example mining on the decode head (MMSeg's "
                        "OHEMPixelSampler): the labelled pixels whose label probability is below THRESH, at least "
                        "MIN_KEPT per image; THRESH 'none': the MIN_KEPT highest-loss pixels per image [alone: 0.7 "
                        "100000]; with ce (and lovasz) terms")
    g.add_argument("--class-weights", metavar="auto|FILE|W1,W2,...",
                   help="per-class loss weights: auto (median frequency from the train split's pixel counts, "
                        "printed per class), a file of numbers, or one number per class; also stored in the weights")
    g.add_argument("--freeze-bn", action="store_true", default=None,
                   help="BatchNorm in eval mode, statistics and affine frozen (MMSeg norm_eval); for small batches")
    g.add_argument("--freeze-backbone", type=int, nargs="?", const=4, metavar="STAGES",
                   help="freeze the ResNet stem and layers 1..STAGES (frozen_stages) [alone: 4, the whole backbone]")
    g.add_argument("--accum-steps", type=int, metavar="N",
                   help="gradient accumulation: N batches of --batch-size per optimizer step, the update of one "
                        "batch N times larger with --freeze-bn (BatchNorm statistics, --avg-non-ignore and --ohem "
                        "see one batch at a time) [1]")
    g.add_argument("--optimizer", choices=["sgd", "adamw"],
                   help="sgd (recipe: momentum 0.9) or adamw (betas 0.9/0.999; --lr 6e-5 and --weight-decay 0.01 "
                        "unless given) [sgd]")
    g.add_argument("--weight-decay", type=float, metavar="WD", help="[recipe: 5e-4]")
    g.add_argument("--no-decay-norm-bias", action="store_true", default=None,
                   help="no weight decay on norm layers and biases (paramwise norm/bias_decay_mult=0)")
    g.add_argument("--warmup", type=int, metavar="ITERS",
                   help="linear warm-up (LinearLR) over ITERS iterations from --warmup-start-factor x lr [0: none]")
    g.add_argument("--warmup-start-factor", type=float, metavar="F", help="the warm-up's first factor [1e-6]")
    g.add_argument("--head-lr-mult", type=float, metavar="M",
                   help="learning-rate multiplier of the decode and auxiliary heads (paramwise custom_keys), "
                        "e.g. 10 [1]")
    g.add_argument("--tensorboard", action="store_true", default=None,
                   help="write scalars (losses, lr, val metrics per class) to WORK_DIR/tensorboard "
                        "(pip install 'isa-triton[tensorboard]')")


def _tuning_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The TrainConfig fields the fine-tuning flags set."""
    out: Dict[str, Any] = {k: getattr(args, k) for k in _TUNING_FIELDS if getattr(args, k, None) is not None}
    if getattr(args, "loss", None):
        out["loss"] = " ".join(args.loss)
    if getattr(args, "ohem", None) is not None:
        words = list(args.ohem)
        if len(words) > 2:
            raise UsageError(f"--ohem takes [THRESH] [MIN_KEPT], got {' '.join(words)}")
        try:
            thresh = 0.7 if not words else None if words[0].lower() == "none" else float(words[0])
            min_kept = int(words[1]) if len(words) > 1 else 100000
        except ValueError:
            raise UsageError(f"--ohem: THRESH is a probability or 'none', MIN_KEPT a count; got {' '.join(words)}") \
                from None
        out["ohem"] = [thresh, min_kept]
    # AdamW's lr / weight decay defaults (6e-5 / 0.01) come from TrainConfig (OPTIMIZER_DEFAULTS), as in Python
    return out


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The train options."""
    mode = p.add_argument_group("what to train (choose --recipe or --model)")
    mode.add_argument("--recipe", metavar="NAME", help="reproduce a published variant (isa list)")
    mode.add_argument("--data-root", metavar="DIR", help="dataset root for --recipe (cityscapes/ade20k/voc layout)")
    mode.add_argument("--model", metavar="NAME", help="fine-tune this variant on a custom folder dataset")
    mode.add_argument("--data", metavar="DIR", help="custom dataset: DIR/images/{train,val}, DIR/masks/{train,val}, "
                      "optional DIR/dataset.json with classes")
    init = p.add_argument_group("initialisation")
    init.add_argument("--weights", metavar="W", help="full-model weights: 'auto' (published; default for --model), "
                      "a .safetensors/.pth file, or 'none' (random init; default for --recipe)")
    init.add_argument("--backbone-weights", metavar="PTH", help="ImageNet ResNetV1c weights: 'auto' (mmcv's "
                      "resnet50_v1c / resnet101_v1c, downloaded once into the cache; default for --recipe without "
                      "--weights), a .pth file, or 'none'")
    init.add_argument("--num-classes", type=int, metavar="K", help="class count (when the dataset has no dataset.json)")
    sched = p.add_argument_group("schedule (defaults: the recipe's)")
    sched.add_argument("--iters", type=int, metavar="N")
    sched.add_argument("--crop-size", type=int, nargs=2, metavar=("H", "W"))
    sched.add_argument("--batch-size", type=int, metavar="B", help="global batch, split over the processes")
    sched.add_argument("--lr", type=float)
    sched.add_argument("--img-scale", type=int, nargs=2, metavar=("W", "H"),
                       help="ratio-resize base scale (recipe's; fine-tuning: 4*crop W, crop H)")
    sched.add_argument("--ratio-range", type=float, nargs=2, metavar=("LO", "HI"))
    sched.add_argument("--test-scale", type=int, nargs=2, metavar=("W", "H"),
                       help="evaluation scale (recipe's; fine-tuning: --img-scale); stored in the weights")
    sched.add_argument("--eval-interval", type=int, metavar="N",
                       help="evaluate every N iterations [recipes: theirs; else iters/10 but at least 50, so that "
                            "evaluation stays a small share of a short run; the last iteration always evaluates]")
    sched.add_argument("--eval-max-images", type=int, metavar="N", help="evaluate on the first N val images only")
    sched.add_argument("--early-stop", type=int, metavar="N", help="stop after N evaluations without a better val mIoU")
    sched.add_argument("--checkpoint-interval", type=int, metavar="M",
                       help="checkpoint every M iterations [recipes: theirs; else iters/10 but at least 50; the "
                            "last iteration and a stop always checkpoint]")
    sched.add_argument("--keep-checkpoints", type=_keep, metavar="N",
                       help="keep the N newest complete checkpoints, 'all' (or 0) keeps every one [2, on --resume the "
                            "run's own; best.safetensors is kept besides]; an R-50 checkpoint is about 300 MB, R-101 "
                            "about 450 MB")
    sched.add_argument("--avg-non-ignore", action="store_true", default=None,
                       help="average the loss over non-ignored pixels (mmseg>=0.23 option; 0.x used all pixels)")
    sched.add_argument("--dropout", type=float, metavar="P", help="override the heads' Dropout2d ratio (0.1)")
    _add_tuning_arguments(p)
    run = p.add_argument_group("run")
    run.add_argument("--work-dir", metavar="OUT", help="outputs (default work_dirs/NAME)")
    run.add_argument("--resume", action="store_true", default=None,
                     help="continue from the newest complete checkpoint in --work-dir (the settings must match its "
                          "config.json but for iters, intervals, logging, workers and threads)")
    run.add_argument("--overwrite", action="store_true", default=None,
                     help="start afresh in a --work-dir that holds an earlier run: its outputs are moved to "
                          "WORK_DIR/previous-<time>/ (nothing is deleted); without it such a run is refused")
    run.add_argument("--seed", type=int)
    run.add_argument("--device", help="auto, cpu, cuda [auto]")
    run.add_argument("--dtype", "--amp", dest="amp", choices=["float32", "bfloat16", "float16", "fp32", "bf16", "fp16"],
                     help="autocast dtype of the forward pass (mixed precision); float32 as published [float32]")
    run.add_argument("--backend", choices=["auto", "triton", "eager", "sdpa"], help="ISA attention backend [auto]")
    run.add_argument("--workers", type=int, metavar="N",
                     help="data workers per process (cuda: the recipe's 2/4 or more, up to 8; cpu: 0)")
    run.add_argument("--threads", type=int, metavar="N", help="torch.set_num_threads (CPU reproducibility)")
    run.add_argument("--log-interval", type=int, metavar="N")
    run.add_argument("--no-check-data", action="store_true", help="skip the data checks of a folder dataset")
    run.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    run.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def config_from_args(args: argparse.Namespace):
    """Build the TrainConfig an `isa train` command line describes."""
    from train import TrainConfig

    if bool(args.recipe) == bool(args.model):
        raise UsageError("choose one: --recipe NAME --data-root DIR (reproduce a variant) or --model NAME "
                         "--data DIR (fine-tune on a custom dataset)")
    common: Dict[str, Any] = {k: getattr(args, k) for k in _FIELDS if getattr(args, k) is not None}
    for key in ("crop_size", "img_scale", "ratio_range", "test_scale"):
        if key in common:
            common[key] = tuple(common[key])
    if "amp" in common:  # one dtype vocabulary with eval/predict; TrainConfig.amp keeps MMSeg's short names
        common["amp"] = {"float32": None, "fp32": None, "bfloat16": "bf16", "float16": "fp16"}.get(
            common["amp"], common["amp"])
    common.update(_tuning_options(args))
    common.update(progress=not args.no_progress, check_data=not args.no_check_data)
    if args.recipe:
        if not args.data_root:
            raise UsageError("--recipe needs --data-root DIR (the dataset in MMSegmentation's layout)")
        if args.data:
            raise UsageError("--data is for --model fine-tuning; with --recipe use --data-root")
        if args.weights in (None, "none"):
            if args.backbone_weights is None:  # MMSeg's recipe: pretrained='open-mmlab://resnet50_v1c'
                common["backbone_weights"] = "auto"
            elif args.backbone_weights == "none":
                logging.getLogger(__name__).warning(
                    "--backbone-weights none: the backbone starts from random init, which does not reproduce the "
                    "published recipe (it starts from ImageNet resnet%s_v1c)", "101" if "r101" in args.recipe else "50")
        return TrainConfig.from_recipe(args.recipe, args.data_root, **common)
    if not args.data:
        raise UsageError("--model needs --data DIR (DIR/images/train + DIR/masks/train)")
    if args.data_root:
        raise UsageError("--data-root is for --recipe; with --model use --data")
    return TrainConfig.for_finetune(args.model, args.data, **common)


def resume_command(argv: list) -> str:
    """The command line that continues this run."""
    words = list(argv) + ([] if "--resume" in argv else ["--resume"])
    return shlex.join(words)


def run(args: argparse.Namespace) -> int:
    """`isa train` entry: returns the exit code."""
    from train import TrainingInterrupted, train

    try:
        result = train(config_from_args(args))
    except TrainingInterrupted as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"isa train: {exc}\ncontinue with: {resume_command(['isa', *sys.argv[1:]])}", file=sys.stderr)
        return exc.exit_code
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # every rank returns the same result; rank 0 reports it
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=1))
    else:
        m, best = result["metrics"], result["best"]
        summary = f"mIoU {m['mIoU']:.2f}  aAcc {m['aAcc']:.2f}  mAcc {m['mAcc']:.2f}" if m else "no evaluation"
        lines = [f"done: {result['iterations']} iterations, final loss {result['final_loss']:.4f}, {summary}",
                 f"weights {result['weights']}"]
        if best is not None:
            lines.append(f"best    {result['best_weights']}  (mIoU {best['mIoU']:.2f} at iteration {best['iter']})")
        lines += [f"config  {result['config']}", f"log     {result['log']}", f"curves  {result['curves']}"]
        print("\n".join(lines))
    return 0


def add_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Register `isa train`."""
    p = subparsers.add_parser("train", help="train: reproduce a published recipe or fine-tune on your data",
                              description=__doc__, epilog=HELP_EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
    return p
