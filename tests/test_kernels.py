"""The Triton kernels, run on the CPU in Triton's interpreter, against an fp64 reference.

TRITON_MODE = "interpret": these tests run in a process that set TRITON_INTERPRET=1 before
importing Triton (a child pytest unless this one did; tests/kernel_env.py). Tolerance rule
(flash-attention's): the kernel's max error against fp64 may be at most twice eager PyTorch's
error in the same dtype, plus a small atol.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from isa_triton import kernels, sparse_attention  # noqa: E402
from isa_triton.attention import eager_attention  # noqa: E402

pytest_plugins = ("kernel_env",)
TRITON_MODE = "interpret"

ATOL = {torch.float32: 1e-6, torch.float16: 1e-4}
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]


@pytest.fixture
def interpret(monkeypatch):
    """This process runs Triton's interpreter; no $ISA_BACKEND override."""
    assert kernels.interpreter_enabled()
    monkeypatch.delenv("ISA_BACKEND", raising=False)


def _make(shape, dtype, layout, gen, slot):
    """A tensor of `shape` in `layout`: nchw, channels_last, or one of three strided views."""
    n, c, h, w = shape
    if layout == "nchw":
        return torch.randn(shape, generator=gen).to(dtype)
    if layout == "channels_last":
        return torch.randn(shape, generator=gen).to(dtype).to(memory_format=torch.channels_last)
    assert layout == "strided"
    if slot == 0:  # channel slice of a wider map
        return torch.randn(n, 2 * c, h, w, generator=gen).to(dtype)[:, c:]
    if slot == 1:  # spatially transposed storage: stride_h = 1
        return torch.randn(n, c, w, h, generator=gen).to(dtype).transpose(2, 3)
    return torch.randn(n, c, h, 2 * w, generator=gen).to(dtype)[..., ::2]  # every other column


