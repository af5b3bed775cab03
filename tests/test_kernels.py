"""The op's Triton kernels, run on the CPU in Triton's interpreter, against an fp64 reference.

TRITON_MODE = "interpret": these tests run in a process that set TRITON_INTERPRET=1 before
importing Triton (a child pytest unless this one did; tests/kernel_env.py). Tolerance rule
(flash-attention's): the kernel's max error against fp64 may be at most twice eager PyTorch's
error in the same dtype, plus a small atol. The candidates of `isa_triton.candidates` are tested
in tests/test_kernel_candidates.py.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton")

from isa_triton import kernels, sparse_attention  # noqa: E402
from isa_triton.attention import eager_attention  # noqa: E402
from isa_triton.checks import errors_vs_fp64, forward_backward, saved_bytes  # noqa: E402
from isa_triton.kernels import FlashBwdConfig, FlashFwdConfig, TileConfig  # noqa: E402

pytest_plugins = ("kernel_env",)
TRITON_MODE = "interpret"

ATOL = {torch.float32: 1e-6, torch.float16: 1e-4}
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
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


def make_inputs(n, cqk, cv, h, w, dtype, layout, seed=0):
    """q, k, v and an upstream gradient in `layout` (shared with tests/test_kernel_candidates.py)."""
    gen = torch.Generator().manual_seed(seed)
    q = _make((n, cqk, h, w), dtype, layout, gen, 0)
    k = _make((n, cqk, h, w), dtype, layout, gen, 1)
    v = _make((n, cv, h, w), dtype, layout, gen, 2)
    grad = torch.randn(n, cv, h, w, generator=gen).to(dtype)
    return q, k, v, grad


def assert_matches_fp64(q, k, v, grad, pattern, block, scale, fwd_cfg=None, bwd_cfg=None):
    """Forward, dq, dk, dv of the Triton op (with these launch configs, None: the op's own) within
    2 x eager's error against fp64 + ATOL, with eager's shape and dtype."""
    errors = errors_vs_fp64(q, k, v, pattern, block, scale, backend="triton", grad=grad, atol=ATOL[q.dtype],
                            fwd_cfg=fwd_cfg, bwd_cfg=bwd_cfg)
    assert list(errors) == ["out", "dq", "dk", "dv"]
    bad = {name: e for name, e in errors.items() if not e["ok"]}
    assert not bad, f"triton error > 2 x eager's + {ATOL[q.dtype]}: {bad}"


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
def test_triton_forward_and_grads_within_twice_eager_error(case, dtype):
    _, n, cqk, cv, h, w, block, pattern, layout = case
    q, k, v, grad = make_inputs(n, cqk, cv, h, w, dtype, layout)
    assert_matches_fp64(q, k, v, grad, pattern, block, cqk ** -0.5)


# Explicit configurations that force every loop and branch: several Cqk/Cv chunks with partial
# last chunks, several key/query blocks, ragged multi-group programs, dV by its own kernel or not.
TILE_CFG = TileConfig(16, 16, 16, num_warps=4, num_stages=1, groups_per_prog=3)
FLASH_FWD_CFG = FlashFwdConfig(32, 16, 16, num_warps=4, num_stages=1)
FLASH_BWD_MULTI = FlashBwdConfig(16, 32, 16, dv_block_dv=32, delta_block_dv=16, num_warps=4, num_stages=1)
FLASH_BWD_ONE = FlashBwdConfig(32, 16, 64, delta_block_dv=32, num_warps=4, num_stages=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fwd_cfg,bwd_cfg,shape,block,pattern", [
    pytest.param(TILE_CFG, TILE_CFG, (2, 40, 24, 8, 8), (2, 2), "short", id="tile_chunks_ragged_groups"),
    pytest.param(FLASH_FWD_CFG, FLASH_BWD_MULTI, (1, 40, 40, 8, 11), (1, 1), "long", id="flash_cv_split"),
    pytest.param(FLASH_FWD_CFG, FLASH_BWD_ONE, (2, 24, 40, 6, 7), (1, 1), "long", id="flash_one_cv_chunk"),
])
def test_every_kernel_loop_and_branch_matches_fp64(dtype, fwd_cfg, bwd_cfg, shape, block, pattern):
    n, cqk, cv, h, w = shape
    q, k, v, grad = make_inputs(n, cqk, cv, h, w, dtype, "nchw", seed=1)
    names = [p.name for p in kernels.launch_plans(q, k, v, pattern, block, fwd_cfg=fwd_cfg, bwd_cfg=bwd_cfg)]
    expected = {"tile_chunks_ragged_groups": ["fwd_tile", "bwd_tile"],
                "flash_cv_split": ["fwd_flash", "bwd_delta", "bwd_dkdv", "bwd_dv", "bwd_dq"],
                "flash_one_cv_chunk": ["fwd_flash", "bwd_delta", "bwd_dkdv", "bwd_dq"]}
    assert names in expected.values()
    assert_matches_fp64(q, k, v, grad, pattern, block, 0.3, fwd_cfg, bwd_cfg)


def test_torch_compile_fullgraph_runs_the_custom_op():
    """The op traces without graph breaks (fake impls, one autograd.Function) and matches eager."""
    q, k, v, grad = make_inputs(1, 16, 16, 8, 8, torch.float32, "nchw", seed=2)

    def fn(a, b, c):
        return sparse_attention(a, b, c, "short", (4, 4), backend="triton") * 2.0

    got = forward_backward(torch.compile(fn, fullgraph=True, backend="aot_eager"), q, k, v, grad)
    ref = forward_backward(lambda a, b, c: eager_attention(a, b, c, "short", (4, 4), 0.25) * 2.0, q, k, v, grad)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_eager_calls_skip_the_custom_op_dispatcher_and_compiled_ones_use_it():
    q, k, v, _ = make_inputs(1, 16, 16, 8, 8, torch.float32, "nchw")
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


def test_explicit_launch_configs_are_refused_under_torch_compile():
    q, k, v, _ = make_inputs(1, 16, 16, 8, 8, torch.float32, "nchw")

    def fn(a, b, c):
        return kernels.triton_attention(a, b, c, "short", (4, 4), 0.25, fwd_cfg=TILE_CFG)

    with pytest.raises(Exception, match="explicit launch configs"):
        torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v)


def test_output_and_grads_keep_the_input_memory_format():
    q, k, v, grad = make_inputs(1, 16, 16, 8, 8, torch.float32, "channels_last")
    got = forward_backward(lambda a, b, c: sparse_attention(a, b, c, "long", (4, 4), backend="triton"),
                           q, k, v, grad)
    for t in got:
        assert t.is_contiguous(memory_format=torch.channels_last)


def test_custom_ops_pass_torch_library_opcheck():
    q, k, v, _ = make_inputs(1, 16, 16, 8, 8, torch.float32, "nchw")
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), True, 4, 4, 0.25)
    torch.library.opcheck(torch.ops.isa_triton.attention_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    out, lse = kernels.attention_forward(q.detach(), k.detach(), v.detach(), True, 4, 4, 0.25)
    bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, True, 4, 4, 0.25)
    torch.library.opcheck(torch.ops.isa_triton.attention_bwd.default, bwd_args,
                          test_utils=("test_schema", "test_faketensor"))


def test_interpreter_refuses_bfloat16():
    q = torch.randn(1, 16, 8, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16"):
        sparse_attention(q, q, q, "short", (4, 4), backend="triton")


def test_triton_refuses_float64_with_a_fix():
    q = torch.randn(1, 16, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="float32, float16 and bfloat16"):
        sparse_attention(q, q, q, "short", (4, 4), backend="triton")


def test_auto_stays_eager_on_cpu_even_under_the_interpreter():
    from isa_triton.attention import resolve_backend

    assert kernels.interpreter_enabled()
    assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "eager"


def test_backward_keeps_only_the_log_sum_exp_not_the_attention_matrix():
    """Saved for backward beyond q, k, v, out: the fp32 LSE (N*G*L floats), nothing O(L^2)."""
    q, k, v, _ = make_inputs(2, 16, 24, 16, 32, torch.float16, "nchw")
    for pattern, block in (("long", (4, 4)), ("short", (4, 8))):
        saved = saved_bytes(lambda a, b, c: sparse_attention(a, b, c, pattern, block, backend="triton"), q, k, v)
        assert saved == 2 * 16 * 32 * 4  # N * H * W fp32 values = N * G * L
        eager = saved_bytes(lambda a, b, c: sparse_attention(a, b, c, pattern, block, backend="eager"), q, k, v)
        assert eager > 4 * saved


def test_launch_configs_are_frozen_typed_and_checked():
    cfg = kernels.fwd_config(torch.float16, 512, 256, 512)
    assert cfg == FlashFwdConfig(128, 64, 256)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.block_m = 64
    with pytest.raises(TypeError, match="blok_m"):
        FlashFwdConfig(blok_m=64, block_n=64, block_dv=64)
    with pytest.raises(ValueError, match="powers of two"):
        TileConfig(48, 16, 16)
    with pytest.raises(ValueError, match="warps"):
        FlashBwdConfig(64, 64, 64, num_warps=3)
    with pytest.raises(ValueError, match="does not fit block_l"):
        q = torch.randn(1, 16, 8, 8)
        kernels.launch_plans(q, q, q, "short", (8, 8), fwd_cfg=TileConfig(32, 16, 16))


def test_the_op_picks_tile_kernels_for_short_groups_and_four_backward_kernels_for_long_ones():
    """What `auto` runs at the ISA shapes (bf16, Cqk 256 / Cv 512): no candidate kernel."""
    names = set()
    for h, w in ((128, 256), (64, 128), (104, 104), (64, 88)):
        for pattern in ("long", "short"):
            for memory_format in (torch.contiguous_format, torch.channels_last):
                q = torch.empty(1, 256, h, w, dtype=torch.bfloat16, device="meta").to(memory_format=memory_format)
                v = torch.empty(1, 512, h, w, dtype=torch.bfloat16, device="meta").to(memory_format=memory_format)
                names |= {p.name for p in kernels.launch_plans(q, q, v, pattern, (8, 8))}
    assert names == {"fwd_tile", "bwd_tile", "fwd_flash", "bwd_delta", "bwd_dkdv", "bwd_dv", "bwd_dq"}
