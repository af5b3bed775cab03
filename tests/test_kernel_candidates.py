"""The sweep's candidate kernels (`isa_triton.candidates`) in Triton's interpreter, against fp64.

Same rule and mode as tests/test_kernels.py (TRITON_INTERPRET=1, 2 x eager's error + atol). One
case of each candidate runs in `make test`; the full grid of variants is marked slow.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from isa_triton import bench, candidates, kernels  # noqa: E402
from isa_triton.candidates import FusedBwdConfig, SplitBwdConfig, TileSplitFwdConfig, TmaFwdConfig  # noqa: E402
from test_kernels import DTYPES, assert_matches_fp64, make_inputs  # noqa: E402

pytest_plugins = ("kernel_env",)
TRITON_MODE = "interpret"


@pytest.mark.parametrize("dtype", DTYPES)
def test_short_forward_with_cv_split_over_programs_matches_fp64(dtype):
    """Cv 40 over 4 programs of 16 columns (one partial, one empty), ragged multi-group programs."""
    q, k, v, grad = make_inputs(2, 24, 40, 8, 8, dtype, "nchw", seed=1)
    fwd = TileSplitFwdConfig(16, 16, 16, num_warps=4, num_stages=1, groups_per_prog=3, dv_split=4)
    bwd = kernels.TileConfig(16, 16, 16, num_warps=4, num_stages=1, groups_per_prog=3)
    assert kernels.launch_plans(q, k, v, "short", (2, 2), fwd_cfg=fwd, backward=False)[0].name == "fwd_tile_split"
    assert_matches_fp64(q, k, v, grad, "short", (2, 2), 0.3, fwd, bwd)


# The TMA forward: tensor descriptors over channels_last 16-bit maps. gw = 13 and 10 (tiles of 16
# columns, zero-filled past gw), rows not a multiple of ROWS, a Cv split over programs (block_dv 16
# of Cv 40: one partial box) and batch 2; the backward reads its LSE.
TMA_CFG = TmaFwdConfig(32, 16, 16, num_warps=4, num_stages=2)


@pytest.mark.parametrize("shape,block", [((2, 24, 40, 10, 26), (2, 2)),
                                         pytest.param((1, 16, 24, 20, 40), (2, 4), marks=pytest.mark.slow)],
                         ids=["gw13_batch2_cv_split", "gw10_rows_partial"])
def test_tma_forward_matches_fp64(shape, block):
    n, cqk, cv, h, w = shape
    q, k, v, grad = make_inputs(n, cqk, cv, h, w, torch.float16, "channels_last", seed=5)
    assert kernels.launch_plans(q, k, v, "long", block, fwd_cfg=TMA_CFG, backward=False)[0].name == "fwd_tma"
    assert_matches_fp64(q, k, v, grad, "long", block, cqk ** -0.5, TMA_CFG)


# SPLIT with its dQ pass through TMA boxes; dq_block_m 16 < one row of 16 or 32 tokens: the dQ tile
# is a whole row; dq_block_n 32: two rows. Cv 264 = a full and a partial box.
TMA_SPLIT_CFG = SplitBwdConfig(32, 16, 16, dq_block_m=16, dq_block_n=32, tma=True, num_warps=4, num_stages=2)


@pytest.mark.parametrize("shape,block", [pytest.param((2, 24, 40, 10, 26), (2, 2), marks=pytest.mark.slow),
                                         ((1, 16, 264, 12, 20), (2, 2))],
                         ids=["gw13_batch2", "gw10_two_cv_boxes"])
def test_tma_split_backward_matches_fp64(shape, block):
    n, cqk, cv, h, w = shape
    q, k, v, grad = make_inputs(n, cqk, cv, h, w, torch.float16, "channels_last", seed=6)
    grad = grad.contiguous(memory_format=torch.channels_last)
    names = [p.name for p in kernels.launch_plans(q, k, v, "long", block, bwd_cfg=TMA_SPLIT_CFG)][1:]
    assert names == ["bwd_delta", "bwd_kv", "bwd_dq_tma"], names
    assert_matches_fp64(q, k, v, grad, "long", block, cqk ** -0.5, TMA_CFG, TMA_SPLIT_CFG)


def test_tma_configs_fall_back_to_the_pointer_kernels_for_other_layouts():
    q, k, v, grad = make_inputs(1, 16, 24, 8, 8, torch.float16, "nchw")
    bwd = SplitBwdConfig(16, 16, 32, dq_block_m=16, dq_block_n=16, tma=True, num_warps=4, num_stages=1)
    names = [p.name for p in kernels.launch_plans(q, k, v, "long", (2, 2), 0.25, fwd_cfg=TMA_CFG, bwd_cfg=bwd)]
    assert names == ["fwd_flash", "bwd_delta", "bwd_kv", "bwd_dq"]
    assert_matches_fp64(q, k, v, grad, "long", (2, 2), 0.25, TMA_CFG, bwd)


# The one-pass long-group backwards: dK, dV per key block, dQ added atomically into an fp32
# workspace (fused) or by `_bwd_dq_kernel` (split). Explicit configs force the dQ Cqk chunking
# (4 chunks of 16 over Cqk 40: one partial, one empty), K/V re-reads, partial key and query tiles
# (L = 169) and Cqk != Cv.
ONE_PASS_VARIANTS = {
    "m16_n32": FusedBwdConfig(16, 32, 16, num_warps=4, num_stages=1),
    "m32_n16_reload_kv": FusedBwdConfig(32, 16, 16, reload_kv=True, num_warps=4, num_stages=1),
    "dq_chunks": FusedBwdConfig(16, 32, 16, dq_block_dk=16, num_warps=4, num_stages=1),
    "split_dq": SplitBwdConfig(16, 32, 16, dq_block_m=32, dq_block_n=16, num_warps=4, num_stages=1),
    "split_dq_reload_kv": SplitBwdConfig(32, 16, 16, dq_block_m=16, dq_block_n=32, reload_kv=True, num_warps=4,
                                         num_stages=1),
}
SMOKE = {("m16_n32", "nchw", torch.float16), ("split_dq", "channels_last", torch.float32)}  # the rest: slow


@pytest.mark.parametrize("variant,layout,dtype", [
    pytest.param(variant, layout, dtype.values[0], id=f"{variant}-{layout}-{dtype.id}",
                 marks=() if (variant, layout, dtype.values[0]) in SMOKE else pytest.mark.slow)
    for variant in ONE_PASS_VARIANTS for layout in ("nchw", "channels_last") for dtype in DTYPES])
def test_one_pass_backward_variants_match_fp64(variant, layout, dtype):
    """L = 169 (13x13 map, 1x1 blocks), batch 2, Cqk 40 != Cv 24: partial tiles everywhere."""
    q, k, v, grad = make_inputs(2, 40, 24, 13, 13, dtype, layout, seed=3)
    assert_matches_fp64(q, k, v, grad, "long", (1, 1), 0.3, None, ONE_PASS_VARIANTS[variant])


ONE_PASS_OP_CASES = [
    # (id, N, Cqk, Cv, H, W, block, layout): the sweep's own one-pass configs for these inputs
    ("L512_channels_last", 1, 24, 16, 16, 32, (1, 1), "channels_last"),
    ("L169_2x2_nchw", 1, 16, 24, 26, 26, (2, 2), "nchw"),
    ("L150_batch2_strided", 2, 16, 40, 10, 30, (1, 2), "strided"),
]


@pytest.mark.slow
@pytest.mark.parametrize("make_config", [candidates.fused_bwd_config, candidates.split_bwd_config],
                         ids=["fused", "split"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ONE_PASS_OP_CASES, ids=[c[0] for c in ONE_PASS_OP_CASES])
def test_one_pass_backward_configs_match_fp64(case, dtype, make_config):
    _, n, cqk, cv, h, w, block, layout = case
    q, k, v, grad = make_inputs(n, cqk, cv, h, w, dtype, layout, seed=4)
    cfg = make_config(dtype, cqk, cv, kernels.is_gather(True, q, k, v))
    assert_matches_fp64(q, k, v, grad, "long", block, cqk ** -0.5, None, cfg)


def test_one_pass_configs_refuse_channels_they_cannot_hold():
    q = torch.empty(1, 256, 16, 16, dtype=torch.float16, device="meta")
    v = torch.empty(1, 1024, 16, 16, dtype=torch.float16, device="meta")
    with pytest.raises(ValueError, match="Cv <= 512"):
        kernels.launch_plans(q, q, v, "long", (1, 1), bwd_cfg=candidates.split_bwd_config(torch.float16, 256, 1024))


def test_each_sweep_list_starts_with_the_ops_default():
    """`isa bench kernels --sweep` compares every candidate with the first entry of its list."""
    fwd, bwd = kernels.fwd_config, kernels.bwd_config
    assert candidates.FWD_SWEEP["contiguous"][0] == fwd(torch.bfloat16, 512, 256, 512, False)
    assert candidates.FWD_SWEEP["gather"][0] == fwd(torch.bfloat16, 512, 256, 512, True)
    assert candidates.BWD_SWEEP["contiguous"][0] == bwd(torch.bfloat16, 512, 256, 512, False)
    assert candidates.BWD_SWEEP["gather"][0] == bwd(torch.bfloat16, 512, 256, 512, True)
    assert candidates.SHORT_FWD_SWEEP[0] == fwd(torch.bfloat16, 64, 256, 512, False)
    sweep = candidates.BWD_SWEEP
    assert sweep["contiguous"][3] == candidates.fused_bwd_config(torch.bfloat16, 256, 512)
    assert sweep["contiguous"][7] == candidates.split_bwd_config(torch.bfloat16, 256, 512)
    assert sweep["gather"][2:] == [candidates.fused_bwd_config(torch.bfloat16, 256, 512, True),
                                   candidates.split_bwd_config(torch.bfloat16, 256, 512, True)]
    assert {candidates.variant(c) for c in sweep["contiguous"]} == set(candidates.BWD_VARIANTS)
    assert bench.config_row(sweep["gather"][3])["config"] == "SplitBwdConfig"
    assert bench.config_text(candidates.SHORT_FWD_SWEEP[1]) == (
        "TileSplitFwdConfig(block_l=64, block_dk=128, block_dv=128, dv_split=2)")