def _inputs(n, cqk, cv, h, w, dtype, layout, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = _make((n, cqk, h, w), dtype, layout, gen, 0)
    k = _make((n, cqk, h, w), dtype, layout, gen, 1)
    v = _make((n, cv, h, w), dtype, layout, gen, 2)
    grad = torch.randn(n, cv, h, w, generator=gen).to(dtype)
    return q, k, v, grad


def _run(fn, q, k, v, grad):
    """Output and (dq, dk, dv) of fn for upstream gradient `grad`."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad)
    return out.detach(), [t.grad for t in leaves]


def _max_err(x, ref):
    return (x.double() - ref).abs().max().item()


def _check_against_fp64(triton_fn, q, k, v, grad, pattern, block, scale):
    ref_out, ref_grads = _run(lambda a, b, c: eager_attention(a, b, c, pattern, block, scale),
                              q.double(), k.double(), v.double(), grad.double())
    eager_out, eager_grads = _run(lambda a, b, c: eager_attention(a, b, c, pattern, block, scale), q, k, v, grad)
    out, grads = _run(triton_fn, q, k, v, grad)
    atol = ATOL[q.dtype]
    names = ("out", "dq", "dk", "dv")
    for name, got, eager, ref in zip(names, [out, *grads], [eager_out, *eager_grads], [ref_out, *ref_grads]):
        assert got.shape == ref.shape and got.dtype == q.dtype, name
        err, eager_err = _max_err(got, ref), _max_err(eager, ref)
        assert err <= 2 * eager_err + atol, f"{name}: triton error {err:.3g} > 2 x eager {eager_err:.3g} + {atol}"


def _with_configs(fwd_cfg, bwd_cfg, pattern, block, scale):
    """The op with explicit launch configs (None: the op's own)."""
    return lambda a, b, c: kernels.triton_attention(a, b, c, pattern, block, scale, fwd_cfg, bwd_cfg)


# (id, N, Cqk, Cv, H, W, block, pattern, layout): tile and flash paths, gather and vector loads
CASES = [
    ("long_8x8_nchw_L6", 1, 16, 24, 16, 24, (8, 8), "long", "nchw"),
    ("short_4x8_channels_last_L32", 2, 24, 16, 8, 16, (4, 8), "short", "channels_last"),
    ("long_2x4_strided_L15_batch3", 3, 16, 20, 6, 20, (2, 4), "long", "strided"),
    ("short_2x4_strided_L8", 2, 16, 24, 4, 8, (2, 4), "short", "strided"),
    ("long_flash_nchw_L150", 1, 16, 40, 10, 30, (1, 2), "long", "nchw"),
    ("long_flash_channels_last_L144", 2, 24, 16, 12, 24, (1, 2), "long", "channels_last"),
    ("short_flash_16x16_L256", 1, 16, 16, 16, 32, (16, 16), "short", "nchw"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_triton_forward_and_grads_within_twice_eager_error(interpret, case, dtype):
    _, n, cqk, cv, h, w, block, pattern, layout = case
    q, k, v, grad = _inputs(n, cqk, cv, h, w, dtype, layout)
    scale = cqk ** -0.5

    def fn(a, b, c):
        return sparse_attention(a, b, c, pattern, block, backend="triton")

    _check_against_fp64(fn, q, k, v, grad, pattern, block, scale)


# Explicit configurations that force every loop and branch: several Cqk/Cv chunks with partial
# last chunks, several key/query blocks, a Cv split over programs, ragged multi-group programs.
TILE_CFG = dict(kind="tile", BLOCK_L=16, BLOCK_DK=16, BLOCK_DV=16, GROUPS_PER_PROG=3, num_warps=4, num_stages=1)
TILE_DV_SPLIT = dict(TILE_CFG, DV_SPLIT=4)  # Cv 40 over 4 programs of 16 columns: one partial, one empty
FLASH_FWD_CFG = dict(kind="flash", BLOCK_M=32, BLOCK_N=16, BLOCK_DK=64, BLOCK_DV=16, num_warps=4, num_stages=1)
FLASH_BWD_MULTI = dict(kind="flash", BLOCK_M=16, BLOCK_N=32, BLOCK_DK=64, BLOCK_DV=16, DV_BLOCK=32, DELTA_DV=16,
                       num_warps=4, num_stages=1)
FLASH_BWD_ONE = dict(kind="flash", BLOCK_M=32, BLOCK_N=16, BLOCK_DK=64, BLOCK_DV=64, DELTA_DV=32,
                     num_warps=4, num_stages=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fwd_cfg,bwd_cfg,shape,block,pattern", [
    pytest.param(TILE_CFG, TILE_CFG, (2, 40, 24, 8, 8), (2, 2), "short", id="tile_chunks_ragged_groups"),
    pytest.param(TILE_DV_SPLIT, TILE_CFG, (2, 24, 40, 8, 8), (2, 2), "short", id="tile_cv_split_over_programs"),
    pytest.param(FLASH_FWD_CFG, FLASH_BWD_MULTI, (1, 40, 40, 8, 11), (1, 1), "long", id="flash_cv_split"),
    pytest.param(FLASH_FWD_CFG, FLASH_BWD_ONE, (2, 24, 40, 6, 7), (1, 1), "long", id="flash_one_cv_chunk"),
])
def test_every_kernel_loop_and_branch_matches_fp64(interpret, dtype, fwd_cfg, bwd_cfg, shape, block, pattern):
    n, cqk, cv, h, w = shape
    q, k, v, grad = _inputs(n, cqk, cv, h, w, dtype, "nchw", seed=1)
    scale = 0.3
    _check_against_fp64(_with_configs(fwd_cfg, bwd_cfg, pattern, block, scale), q, k, v, grad, pattern, block, scale)


# The TMA forward (kind "tma"): tensor descriptors over channels_last 16-bit maps. gw = 13 and 10
# (tiles of 16 columns, zero-filled past gw), rows not a multiple of ROWS, a Cv split over programs
# (BLOCK_DV 16 of Cv 40: one partial box) and batch 2; the backward reads its LSE.
TMA_CFG = dict(kind="tma", BLOCK_M=32, BLOCK_N=16, BLOCK_DK=32, BLOCK_DV=16, num_warps=4, num_stages=2)


@pytest.mark.parametrize("shape,block", [((2, 24, 40, 10, 26), (2, 2)), ((1, 16, 24, 20, 40), (2, 4))],
                         ids=["gw13_batch2_cv_split", "gw10_rows_partial"])
def test_tma_forward_matches_fp64(interpret, shape, block):
    n, cqk, cv, h, w = shape
    q, k, v, grad = _inputs(n, cqk, cv, h, w, torch.float16, "channels_last", seed=5)
    scale = cqk ** -0.5
    _check_against_fp64(_with_configs(TMA_CFG, None, "long", block, scale), q, k, v, grad, "long", block, scale)


@pytest.mark.parametrize("shape,block", [((2, 24, 40, 10, 26), (2, 2)), ((1, 16, 264, 12, 20), (2, 2))],
                         ids=["gw13_batch2", "gw10_two_cv_boxes"])
def test_tma_split_backward_matches_fp64(interpret, shape, block):
    """SPLIT_DQ with its dQ pass through TMA boxes; Cv 264 = a full and a partial box."""
    n, cqk, cv, h, w = shape
    q, k, v, grad = _inputs(n, cqk, cv, h, w, torch.float16, "channels_last", seed=6)
    grad = grad.contiguous(memory_format=torch.channels_last)
    scale = cqk ** -0.5
    cfg = dict(kind="flash", SPLIT_DQ=True, TMA=True, BLOCK_M=32, BLOCK_N=16, BLOCK_DK=max(16, kernels._np2(cqk)),
               BLOCK_DV=kernels._np2(cv), DQ_BLOCK_M=16, DQ_BLOCK_N=32, DELTA_DV=16, num_warps=4, num_stages=2)
    # DQ_BLOCK_M 16 < one row of 16 or 32 tokens: the dQ tile is a whole row; DQ_BLOCK_N 32: two rows
    names = [p.name for p in kernels.launch_plans(q, k, v, "long", block, scale, bwd_cfg=cfg)][1:]
    assert names == ["bwd_delta", "bwd_kv", "bwd_dq_tma"], names
    _check_against_fp64(_with_configs(TMA_CFG, cfg, "long", block, scale), q, k, v, grad, "long", block, scale)


def test_tma_configs_fall_back_to_the_pointer_kernels_for_other_layouts(interpret):
    q, k, v, grad = _inputs(1, 16, 24, 8, 8, torch.float16, "nchw")
    cfg = dict(kind="flash", SPLIT_DQ=True, TMA=True, BLOCK_M=16, BLOCK_N=16, BLOCK_DK=16, BLOCK_DV=32,
               num_warps=4, num_stages=1)
    plans = kernels.launch_plans(q, k, v, "long", (2, 2), 0.25, bwd_cfg=cfg)
    assert [p.name for p in plans][1:] == ["bwd_delta", "bwd_kv", "bwd_dq"]
    geo = kernels.Geometry(1, 8, 8, 2, 2, True)
    lse = torch.empty(4, 16)
    assert kernels._fwd_plan(q, k, v, torch.empty_like(v), lse, geo, 0.25, TMA_CFG)[0].name == "fwd_flash"
    _check_against_fp64(_with_configs(TMA_CFG, cfg, "long", (2, 2), 0.25), q, k, v, grad, "long", (2, 2), 0.25)


def test_torch_compile_fullgraph_runs_the_custom_op(interpret):
    """The op traces without graph breaks (fake impls, one autograd.Function) and matches eager."""
    q, k, v, grad = _inputs(1, 16, 16, 8, 8, torch.float32, "nchw", seed=2)

    def fn(a, b, c):
        return sparse_attention(a, b, c, "short", (4, 4), backend="triton") * 2.0

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out, grads = _run(compiled, q, k, v, grad)
    ref_out, ref_grads = _run(lambda a, b, c: eager_attention(a, b, c, "short", (4, 4), 0.25) * 2.0, q, k, v, grad)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_eager_calls_skip_the_custom_op_dispatcher_and_compiled_ones_use_it(interpret):
    q, k, v, _ = _inputs(1, 16, 16, 8, 8, torch.float32, "nchw")
    q.requires_grad_()
    out = sparse_attention(q, k, v, "short", (4, 4), backend="triton")
    assert type(out.grad_fn).__name__ == "_AttentionBackward"
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(lambda a, b, c: sparse_attention(a, b, c, "short", (4, 4), backend="triton"),
                  backend=backend, fullgraph=True)(q, k, v)
    code = "\n".join(m.code for m in graphs[0].modules() if isinstance(m, torch.fx.GraphModule))
    assert "isa_triton.attention_fwd" in code and "isa_triton.attention_bwd" in code


def test_explicit_launch_configs_are_refused_under_torch_compile(interpret):
    q, k, v, _ = _inputs(1, 16, 16, 8, 8, torch.float32, "nchw")

    def fn(a, b, c):
        return kernels.triton_attention(a, b, c, "short", (4, 4), 0.25, fwd_cfg=TILE_CFG)

    with pytest.raises(Exception, match="explicit launch configs"):
        torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v)


def test_output_and_grads_keep_the_input_memory_format(interpret):
    q, k, v, grad = _inputs(1, 16, 16, 8, 8, torch.float32, "channels_last")
    out, (dq, dk, dv) = _run(lambda a, b, c: sparse_attention(a, b, c, "long", (4, 4), backend="triton"),
                             q, k, v, grad)
    for t in (out, dq, dk, dv):
        assert t.is_contiguous(memory_format=torch.channels_last)


def test_custom_ops_pass_torch_library_opcheck(interpret):
    q, k, v, _ = _inputs(1, 16, 16, 8, 8, torch.float32, "nchw")
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), True, 4, 4, 0.25)
    torch.library.opcheck(torch.ops.isa_triton.attention_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    out, lse = kernels._forward_impl(q.detach(), k.detach(), v.detach(), True, 4, 4, 0.25)
    bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, True, 4, 4, 0.25)
    torch.library.opcheck(torch.ops.isa_triton.attention_bwd.default, bwd_args,
                          test_utils=("test_schema", "test_faketensor"))


