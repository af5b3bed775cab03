#!/usr/bin/env python3
"""The one GPU check of isa_triton's attention kernels: correctness, memory, torch.compile, speed.

Run from the repository root on a CUDA machine (about 3-4 minutes on an H100, Triton compile included):

    PYTHONUNBUFFERED=1 python scripts/gpu_kernels.py --json gpu_kernels.json

Phases (each one's failure is recorded and the next still runs; the JSON is always written):
0. precompile: the Triton kernels of every case below are compiled in parallel worker processes
   (they fill Triton's disk cache, so the timed phases never wait for a compile);
1. correctness: forward, dq, dk, dv against fp64 eager, bf16/fp16/fp32, at the ISA shapes, NCHW and
   channels_last, both patterns: error <= 2 x eager's error in the same dtype + atol (isa_triton.checks);
   then the long-range cases again through the sweep's one-pass backwards ("fused-bwd": dQ by atomics,
   "split-bwd": a separate dQ pass; isa_triton.candidates);
2. memory: bytes saved for backward (must be the fp32 LSE only, no O(L^2) matrix) and peak memory;
3. torch.compile(fullgraph=True) of forward+backward through the custom op (inductor);
4. config sweep (`isa_triton.candidates`), each config also checked against fp64: the long-range
   kernels (defaults first; the pointer and TMA forwards; the channels_last backward at batch 1 and 8,
   "four", "fused" and "split" side by side, with a summary line) and the short-range forward's Cv
   split at batch 1 and 8;
5. benchmark: `isa bench kernels` rows (bf16; triton, eager, sdpa; batch 1 and 8; both layouts),
   then FlexAttention.
Exit status 1 when a correctness, memory or compile check fails. `--dry-run` rehearses every phase on
the CPU in Triton's interpreter (TRITON_INTERPRET=1, set here before Triton is imported).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if "--dry-run" in sys.argv[1:]:  # Triton reads TRITON_INTERPRET when it is imported (by isa_triton below)
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from isa_triton import bench, candidates, kernels  # noqa: E402
from isa_triton.attention import resolve_backend, sparse_attention  # noqa: E402
from isa_triton.checks import errors_vs_fp64, forward_backward, saved_bytes  # noqa: E402

DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CQK, CV = 256, 512
DEVICE = "cuda"
# (dtype, H, W, pattern, layout, N): every kernel path at ISA shapes (long L = 512, 169, 128, 88; short L = 64)
CORRECTNESS = [
    ("bf16", 128, 256, "long", "nchw", 1),
    ("bf16", 128, 256, "long", "channels_last", 1),
    ("bf16", 128, 256, "short", "nchw", 1),
    ("bf16", 128, 256, "short", "channels_last", 8),  # 4096 groups: two groups per program
    ("bf16", 104, 104, "long", "channels_last", 1),
    ("bf16", 104, 104, "long", "nchw", 2),
    ("bf16", 104, 104, "short", "nchw", 1),
    ("bf16", 64, 88, "long", "nchw", 1),
    ("bf16", 64, 128, "long", "channels_last", 1),
    ("fp16", 128, 256, "long", "channels_last", 1),
    ("fp16", 128, 256, "short", "nchw", 1),
    ("fp16", 64, 88, "long", "nchw", 1),
    ("fp32", 128, 256, "long", "nchw", 1),
    ("fp32", 64, 88, "long", "channels_last", 1),
    ("fp32", 104, 104, "short", "nchw", 1),
]
# The same check through the sweep's one-pass long-range backwards ("fused", "split"): long L = 512 and
# 169, bf16/fp16/fp32, both layouts
CORRECTNESS_FUSED = [(d, h, w, "long", lay, n) for d in ("bf16", "fp16", "fp32")
                     for h, w, n in ((128, 256, 1), (104, 104, 2)) for lay in ("channels_last", "nchw")]
ONE_PASS = {"fused": candidates.fused_bwd_config, "split": candidates.split_bwd_config}


def long_bwd_config(mode: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """The launch config of long-range backward `mode` for these inputs (None for "four": the op's own)."""
    if mode == "four":
        return None
    return ONE_PASS[mode](q.dtype, q.shape[1], v.shape[1], kernels.is_gather(True, q, k, v))


MEM_DTYPE = "bf16"
MEM_SHAPE, COMPILE_SHAPE = (128, 256), (64, 64)
BENCH_CASES = tuple(bench.CASES)
BENCH_BACKENDS = ("triton", "eager", "sdpa")
BENCH_BATCHES = (1, 8)
SWEEP_CASE = "cityscapes_whole"


def dry_run_setup() -> None:
    """CPU rehearsal: interpreter, small channels, small maps, fp16 instead of bf16, one bench case."""
    global DEVICE, CQK, CV, CORRECTNESS, MEM_DTYPE, BENCH_CASES, BENCH_BACKENDS, BENCH_BATCHES, SWEEP_CASE
    global CORRECTNESS_FUSED
    global MEM_SHAPE, COMPILE_SHAPE
    assert kernels.interpreter_enabled(), "TRITON_INTERPRET=1 is set at the top of this script for --dry-run"
    DEVICE, CQK, CV, MEM_DTYPE = "cpu", 16, 24, "fp16"
    MEM_SHAPE, COMPILE_SHAPE = (16, 32), (16, 16)
    CORRECTNESS = [("fp16" if d == "bf16" else d, 16, 24 if p == "long" else 16, p, lay, min(n, 2))
                   for d, h, w, p, lay, n in CORRECTNESS[:4] + CORRECTNESS[-2:]]
    CORRECTNESS_FUSED = [("fp16", 96, 96, "long", "channels_last", 1)]  # L = 144: the flash path
    BENCH_CASES, BENCH_BACKENDS, BENCH_BATCHES, SWEEP_CASE = ("ade20k",), ("eager", "sdpa"), (1,), "dry_run"
    bench.CASES["dry_run"] = (16, 24)


def log(msg: str = "") -> None:
    print(msg, flush=True)


def _warm(task) -> str:
    """Worker: run the Triton op (forward + backward) once on one case so its kernels get compiled."""
    dtype, h, w, pattern, layout, n, cfg = task
    try:
        q, k, v = bench.make_inputs(n, CQK, CV, h, w, DT[dtype], layout, DEVICE)
        if cfg is None or cfg in ONE_PASS:  # the op; a one-pass name: with that long-range backward
            bwd = None if cfg is None else long_bwd_config(cfg, q, k, v)
            forward_backward(lambda a, b, c: kernels.triton_attention(a, b, c, pattern, (8, 8), CQK ** -0.5,
                                                                      bwd_cfg=bwd), q, k, v, torch.ones_like(v))
        else:
            which, config = cfg
            out, lse = kernels.attention_forward(q, k, v, pattern == "long", 8, 8, CQK ** -0.5,
                                                 config if which == "fwd" else None)
            if which == "bwd":
                kernels.attention_backward(out, q, k, v, out, lse, pattern == "long", 8, 8, CQK ** -0.5, config)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return "ok"
    except Exception as exc:  # reported; the main process will meet (and record) it again
        return f"{type(exc).__name__}: {str(exc)[:200]}"


def _init_worker(device: str, cqk: int, cv: int) -> None:
    global DEVICE, CQK, CV
    DEVICE, CQK, CV = device, cqk, cv


def bench_tasks() -> list:
    tasks = []
    for case in bench.CASES:
        h, w = bench.CASES[case]
        for p in ("long", "short"):
            for lay in ("nchw", "channels_last"):
                for n in (1, 8):
                    tasks.append(("bf16", h, w, p, lay, n, None))
    for lay, kind in (("channels_last", "contiguous"), ("nchw", "gather")):
        for which, sweep in (("fwd", candidates.FWD_SWEEP), ("bwd", candidates.BWD_SWEEP)):
            for cfg in sweep[kind][1:]:
                tasks.append(("bf16", 128, 256, "long", lay, 1, (which, cfg)))
    for cfg in candidates.SHORT_FWD_SWEEP[1:]:
        tasks.append(("bf16", 128, 256, "short", "channels_last", 1, ("fwd", cfg)))
    return tasks


def precompile(workers: int, dry_run: bool = False) -> dict:
    tasks = [(d, h, w, p, lay, n, None) for d, h, w, p, lay, n in CORRECTNESS]
    tasks += [(d, h, w, p, lay, n, mode) for d, h, w, p, lay, n in CORRECTNESS_FUSED for mode in ("fused", "split")]
    if dry_run:
        tasks = tasks[:2] + tasks[-1:]
    else:
        tasks += bench_tasks()
    tasks = list(dict.fromkeys(tasks))  # launch configs are frozen dataclasses: hashable
    tasks.sort(key=lambda t: (t[0] != "fp32", -t[5]))  # the slowest compiles (fp32 FMA kernels) and runs first
    results = {}
    import multiprocessing as mp

    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                             initializer=_init_worker, initargs=(DEVICE, CQK, CV)) as pool:
        futures = {pool.submit(_warm, t): t for t in tasks}
        for fut in as_completed(futures):
            results[str(futures[fut])] = fut.result()
    return results


