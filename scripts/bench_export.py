"""CPU latency of an exported model against the PyTorch paths, side by side in one run (BENCHMARKS.md, "Export").

    python scripts/bench_export.py --size 512x1024 --threads 2 --repeats 5 --json export_bench.json [--pt2]

Rows (all fp32, batch 1, the same seeded random R-50-D8 weights, the same input):
- onnxruntime: `isa export --format onnx` of the model (static shape), CPUExecutionProvider,
  intra-op threads = --threads, inter-op 1, default graph optimisations (BN folding, fusions);
- PyTorch fast path: `zoo.fuse.optimize_for_inference` (BN folded, channels_last) under `torch.inference_mode`,
  what `isa predict` / `zoo.Segmenter` run;
- PyTorch eager reference: the unfused NCHW model with the eager (MMSegmentation-style) attention under
  `torch.no_grad`, as `isa bench model` times its baseline;
- (--pt2) the AOTInductor package of `isa export --format pt2`, loaded with `aoti_load_package`.

Calls are interleaved (one call of each row per round), so a busy machine slows every row alike and the
ratios stay comparable; the medians are printed as a table and written as JSON with the machine's load.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch._inductor  # aoti_load_package (not imported by `import torch`)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from zoo import create_model  # noqa: E402
from zoo.export import OnnxRuntimeModel, export_model  # noqa: E402
from zoo.fuse import optimize_for_inference  # noqa: E402
from zoo.utils import write_bytes_atomic  # noqa: E402


def _size(text: str) -> tuple:
    h, w = (int(v) for v in text.lower().split("x"))
    return h, w


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1]).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="isanet_r50-d8_512x1024_40k_cityscapes")
    parser.add_argument("--size", type=_size, default=(512, 1024), help="HxW [512x1024]")
    parser.add_argument("--threads", type=int, default=2, help="threads of every row [2]")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up round [5]")
    parser.add_argument("--pt2", action="store_true", help="also time the AOTInductor package (compiles 1-2 min)")
    parser.add_argument("--workdir", help="where the exported files go [a temporary folder]")
    parser.add_argument("--json", metavar="FILE", help="write the results here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model(args.model, backend="eager").eval()
    x = torch.randn(1, 3, *args.size, generator=torch.Generator().manual_seed(1))
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_export_"))

    start = time.perf_counter()
    onnx_path = export_model(model, workdir / "model.onnx", size=args.size)
    export_s = {"onnx": time.perf_counter() - start}
    runner = OnnxRuntimeModel(onnx_path, threads=args.threads)
    fast = optimize_for_inference(model)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def run_fast() -> torch.Tensor:
        with torch.inference_mode():
            return fast(x_cl)

    def run_eager() -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    rows: Dict[str, Callable[[], torch.Tensor]] = {
        "onnxruntime (isa export --format onnx)": lambda: runner(x),
        "PyTorch fast path (BN folded, channels_last, inference_mode)": run_fast,
        "PyTorch eager reference (unfused, NCHW, eager attention, no_grad)": run_eager,
    }
    if args.pt2:
        start = time.perf_counter()
        package = export_model(model, workdir / "model.pt2", size=args.size)
        export_s["pt2"] = time.perf_counter() - start
        compiled = torch._inductor.aoti_load_package(str(package))

        def run_pt2() -> torch.Tensor:
            with torch.inference_mode():
                return compiled(x)

        rows["AOTInductor package (isa export --format pt2)"] = run_pt2

    reference = run_eager()
    max_rel = {name: float((fn().double() - reference.double()).abs().max() / reference.double().abs().max())
               for name, fn in rows.items()}  # also the warm-up round
    load_before = os.getloadavg()
    times: Dict[str, List[float]] = {name: [] for name in rows}
    for _ in range(args.repeats):
        for name, fn in rows.items():
            begin = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - begin) * 1e3)
    load_after = os.getloadavg()

    eager = times[next(n for n in rows if n.startswith("PyTorch eager"))]
    # speed-ups per round, then their median: robust to a machine whose load changes between rounds
    speedup = {n: statistics.median(e / t for e, t in zip(eager, times[n])) for n in rows}
    print(f"{args.model} {args.size[0]}x{args.size[1]}, batch 1, fp32, {args.threads} threads, median of "
          f"{args.repeats} interleaved rounds after 1 warm-up; {_cpu_name()}; load {load_before[0]:.2f} -> "
          f"{load_after[0]:.2f}")
    print("| implementation | ms (median) | min-max ms | x eager reference (median of per-round ratios) | "
          "max rel. diff vs eager |")
    print("|---|---|---|---|---|")
    for name in rows:
        med = statistics.median(times[name])
        print(f"| {name} | {med:.0f} | {min(times[name]):.0f}-{max(times[name]):.0f} | {speedup[name]:.2f} | "
              f"{max_rel[name]:.1e} |")
    if args.json:
        import onnxruntime

        payload = {"model": args.model, "size": list(args.size), "threads": args.threads, "repeats": args.repeats,
                   "cpu": _cpu_name(), "nproc": os.cpu_count(), "loadavg_before": load_before,
                   "loadavg_after": load_after, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                   "python": platform.python_version(), "commit": _commit(),
                   "date": time.strftime("%Y-%m-%d"), "export_seconds": export_s,
                   "ms": times, "ms_median": {n: statistics.median(t) for n, t in times.items()},
                   "speedup_vs_eager_median_of_rounds": speedup,
                   "max_rel_diff_vs_eager": max_rel}
        write_bytes_atomic(Path(args.json), (json.dumps(payload, indent=1) + "\n").encode())
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
