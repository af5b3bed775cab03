#!/usr/bin/env python
"""Images/s of `eval.evaluate` on the CPU: this tree against another checkout (the code before batching), side by side.

Each measurement is a fresh child process (`--child`) that builds the same seeded R-50 Cityscapes model and a
synthetic folder dataset of same-size images, then times `evaluate()` (after a warm-up on one batch). Rounds
alternate between the variants, so load from other users of a shared machine hits them alike; the table gives
the median images/s over rounds and each variant's speed-up against the first.

    .venv/bin/python scripts/bench_eval.py --baseline /tmp/isa_base --threads 2 --rounds 3
    .venv/bin/python scripts/bench_eval.py --baseline /tmp/isa_base --variants base:1 new:1 new:4

Variants are NAME:BATCH, NAME `base` (the --baseline tree; batch must be 1 there) or `new` (this tree).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = "isanet_r50-d8_512x1024_40k_cityscapes"


def make_data(root: Path, n: int, hw: tuple[int, int]) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "images/val").mkdir(parents=True, exist_ok=True)
    (root / "masks/val").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)).save(root / f"images/val/im{i:03d}.png")
        Image.fromarray(rng.integers(0, 19, hw).astype(np.uint8)).save(root / f"masks/val/im{i:03d}.png")
    (root / "dataset.json").write_text(json.dumps({"classes": [f"c{i}" for i in range(19)]}))


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from eval.datasets import FolderDataset
    from eval.evaluate import evaluate
    from zoo import Segmenter, create_model

    torch.manual_seed(0)
    seg = Segmenter(create_model(MODEL), device="cpu", dtype="float32", scale_wh=tuple(args.scale))
    data = FolderDataset(args.data, "val")
    kwargs = {"batch_size": args.batch} if args.batch != 1 else {}
    # warm-up with a full batch: oneDNN builds its kernels for each new input shape on first use
    evaluate(seg, data, max_images=args.batch, num_workers=0, progress=False, **kwargs)
    cpu0, t0 = time.process_time(), time.perf_counter()
    result = evaluate(seg, data, num_workers=args.workers, progress=False, **kwargs)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    print(json.dumps({"images": result["num_images"], "wall_s": wall, "cpu_s": cpu, "mIoU": result["mIoU"],
                      "load": os.getloadavg()[0]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, help="a checkout of the code before (e.g. git archive c5bdbf1)")
    parser.add_argument("--variants", nargs="+", default=["base:1", "new:1", "new:4"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, nargs=2, default=(256, 512), metavar=("H", "W"))
    parser.add_argument("--scale", type=int, nargs=2, default=(512, 256), metavar=("W", "H"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    data = Path(tempfile.mkdtemp()) / "data"
    make_data(data, args.images, tuple(args.size))
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    for r in range(args.rounds):
        for variant in args.variants:
            name, batch = variant.split(":")
            tree = REPO if name == "new" else args.baseline
            env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(args.threads))
            cmd = [sys.executable, str(REPO / "scripts/bench_eval.py"), "--child", "--data", str(data), "--batch",
                   batch, "--threads", str(args.threads), "--workers", str(args.workers), "--scale",
                   *map(str, args.scale)]
            out = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, check=True)
            record = json.loads(out.stdout.strip().splitlines()[-1])
            runs[variant].append(record)
            print(f"round {r + 1} {variant:8} {record['images'] / record['wall_s']:6.3f} img/s  "
                  f"(cpu {record['cpu_s']:.1f} s, load {record['load']:.1f}, mIoU {record['mIoU']:.4f})", flush=True)
    first = args.variants[0]
    base = statistics.median(r["images"] / r["wall_s"] for r in runs[first])
    print(f"\n{args.images} images {args.size[0]}x{args.size[1]}, scale {args.scale[0]}x{args.scale[1]}, "
          f"{args.threads} threads, {args.workers} workers, R-50 fp32")
    for variant, records in runs.items():
        speed = statistics.median(r["images"] / r["wall_s"] for r in records)
        rounds = ", ".join(f"{r['images'] / r['wall_s']:.3f}" for r in records)
        print(f"{variant:8} median {speed:6.3f} img/s  x{speed / base:.2f}  (rounds: {rounds})")


if __name__ == "__main__":
    main()