def copy_bandwidth() -> float:
    """Device-to-device copy GB/s (bytes read + written) of a 1 GiB buffer: the practical roofline."""
    x = torch.empty(2**29, dtype=torch.float16, device="cuda")
    y = torch.empty_like(x)
    ms = bench.time_ms(lambda: y.copy_(x))
    return 2 * x.numel() * 2 / (ms * 1e-3) / 1e9


def check_correctness() -> list:
    rows = []
    cases = [c + ("four",) for c in CORRECTNESS] + [c + (m,) for c in CORRECTNESS_FUSED for m in ("fused", "split")]
    for dtype, h, w, pattern, layout, n, mode in cases:
        q, k, v = bench.make_inputs(n, CQK, CV, h, w, DT[dtype], layout, DEVICE, seed=7)
        try:
            res = errors_vs_fp64(q, k, v, pattern, (8, 8), backend="triton", bwd_cfg=long_bwd_config(mode, q, k, v))
            ok = all(r["ok"] for r in res.values())
            row = dict(dtype=dtype, h=h, w=w, pattern=pattern, layout=layout, batch=n, long_bwd=mode, ok=ok,
                       errors=res)
            detail = "  ".join(f"{name} {r['err']:.2e}/{r['eager_err']:.2e}" for name, r in res.items())
        except Exception as exc:
            row = dict(dtype=dtype, h=h, w=w, pattern=pattern, layout=layout, batch=n, long_bwd=mode, ok=False,
                       error=traceback.format_exc(limit=3))
            detail = f"{type(exc).__name__}: {exc}"
        rows.append(row)
        log(f"{'PASS' if row['ok'] else 'FAIL'} {dtype} {h}x{w} {pattern:<5} {layout:<13} N={n} "
            f"{mode + '-bwd' if mode != 'four' else 'default  '}  "
            f"(triton/eager max err) {detail}")
        del q, k, v
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return rows


