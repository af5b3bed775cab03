"""`isa bench kernels`: time ISA's attention op per backend on a CUDA GPU.

For each ISA geometry (Cityscapes whole image 128x256 feature, 512x1024 crop 64x128, the 769 crop
104x104 after padding, an ADE20K image 64x88), each pattern (long, short), batch 1 and 8, and input
layout (NCHW, channels_last), with Cqk = 256 and Cv = 512: forward and forward+backward time of
every backend (triton, eager, sdpa, and FlexAttention compiled on the permuted layout where it
works), TFLOP/s, GB/s against the floor of reading q, k, v and writing the output once, and peak
memory. Times are `triton.testing.do_bench` medians.

Formulas (per call; G groups of L tokens per image, N images, e = bytes per element):
- forward FLOPs = 2 N G L^2 (Cqk + Cv) (two matrix products);
  forward+backward FLOPs = 3x that (backward = dV, dP, dQ, dK; the recomputed Q K^T is not counted).
- forward bytes floor = e N H W (2 Cqk + 2 Cv) (read q, k, v, write out);
  forward+backward floor = forward floor + e N H W (4 Cqk + 4 Cv) (read q, k, v, out, dout; write dq, dk, dv).
- peak memory = the largest `torch.cuda.max_memory_allocated()` above what was allocated before the call.

Example:
    isa bench kernels --dtype bfloat16 --json bench_kernels.json
    isa bench kernels --cases cityscapes_whole --batch 1
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .attention import eager_attention, from_groups, sdpa_attention, to_groups
from .checks import forward_backward

CASES: Dict[str, tuple] = {
    "cityscapes_whole": (128, 256),  # 1024x2048 image, 1/8 feature
    "cityscapes_crop": (64, 128),  # 512x1024 crop
    "cityscapes_769": (104, 104),  # 769x769 crop: 97x97 padded to 104x104
    "ade20k": (64, 88),  # 512x683 image: 64x86 padded to 64x88
}
PATTERNS = ("long", "short")
BACKENDS = ("triton", "eager", "sdpa", "flex")
BLOCK = (8, 8)


def group_shape(h: int, w: int, pattern: str, block=BLOCK):
    """(groups per image, tokens per group)."""
    gh, gw = h // block[0], w // block[1]
    return (block[0] * block[1], gh * gw) if pattern == "long" else (gh * gw, block[0] * block[1])


def flops(n: int, h: int, w: int, pattern: str, cqk: int, cv: int, backward: bool) -> float:
    groups, tokens = group_shape(h, w, pattern)
    fwd = 2.0 * n * groups * tokens ** 2 * (cqk + cv)
    return 3 * fwd if backward else fwd


def floor_bytes(n: int, h: int, w: int, cqk: int, cv: int, elsize: int, backward: bool) -> float:
    fwd = elsize * n * h * w * (2 * cqk + 2 * cv)
    return fwd + elsize * n * h * w * (4 * cqk + 4 * cv) if backward else fwd


def make_inputs(n: int, cqk: int, cv: int, h: int, w: int, dtype: torch.dtype, layout: str,
                device: str = "cuda", seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    mf = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    q = torch.randn(n, cqk, h, w, device=device, dtype=dtype, generator=gen).contiguous(memory_format=mf)
    k = torch.randn(n, cqk, h, w, device=device, dtype=dtype, generator=gen).contiguous(memory_format=mf)
    v = torch.randn(n, cv, h, w, device=device, dtype=dtype, generator=gen).contiguous(memory_format=mf)
    return q, k, v


_FLEX_CACHE: Dict[str, Callable] = {}


def flex_attention_fn(pattern: str, scale: float) -> Callable:
    """FlexAttention (compiled) on the permuted (groups, 1, tokens, C) layout."""
    from torch.nn.attention.flex_attention import flex_attention

    if "fn" not in _FLEX_CACHE:
        _FLEX_CACHE["fn"] = torch.compile(flex_attention, dynamic=False)
    flex = _FLEX_CACHE["fn"]

    def run(q, k, v):
        n, _, h, w = q.shape
        qg, kg, vg = (to_groups(t, pattern, BLOCK).unsqueeze(1) for t in (q, k, v))
        out = flex(qg, kg, vg, scale=scale)
        return from_groups(out.squeeze(1), pattern, BLOCK, n, h, w)

    return run


def backend_fn(name: str, pattern: str, scale: float) -> Callable:
    if name == "triton":
        from .kernels import triton_attention

        return lambda q, k, v: triton_attention(q, k, v, pattern, BLOCK, scale)
    if name == "eager":
        return lambda q, k, v: eager_attention(q, k, v, pattern, BLOCK, scale)
    if name == "sdpa":
        return lambda q, k, v: sdpa_attention(q, k, v, pattern, BLOCK, scale)
    if name == "flex":
        return flex_attention_fn(pattern, scale)
    raise ValueError(name)


def peak_bytes(call: Callable[[], object]) -> int:
    if not torch.cuda.is_available():
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = call()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del result
    return int(peak)


def time_ms(call: Callable[[], object], warmup: int = 10, rep: int = 40) -> float:
    """Median milliseconds of `call`: `triton.testing.do_bench` on a GPU, 3 wall-clock calls on the CPU."""
    if not torch.cuda.is_available():  # CPU smoke runs
        times = []
        for _ in range(3):
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1e3)
        return sorted(times)[1]
    import triton.testing

    return float(triton.testing.do_bench(call, warmup=warmup, rep=rep, return_mode="median"))


def measure(fn: Callable, q, k, v, backward: bool, warmup: int, rep: int) -> Dict[str, float]:
    """Median time (ms) and peak memory (bytes) of fn's forward, or forward+backward."""
    if not backward:
        def call():
            with torch.no_grad():
                return fn(q, k, v)

        call()  # compile / autotune outside the timing
        return {"ms": time_ms(call, warmup=warmup, rep=rep), "peak_bytes": peak_bytes(call)}
    grad = torch.randn_like(v)

    def call():
        forward_backward(fn, q, k, v, grad)  # fresh leaves per call: no gradient accumulates

    call()
    return {"ms": time_ms(call, warmup=warmup, rep=rep), "peak_bytes": peak_bytes(call)}


