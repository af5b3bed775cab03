#!/usr/bin/env python
"""Training-iteration time and peak memory of ISANet at a recipe's crop and per-GPU batch (GPU).

Default: R-50-D8 Cityscapes (isanet_r50-d8_512x1024_40k_cityscapes), crop 512x1024, batch 2 per GPU
(the recipe's 4 GPUs x 2), synthetic normalized images and labels (5 % ignored), one full training
iteration = forward, MMSeg loss (decode + 0.4 aux), backward, SGD step, poly step. For each
attention backend (eager, triton) and precision (fp32, bf16 autocast): a few warm-up iterations,
then `--iters` timed iterations between CUDA events; peak memory = torch.cuda.max_memory_allocated
over the timed iterations (optimizer state included). Prints a table and writes JSON to --json.

    python scripts/gpu_train_bench.py --json train_bench.json
    python scripts/gpu_train_bench.py --backends eager triton sdpa --dtypes fp32 bf16 fp16

Budget: about a minute on an H100 with the defaults (4 configurations x (3 + 10) iterations);
configurations are skipped once --budget-s seconds have passed, so the script ends in time.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def bench_one(name: str, backend: str, dtype: str, batch: int, crop_hw: List[int], warmup: int,
              iters: int, device: str = "cuda") -> Dict[str, Any]:
    """Time `iters` training iterations of variant `name` with one backend and precision."""
    from train.loss import isanet_loss
    from train.schedule import PolyLR
    from zoo import create_model
    from zoo.inference import autocast
    from zoo.utils import parse_dtype

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    model = create_model(name, backend=backend).to(dev).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    sched = PolyLR(opt, max_iters=10_000)
    scaler = torch.amp.GradScaler(dev.type, enabled=dtype == "fp16")
    g = torch.Generator(device=dev).manual_seed(0)
    h, w = crop_hw
    x = torch.randn(batch, 3, h, w, device=dev, generator=g)
    y = torch.randint(0, model.num_classes, (batch, h, w), device=dev, generator=g)
    y[torch.rand(batch, h, w, device=dev, generator=g) < 0.05] = 255
    cast = autocast(dev, parse_dtype(dtype))

    def step() -> torch.Tensor:
        with cast:
            out = model(x)
        loss = isanet_loss(out, y, model.align_corners)["loss"]
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        return loss.detach()

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t_start = time.perf_counter()
    losses = [step() for _ in range(iters)]
    if cuda:
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / iters
        peak = torch.cuda.max_memory_allocated(dev) / 2**30
    else:  # --device cpu: a smoke run of this script, not a benchmark
        ms = (time.perf_counter() - t_start) * 1e3 / iters
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    loss = float(torch.stack(losses).float().mean())
    result = {"model": name, "backend": backend, "dtype": dtype, "batch_per_gpu": batch, "crop_hw": list(crop_hw),
              "ms_per_iter": ms, "img_per_s": batch * 1000.0 / ms,
              "peak_mem_gib": peak, "mean_loss": loss,
              "finite": math.isfinite(loss)}
    del model, opt, x, y
    if cuda:
        torch.cuda.empty_cache()
    return result


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="isanet_r50-d8_512x1024_40k_cityscapes")
    p.add_argument("--backends", nargs="+", default=["eager", "triton"])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    p.add_argument("--batch", type=int, help="per-GPU batch (default: the recipe's samples_per_gpu)")
    p.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"), help="default: the recipe's crop")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=150.0, help="skip configurations started after this")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: smoke-test the script only")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_train_bench: needs a CUDA GPU (or --device cpu for a smoke run)", file=sys.stderr)
        return 2
    from zoo import get_config

    vc = get_config(args.model)
    batch = args.batch or vc.samples_per_gpu
    crop = args.crop or list(vc.crop_size_hw)
    torch.backends.cudnn.benchmark = True  # MMSeg's setting
    t0 = time.perf_counter()
    rows: List[Dict[str, Any]] = []
    for dtype in args.dtypes:
        for backend in args.backends:
            if time.perf_counter() - t0 > args.budget_s:
                rows.append({"backend": backend, "dtype": dtype, "skipped": "time budget"})
                continue
            try:
                rows.append(bench_one(args.model, backend, dtype, batch, crop, args.warmup, args.iters,
                                      args.device))
            except Exception as exc:  # a missing backend must not lose the other rows
                rows.append({"backend": backend, "dtype": dtype, "error": f"{type(exc).__name__}: {exc}"[:300]})
                if args.device == "cuda":
                    torch.cuda.empty_cache()
    base = {(r["dtype"]): r["ms_per_iter"] for r in rows if r.get("backend") == "eager" and "ms_per_iter" in r}
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"{args.model}  crop {crop[0]}x{crop[1]}  batch/GPU {batch}  {gpu}")
    print(f"{'backend':>8} {'dtype':>5} {'ms/iter':>9} {'img/s':>7} {'peak GiB':>9} {'vs eager':>8}  loss")
    for r in rows:
        if "ms_per_iter" not in r:
            print(f"{r['backend']:>8} {r['dtype']:>5}  {r.get('error') or r.get('skipped')}")
            continue
        speed = base.get(r["dtype"])
        rel = f"{speed / r['ms_per_iter']:.2f}x" if speed else "-"
        print(f"{r['backend']:>8} {r['dtype']:>5} {r['ms_per_iter']:9.1f} {r['img_per_s']:7.2f} "
              f"{r['peak_mem_gib']:9.2f} {rel:>8}  {r['mean_loss']:.4f}")
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        payload = {"script": "scripts/gpu_train_bench.py", "argv": sys.argv[1:], "date": datetime.datetime.now(
                   datetime.timezone.utc).isoformat(timespec="seconds"), "gpu": gpu,
                   "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
                   "results": rows}
        try:
            import triton
            payload["triton"] = triton.__version__
        except ImportError:
            pass
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1))
    return 0 if all("ms_per_iter" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