def check_memory() -> list:
    rows = []
    for pattern in ("long", "short"):
        q, k, v = bench.make_inputs(1, CQK, CV, *MEM_SHAPE, DT[MEM_DTYPE], "channels_last", DEVICE)
        groups, tokens = bench.group_shape(*MEM_SHAPE, pattern)
        lse = groups * tokens * 4
        attn = groups * tokens * tokens * 2
        row = dict(pattern=pattern, lse_bytes=lse, attention_matrix_bytes_bf16=attn)
        for name in ("triton", "eager"):
            fn = lambda a, b, c, name=name: sparse_attention(a, b, c, pattern, (8, 8), backend=name)  # noqa: E731
            row[f"{name}_saved_bytes"] = saved_bytes(fn, q, k, v)
            grad = torch.randn_like(v)
            row[f"{name}_fwdbwd_peak_bytes"] = bench.peak_bytes(lambda: forward_backward(fn, q, k, v, grad))
            if DEVICE != "cuda":
                row[f"{name}_fwdbwd_peak_bytes"] = 0
        row["ok"] = row["triton_saved_bytes"] <= lse
        rows.append(row)
        log(f"{'PASS' if row['ok'] else 'FAIL'} saved for backward, {pattern}: triton {row['triton_saved_bytes']} B "
            f"(LSE {lse} B), eager {row['eager_saved_bytes']} B (attention matrix {attn} B); peak fwd+bwd "
            f"triton {row['triton_fwdbwd_peak_bytes'] / 2**20:.1f} MiB, "
            f"eager {row['eager_fwdbwd_peak_bytes'] / 2**20:.1f} MiB")
    return rows


