"""The compiled Triton kernels on a CUDA GPU (skipped where there is none: CI has no GPU).

The full GPU check, with the benchmark, is scripts/gpu_kernels.py; these are its quick core.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from isa_triton import bench, kernels, sparse_attention  # noqa: E402
from isa_triton.attention import resolve_backend  # noqa: E402
from isa_triton.checks import errors_vs_fp64, forward_backward, saved_bytes  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or kernels.interpreter_enabled(),
                                reason="needs a CUDA GPU and Triton compiling (TRITON_INTERPRET unset)")


@pytest.fixture(autouse=True)
def _exact_fp32(monkeypatch):
    monkeypatch.delenv("ISA_BACKEND", raising=False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


# (dtype, H, W, pattern, layout, N): tile and flash paths, gather and vector loads, Cqk 256 / Cv 512
CASES = [
    (torch.bfloat16, 64, 128, "long", "nchw", 1),
    (torch.bfloat16, 64, 128, "short", "channels_last", 2),
    (torch.bfloat16, 104, 104, "long", "channels_last", 1),
    (torch.bfloat16, 104, 104, "long", "nchw", 1),
    (torch.float16, 64, 88, "long", "nchw", 1),
    (torch.float16, 128, 256, "long", "channels_last", 1),
    (torch.float32, 64, 64, "short", "nchw", 1),
    (torch.float32, 104, 104, "long", "channels_last", 1),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{str(c[0])[6:]}-{c[1]}x{c[2]}-{c[3]}-{c[4]}-N{c[5]}")
def test_gpu_forward_and_grads_within_twice_eager_error(case):
    dtype, h, w, pattern, layout, n = case
    q, k, v = bench.make_inputs(n, 256, 512, h, w, dtype, layout, seed=5)
    res = errors_vs_fp64(q, k, v, pattern, (8, 8), backend="triton")
    assert all(r["ok"] for r in res.values()), res


def test_auto_picks_triton_on_this_gpu():
    assert resolve_backend("auto", torch.device("cuda"), torch.bfloat16) == "triton"
    assert resolve_backend("auto", torch.device("cuda"), torch.float16) == "triton"


def test_no_attention_matrix_is_saved_for_backward():
    q, k, v = bench.make_inputs(1, 256, 512, 64, 128, torch.bfloat16, "channels_last")
    saved = saved_bytes(lambda a, b, c: sparse_attention(a, b, c, "long", (8, 8), backend="triton"), q, k, v)
    assert saved == 64 * 128 * 4  # the fp32 log-sum-exp: one float per pixel


def test_torch_compile_fullgraph_forward_backward():
    q, k, v = bench.make_inputs(1, 64, 64, 32, 32, torch.float16, "nchw", seed=2)
    grad = torch.randn_like(v)

    def fn(a, b, c):
        return sparse_attention(a, b, c, "short", (8, 8), backend="triton") * 2.0

    for got, ref in zip(forward_backward(torch.compile(fn, fullgraph=True), q, k, v, grad),
                        forward_backward(fn, q, k, v, grad)):
        torch.testing.assert_close(got, ref, atol=2e-3, rtol=2e-3)


def test_every_default_launch_config_runs_on_this_gpu():
    """Each config the op picks for the ISA shapes launches (compile + run) without an error."""
    for case in bench.CASES.values():
        for pattern in ("long", "short"):
            for layout in ("nchw", "channels_last"):
                q, k, v = bench.make_inputs(1, 256, 512, case[0], case[1], torch.bfloat16, layout)
                out, lse = kernels.attention_forward(q, k, v, pattern == "long", 8, 8, 1 / 16)
                dq, dk, dv = kernels.attention_backward(out, q, k, v, out, lse, pattern == "long", 8, 8, 1 / 16)
                torch.cuda.synchronize()
                assert all(torch.isfinite(t).all() for t in (out, dq, dk, dv))
