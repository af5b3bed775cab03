"""Launch-config candidates that `isa bench kernels --sweep` times beside the op's defaults.

Nothing here is on the op's path: `backend="auto"` (and `triton_attention` without explicit
configs) never reaches this module; `isa_triton.bench.run_sweep` and the tests do. Each candidate
is kept because it may win somewhere and needs GPU timings to decide (BENCHMARKS.md, kernel history):

- `TileSplitFwdConfig`: the short-range forward with a group's Cv over `dv_split` programs (untimed).
- `TmaFwdConfig`: the long-range forward fed by Hopper's bulk-tensor copies (channels_last 16-bit
  maps, sm_90; other layouts fall back to the pointer kernel with the same blocks; untimed).
- `FusedBwdConfig`: a one-pass long-range backward, dQ by relaxed fp32 atomics into an
  (N*G, L, Cqk) fp32 workspace (H100: 1.21x the four-kernel backward at 128x256, batch 8,
  channels_last; 3.8x for NCHW; no gain at batch 1; off by default for that workspace).
- `SplitBwdConfig`: the same dK/dV pass without dQ, then `_bwd_dq_kernel` (no atomics, no
  workspace) or, with tma=True on channels_last 16-bit maps, `_bwd_dq_tma_kernel` (untimed).
- `FWD_SWEEP`, `SHORT_FWD_SWEEP`, `BWD_SWEEP`: what the sweep times, the op's default first.

Every entry compiles for sm_90a without spills (tests/test_kernel_compile.py) and matches fp64 in the
interpreter (tests/test_kernel_candidates.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Optional, Union

import torch

from .kernels import (_LOG2E, INTERPRETED, FlashBwdConfig, FlashFwdConfig, Geometry, Launch, LaunchConfig,
                      TileConfig, _chunk, _fwd_tile_groups, _group_block, _np2, _pixel_offset, _precision, _strides,
                      _whole, delta_launch, dq_launch, tl, triton)

ONE_PASS_MAX_DK, ONE_PASS_MAX_DV = 256, 512  # the one-pass dK/dV kernel holds whole Cqk and Cv rows per tile
TMA_MAX_BOX = 256  # elements per dimension of one bulk-tensor copy
TMA_MAX_GW = 128  # a tile holds at least one whole row of a group's tokens


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _fwd_tile_split_kernel(
    Q, K, V, O, LSE,
    sq_n, sq_c, sq_h, sq_w, sk_n, sk_c, sk_h, sk_w, sv_n, sv_c, sv_h, sv_w, so_n, so_c, so_h, so_w,
    L, G, NG, gw, CQK, CV, CV_PER, qk_scale,
    BH: tl.constexpr, BW: tl.constexpr, LONG: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    GROUPS_PER_PROG: tl.constexpr, DV_SPLIT: tl.constexpr, PREC: tl.constexpr,
):
    """`_fwd_tile_kernel` with a group's Cv over DV_SPLIT adjacent programs (CV_PER columns each, the
    scores recomputed by each)."""
    c_lo = (tl.program_id(0) % DV_SPLIT) * CV_PER
    _fwd_tile_groups(Q, K, V, O, LSE, sq_n, sq_c, sq_h, sq_w, sk_n, sk_c, sk_h, sk_w, sv_n, sv_c, sv_h, sv_w,
                     so_n, so_c, so_h, so_w, L, G, NG, gw, CQK, qk_scale, tl.program_id(0) // DV_SPLIT, c_lo,
                     tl.minimum(c_lo + CV_PER, CV), BH, BW, LONG, BLOCK_L, BLOCK_DK, BLOCK_DV, GROUPS_PER_PROG, PREC)


@triton.jit
def _tma_box(X, n, lh, lw, s_n, s_h, s_w, gh, gw, C, BH: tl.constexpr, BW: tl.constexpr, ROWS: tl.constexpr,
             GWB: tl.constexpr, BOX_C: tl.constexpr):
    """Descriptor of group (n, lh, lw) of a channels_last map: box [ROWS, GWB, BOX_C] of [gh, gw, C]."""
    return tl.make_tensor_descriptor(X + n * s_n + lh * s_h + lw * s_w, shape=[gh, gw, C],
                                     strides=[BH * s_h, BW * s_w, 1], block_shape=[ROWS, GWB, BOX_C])


@triton.jit
def _fwd_tma_kernel(
    Q, K, V, O, LSE,
    sq_n, sq_h, sq_w, sk_n, sk_h, sk_w, sv_n, sv_h, sv_w, so_n, so_h, so_w,
    G, gh, gw, CQK, CV, NUM_DV, qk_scale,
    BH: tl.constexpr, BW: tl.constexpr,
    ROWS_M: tl.constexpr, ROWS_N: tl.constexpr, GWB: tl.constexpr, BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """Long groups of channels_last 16-bit maps through TMA tensor descriptors (sm_90+).

    A group (n, lh, lw) is the strided 3-D box [gh, gw, C] with strides (BH*s_h, BW*s_w, 1) of its
    map, so Hopper's bulk-tensor copies fetch ROWS x GWB tokens x channels per tile (GWB = gw
    rounded up to a power of two; the copy zero-fills tokens past gw and gh and clips the
    store). Otherwise `_fwd_flash_kernel`: online softmax over key tiles, Cv split over programs.
    """
    BLOCK_M: tl.constexpr = ROWS_M * GWB
    BLOCK_N: tl.constexpr = ROWS_N * GWB
    per_group = ((gh + ROWS_M - 1) // ROWS_M) * NUM_DV
    pid = tl.program_id(0)
    bg = pid // per_group
    m_blk = (pid % per_group) // NUM_DV
    dv_blk = pid % NUM_DV
    n = (bg // G).to(tl.int64)
    grp = bg % G
    lh = grp // BW
    lw = grp % BW
    q_desc = _tma_box(Q, n, lh, lw, sq_n, sq_h, sq_w, gh, gw, CQK, BH, BW, ROWS_M, GWB, BLOCK_DK)
    k_desc = _tma_box(K, n, lh, lw, sk_n, sk_h, sk_w, gh, gw, CQK, BH, BW, ROWS_N, GWB, BLOCK_DK)
    v_desc = _tma_box(V, n, lh, lw, sv_n, sv_h, sv_w, gh, gw, CV, BH, BW, ROWS_N, GWB, BLOCK_DV)
    o_desc = _tma_box(O, n, lh, lw, so_n, so_h, so_w, gh, gw, CV, BH, BW, ROWS_M, GWB, BLOCK_DV)
    row0 = m_blk * ROWS_M
    q = tl.reshape(q_desc.load([row0, 0, 0]), [BLOCK_M, BLOCK_DK])
    offs_n0 = tl.arange(0, BLOCK_N)
    col_ok = (offs_n0 % GWB) < gw
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, dtype=tl.float32)
    for r0 in range(0, gh, ROWS_N):
        k = tl.reshape(k_desc.load([r0, 0, 0]), [BLOCK_N, BLOCK_DK])
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where((col_ok & (r0 + offs_n0 // GWB < gh))[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.reshape(v_desc.load([r0, 0, dv_blk * BLOCK_DV]), [BLOCK_N, BLOCK_DV])
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(V.dtype.element_ty), v, acc)
        m_i = m_new
    acc = acc / l_i[:, None]
    o_desc.store([row0, 0, dv_blk * BLOCK_DV], tl.reshape(acc.to(O.dtype.element_ty), [ROWS_M, GWB, BLOCK_DV]))
    offs_m = tl.arange(0, BLOCK_M)
    row = row0 + offs_m // GWB
    col = offs_m % GWB
    tl.store(LSE + bg * gh * gw + row * gw + col, m_i + tl.log2(l_i), mask=(row < gh) & (col < gw) & (dv_blk == 0))


@triton.jit
def _bwd_dq_tma_kernel(
    Q, K, V, DO, DQ, LSE, DELTA,
    sq_n, sq_h, sq_w, sk_n, sk_h, sk_w, sv_n, sv_h, sv_w, sdo_n, sdo_h, sdo_w, sdq_n, sdq_h, sdq_w,
    G, gh, gw, CQK, CV, qk_scale, scale,
    BH: tl.constexpr, BW: tl.constexpr, ROWS_M: tl.constexpr, ROWS_N: tl.constexpr, GWB: tl.constexpr,
    BLOCK_DK: tl.constexpr, BOX_DV: tl.constexpr, TWO_DV: tl.constexpr,
):
    """SPLIT_DQ's dQ pass through TMA boxes: ROWS_M rows of queries per program, whole dO rows.

    Transposed (keys x queries) so that the loop-invariant Q and dO tiles are wgmma B operands,
    which stay in shared memory, and dQ^T (Cqk x queries) has M = Cqk.
    """
    BLOCK_M: tl.constexpr = ROWS_M * GWB
    BLOCK_N: tl.constexpr = ROWS_N * GWB
    per_group = (gh + ROWS_M - 1) // ROWS_M
    pid = tl.program_id(0)
    bg = pid // per_group
    r_m = (pid % per_group) * ROWS_M
    n = (bg // G).to(tl.int64)
    grp = bg % G
    lh = grp // BW
    lw = grp % BW
    q_desc = _tma_box(Q, n, lh, lw, sq_n, sq_h, sq_w, gh, gw, CQK, BH, BW, ROWS_M, GWB, BLOCK_DK)
    do_desc = _tma_box(DO, n, lh, lw, sdo_n, sdo_h, sdo_w, gh, gw, CV, BH, BW, ROWS_M, GWB, BOX_DV)
    k_desc = _tma_box(K, n, lh, lw, sk_n, sk_h, sk_w, gh, gw, CQK, BH, BW, ROWS_N, GWB, BLOCK_DK)
    v_desc = _tma_box(V, n, lh, lw, sv_n, sv_h, sv_w, gh, gw, CV, BH, BW, ROWS_N, GWB, BOX_DV)
    offs_m = tl.arange(0, BLOCK_M)
    row = r_m + offs_m // GWB
    col = offs_m % GWB
    m_ok = (row < gh) & (col < gw)
    tok = bg * gh * gw + row * gw + col
    lse = tl.load(LSE + tok, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + tok, mask=m_ok, other=0.0)
    qt = tl.trans(tl.reshape(q_desc.load([r_m, 0, 0]), [BLOCK_M, BLOCK_DK]))
    dot0 = tl.trans(tl.reshape(do_desc.load([r_m, 0, 0]), [BLOCK_M, BOX_DV]))
    if TWO_DV:
        dot1 = tl.trans(tl.reshape(do_desc.load([r_m, 0, BOX_DV]), [BLOCK_M, BOX_DV]))
    offs_n0 = tl.arange(0, BLOCK_N)
    dqt = tl.full([BLOCK_DK, BLOCK_M], 0.0, dtype=tl.float32)
    for r_n in range(0, gh, ROWS_N):
        n_ok = ((offs_n0 % GWB) < gw) & (r_n + offs_n0 // GWB < gh)
        k = tl.reshape(k_desc.load([r_n, 0, 0]), [BLOCK_N, BLOCK_DK])
        pt = tl.exp2(tl.dot(k, qt) * qk_scale - lse[None, :])
        pt = tl.where(n_ok[:, None], pt, 0.0)
        dpt = tl.dot(tl.reshape(v_desc.load([r_n, 0, 0]), [BLOCK_N, BOX_DV]), dot0)
        if TWO_DV:
            dpt = tl.dot(tl.reshape(v_desc.load([r_n, 0, BOX_DV]), [BLOCK_N, BOX_DV]), dot1, dpt)
        dst = (pt * (dpt - delta[None, :])).to(K.dtype.element_ty)
        dqt = tl.dot(tl.trans(k), dst, dqt)
    dq_desc = _tma_box(DQ, n, lh, lw, sdq_n, sdq_h, sdq_w, gh, gw, CQK, BH, BW, ROWS_M, GWB, BLOCK_DK)
    dq_desc.store([r_m, 0, 0], tl.reshape(tl.trans(dqt * scale).to(DQ.dtype.element_ty), [ROWS_M, GWB, BLOCK_DK]))


@triton.jit
def _bwd_fused_kernel(
    Q, K, V, DO, DQW, DK, DV, LSE, DELTA,
    sq_n, sq_c, sq_h, sq_w, sk_n, sk_c, sk_h, sk_w, sv_n, sv_c, sv_h, sv_w,
    sdo_n, sdo_c, sdo_h, sdo_w, sdk_n, sdk_c, sdk_h, sdk_w, sdv_n, sdv_c, sdv_h, sdv_w,
    L, G, gw, CQK, CV, qk_scale, scale,
    BH: tl.constexpr, BW: tl.constexpr, LONG: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    RELOAD_KV: tl.constexpr, DQ_CHUNK: tl.constexpr, WITH_DQ: tl.constexpr, PREC: tl.constexpr,
):
    """Long groups, one pass: dK, dV of BLOCK_N keys and (WITH_DQ) their dQ share, over all queries.

    Whole Cqk and Cv rows per tile: S and dP once per (query block, key block) give dV^T += dO^T P and
    dK^T += Q^T dS (accumulated as (channels, keys): M = Cqk / Cv, wgmma-shaped on sm_90) and dQ += dS K,
    added with relaxed fp32 atomics into DQW, laid out (group, token, Cqk), by Cqk chunks of DQ_CHUNK.
    RELOAD_KV re-reads the K/V tiles per query block instead of keeping them live.
    """
    bg, n_blk, n, grp = _group_block(L, G, BLOCK_N)
    offs_n = n_blk * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < L
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    dk_ok = offs_dk < CQK
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < CV
    pk = _pixel_offset(offs_n, grp, gw, sk_h, sk_w, BH, BW, LONG)
    pv = _pixel_offset(offs_n, grp, gw, sv_h, sv_w, BH, BW, LONG)
    dqw_base = DQW + bg.to(tl.int64) * L * CQK + offs_dk[None, :]
    pdk = _pixel_offset(offs_n, grp, gw, sdk_h, sdk_w, BH, BW, LONG)
    pdv = _pixel_offset(offs_n, grp, gw, sdv_h, sdv_w, BH, BW, LONG)
    kt_ptrs = K + n * sk_n + pk[None, :] + offs_dk[:, None] * sk_c
    vt_ptrs = V + n * sv_n + pv[None, :] + offs_dv[:, None] * sv_c
    kt_mask = dk_ok[:, None] & n_ok[None, :]
    vt_mask = dv_ok[:, None] & n_ok[None, :]
    if not RELOAD_KV:
        kt = tl.load(kt_ptrs, mask=kt_mask, other=0.0)
        vt = tl.load(vt_ptrs, mask=vt_mask, other=0.0)
    dkt_acc = tl.full([BLOCK_DK, BLOCK_N], 0.0, dtype=tl.float32)
    dvt_acc = tl.full([BLOCK_DV, BLOCK_N], 0.0, dtype=tl.float32)
    for start in range(0, L, BLOCK_M):
        offs_m = start + offs_m0
        m_ok = offs_m < L
        pq = _pixel_offset(offs_m, grp, gw, sq_h, sq_w, BH, BW, LONG)
        pdo = _pixel_offset(offs_m, grp, gw, sdo_h, sdo_w, BH, BW, LONG)
        q = tl.load(Q + n * sq_n + pq[:, None] + offs_dk[None, :] * sq_c,
                    mask=m_ok[:, None] & dk_ok[None, :], other=0.0)
        do = tl.load(DO + n * sdo_n + pdo[:, None] + offs_dv[None, :] * sdo_c,
                     mask=m_ok[:, None] & dv_ok[None, :], other=0.0)
        lse = tl.load(LSE + bg * L + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + bg * L + offs_m, mask=m_ok, other=0.0)
        if RELOAD_KV:  # re-read per query block (L2 hits): fewer live registers
            kt = tl.load(kt_ptrs, mask=kt_mask, other=0.0)
            vt = tl.load(vt_ptrs, mask=vt_mask, other=0.0)
        s = tl.dot(q, kt, input_precision=PREC)
        p = tl.exp2(s * qk_scale - lse[:, None])  # 0 for padded queries
        p = tl.where(n_ok[None, :], p, 0.0)
        dp = tl.dot(do, vt, input_precision=PREC)
        ds = (p * (dp - delta[:, None])).to(Q.dtype.element_ty)
        dvt_acc = tl.dot(tl.trans(do), p.to(DO.dtype.element_ty), dvt_acc, input_precision=PREC)
        dkt_acc = tl.dot(tl.trans(q), ds, dkt_acc, input_precision=PREC)
        if not WITH_DQ:
            pass
        elif DQ_CHUNK >= BLOCK_DK:
            dq = tl.dot(ds, tl.trans(kt), input_precision=PREC)
            tl.atomic_add(dqw_base + offs_m[:, None] * CQK, dq, mask=m_ok[:, None] & dk_ok[None, :],
                          sem="relaxed")
        else:  # dQ by Cqk chunks (K^T chunk re-read, L2 hits): a smaller live fp32 tile
            for d0 in tl.static_range(0, BLOCK_DK, DQ_CHUNK):
                offs_c = d0 + tl.arange(0, DQ_CHUNK)
                ktc = tl.load(K + n * sk_n + pk[None, :] + offs_c[:, None] * sk_c,
                              mask=(offs_c < CQK)[:, None] & n_ok[None, :], other=0.0)
                dq = tl.dot(ds, tl.trans(ktc), input_precision=PREC)
                tl.atomic_add(DQW + bg.to(tl.int64) * L * CQK + offs_m[:, None] * CQK + offs_c[None, :], dq,
                              mask=m_ok[:, None] & (offs_c < CQK)[None, :], sem="relaxed")
    tl.store(DK + n * sdk_n + pdk[None, :] + offs_dk[:, None] * sdk_c, (dkt_acc * scale).to(DK.dtype.element_ty),
             mask=dk_ok[:, None] & n_ok[None, :])
    tl.store(DV + n * sdv_n + pdv[None, :] + offs_dv[:, None] * sdv_c, dvt_acc.to(DV.dtype.element_ty),
             mask=dv_ok[:, None] & n_ok[None, :])


@triton.jit
def _bwd_dq_cast_kernel(
    DQW, DQ, sdq_n, sdq_c, sdq_h, sdq_w, L, G, gw, CQK, scale,
    BH: tl.constexpr, BW: tl.constexpr, LONG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DK: tl.constexpr,
):
    """dQ = scale * the fp32 workspace (group, token, Cqk), written through dQ's strides."""
    bg, m_blk, n, grp = _group_block(L, G, BLOCK_M)
    offs_m = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < L
    offs_dk0 = tl.arange(0, BLOCK_DK)
    pdq = _pixel_offset(offs_m, grp, gw, sdq_h, sdq_w, BH, BW, LONG)
    ws = DQW + bg.to(tl.int64) * L * CQK + offs_m[:, None] * CQK
    for d0 in range(0, CQK, BLOCK_DK):
        offs_dk = d0 + offs_dk0
        mask = m_ok[:, None] & (offs_dk < CQK)[None, :]
        x = tl.load(ws + offs_dk[None, :], mask=mask, other=0.0)
        tl.store(DQ + n * sdq_n + pdq[:, None] + offs_dk[None, :] * sdq_c, (x * scale).to(DQ.dtype.element_ty),
                 mask=mask)


