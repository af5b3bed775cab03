"""`isa bench model` and `isa bench kernels`: benchmarks that print a table and write JSON."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Dict

import torch

from zoo.utils import DTYPE_CHOICES, parse_dtype, write_bytes_atomic


def _size(text: str) -> tuple:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must look like 512x1024 (HxW), got {text!r}") from None
    return h, w


def _write_json(path: str, payload: Dict[str, Any]) -> None:
    write_bytes_atomic(Path(path), (json.dumps(payload, indent=1) + "\n").encode())
    print(f"wrote {path}")


def _model(args: argparse.Namespace) -> int:
    from zoo.bench import bench_model

    result = bench_model(args.model, args.size, args.device, args.dtype, args.warmup, args.repeats,
                         not args.no_baseline, args.backend, args.threads)
    line = (f"{result['model']} {args.size[0]}x{args.size[1]} {result['device']} {result['dtype']}: "
            f"{result['ms_median']:.1f} ms (median of {args.repeats})")
    if "reference_ms_median" in result:
        line += (f"; reference fp32 path {result['reference_ms_median']:.1f} ms "
                 f"-> {result['speedup_vs_reference']:.2f}x")
    print(line)
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("_all")}))
    if args.json:
        _write_json(args.json, result)
    return 0


def _kernels(args: argparse.Namespace) -> int:
    from isa_triton import bench

    dtype = parse_dtype(args.dtype)
    if not torch.cuda.is_available():
        print("isa bench kernels: no CUDA GPU here: the Triton kernels' timings need one. What this CPU can run: "
              "`isa demo` (eager backends timed side by side, and the Triton kernels checked against fp64 in "
              "Triton's interpreter)")
        return 1
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | dtype {args.dtype} | "
          f"Cqk {args.cqk} Cv {args.cv} | do_bench median")
    print(bench.HEADER)
    started = time.monotonic()
    deadline = started + args.budget if args.budget else None
    rows = bench.run_benchmark(dtype, args.cases, args.patterns, args.batch, args.layouts, args.backends,
                               not args.no_backward, args.cqk, args.cv, warmup=args.warmup, rep=args.rep,
                               deadline=deadline)
    sweep = bench.run_sweep(dtype, cqk=args.cqk, cv=args.cv, deadline=deadline) if args.sweep else []
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, dtype=args.dtype,
                  time=time.strftime("%Y-%m-%d %H:%M:%S"), seconds=time.monotonic() - started, rows=rows,
                  sweep=sweep)
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        pass
    if args.json:
        _write_json(args.json, result)
    return 0


def add_parser(subparsers: Any) -> None:
    """Register `isa bench model` and `isa bench kernels`."""
    from isa_triton import bench as kernel_bench

    bench = subparsers.add_parser("bench", help="benchmarks: `isa bench model`, `isa bench kernels`")
    sub = bench.add_subparsers(dest="bench_command", required=True, metavar="WHAT")

    p = sub.add_parser("model", help="time eval-mode inference of a variant (optimized vs MMSeg's reference path)")
    p.add_argument("--model", default="isanet_r50-d8_512x1024_40k_cityscapes")
    p.add_argument("--size", type=_size, default=(512, 1024), help="HxW (default 512x1024)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda [auto]")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32")
    p.add_argument("--backend", default="auto", help="attention backend of the optimized path")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    p.add_argument("--no-baseline", action="store_true", help="skip the reference-path timing")
    p.add_argument("--json", metavar="FILE", help="write the result here")
    p.set_defaults(func=_model)

    p = sub.add_parser("kernels", help="time the attention op per backend (CUDA)",
                       description=kernel_bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="bfloat16")
    p.add_argument("--json", metavar="FILE", help="write the rows here")
    p.add_argument("--cases", nargs="+", choices=list(kernel_bench.CASES), default=list(kernel_bench.CASES))
    p.add_argument("--patterns", nargs="+", choices=kernel_bench.PATTERNS, default=list(kernel_bench.PATTERNS))
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--layouts", nargs="+", choices=("nchw", "channels_last"), default=["nchw", "channels_last"])
    p.add_argument("--backends", nargs="+", choices=kernel_bench.BACKENDS, default=list(kernel_bench.BACKENDS))
    p.add_argument("--cqk", type=int, default=256)
    p.add_argument("--cv", type=int, default=512)
    p.add_argument("--no-backward", action="store_true", help="time the forward only")
    p.add_argument("--sweep", action="store_true", help="also time alternative Triton launch configs")
    p.add_argument("--warmup", type=int, default=10, help="do_bench warm-up (ms)")
    p.add_argument("--rep", type=int, default=40, help="do_bench repetition time (ms)")
    p.add_argument("--budget", type=float, default=0, help="skip what is left after this many seconds (0: none)")
    p.set_defaults(func=_kernels)