def check_compile() -> dict:
    # channels_last: with NCHW long-range inputs `auto` picks eager, and the check would compare
    # Inductor's fused bf16 eager graph with uncompiled eager instead of exercising the custom op
    q, k, v = bench.make_inputs(1, CQK, CV, *COMPILE_SHAPE, DT[MEM_DTYPE], "channels_last", DEVICE, seed=3)
    grad = torch.randn_like(v)
    backend = "auto" if DEVICE == "cuda" else "triton"
    resolved = resolve_backend(backend, q.device, q.dtype, kernels.is_gather(True, q, k, v))

    def fn(a, b, c):
        return sparse_attention(a, b, c, "long", (8, 8), backend=backend) * 2.0

    start = time.monotonic()
    compiled = torch.compile(fn, fullgraph=True, backend="inductor" if DEVICE == "cuda" else "aot_eager")
    got = forward_backward(compiled, q, k, v, grad)
    seconds = time.monotonic() - start
    ref = forward_backward(fn, q, k, v, grad)
    diffs = [(g.float() - r.float()).abs().max().item() for g, r in zip(got, ref)]
    ok = all(d <= 1e-2 for d in diffs)
    log(f"{'PASS' if ok else 'FAIL'} torch.compile(fullgraph=True) fwd+bwd, backend {backend} -> "
        f"{resolved}: max |compiled - uncompiled| "
        f"{max(diffs):.2e} ({seconds:.1f} s compile+run)")
    return dict(ok=ok, max_diff=diffs, seconds=seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="gpu_kernels.json", help="write every result here")
    parser.add_argument("--budget", type=float, default=225,
                        help="seconds for the whole run; benchmark rows, sweep and FlexAttention are trimmed to fit")
    parser.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1), help="precompile processes")
    parser.add_argument("--skip", nargs="+", default=[], choices=("memory", "compile", "benchmark", "sweep", "flex"),
                        help="phases to leave out (e.g. --skip benchmark flex: correctness and the sweep only)")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU rehearsal of every phase: Triton interpreter, tiny channels, fp16 for bf16")
    args = parser.parse_args()
    if args.dry_run:
        dry_run_setup()
    t0 = time.monotonic()
    deadline = t0 + args.budget
    torch.backends.cuda.matmul.allow_tf32 = False  # eager fp32 reference and the fp32 kernels: exact fp32
    import triton

    if DEVICE == "cuda":
        props = torch.cuda.get_device_properties(0)
        name, cap, sms = props.name, f"{props.major}.{props.minor}", props.multi_processor_count
    else:
        name, cap, sms = "cpu (dry run, Triton interpreter)", "-", 0
    result = dict(device=name, capability=cap, sms=sms, torch=torch.__version__, triton=triton.__version__,
                  python=sys.version.split()[0], date=time.strftime("%Y-%m-%d %H:%M:%S"), failures=[],
                  dry_run=DEVICE != "cuda")
    log(f"# {name} sm {cap} {sms} SMs | torch {torch.__version__} | triton {triton.__version__}")

    def phase(name, fn, *a, critical=True):
        start = time.monotonic()
        log(f"\n## {name}")
        try:
            out = fn(*a)
        except Exception:
            out = dict(error=traceback.format_exc())
            log(out["error"])
            if critical:
                result["failures"].append(name)
        result[name] = out
        result[f"{name}_seconds"] = time.monotonic() - start
        log(f"({name}: {result[f'{name}_seconds']:.1f} s, total {time.monotonic() - t0:.1f} s)")
        write()
        return out

    def write():
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1, default=str))

    pre = phase("precompile", precompile, args.workers, DEVICE != "cuda", critical=False)
    if isinstance(pre, dict):
        bad = {k: v for k, v in pre.items() if v != "ok"}
        log(f"{len(pre) - len(bad)}/{len(pre)} warm-up runs ok" + "".join(f"\n  {k}: {v}" for k, v in bad.items()))
    if DEVICE == "cuda":
        result["copy_gbps"] = phase("copy_bandwidth", copy_bandwidth, critical=False)
        log(f"device-to-device copy: {result['copy_gbps']} GB/s")
    rows = phase("correctness", check_correctness)
    if isinstance(rows, list) and not all(r["ok"] for r in rows):
        result["failures"].append("correctness")
    if "memory" not in args.skip:
        mem = phase("memory", check_memory)
        if isinstance(mem, list) and not all(r["ok"] for r in mem):
            result["failures"].append("memory")
    if "compile" not in args.skip:
        comp = phase("compile", check_compile)
        if isinstance(comp, dict) and not comp.get("ok"):
            result["failures"].append("compile")

    bdt = DT[MEM_DTYPE]
    if "sweep" not in args.skip:  # first: it is what picks the defaults
        phase("sweep", lambda: bench.run_sweep(bdt, case=SWEEP_CASE, cqk=CQK, cv=CV, warmup=5, rep=25,
                                               deadline=deadline - 60, log=log, device=DEVICE), critical=False)
    if "benchmark" not in args.skip:
        log("\n" + bench.HEADER)
        phase("benchmark", lambda: bench.run_benchmark(
            bdt, cases=BENCH_CASES, backends=BENCH_BACKENDS, batches=BENCH_BATCHES, cqk=CQK, cv=CV, warmup=5,
            rep=25, deadline=deadline - 30, log=log, device=DEVICE), critical=False)
    if "flex" not in args.skip and time.monotonic() < deadline - 40 and DEVICE == "cuda":  # a Flex compile: tens of s
        phase("flex", lambda: bench.run_benchmark(
            torch.bfloat16, cases=("cityscapes_whole",), batches=(1,), layouts=("nchw",), backends=("flex",),
            warmup=5, rep=25, deadline=deadline, log=log), critical=False)
    result["seconds"] = time.monotonic() - t0
    write()
    log(f"\n# done in {result['seconds']:.0f} s; failures: {result['failures'] or 'none'}; wrote {args.json}")
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
