"""`isa bench model`, `isa bench kernels` and `isa bench data`: benchmarks that print a table and write JSON."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch

from isa import UsageError
from zoo.utils import DTYPE_CHOICES, parse_dtype

_PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _size(text: str) -> tuple:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must look like 512x1024 (HxW), got {text!r}") from None
    return h, w


def _write_json(path: str, payload: Dict[str, Any]) -> None:
    from eval.report import write_json_atomic

    write_json_atomic(path, payload)
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


def _median_ms(call: Callable[[], Any], reps: int) -> float:
    call()  # warm-up: allocator, first-call dispatch
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def cpu_attention_times(shape: Sequence[int] = (1, 256, 512, 64, 64), block: Tuple[int, int] = (8, 8),
                        reps: int = 7, seed: int = 0) -> List[Dict[str, Any]]:
    """Median forward time (ms) of the eager and SDPA backends per pattern on CPU fp32 tensors.

    Also the largest difference between the two outputs (they compute the same thing).

    Example:
        >>> rows = cpu_attention_times((1, 16, 16, 16, 16), reps=1)
        >>> [(r["pattern"], r["max_abs_diff"] < 1e-4) for r in rows]
        [('long', True), ('short', True)]
    """
    from isa_triton import sparse_attention

    n, cqk, cv, h, w = (int(v) for v in shape)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, cqk, h, w, generator=gen)
    k = torch.randn(n, cqk, h, w, generator=gen)
    v = torch.randn(n, cv, h, w, generator=gen)
    rows = []
    for pattern in ("long", "short"):
        row: Dict[str, Any] = {"pattern": pattern, "shape": [n, cqk, cv, h, w], "block": list(block)}
        outputs = {}
        for backend in ("eager", "sdpa"):
            fn = lambda: sparse_attention(q, k, v, pattern, block, backend=backend)  # noqa: E731
            row[f"{backend}_ms"] = _median_ms(fn, reps)
            outputs[backend] = fn()
        row["max_abs_diff"] = float((outputs["eager"] - outputs["sdpa"]).abs().max())
        rows.append(row)
    return rows


_INTERPRETER_SCRIPT = r"""
import json, sys, time
try:
    import triton  # noqa: F401  (TRITON_INTERPRET=1 is already in the environment)
except ImportError as exc:
    print(json.dumps({"skipped": f"triton is not installed ({exc})"})); sys.exit(0)
import torch
from isa_triton.checks import errors_vs_fp64
n, cqk, cv, h, w, bh, bw, seed = (int(x) for x in sys.argv[1:9])
rows = []
for pattern in ("long", "short"):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(n, cqk, h, w, generator=gen), torch.randn(n, cqk, h, w, generator=gen)
    v = torch.randn(n, cv, h, w, generator=gen)
    start = time.perf_counter()
    # flash-attention's rule, as tests/test_kernels.py: error <= 2 x eager fp32's error + 1e-6
    errors = errors_vs_fp64(q, k, v, pattern, (bh, bw), backend="triton", atol=1e-6)
    rows.append({"pattern": pattern, "seconds": time.perf_counter() - start, "errors": errors})