def run_benchmark(dtype: torch.dtype = torch.bfloat16, cases: Sequence[str] = tuple(CASES),
                  patterns: Sequence[str] = PATTERNS, batches: Sequence[int] = (1, 8),
                  layouts: Sequence[str] = ("nchw", "channels_last"), backends: Sequence[str] = BACKENDS,
                  backward: bool = True, cqk: int = 256, cv: int = 512, flex_cases: Optional[Sequence[str]] = None,
                  warmup: int = 10, rep: int = 40, deadline: Optional[float] = None,
                  log: Callable[[str], None] = print, device: str = "cuda") -> List[Dict]:
    """Rows of the table (one per case x pattern x batch x layout x backend)."""
    scale = cqk ** -0.5
    elsize = torch.empty((), dtype=dtype).element_size()
    rows: List[Dict] = []
    for case in cases:
        h, w = CASES[case]
        for pattern in patterns:
            groups, tokens = group_shape(h, w, pattern)
            for n in batches:
                for layout in layouts:
                    q, k, v = make_inputs(n, cqk, cv, h, w, dtype, layout, device)
                    eager_ms = {}
                    for name in backends:
                        row = dict(case=case, h=h, w=w, pattern=pattern, groups=groups, tokens=tokens, batch=n,
                                   layout=layout, backend=name, dtype=str(dtype).replace("torch.", ""),
                                   cqk=cqk, cv=cv)
                        if name == "flex" and flex_cases is not None and (case, pattern, n) not in flex_cases:
                            continue
                        if deadline is not None and time.monotonic() > deadline:
                            row["error"] = "skipped: time budget spent"
                            rows.append(row)
                            continue
                        passes = (False, True) if backward else (False,)
                        try:
                            fn = backend_fn(name, pattern, scale)
                            for bwd in passes:
                                key = "fwdbwd" if bwd else "fwd"
                                m = measure(fn, q, k, v, bwd, warmup, rep)
                                sec = m["ms"] * 1e-3
                                row[f"{key}_ms"] = m["ms"]
                                row[f"{key}_tflops"] = flops(n, h, w, pattern, cqk, cv, bwd) / sec / 1e12
                                row[f"{key}_gbps"] = floor_bytes(n, h, w, cqk, cv, elsize, bwd) / sec / 1e9
                                row[f"{key}_floor_bytes"] = floor_bytes(n, h, w, cqk, cv, elsize, bwd)
                                row[f"{key}_peak_mb"] = m["peak_bytes"] / 2**20
                                if name == "eager":
                                    eager_ms[key] = m["ms"]
                        except Exception as exc:  # a backend that cannot run this case is reported, not fatal
                            row["error"] = _short(exc)
                            if device == "cuda":
                                torch.cuda.empty_cache()
                        for key in ("fwd", "fwdbwd"):
                            if key in eager_ms and f"{key}_ms" in row:
                                row[f"{key}_speedup_vs_eager"] = eager_ms[key] / row[f"{key}_ms"]
                        rows.append(row)
                        log(format_row(row))
                    del q, k, v
                    if device == "cuda":
                        torch.cuda.empty_cache()
    return rows


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}"


