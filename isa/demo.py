"""`isa demo`: the whole project in one command on a fresh machine (what `make demo` runs).

1. Writes a small deterministic synthetic dataset (train.synthetic.make_scene_dataset: five
   classes told apart by texture, shape and position, not by colour) in the custom folder layout.
2. Builds a zoo model (an R-50-D8 variant by default) with cached MMSegmentation weights when
   `isa download` put them in the cache, random initialisation otherwise.
3. Fine-tunes it with the training package, evaluates mIoU before and after with the evaluation
   package, and writes a training-curve PNG, a before/after comparison and `isa predict` overlays.
4. Compares the attention backends: on a CUDA GPU `isa bench kernels`; on the CPU the eager
   backends' forward times and a check of the Triton kernels in Triton's interpreter against fp64.

Output folder (default ./demo_out): data/ (the dataset), train/ (log.jsonl, curves.png,
model.safetensors), curves.png, comparison.png, overlays/, summary.json.

Example (Python):
    >>> from isa.demo import run_demo                                      # doctest: +SKIP
    >>> result = run_demo("demo_out", quick=True)                          # doctest: +SKIP
    >>> result["miou_before"] < result["miou_after"]                       # doctest: +SKIP
    True
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

DEFAULT_MODEL = "r50-d8"
DEFAULT_OUT = "demo_out"
_MARKER = ".isa-demo"  # marks an output folder this command owns (and may clear on the next run)
_PROJECT_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of one demo run: dataset, schedule, kernel shapes."""

    num_train: int
    num_val: int
    size_hw: Tuple[int, int]
    iters: int
    batch_size: int
    crop_hw: Tuple[int, int]
    lr: float
    eval_interval: int
    log_interval: int
    show_images: int
    cpu_shape: Tuple[int, int, int, int, int]  # N, Cqk, Cv, H, W of the eager timing
    cpu_reps: int
    interp_shape: Tuple[int, int, int, int, int]  # N, Cqk, Cv, H, W of the interpreter check
    interp_block: Tuple[int, int]


# The default run: 3-5 min on 2 idle CPU cores, val mIoU 11.5 -> 66-73 from random init (the CPU decides; README).
FULL = DemoPlan(num_train=40, num_val=8, size_hw=(96, 128), iters=400, batch_size=4, crop_hw=(64, 64), lr=0.03,
                eval_interval=80, log_interval=5, show_images=4, cpu_shape=(1, 256, 512, 64, 64), cpu_reps=7,
                interp_shape=(1, 16, 24, 16, 16), interp_block=(4, 4))
# `--quick`: every step once, on toy sizes (the test runs this; well under a minute on 2 cores).
QUICK = DemoPlan(num_train=4, num_val=2, size_hw=(48, 64), iters=2, batch_size=2, crop_hw=(32, 32), lr=0.02,
                 eval_interval=2, log_interval=1, show_images=2, cpu_shape=(1, 64, 128, 32, 32), cpu_reps=3,
                 interp_shape=(1, 8, 8, 8, 8), interp_block=(2, 2))


# --------------------------------------------------------------------------------------------------
# model and output folder


def resolve_model(spec: str) -> str:
    """A zoo variant name from a full name, an fnmatch pattern or a fragment ("r50-d8", "r101").

    Among several matches a variant whose MMSegmentation weights are cached wins, else the first
    in `isa list` order, so `isa demo` uses downloaded weights whenever there are some.

    Example:
        >>> resolve_model("isanet_r101-d8_512x512_20k_voc12aug")
        'isanet_r101-d8_512x512_20k_voc12aug'
        >>> resolve_model("r50-d8").startswith("isanet_r50-d8_")
        True
    """
    from zoo.hub import cached_weights
    from zoo.registry import get_config, list_models

    matches = list_models(spec) or list_models(f"*{spec.lower()}*")
    if not matches:
        get_config(spec)  # raises KeyError naming close matches
        return spec
    if spec in matches:
        return spec
    cached = [name for name in matches if cached_weights(name) is not None]
    return (cached or matches)[0]