print(json.dumps({"rows": rows}))
"""


def triton_interpreter_check(shape: Sequence[int] = (1, 16, 24, 16, 16), block: Tuple[int, int] = (4, 4),
                             seed: int = 0, timeout_s: float = 240.0) -> Dict[str, Any]:
    """Run the Triton kernels (forward and backward) in Triton's interpreter on CPU, against fp64.

    A subprocess, because TRITON_INTERPRET=1 must be set before triton is imported. Returns
    {"rows": [{"pattern", "seconds", "errors": {out|dq|dk|dv: {err, eager_err, bound, ok}}}], "ok"}
    or {"skipped": reason} / {"error": message}.

    Example:
        >>> triton_interpreter_check((1, 8, 8, 8, 8), (2, 2))["ok"]          # doctest: +SKIP
        True
    """
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("ISA_BACKEND", None)
    env["PYTHONPATH"] = os.pathsep.join([str(_PROJECT_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    args = [str(int(x)) for x in (*shape, *block, seed)]
    try:
        proc = subprocess.run([sys.executable, "-c", _INTERPRETER_SCRIPT, *args], capture_output=True, text=True,
                              env=env, cwd=_PROJECT_ROOT, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"the interpreter check took more than {timeout_s:.0f} s and was stopped"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit code {proc.returncode}: {tail}"}
    result = json.loads(lines[-1])
    if "rows" in result:
        result["ok"] = all(e["ok"] for row in result["rows"] for e in row["errors"].values())
    return result


def cpu_kernel_report(cpu_shape: Sequence[int] = (1, 256, 512, 64, 64), reps: int = 7,
                      interp_shape: Sequence[int] = (1, 16, 24, 16, 16), interp_block: Tuple[int, int] = (4, 4),
                      seed: int = 0, say: Callable[[str], None] = print, indent: str = "") -> Dict[str, Any]:
    """What a CPU can show of the attention backends: eager and SDPA timed side by side, and the Triton
    kernels checked against fp64 in Triton's interpreter (a correctness check, not a timing)."""
    n, cqk, cv, h, w = cpu_shape
    say(f"{indent}CPU forward, fp32, q/k {n}x{cqk}x{h}x{w}, v {n}x{cv}x{h}x{w}, 8x8 blocks (an ISA head on a "
        f"{8 * h}x{8 * w} image), median of {reps}:")
    rows = cpu_attention_times(cpu_shape, (8, 8), reps, seed)
    say(f"{indent}  pattern   eager ms   sdpa ms   max |eager - sdpa|")
    for r in rows:
        say(f"{indent}  {r['pattern']:<7} {r['eager_ms']:9.2f} {r['sdpa_ms']:9.2f}   {r['max_abs_diff']:.1e}")
    n, cqk, cv, h, w = interp_shape
    bh, bw = interp_block
    say(f"{indent}Triton kernels in Triton's interpreter (TRITON_INTERPRET=1, CPU), q/k {n}x{cqk}x{h}x{w}, "
        f"v {n}x{cv}x{h}x{w}, {bh}x{bw} blocks,")
    say(f"{indent}forward and backward against an fp64 reference (pass: error <= 2 x eager fp32's error + 1e-6):")
    check = triton_interpreter_check(interp_shape, interp_block, seed)
    if "rows" in check:
        for row in check["rows"]:
            parts = [f"{k} {e['err']:.1e}{'' if e['ok'] else ' FAIL'}" for k, e in row["errors"].items()]
            say(f"{indent}  {row['pattern']:<6} max error  {'  '.join(parts)}   ({row['seconds']:.1f} s)")
        say(f"{indent}  {'all within bounds' if check['ok'] else 'SOME ERRORS ABOVE THE BOUND'}")
    else:
        say(f"{indent}  not run: {check.get('skipped') or check.get('error')}")
    say(f"{indent}Kernel speed needs a GPU: the interpreter checks correctness only, it is not a timing. On a")
    say(f"{indent}CUDA machine `isa bench kernels` times Triton against eager, SDPA and FlexAttention.")
    return {"cpu": rows, "interpreter": check}


def _kernels(args: argparse.Namespace) -> int:
    from isa_triton import bench

    dtype = parse_dtype(args.dtype)
    if not torch.cuda.is_available():
        print("isa bench kernels: no CUDA GPU here, so no Triton timings; what this CPU can run instead "
              f"(in float32{'' if dtype == torch.float32 else f'; --dtype {args.dtype} is for the GPU timings'}):")
        result = {"dtype": "float32", "device": "cpu", **cpu_kernel_report()}
        if args.json:
            _write_json(args.json, result)
        check = result["interpreter"]
        return 1 if check.get("ok") is False else 0
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


FOLDER_BENCH_MODEL = "isanet_r50-d8_512x512_20k_voc12aug"  # isa train --model's usual choice for own data