HEADER = (f"{'case':<17}{'pat':<6}{'N':>2} {'layout':<8}{'backend':<8}"
          f"{'fwd ms':>9}{'TF/s':>7}{'GB/s':>7}{'MB':>8}{'x eag':>6}"
          f"{'f+b ms':>9}{'TF/s':>7}{'GB/s':>7}{'MB':>8}{'x eag':>6}")


def format_row(r: Dict) -> str:
    def f(key, fmt):
        val = r.get(key)
        return format(val, fmt) if isinstance(val, (int, float)) and not math.isnan(val) else "-".rjust(
            int(fmt.split(".")[0]) if fmt[0].isdigit() else 7)

    s = (f"{r['case']:<17}{r['pattern']:<6}{r['batch']:>2} {('NCHW' if r['layout'] == 'nchw' else 'CL'):<8}"
         f"{r['backend']:<8}{f('fwd_ms', '9.3f')}{f('fwd_tflops', '7.1f')}{f('fwd_gbps', '7.0f')}"
         f"{f('fwd_peak_mb', '8.1f')}{f('fwd_speedup_vs_eager', '6.2f')}"
         f"{f('fwdbwd_ms', '9.3f')}{f('fwdbwd_tflops', '7.1f')}{f('fwdbwd_gbps', '7.0f')}"
         f"{f('fwdbwd_peak_mb', '8.1f')}{f('fwdbwd_speedup_vs_eager', '6.2f')}")
    if r.get("error"):
        s += f"  [{r['error']}]"
    return s


# --------------------------------------------------------------------------------------------
# Optional config sweep of the Triton kernels (GPU only; the op itself never autotunes)
# --------------------------------------------------------------------------------------------
def config_row(config: Any) -> Dict[str, Any]:
    """A launch config as a JSON-ready dict: its class name and fields."""
    return dict(config=type(config).__name__, **dataclasses.asdict(config))


def config_text(config: Any) -> str:
    """A launch config as its class and the fields that differ from their defaults."""
    fields = [f"{f.name}={getattr(config, f.name)}" for f in dataclasses.fields(config)
              if f.default is dataclasses.MISSING or getattr(config, f.name) != f.default]
    return f"{type(config).__name__}({', '.join(fields)})"