# --------------------------------------------------------------------------------------------
# Launch configs and plans
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TileSplitFwdConfig(TileConfig):
    """`TileConfig` for the forward, with a group's Cv over `dv_split` adjacent programs."""

    dv_split: int = dataclasses.field(kw_only=True)

    def fwd_plan(self, geo: Geometry, scale: float, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 out: torch.Tensor, lse: torch.Tensor) -> List[Launch]:
        (tile,) = super().fwd_plan(geo, scale, q, k, v, out, lse)
        cv_per = triton.cdiv(triton.cdiv(v.shape[1], self.dv_split), self.block_dv) * self.block_dv
        return [dataclasses.replace(tile, kernel=_fwd_tile_split_kernel, grid=(tile.grid[0] * self.dv_split,),
                                    args=dict(tile.args, CV_PER=cv_per),
                                    constexprs=dict(tile.constexprs, DV_SPLIT=self.dv_split), name="fwd_tile_split")]


def _tma_strides(**tensors: torch.Tensor) -> Dict[str, int]:
    """(n, h, w) strides of the TMA kernels' maps, named s{name}_n/h/w (the channel stride is 1)."""
    return {f"s{name}_{d}": x.stride(i) for name, x in tensors.items() for d, i in (("n", 0), ("h", 2), ("w", 3))}