def _data(args: argparse.Namespace) -> int:
    from train.bench import bench_data, format_result, make_benchmark_data

    if bool(args.data) == bool(args.data_root):
        raise UsageError("isa bench data: pass --data DIR (a folder dataset: DIR/images/train, DIR/masks/train) or "
                         "--data-root DIR with --recipe NAME (a benchmark layout)")
    if args.data_root and not args.recipe:
        raise UsageError("--data-root needs --recipe NAME (the variant whose pipeline to time)")
    if args.data and args.make_data:
        raise UsageError("--make-data writes a benchmark layout under --data-root; with --data time your folder")
    recipe = args.recipe or FOLDER_BENCH_MODEL
    data_root = args.data or args.data_root
    if args.make_data:
        dataset = "ade20k" if "ade20k" in args.recipe else "cityscapes"
        data_root = str(make_benchmark_data(args.data_root, dataset, args.make_data))
        print(f"wrote {args.make_data} {dataset} training pairs under {data_root}")
    rows = [bench_data(recipe, data_root, workers=w, samples=args.samples, warmup=args.warmup,
                       batch_size=args.batch_size, reference=args.reference, folder=bool(args.data),
                       crop_size=args.crop_size) for w in args.workers]
    for row in rows:
        print(format_result(row))
    if len(rows) > 1 and rows[0]["workers"] > 0:
        print(f"loader scaling: {rows[-1]['samples_per_s'] / rows[0]['samples_per_s']:.2f}x from "
              f"{rows[0]['workers']} to {rows[-1]['workers']} workers")
    result = rows[0] if len(rows) == 1 else {"recipe": recipe, "rows": rows}
    if args.json:
        _write_json(args.json, result)
    print(json.dumps({k: v for k, v in result.items() if k != "ms_all"}))
    return 0


def add_parser(subparsers: Any) -> None:
    """Register `isa bench model` and `isa bench kernels`."""
    from isa_triton import bench as kernel_bench

    bench = subparsers.add_parser("bench", help="benchmarks: `isa bench model`, `isa bench kernels`, `isa bench data`")
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
    p.add_argument("--out", "--json", dest="json", metavar="FILE", help="write the result as JSON here")
    p.set_defaults(func=_model)

    p = sub.add_parser("kernels", help="time the attention op per backend (CUDA)",
                       description=kernel_bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="bfloat16")
    p.add_argument("--out", "--json", dest="json", metavar="FILE", help="write the rows as JSON here")
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

    p = sub.add_parser("data", help="time the recipe's training data pipeline per sample (one core) and the loader",
                       description="Decode, ratio resize, crop, flip, photometric distortion and pad of a recipe, "
                       "as `isa train` runs them. --workers 0: one process on one thread, ms per sample after a "
                       "warm-up; --workers N: the DataLoader's samples per second. MMSegmentation's own pipeline "
                       "is timed beside it by tools/mmseg_pipeline_reference.py.")
    p.add_argument("--recipe", help="a variant name, e.g. isanet_r50-d8_512x1024_40k_cityscapes (with --data: "
                                    f"whose fine-tuning crop to use [{FOLDER_BENCH_MODEL}])")
    p.add_argument("--data-root", help="a benchmark dataset (Cityscapes / ADE20K layout) for --recipe")
    p.add_argument("--data", metavar="DIR", help="a folder dataset (DIR/images/train, DIR/masks/train), timed as "
                                                 "`isa train --model NAME --data DIR` reads and augments it")
    p.add_argument("--crop-size", type=int, nargs=2, metavar=("H", "W"), help="replace the crop size")
    p.add_argument("--workers", type=int, nargs="+", default=[0], help="0: one process; N: DataLoader workers "
                   "(several values: one row each) [0]")
    p.add_argument("--samples", type=int, default=24, help="timed samples [24]")
    p.add_argument("--warmup", type=int, default=4, help="untimed samples (or batches) first [4]")
    p.add_argument("--batch-size", type=int, default=2, help="loader batch with --workers N [2]")
    p.add_argument("--make-data", type=int, default=0, metavar="N",
                   help="first write N synthetic training pairs at the recipe's sizes under --data-root")
    p.add_argument("--reference", action="store_true",
                   help="time the reference pipeline (train.transforms) instead of the fast one")
    p.add_argument("--out", "--json", dest="json", metavar="FILE", help="write the result as JSON here")
    p.set_defaults(func=_data)