def run_sweep(dtype: torch.dtype = torch.bfloat16, case: str = "cityscapes_whole", n: int = 1,
              cqk: int = 256, cv: int = 512, warmup: int = 10, rep: int = 40, deadline: Optional[float] = None,
              log: Callable[[str], None] = print, device: str = "cuda",
              bwd_batches: Sequence[int] = (1, 8)) -> List[Dict]:
    """Time the launch configs of `isa_triton.candidates` (each list's first entry: the op's default).

    Long range: the forward at batch `n`; the channels_last backward at each of `bwd_batches` (the
    four-kernel, fused and split backwards side by side), the NCHW backward at `n`. Short range
    (channels_last): the forward at each of `bwd_batches`. Ends with one summary line per (layout,
    batch): the best of each backward. Every config's output (or dq, dk, dv) is checked against fp64
    eager maths like the op's (row "ok"); the summaries count only those that pass.
    """
    from . import candidates, checks, kernels

    h, w = CASES[case]
    scale = cqk ** -0.5
    rows = []
    refs = {}
    plan = [("channels_last", "long", [("fwd", n, cfg) for cfg in candidates.FWD_SWEEP["contiguous"]]
             + [("bwd", b, cfg) for b in bwd_batches for cfg in candidates.BWD_SWEEP["contiguous"]]),
            ("nchw", "long", [("fwd", n, cfg) for cfg in candidates.FWD_SWEEP["gather"]]
             + [("bwd", n, cfg) for cfg in candidates.BWD_SWEEP["gather"]]),
            ("channels_last", "short", [("fwd", b, cfg) for b in bwd_batches for cfg in candidates.SHORT_FWD_SWEEP])]
    for layout, pattern, jobs in plan:
        long_range = pattern == "long"
        inputs = {}
        for which, batch, cfg in jobs:
            if deadline is not None and time.monotonic() > deadline:
                break
            if batch not in inputs:
                inputs.clear()
                refs.clear()
                if device == "cuda":
                    torch.cuda.empty_cache()
                q, k, v = make_inputs(batch, cqk, cv, h, w, dtype, layout, device)
                out, lse = kernels.attention_forward(q, k, v, long_range, 8, 8, scale)
                inputs[batch] = (q, k, v, out, lse, torch.randn_like(out))
                # every config is checked against fp64 as the op's own (2 x eager's error + atol)
                refs[batch] = checks.reference_fp64(q, k, v, pattern, BLOCK, scale, inputs[batch][-1])
            q, k, v, out, lse, do = inputs[batch]
            variant = candidates.variant(cfg)
            row = dict(layout=layout, pattern=pattern, which=which, case=case, batch=batch, variant=variant,
                       label=config_text(cfg), config=config_row(cfg))
            try:
                if which == "fwd":
                    call = lambda: kernels.attention_forward(q, k, v, long_range, 8, 8, scale, cfg)  # noqa: E731
                else:
                    call = lambda: kernels.attention_backward(do, q, k, v, out, lse, True, 8, 8, scale, cfg)  # noqa
                got = call()
                got = [got[0], None, None, None] if which == "fwd" else [None, *got]
                errs = checks.compare(got, *refs[batch], checks.ATOL[dtype])
                row["ok"] = all(e["ok"] for e in errs.values())
                row["max_err"] = {name: e["err"] for name, e in errs.items()}
                row["ms"] = time_ms(call, warmup=warmup, rep=rep)
            except Exception as exc:
                row["error"] = _short(exc)
            rows.append(row)
            status = "" if "error" in row else ("  PASS" if row["ok"] else f"  FAIL (vs fp64: {row['max_err']})")
            log(f"sweep {pattern:<6}{layout:<14}{which:<4} N={batch:<2} {variant:<6}"
                f"{row.get('ms', float('nan')):9.3f} ms  {row['label']}{status}"
                + (f"  [{row['error']}]" if "error" in row else ""))
        inputs.clear()
    for layout in ("channels_last", "nchw"):
        for b in sorted({r["batch"] for r in rows if r["layout"] == layout and r["which"] == "bwd"}):
            best = {}
            for var in candidates.BWD_VARIANTS:
                ms = [r["ms"] for r in rows if r["layout"] == layout and r["which"] == "bwd" and r["batch"] == b
                      and r["variant"] == var and r.get("ok")]
                best[var] = min(ms) if ms else float("nan")
            log(f"sweep summary: long bwd {case} {layout} N={b}: best "
                + ", ".join(f"{var} {best[var]:.3f} ms" for var in candidates.BWD_VARIANTS))
    # what to make the defaults (kernels.fwd_config / bwd_config): the fastest passing config of each
    # problem class against the current default (the first of its list)
    classes = sorted({(r["pattern"], r["layout"], r["which"], r["batch"]) for r in rows})
    for pattern, layout, which, b in classes:
        mine = [r for r in rows if (r["pattern"], r["layout"], r["which"], r["batch"]) == (pattern, layout, which, b)]
        ok = [r for r in mine if r.get("ok")]
        if not ok:
            continue
        best = min(ok, key=lambda r: r["ms"])
        default = mine[0].get("ms", float("nan"))
        log(f"sweep best: {pattern} {layout} {which} N={b}: {best['ms']:.3f} ms ({default / best['ms']:.2f}x the "
            f"default's {default:.3f} ms) {best['label']}")
    return rows
