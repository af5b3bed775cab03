"""The public op `isa_triton.sparse_attention`: grouping, the eager paths, dispatch and errors (CPU)."""
from __future__ import annotations

import pytest
import torch

from isa_triton import BACKENDS, sparse_attention
from isa_triton.attention import eager_attention, from_groups, resolve_backend, sdpa_attention, to_groups


def _naive_attention(q, k, v, pattern, block, scale):
    """Pixel-by-pixel definition: each output pixel attends to the pixels of its group."""
    n, _, h, w = q.shape
    bh, bw = block
    out = torch.zeros(n, v.shape[1], h, w, dtype=q.dtype)
    for r in range(h):
        for c in range(w):
            if pattern == "long":
                rows, cols = torch.arange(r % bh, h, bh), torch.arange(c % bw, w, bw)
            else:
                rows = torch.arange(r - r % bh, r - r % bh + bh)
                cols = torch.arange(c - c % bw, c - c % bw + bw)
            rr, cc = torch.meshgrid(rows, cols, indexing="ij")
            keys = k[:, :, rr.flatten(), cc.flatten()]  # (n, C, L)
            vals = v[:, :, rr.flatten(), cc.flatten()]
            attn = (torch.einsum("nc,ncl->nl", q[:, :, r, c], keys) * scale).softmax(-1)
            out[:, :, r, c] = torch.einsum("nl,ncl->nc", attn, vals)
    return out


@pytest.mark.parametrize("pattern", ["long", "short"])
@pytest.mark.parametrize("block", [(2, 3), (4, 2)])
def test_eager_matches_the_pixel_by_pixel_definition(pattern, block):
    torch.manual_seed(0)
    q, k = torch.randn(2, 5, 8, 6, dtype=torch.float64), torch.randn(2, 5, 8, 6, dtype=torch.float64)
    v = torch.randn(2, 3, 8, 6, dtype=torch.float64)
    ref = _naive_attention(q, k, v, pattern, block, 0.7)
    torch.testing.assert_close(eager_attention(q, k, v, pattern, block, 0.7), ref)


@pytest.mark.parametrize("pattern", ["long", "short"])
def test_groups_round_trip_and_have_the_spec_sizes(pattern):
    x = torch.randn(2, 3, 16, 24)
    g = to_groups(x, pattern, (8, 8))
    groups, tokens = (64, 2 * 3) if pattern == "long" else (2 * 3, 64)
    assert g.shape == (2 * groups, tokens, 3)
    torch.testing.assert_close(from_groups(g, pattern, (8, 8), 2, 16, 24), x)


def test_long_groups_are_the_stride_8_sublattice():
    x = torch.arange(16 * 16, dtype=torch.float32).view(1, 1, 16, 16)
    g = to_groups(x, "long", (8, 8))  # group (lh, lw) = (1, 2) is index 1 * 8 + 2
    torch.testing.assert_close(g[10, :, 0], x[0, 0, 1::8, 2::8].flatten())


@pytest.mark.parametrize("pattern", ["long", "short"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_sdpa_matches_eager(pattern, layout):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 16, 16, 8), torch.randn(2, 16, 16, 8), torch.randn(2, 24, 16, 8)
    if layout == "channels_last":
        q, k, v = (t.to(memory_format=torch.channels_last) for t in (q, k, v))
    torch.testing.assert_close(sdpa_attention(q, k, v, pattern, (4, 4), 0.25),
                               eager_attention(q, k, v, pattern, (4, 4), 0.25), atol=1e-5, rtol=1e-5)


def test_default_scale_is_cqk_to_the_minus_half():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 16, 8, 8), torch.randn(1, 16, 8, 8), torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(sparse_attention(q, k, v, "long", (4, 4), backend="eager"),
                               eager_attention(q, k, v, "long", (4, 4), 0.25))


def test_int_block_size_means_square_blocks():
    q = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(sparse_attention(q, q, q, "short", 4, backend="eager"),
                               sparse_attention(q, q, q, "short", (4, 4), backend="eager"))


def test_gradients_flow_through_the_eager_path():
    q = torch.randn(1, 4, 8, 8, requires_grad=True)
    sparse_attention(q, q, q, "long", (4, 4), backend="eager").sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_auto_is_eager_on_cpu_and_isa_backend_overrides_it(monkeypatch):
    monkeypatch.delenv("ISA_BACKEND", raising=False)
    assert resolve_backend("auto", torch.device("cpu")) == "eager"
    monkeypatch.setenv("ISA_BACKEND", "sdpa")
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    assert resolve_backend("eager", torch.device("cpu")) == "eager"  # explicit beats the variable
    monkeypatch.setenv("ISA_BACKEND", "fast")
    with pytest.raises(ValueError, match="ISA_BACKEND"):
        resolve_backend("auto", torch.device("cpu"))


def test_every_backend_name_is_accepted():
    assert set(BACKENDS) == {"auto", "triton", "eager", "sdpa"}
    with pytest.raises(ValueError, match="backend must be one of"):
        sparse_attention(torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), "long",
                         backend="cuda")


@pytest.mark.parametrize("make,match", [
    (lambda: (torch.randn(1, 4, 8, 8), torch.randn(1, 5, 8, 8), torch.randn(1, 4, 8, 8)), "same shape"),
    (lambda: (torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.randn(2, 4, 8, 8)), "share N, H, W"),
    (lambda: (torch.randn(1, 4, 12, 8), torch.randn(1, 4, 12, 8), torch.randn(1, 4, 12, 8)), "multiples of"),
    (lambda: (torch.ones(1, 4, 8, 8, dtype=torch.int64),) * 3, "floating-point"),
    (lambda: (torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8).double(), torch.randn(1, 4, 8, 8)), "dtype"),
    (lambda: (torch.randn(4, 8, 8),) * 3, "4-d"),
])
def test_bad_inputs_raise_clear_errors(make, match):
    q, k, v = make()
    with pytest.raises(ValueError, match=match):
        sparse_attention(q, k, v, "long", (8, 8), backend="eager")


def test_unknown_pattern_raises():
    q = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="pattern"):
        sparse_attention(q, q, q, "global", (8, 8))


def test_docstring_example_runs():
    q = k = torch.randn(1, 16, 16, 16)
    v = torch.randn(1, 32, 16, 16)
    assert sparse_attention(q, k, v, "long", (8, 8)).shape == (1, 32, 16, 16)


def test_kernel_benchmark_table_runs_on_cpu_for_the_eager_paths():
    from isa_triton import bench

    rows = bench.run_benchmark(torch.float32, cases=["ade20k"], patterns=["short"], batches=[1], layouts=["nchw"],
                               backends=["eager", "sdpa"], cqk=16, cv=16, log=lambda s: None, device="cpu")
    assert [r["backend"] for r in rows] == ["eager", "sdpa"]
    for r in rows:
        assert "error" not in r and r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0
        assert r["tokens"] == 64 and r["groups"] == 88
    assert rows[1]["fwd_speedup_vs_eager"] > 0
    assert bench.flops(1, 128, 256, "long", 256, 512, False) == 2 * 64 * 512 ** 2 * 768
    assert bench.format_row(rows[0]).startswith("ade20k")


def test_auto_avoids_triton_where_it_was_measured_slower():
    """fp32 (exact FMA path) and NCHW long-range gathers stay eager even on a GPU (BENCHMARKS.md)."""
    cuda = torch.device("cuda")
    assert resolve_backend("auto", cuda, torch.float32) == "eager"
    assert resolve_backend("auto", cuda, torch.bfloat16, gather=True) == "eager"