def test_interpreter_refuses_bfloat16(interpret):
    q = torch.randn(1, 16, 8, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16"):
        sparse_attention(q, q, q, "short", (4, 4), backend="triton")


def test_triton_refuses_float64_with_a_fix(interpret):
    q = torch.randn(1, 16, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="float32, float16 and bfloat16"):
        sparse_attention(q, q, q, "short", (4, 4), backend="triton")


def test_auto_stays_eager_on_cpu_even_under_the_interpreter(interpret):
    from isa_triton.attention import resolve_backend

    assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "eager"


def test_backward_keeps_only_the_log_sum_exp_not_the_attention_matrix(interpret):
    """Saved for backward beyond q, k, v, out: the fp32 LSE (N*G*L floats), nothing O(L^2)."""
    from isa_triton.checks import saved_bytes

    q, k, v, _ = _inputs(2, 16, 24, 16, 32, torch.float16, "nchw")
    for pattern, block in (("long", (4, 4)), ("short", (4, 8))):
        saved = saved_bytes(lambda a, b, c: sparse_attention(a, b, c, pattern, block, backend="triton"), q, k, v)
        assert saved == 2 * 16 * 32 * 4  # N * H * W fp32 values = N * G * L
        eager = saved_bytes(lambda a, b, c: sparse_attention(a, b, c, pattern, block, backend="eager"), q, k, v)
        assert eager > 4 * saved


# The one-pass long-group backward (FUSED_DQ): dK, dV per key block, dQ added atomically into an
# fp32 workspace. Explicit configs force the dQ Cqk chunking (4 chunks of 16 over Cqk 40: one
# partial, one empty), K/V re-reads, partial key and query tiles (L = 169) and Cqk != Cv.
def _fused_cfg(cqk, cv, **kw):
    cfg = dict(kind="flash", FUSED_DQ=True, BLOCK_M=16, BLOCK_N=32, BLOCK_DK=max(16, kernels._np2(cqk)),
               BLOCK_DV=max(16, kernels._np2(cv)), DELTA_DV=16, num_warps=4, num_stages=1)
    cfg.update(kw)
    return cfg


FUSED_VARIANTS = {
    "m16_n32": {},
    "m32_n16_reload_kv": dict(RELOAD_KV=True, BLOCK_M=32, BLOCK_N=16),
    "dq_chunks": dict(DQ_CHUNK=16),
    # SPLIT_DQ: the same dK/dV kernel without atomics, then _bwd_dq_kernel over whole dO rows
    "split_dq": dict(FUSED_DQ=False, SPLIT_DQ=True, DQ_BLOCK_M=32, DQ_BLOCK_N=16),
    "split_dq_reload_kv": dict(FUSED_DQ=False, SPLIT_DQ=True, RELOAD_KV=True, BLOCK_M=32, BLOCK_N=16),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("variant", list(FUSED_VARIANTS))
def test_one_pass_backward_variants_match_fp64(interpret, dtype, layout, variant):
    """L = 169 (13x13 map, 1x1 blocks), batch 2, Cqk 40 != Cv 24: partial tiles everywhere."""
    n, cqk, cv, h, w, block = 2, 40, 24, 13, 13, (1, 1)
    q, k, v, grad = _inputs(n, cqk, cv, h, w, dtype, layout, seed=3)
    scale = 0.3
    cfg = _fused_cfg(cqk, cv, **FUSED_VARIANTS[variant])
    _check_against_fp64(_with_configs(None, cfg, "long", block, scale), q, k, v, grad, "long", block, scale)


ONE_PASS_OP_CASES = [
    # (id, N, Cqk, Cv, H, W, block, layout): the op's own one-pass configs (long_backward("fused"/"split"))
    ("L512_channels_last", 1, 24, 16, 16, 32, (1, 1), "channels_last"),
    ("L169_2x2_nchw", 1, 16, 24, 26, 26, (2, 2), "nchw"),
    ("L150_batch2_strided", 2, 16, 40, 10, 30, (1, 2), "strided"),
]


@pytest.mark.parametrize("mode", ["fused", "split"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ONE_PASS_OP_CASES, ids=[c[0] for c in ONE_PASS_OP_CASES])
def test_one_pass_backwards_through_the_op_match_fp64(interpret, case, dtype, mode):
    _, n, cqk, cv, h, w, block, layout = case
    q, k, v, grad = _inputs(n, cqk, cv, h, w, dtype, layout, seed=4)
    gather = kernels.is_gather(True, q, k, v)
    with kernels.long_backward(mode):
        cfg = kernels.bwd_config(dtype, (h // block[0]) * (w // block[1]), cqk, cv, gather)
        assert cfg.get("FUSED_DQ" if mode == "fused" else "SPLIT_DQ"), cfg
        _check_against_fp64(lambda a, b, c: sparse_attention(a, b, c, "long", block, backend="triton"),
                            q, k, v, grad, "long", block, cqk ** -0.5)


def test_long_backward_switch(monkeypatch):
    """Four kernels by default; the environment variable and the context manager pick a one-pass one
    for long groups only; an unknown mode is refused with the choices."""
    monkeypatch.delenv("ISA_TRITON_LONG_BWD", raising=False)
    cfg = kernels.bwd_config(torch.float16, 512, 256, 512)
    assert cfg["kind"] == "flash" and not cfg.get("FUSED_DQ") and not cfg.get("SPLIT_DQ")
    monkeypatch.setenv("ISA_TRITON_LONG_BWD", "fused")
    assert kernels.bwd_config(torch.float16, 512, 256, 512).get("FUSED_DQ")
    with kernels.long_backward("four"):
        assert not kernels.bwd_config(torch.float16, 512, 256, 512).get("FUSED_DQ")
    with kernels.long_backward("split"):
        assert kernels.bwd_config(torch.bfloat16, 512, 256, 512, gather=True).get("SPLIT_DQ")
        assert kernels.bwd_config(torch.float16, 64, 256, 512)["kind"] == "tile"
        assert not kernels.bwd_config(torch.float16, 512, 256, 1024).get("SPLIT_DQ")  # Cv too wide
    monkeypatch.setenv("ISA_TRITON_LONG_BWD", "fast")
    with pytest.raises(ValueError, match="four, fused, split"):
        kernels.bwd_config(torch.float16, 512, 256, 512)
    with pytest.raises(ValueError, match="four, fused, split"):
        with kernels.long_backward("one"):
            pass
