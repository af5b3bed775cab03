"""Eval-mode inference time of a variant, MMSegmentation's reference path vs the optimized path (`isa bench model`)."""
from __future__ import annotations

import statistics
import time
from typing import Dict, List, Sequence

import torch

from .factory import create_model
from .fuse import optimize_for_inference
from .inference import autocast
from .utils import dtype_name, parse_dtype, resolve_device


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


def bench_model(name: str, size: Sequence[int] = (512, 1024), device: str = "cpu", dtype: str = "float32",
                warmup: int = 1, repeats: int = 5, baseline: bool = True, backend: str = "auto",
                threads: int = 0) -> Dict[str, object]:
    """Median eval-mode forward time (ms) of the optimized path and, side by side, the reference path.

    The reference path is MMSegmentation's structure run as it runs it: unfused BN, NCHW, eager
    permute attention, fp32 under `torch.no_grad`. The optimized path folds BN, uses channels_last,
    `torch.inference_mode`, the chosen attention backend and autocast to `dtype`.
    """
    dev = resolve_device(device)
    cast_dtype = parse_dtype(dtype)
    if threads:
        torch.set_num_threads(threads)
    model = create_model(name, backend=backend).eval().to(dev)
    x = torch.randn(1, 3, *size, device=dev)
    result: Dict[str, object] = {"model": name, "size": list(size), "device": str(dev),
                                 "dtype": dtype_name(cast_dtype), "threads": torch.get_num_threads(),
                                 "backend": backend,
                                 "torch": torch.__version__}
    fast = optimize_for_inference(model)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def run_fast():
        with torch.inference_mode(), autocast(dev, cast_dtype):
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