def _prepare_out(out: Path) -> None:
    """Create `out`, or clear what an earlier `isa demo` wrote there; never touch a foreign folder."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / _MARKER).is_file():
        raise ValueError(f"--out {out} is not empty and was not written by `isa demo`; pass an empty or new "
                         "folder (nothing was changed)")
    for stale in ("data", "train", "overlays"):
        shutil.rmtree(out / stale, ignore_errors=True)  # e.g. an earlier run's checkpoints of other --iters
    out.mkdir(parents=True, exist_ok=True)
    (out / _MARKER).write_text("written by `isa demo`; the next `isa demo --out` here replaces its contents\n")


# --------------------------------------------------------------------------------------------------
# pictures


def _blend(image: np.ndarray, labels: np.ndarray, palette: Sequence[Sequence[int]], alpha: float = 0.55) -> np.ndarray:
    from zoo.visualize import colorize

    mixed = image.astype(np.float32) * (1 - alpha) + colorize(labels, palette).astype(np.float32) * alpha
    return np.clip(mixed + 0.5, 0, 255).astype(np.uint8)


def _legend(classes: Sequence[str], palette: Sequence[Sequence[int]], font: Any) -> Image.Image:
    row, swatch, pad = 16, 12, 6
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(int(probe.textlength(c, font=font)) for c in classes)
    panel = Image.new("RGB", (pad * 3 + swatch + text_w, pad * 2 + row * len(classes)), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    for i, (name, colour) in enumerate(zip(classes, palette)):
        y = pad + i * row
        draw.rectangle([pad, y + 2, pad + swatch, y + 2 + swatch], fill=tuple(int(v) for v in colour), outline=(0, 0, 0))
        draw.text((pad * 2 + swatch, y + 2), name, fill=(0, 0, 0), font=font)
    return panel


def comparison_png(rows: Sequence[Dict[str, np.ndarray]], classes: Sequence[str], palette: Sequence[Sequence[int]],
                   path: Path, scale: int = 2) -> Path:
    """One row per image: image | ground truth | before | after (colours blended), legend on the right."""
    from zoo.visualize import save_png

    font = ImageFont.load_default()
    titles = ("image", "ground truth", "before fine-tuning", "after fine-tuning")
    h, w = rows[0]["image"].shape[:2]
    th, tw, pad, head = h * scale, w * scale, 6, 18
    legend = _legend(classes, palette, font)
    width = pad + 4 * (tw + pad) + legend.width
    canvas = Image.new("RGB", (width, head + len(rows) * (th + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(titles):
        draw.text((pad + j * (tw + pad), 3), title, fill=(0, 0, 0), font=font)
    for i, row in enumerate(rows):
        tiles = (row["image"], _blend(row["image"], row["mask"], palette), _blend(row["image"], row["before"], palette),
                 _blend(row["image"], row["after"], palette))
        for j, tile in enumerate(tiles):
            picture = Image.fromarray(tile).resize((tw, th), Image.NEAREST)
            canvas.paste(picture, (pad + j * (tw + pad), head + i * (th + pad)))
    canvas.paste(legend, (pad + 4 * (tw + pad), head))
    save_png(canvas, path)
    return path


# --------------------------------------------------------------------------------------------------
# attention kernels


def gpu_kernel_bench(out: Path, budget_s: int = 240) -> Dict[str, Any]:
    """`isa bench kernels` in a subprocess (its table streams to this terminal); rows saved as JSON."""
    path = out / "bench_kernels.json"
    command = [sys.executable, "-m", "isa", "bench", "kernels", "--out", str(path), "--budget", str(budget_s)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(_PROJECT_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    sys.stdout.flush()
    code = subprocess.call(command, env=env)
    return {"command": "isa bench kernels --out " + str(path) + f" --budget {budget_s}", "exit_code": code,
            "json": str(path) if path.is_file() else None}


# --------------------------------------------------------------------------------------------------
# the demo


def _say(text: str) -> None:
    print(text, flush=True)  # interleaves correctly with tqdm's stderr when piped (`| tee`)


def _fmt(value: Optional[float]) -> str:
    return "   -" if value is None or not math.isfinite(value) else f"{value:5.1f}"


def _iou_table(classes: Sequence[str], before: Dict[str, Any], after: Dict[str, Any]) -> str:
    width = max(len(c) for c in list(classes) + ["class"])
    lines = [f"      {'class':<{width}}  before   after"]
    for name, b, a in zip(classes, before["IoU"], after["IoU"]):
        lines.append(f"      {name:<{width}}   {_fmt(b)}   {_fmt(a)}")
    lines.append(f"      {'mIoU':<{width}}   {_fmt(before['mIoU'])}   {_fmt(after['mIoU'])}")
    lines.append(f"      {'aAcc':<{width}}   {_fmt(before['aAcc'])}   {_fmt(after['aAcc'])}")
    return "\n".join(lines)


def _clean(values: Sequence[Any]) -> List[Optional[float]]:
    return [None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v) for v in values]


def run_demo(out: str | os.PathLike = DEFAULT_OUT, *, model: str = DEFAULT_MODEL, iters: Optional[int] = None,
             device: str = "auto", seed: int = 0, quick: bool = False, progress: bool = True,
             kernels: bool = True, say: Callable[[str], None] = _say) -> Dict[str, Any]:
    """Run the demo (dataset, fine-tuning, before/after mIoU, pictures, kernel comparison); return the figures.

    Returned keys: `out`, `data`, `model`, `weights` ("random" or the cached file), `device`, `iters`,
    `miou_before`, `miou_after`, `aacc_before`, `aacc_after`, `iou_before`/`iou_after` (per class, None
    where a class is absent), `classes`, `curves`, `train_curves`, `comparison`, `overlays`,
    `trained_weights`, `train_seconds`, `kernels`, `seconds`. The same is written to OUT/summary.json.

    Example:
        >>> r = run_demo("demo_out", quick=True, progress=False)                 # doctest: +SKIP
        >>> sorted(r)[:3]                                                        # doctest: +SKIP
        ['aacc_after', 'aacc_before', 'classes']
    """
    from eval.datasets import FolderDataset
    from eval.evaluate import evaluate
    from eval.predict import predict_files
    from eval.report import write_json_atomic
    from train import TrainConfig, finetune
    from train.engine import build_model
    from train.plot import plot_curves, read_log
    from train.synthetic import make_scene_dataset
    from zoo import Segmenter
    from zoo.hub import cached_weights, get_cache_dir
    from zoo.registry import get_config
    from zoo.utils import resolve_device

    started = time.perf_counter()
    plan = QUICK if quick else FULL
    if iters is not None:
        if iters < 1:
            raise ValueError(f"--iters must be >= 1, got {iters}")
        plan = replace(plan, iters=int(iters), eval_interval=max(int(iters) // 6, 1))
    out = Path(out)
    name = resolve_model(model)
    config = get_config(name)
    dev = resolve_device(device)
    _prepare_out(out)
    say(f"isa demo: fine-tune an ISANet from the zoo on synthetic scenes, then compare the attention kernels"
        f"{'  (--quick: toy sizes)' if quick else ''}")
    say(f"output folder: {out.resolve()}\n")

    # 1. dataset ---------------------------------------------------------------------------------
    data = make_scene_dataset(out / "data", num_train=plan.num_train, num_val=plan.num_val, size_hw=plan.size_hw,
                              seed=seed)
    train_set, val_set = FolderDataset(data, "train"), FolderDataset(data, "val")
    classes, palette = list(val_set.classes), [list(c) for c in val_set.palette]
    h, w = plan.size_hw
    say(f"[1/4] dataset: {len(train_set)} train + {len(val_set)} val scenes of {h}x{w} pixels, {len(classes)} classes "
        f"({', '.join(classes)})")
    say("      Textures, shapes and position tell the classes apart: every class draws its colours from the same range.")
    say(f"      This is the layout your own data needs (`isa train --model NAME --data {data}`):")
    say(f"        {data}/dataset.json           classes, palette (colours for overlays), ignore_index 255")
    say(f"        {data}/images/train/*.png     RGB images (.png or .jpg)")
    say(f"        {data}/masks/train/*.png      8-bit PNGs of the same names: pixel = class index, 255 = unlabelled")
    say(f"        {data}/images/val, masks/val  the same for evaluation\n")

    # 2. model -------------------------------------------------------------------------------------
    cached = cached_weights(name)
    weights = str(cached) if cached is not None else None
    say(f"[2/4] model: {name} (ResNet-{config.depth}-D8, published mIoU {config.mIoU:.2f} on {config.dataset})")
    if cached is not None:
        say(f"      weights: MMSegmentation's published checkpoint, cached at {cached}")
        say(f"               (only the classifiers are re-initialised, for {len(classes)} classes)")
    else:
        say(f"      weights: random initialisation (no cached weights in {get_cache_dir()})")
        say(f"               `isa download {name}` caches MMSegmentation's checkpoint;")
        say("               the next `isa demo` then fine-tunes from it")
    say(f"      device: {dev}{'' if dev.type == 'cuda' else f' ({torch.get_num_threads()} threads)'}\n")

    # the train package's own fine-tuning settings; img_scale (4 W, H) keeps the images at their size
    run_dir = out / "train"
    options: Dict[str, Any] = dict(
        iters=plan.iters, crop_size=plan.crop_hw, batch_size=plan.batch_size, weights=weights or "none",
        lr=plan.lr, device=str(dev), seed=seed, checkpoint_interval=plan.iters, eval_interval=plan.eval_interval,
        progress=progress, img_scale=(4 * w, h), ratio_range=(0.75, 1.5), keep_checkpoints=1,
        log_interval=plan.log_interval, work_dir=str(run_dir))
    cfg = TrainConfig.for_finetune(name, str(data), **options)

    # 3. before / fine-tune / after ---------------------------------------------------------------
    say(f"[3/4] fine-tuning: {plan.iters} iterations, batch {plan.batch_size}, random {plan.crop_hw[0]}x"
        f"{plan.crop_hw[1]} crops, SGD lr {plan.lr} (poly), seed {seed}; the same training by hand:")
    say(f"      isa train --model {name} --data {data} --weights {'none' if weights is None else weights} "
        f"--iters {plan.iters} --batch-size {plan.batch_size} --crop-size {plan.crop_hw[0]} {plan.crop_hw[1]} "
        f"--lr {plan.lr} --img-scale {4 * w} {h} --ratio-range 0.75 1.5 --work-dir {run_dir}")
    torch.manual_seed(seed)  # the engine seeds the same way before building: this is its starting model
    initial = Segmenter(build_model(cfg, len(classes)), device=dev, dtype="float32", scale_wh=cfg.img_scale)
    shown = list(range(min(plan.show_images, len(val_set))))
    before = evaluate(initial, val_set, num_workers=0, progress=False)
    before_maps = {i: initial(val_set[i][0]).numpy() for i in shown}
    del initial
    say(f"      mIoU before fine-tuning: {before['mIoU']:.1f}  (val, {len(val_set)} images)")

    t_train = time.perf_counter()
    result = finetune(name, str(data), **options)
    train_seconds = time.perf_counter() - t_train
    after = result["metrics"]
    say(f"      mIoU after {plan.iters} iterations: {after['mIoU']:.1f}  (training took {train_seconds:.0f} s)\n")
    say(_iou_table(classes, before, after))
    shutil.rmtree(Path(run_dir) / "checkpoints", ignore_errors=True)  # resumable state (~300 MB): not needed here

    curves = out / "curves.png"
    records = [{"mode": "val", "iter": 0, "mIoU": before["mIoU"]}] + read_log(result["log"])
    plot_curves(records, curves, title=f"isa demo: {name} on synthetic scenes ({dev})")

    trained = Segmenter(weights=result["weights"], device=dev, dtype="float32")  # the file says what it is
    rows = []
    for i in shown:
        image, mask, _ = val_set[i]
        rows.append({"image": image.permute(1, 2, 0).numpy(), "mask": mask.numpy(), "before": before_maps[i],
                     "after": trained(image).numpy()})
    comparison = comparison_png(rows, classes, palette, out / "comparison.png")
    overlay_records = predict_files(trained, [val_set.samples[i].image_path for i in shown], out / "overlays",
                                    progress=False)
    del trained
    say("\n      outputs:")
    say(f"        training curves   {curves}  (loss and val mIoU; iteration 0 = before)")
    say(f"        before/after      {comparison}  (image | ground truth | before | after)")
    say(f"        overlays          {out / 'overlays'}/  (`isa predict` output: *_overlay.png with legend, *_mask.png)")
    say(f"        fine-tuned model  {result['weights']}")
    say(f"        training log      {result['log']}\n")

    # 4. kernels -----------------------------------------------------------------------------------
    kernel_info: Dict[str, Any] = {}
    if kernels:
        say("[4/4] attention kernels")
        kernel_info = _kernel_section(out, plan, seed, say)
    else:
        say("[4/4] attention kernels: skipped (kernels=False)")

    seconds = time.perf_counter() - started
    summary = {
        "out": str(out), "data": str(data), "model": name, "weights": weights or "random", "device": str(dev),
        "iters": plan.iters, "batch_size": plan.batch_size, "crop_hw": list(plan.crop_hw), "lr": plan.lr,
        "seed": seed, "quick": quick, "classes": classes,
        "miou_before": float(before["mIoU"]), "miou_after": float(after["mIoU"]),
        "aacc_before": float(before["aAcc"]), "aacc_after": float(after["aAcc"]),
        "iou_before": _clean(before["IoU"]), "iou_after": _clean(after["IoU"]),
        "curves": str(curves), "train_curves": result["curves"], "comparison": str(comparison),
        "overlays": [r["overlay"] for r in overlay_records], "trained_weights": result["weights"],
        "train_seconds": train_seconds, "kernels": kernel_info, "seconds": seconds,
        "plan": asdict(plan),
    }
    write_json_atomic(out / "summary.json", summary)
    say(f"\ndone in {seconds / 60:.1f} min: mIoU {before['mIoU']:.1f} -> {after['mIoU']:.1f}; figures in "
        f"{out / 'summary.json'}")
    return summary


def _kernel_section(out: Path, plan: DemoPlan, seed: int, say: Callable[[str], None]) -> Dict[str, Any]:
    from isa.bench import cpu_kernel_report

    if torch.cuda.is_available():
        say(f"      GPU: {torch.cuda.get_device_name()} - running `isa bench kernels` (Triton vs eager vs SDPA "
            "vs FlexAttention):")
        return {"gpu": gpu_kernel_bench(out)}
    return cpu_kernel_report(plan.cpu_shape, plan.cpu_reps, plan.interp_shape, plan.interp_block, seed, say,
                             indent="      ")


# --------------------------------------------------------------------------------------------------
# CLI


def _main(args: argparse.Namespace) -> int:
    result = run_demo(args.out, model=args.model, iters=args.iters, device=args.device, seed=args.seed,
                      quick=args.quick, progress=not args.no_progress)
    check = result["kernels"].get("interpreter", {})
    return 1 if check.get("ok") is False else 0


def add_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Add `isa demo` to an argparse subparsers object.

    Example:
        >>> parser = argparse.ArgumentParser(prog="isa"); sub = parser.add_subparsers()
        >>> _ = add_parser(sub)
        >>> parser.parse_args(["demo", "--quick"]).quick
        True
    """
    parser = subparsers.add_parser(
        "demo", help="fine-tune a zoo model on synthetic scenes and compare the kernels (a few minutes on CPU)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="variant name, pattern or fragment (default r50-d8: a cached R-50-D8 variant if any)")
    parser.add_argument("--iters", type=int, default=None, help=f"fine-tuning iterations (default {FULL.iters})")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda [auto]")
    parser.add_argument("--out-dir", "--out", dest="out", default=DEFAULT_OUT,
                        help=f"output folder (default ./{DEFAULT_OUT})")
    parser.add_argument("--seed", type=int, default=0, help="dataset and training seed (default 0)")
    parser.add_argument("--quick", action="store_true", help="toy sizes: every step once in well under a minute")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=_main)
    return parser
