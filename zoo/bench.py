"""`isa bench model`: eval-mode inference time of a variant, reference path vs the optimized path."""
from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Dict, List

import torch

from .factory import create_model
from .fuse import optimize_for_inference

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parse_size(text: str) -> tuple:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must look like 512x1024 (HxW), got {text!r}") from None
    return h, w


def _time(fn, device: torch.device, warmup: int, repeats: int) -> List[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def bench_model(name: str, size: tuple = (512, 1024), device: str = "cpu", dtype: str = "float32",
                warmup: int = 1, repeats: int = 5, baseline: bool = True, backend: str = "auto",
                threads: int = 0) -> Dict[str, object]:
    """Median eval-mode forward time (ms) of the optimized path and, side by side, the reference path.

    The reference path is MMSegmentation's structure run as it runs it: unfused BN, NCHW, eager
    permute attention, fp32 under `torch.no_grad`. The optimized path folds BN, uses channels_last,
    `torch.inference_mode`, the chosen attention backend and autocast to `dtype`.
    """
    dev = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    model = create_model(name, backend=backend).eval().to(dev)
    x = torch.randn(1, 3, *size, device=dev)
    result: Dict[str, object] = {"model": name, "size": list(size), "device": device, "dtype": dtype,
                                 "threads": torch.get_num_threads(), "backend": backend,
                                 "torch": torch.__version__}
    fast = optimize_for_inference(model)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    cast = torch.autocast(dev.type, dtype=DTYPES[dtype]) if dtype != "float32" else nullcontext()

    def run_fast():
        with torch.inference_mode(), cast:
            fast(x_cl)

    times = _time(run_fast, dev, warmup, repeats)
    result.update(ms_median=statistics.median(times), ms_all=times)
    if baseline:
        model.set_backend("eager")

        def run_ref():
            with torch.no_grad():
                model(x)

        ref = _time(run_ref, dev, warmup, repeats)
        result.update(reference_ms_median=statistics.median(ref), reference_ms_all=ref,
                      speedup_vs_reference=statistics.median(ref) / statistics.median(times))
    if dev.type == "cuda":
        result["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return result


def _run(args: argparse.Namespace) -> int:
    result = bench_model(args.model, args.size, args.device, args.dtype, args.warmup, args.repeats,
                         not args.no_baseline, args.backend, args.threads)
    line = f"{result['model']} {args.size[0]}x{args.size[1]} {args.device} {args.dtype}: " \
           f"{result['ms_median']:.1f} ms (median of {args.repeats})"
    if "reference_ms_median" in result:
        line += f"; reference fp32 path {result['reference_ms_median']:.1f} ms " \
                f"-> {result['speedup_vs_reference']:.2f}x"
    print(line)
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("_all")}))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(path)
    return 0


def add_parser(subparsers) -> None:
    """Register `isa bench model`."""
    p = subparsers.add_parser("model", help="time eval-mode inference of a variant")
    p.add_argument("--model", default="isanet_r50-d8_512x1024_40k_cityscapes")
    p.add_argument("--size", type=_parse_size, default=(512, 1024), help="HxW (default 512x1024)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--backend", default="auto", help="attention backend of the optimized path")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    p.add_argument("--no-baseline", action="store_true", help="skip the reference-path timing")
    p.add_argument("--json", help="write the result here")
    p.set_defaults(func=_run)