def _tma_rows(geo: Geometry, block_m: int, block_n: int) -> tuple:
    """TMA tiles are whole rows of a group's token grid: (rows per query tile, per key tile, padded row)."""
    gwb = _np2(geo.gw)
    return max(1, block_m // gwb), max(1, block_n // gwb), gwb


def tma_eligible(geo: Geometry, block_dk: int, block_dv: int, *tensors: torch.Tensor) -> bool:
    """Whether the TMA kernels can read these maps: long range, 16-bit, channels_last with channel
    counts that are multiples of 8 (16-byte aligned rows and strides), whole Cqk in one box."""
    q = tensors[0]
    return (geo.long_range and q.dtype in (torch.float16, torch.bfloat16) and _np2(geo.gw) <= TMA_MAX_GW
            and block_dk >= q.shape[1] and max(block_dk, block_dv) <= TMA_MAX_BOX
            and all(t.dtype == q.dtype and t.stride(1) == 1 and t.shape[1] % 8 == 0
                    and all(st % 8 == 0 for st in (t.stride(0), t.stride(2), t.stride(3)))
                    and (t.device.type == "meta" or t.data_ptr() % 16 == 0) for t in tensors))


def _scratch(size: int, alignment: int, stream: Optional[int]) -> torch.Tensor:
    """Global scratch for kernels that build TMA descriptors on the device (128 bytes each)."""
    on_gpu = torch.cuda.is_available() and not INTERPRETED
    return torch.empty(size, dtype=torch.int8, device="cuda" if on_gpu else "cpu")


def _use_scratch_allocator() -> None:
    """Set Triton's allocator for device-side descriptors, as its tutorials do; a context variable (per
    thread: autograd's backward may run in another one), so it is set again for every TMA plan."""
    triton.set_allocator(_scratch)


@dataclass(frozen=True)
class TmaFwdConfig(FlashFwdConfig):
    """`_fwd_tma_kernel` for channels_last 16-bit maps (block_m, block_n rounded to whole rows of a group's
    token grid); `_fwd_flash_kernel` with the same blocks for other maps."""

    def fwd_plan(self, geo: Geometry, scale: float, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 out: torch.Tensor, lse: torch.Tensor) -> List[Launch]:
        cqk, cv = q.shape[1], v.shape[1]
        if not tma_eligible(geo, _whole(cqk), self.block_dv, q, k, v, out):
            return super().fwd_plan(geo, scale, q, k, v, out, lse)
        _use_scratch_allocator()
        rows_m, rows_n, gwb = _tma_rows(geo, self.block_m, self.block_n)
        num_dv = triton.cdiv(cv, self.block_dv)
        args = dict(Q=q, K=k, V=v, O=out, LSE=lse, **_tma_strides(q=q, k=k, v=v, o=out), G=geo.groups, gh=geo.gh,
                    gw=geo.gw, CQK=cqk, CV=cv, NUM_DV=num_dv, qk_scale=scale * _LOG2E)
        cx = dict(BH=geo.bh, BW=geo.bw, ROWS_M=rows_m, ROWS_N=rows_n, GWB=gwb, BLOCK_DK=_whole(cqk),
                  BLOCK_DV=self.block_dv)
        grid = (triton.cdiv(geo.gh, rows_m) * num_dv * geo.n * geo.groups,)
        return [Launch(_fwd_tma_kernel, grid, args, cx, self.num_warps, self.num_stages, "fwd_tma")]


def _one_pass_launch(cfg: Union["FusedBwdConfig", "SplitBwdConfig"], geo: Geometry, scale: float,
                     do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: torch.Tensor,
                     delta: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, dq_ws: Optional[torch.Tensor],
                     dq_chunk: Optional[int] = None) -> Launch:
    """`_bwd_fused_kernel` over block_n keys per program; dQ into `dq_ws` by atomics (None: no dQ)."""
    cqk, cv = q.shape[1], v.shape[1]
    if _whole(cqk) > ONE_PASS_MAX_DK or _whole(cv) > ONE_PASS_MAX_DV:
        raise ValueError(f"{type(cfg).__name__} holds whole Cqk and Cv rows per tile: Cqk <= {ONE_PASS_MAX_DK} "
                         f"and Cv <= {ONE_PASS_MAX_DV} needed, got {cqk} and {cv}")
    args = dict(Q=q, K=k, V=v, DO=do, DQW=dk if dq_ws is None else dq_ws, DK=dk, DV=dv, LSE=lse, DELTA=delta,
                **_strides(q, "sq"), **_strides(k, "sk"), **_strides(v, "sv"), **_strides(do, "sdo"),
                **_strides(dk, "sdk"), **_strides(dv, "sdv"), L=geo.tokens, G=geo.groups, gw=geo.gw, CQK=cqk,
                CV=cv, qk_scale=scale * _LOG2E, scale=scale)
    cx = dict(geo.geo_constexprs(), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_DK=_whole(cqk),
              BLOCK_DV=_whole(cv), RELOAD_KV=cfg.reload_kv, DQ_CHUNK=dq_chunk or _whole(cqk), WITH_DQ=dq_ws is not None,
              PREC=_precision(q.dtype))
    return Launch(_bwd_fused_kernel, (triton.cdiv(geo.tokens, cfg.block_n) * geo.n * geo.groups,), args, cx,
                  cfg.num_warps, cfg.num_stages, "bwd_kv" if dq_ws is None else "bwd_fused")


@dataclass(frozen=True)
class FusedBwdConfig(LaunchConfig):
    """One-pass long backward: dK, dV of block_n keys in registers, S and dP once per (query block, key
    block), dQ by relaxed fp32 atomics (by Cqk chunks of dq_block_dk if set) into a workspace that
    `_bwd_dq_cast_kernel` scales and writes; reload_kv re-reads K/V per query block."""

    block_m: int
    block_n: int
    delta_block_dv: int
    reload_kv: bool = False
    dq_block_dk: Optional[int] = None
    num_warps: int = 8
    num_stages: int = 2

    def bwd_plan(self, geo: Geometry, scale: float, do: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor,
                 dv: torch.Tensor) -> List[Launch]:
        cqk, ng = q.shape[1], geo.n * geo.groups
        delta = torch.empty_like(lse)
        dq_ws = torch.zeros(ng, geo.tokens, cqk, device=q.device, dtype=torch.float32)
        cast = Launch(_bwd_dq_cast_kernel, (triton.cdiv(geo.tokens, 64) * ng,),
                      dict(DQW=dq_ws, DQ=dq, **_strides(dq, "sdq"), L=geo.tokens, G=geo.groups, gw=geo.gw, CQK=cqk,
                           scale=scale),
                      dict(geo.geo_constexprs(), BLOCK_M=64, BLOCK_DK=_chunk(cqk, 64)), 4, 1, "bwd_dq_cast")
        return [delta_launch(geo, out, do, delta, self.delta_block_dv),
                _one_pass_launch(self, geo, scale, do, q, k, v, lse, delta, dk, dv, dq_ws, self.dq_block_dk), cast]


@dataclass(frozen=True)
class SplitBwdConfig(LaunchConfig):
    """The one-pass dK/dV kernel without dQ, then dQ per dq_block_m queries over dq_block_n keys with
    whole dO rows (by chunks of dq_block_dv if set): `_bwd_dq_kernel`, or with tma=True (channels_last
    16-bit maps, Cv <= 512) `_bwd_dq_tma_kernel`; dq_warps / dq_stages default to the dK/dV pass's."""

    block_m: int
    block_n: int
    delta_block_dv: int
    dq_block_m: int
    dq_block_n: int
    dq_block_dv: Optional[int] = None
    reload_kv: bool = False
    tma: bool = False
    dq_warps: Optional[int] = None
    dq_stages: Optional[int] = None
    num_warps: int = 8
    num_stages: int = 2

    def bwd_plan(self, geo: Geometry, scale: float, do: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor,
                 dv: torch.Tensor) -> List[Launch]:
        cqk, cv = q.shape[1], v.shape[1]
        delta = torch.empty_like(lse)
        plans = [delta_launch(geo, out, do, delta, self.delta_block_dv),
                 _one_pass_launch(self, geo, scale, do, q, k, v, lse, delta, dk, dv, None)]
        warps, stages = self.dq_warps or self.num_warps, self.dq_stages or self.num_stages
        box_dv = min(TMA_MAX_BOX, _whole(cv))
        if not (self.tma and cv <= 2 * TMA_MAX_BOX and tma_eligible(geo, _whole(cqk), box_dv, q, k, v, do, dq)):
            return plans + [dq_launch(geo, scale, do, q, k, v, lse, delta, dq, self.dq_block_m, self.dq_block_n,
                                      self.dq_block_dv or _whole(cv), warps, stages)]
        _use_scratch_allocator()
        rows_m, rows_n, gwb = _tma_rows(geo, self.dq_block_m, self.dq_block_n)
        args = dict(Q=q, K=k, V=v, DO=do, DQ=dq, LSE=lse, DELTA=delta, **_tma_strides(q=q, k=k, v=v, do=do, dq=dq),
                    G=geo.groups, gh=geo.gh, gw=geo.gw, CQK=cqk, CV=cv, qk_scale=scale * _LOG2E, scale=scale)
        cx = dict(BH=geo.bh, BW=geo.bw, GWB=gwb, BLOCK_DK=_whole(cqk), BOX_DV=box_dv, TWO_DV=cv > box_dv,
                  ROWS_M=rows_m, ROWS_N=rows_n)
        return plans + [Launch(_bwd_dq_tma_kernel, (triton.cdiv(geo.gh, rows_m) * geo.n * geo.groups,), args, cx,
                               warps, stages, "bwd_dq_tma")]


def fused_bwd_config(dtype: torch.dtype, cqk: int, cv: int, gather: bool = False) -> FusedBwdConfig:
    """The one-pass backward with dQ by atomics, sized for an H100 (no spills, tests/test_kernel_compile.py)."""
    delta = _chunk(cv, 32 if gather else 64)
    if dtype == torch.float32:  # FMA dot products: exact, small tiles, not tuned
        return FusedBwdConfig(16, 16, delta, num_warps=4, num_stages=1)
    if gather:
        return FusedBwdConfig(16, 32, delta, num_stages=1)
    return FusedBwdConfig(32, 32, delta)


def split_bwd_config(dtype: torch.dtype, cqk: int, cv: int, gather: bool = False) -> SplitBwdConfig:
    """The one-pass dK/dV backward with a separate dQ pass, sized like `fused_bwd_config`."""
    delta = _chunk(cv, 32 if gather else 64)
    if dtype == torch.float32:
        return SplitBwdConfig(16, 16, delta, 16, 16, num_warps=4, num_stages=1)
    if gather:  # dQ as the four-kernel backward's (dP by Cv chunks): whole gathered dO rows spill
        return SplitBwdConfig(16, 32, delta, 32, 32, dq_block_dv=_chunk(cv, 32), num_stages=1)
    return SplitBwdConfig(32, 32, delta, 64, 32)


# --------------------------------------------------------------------------------------------
# What the sweep times (ISA channels, Cqk 256 / Cv 512; the op's default first in each list)
# --------------------------------------------------------------------------------------------
FWD_SWEEP: Dict[str, List[FlashFwdConfig]] = {
    "contiguous": [
        FlashFwdConfig(128, 64, 256), FlashFwdConfig(128, 64, 128, num_stages=3), FlashFwdConfig(128, 32, 256),
        FlashFwdConfig(64, 64, 512), FlashFwdConfig(64, 32, 512),
        FlashFwdConfig(64, 32, 256, num_warps=4),  # 96 KB of shared memory: two programs per SM
        FlashFwdConfig(128, 64, 256, num_stages=1), FlashFwdConfig(128, 32, 256, num_stages=3),
        # bulk-tensor copies instead of per-thread loads (K/V multi-buffered through mbarriers)
        TmaFwdConfig(128, 64, 256), TmaFwdConfig(128, 64, 256, num_stages=3),
        TmaFwdConfig(128, 32, 256, num_stages=4), TmaFwdConfig(128, 64, 128, num_stages=3),
        TmaFwdConfig(64, 64, 256, num_warps=4), TmaFwdConfig(64, 32, 256, num_warps=4, num_stages=3),
    ],
    "gather": [FlashFwdConfig(128, 32, 128), FlashFwdConfig(128, 32, 128, num_stages=3)],
}
# short range (64-token groups), channels_last: dv_split for small batches (512 groups: 1.3 waves of 132 SMs)
SHORT_FWD_SWEEP: List[TileConfig] = [
    TileConfig(64, 128, 128), TileSplitFwdConfig(64, 128, 128, dv_split=2),
    TileSplitFwdConfig(64, 128, 128, dv_split=4), TileSplitFwdConfig(64, 64, 64, dv_split=2),
    TileConfig(64, 128, 128, num_stages=1),
]
# block_m = 64 makes every dot of the one-pass kernel a wgmma (32: mma.sync), at block_n = 16 to fit
BWD_SWEEP: Dict[str, List[LaunchConfig]] = {
    "contiguous": [
        FlashBwdConfig(64, 64, 64, 256, 64), FlashBwdConfig(64, 64, 64, 128, 64), FlashBwdConfig(32, 64, 64, 256, 64),
        FusedBwdConfig(32, 32, 64), FusedBwdConfig(32, 32, 64, dq_block_dk=64),
        FusedBwdConfig(32, 32, 64, num_stages=3), FusedBwdConfig(32, 16, 64, num_warps=4),
        SplitBwdConfig(32, 32, 64, 64, 32), SplitBwdConfig(64, 16, 64, 64, 32),
        SplitBwdConfig(64, 16, 64, 64, 32, dq_warps=8, num_warps=4), SplitBwdConfig(32, 32, 64, 64, 32, dq_warps=16),
        SplitBwdConfig(32, 32, 64, 64, 32, dq_warps=4),
        # dQ through TMA boxes (dq_block_m / dq_block_n: whole rows of 32 tokens here)
        SplitBwdConfig(32, 32, 64, 32, 64, tma=True),
        SplitBwdConfig(64, 16, 64, 32, 64, tma=True, dq_warps=8, num_warps=4),
    ],
    "gather": [
        FlashBwdConfig(32, 32, 32, 64, 32), FlashBwdConfig(32, 32, 32, 64, 32, num_stages=1),
        FusedBwdConfig(16, 32, 32, num_stages=1), SplitBwdConfig(16, 32, 32, 32, 32, dq_block_dv=32, num_stages=1),
    ],
}
_VARIANTS = {TileSplitFwdConfig: "tile", TileConfig: "tile", TmaFwdConfig: "tma", FlashFwdConfig: "flash",
             FlashBwdConfig: "four", FusedBwdConfig: "fused", SplitBwdConfig: "split"}
BWD_VARIANTS = ("four", "fused", "split")


def variant(config: LaunchConfig) -> str:
    """The kernels a config runs: tile, flash or tma (forward); four, fused or split (long backward)."""
    return _VARIANTS[type(config)]
