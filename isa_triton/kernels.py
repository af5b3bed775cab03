"""Fused Triton kernels of ISA's two sparse attentions: what `backend="auto"` runs on a GPU.

For (N, C, H, W) maps q, k (Cqk channels) and v (Cv channels), `triton_attention` computes

    out[n, :, p] = sum_{p' in group(p)} softmax_{p'}(scale * q[n, :, p] . k[n, :, p']) v[n, :, p']

where group(p) is every pixel with p's offset inside its (bh, bw) block (``pattern="long"``: L =
(H/bh)(W/bw) tokens) or p's own block (``"short"``: L = bh*bw). Kernels address tokens through the
maps' four strides (NCHW, channels_last, channel or spatial slices): no permute copy, no L x L
matrix in memory. Outputs and gradients keep their input's memory format; the backward recomputes
P from the fp32 row log-sum-exp, the only tensor saved besides q, k, v and out (N*H*W floats).

Kernels (fp32 accumulation; fp32, fp16, bf16 inputs; fp32 dot products are exact FMA unless TF32 is on):
- L <= 128 (short range, small maps): `_fwd_tile_kernel`, `_bwd_tile_kernel` hold a group's whole
  score tile, loop over Cqk and Cv chunks and take 1-4 groups per program;
- longer groups: `_fwd_flash_kernel` (online softmax over key tiles, Cv split over programs), then
  `_bwd_delta_kernel`, `_bwd_dkdv_kernel`, `_bwd_dv_kernel` (when Cv takes several chunks), `_bwd_dq_kernel`.
Launch configs are frozen dataclasses fixed per problem class by `fwd_config` / `bwd_config` (no
autotuning). Alternatives and untimed kernels are in `isa_triton.candidates`, for `isa bench kernels --sweep`.
Autograd is one `torch.autograd.Function`: eager calls launch the kernels directly; under torch.compile
it calls the custom ops ``isa_triton::attention_fwd`` / ``attention_bwd`` (with fake implementations).

Tested: CPU, Triton 3.8 interpreter (TRITON_INTERPRET=1 set before Triton is imported), torch 2.14:
fp32/fp16 forward, dq, dk, dv against fp64 within 2x eager's error + atol; both patterns; blocks 1x1
to 16x16; L 6-256; Cqk != Cv; several chunks and block sizes; batch 1-3; the layouts above;
torch.compile(fullgraph=True); opcheck (tests/test_kernels.py). Every launch config at ISA shapes
compiles for sm_90a (Triton 3.8) without spills within 227 KB of shared memory
(tests/test_kernel_compile.py). GPU: H100 80GB, torch 2.11, Triton 3.6, bf16/fp16/fp32, before this
module was reorganised (same kernels; not rerun since, no GPU: BENCHMARKS.md, kernel history).
Limits: bf16 is refused in the interpreter (its bf16 dot is wrong); NCHW long-range tokens are 2-byte
gathers (slow: `auto` keeps them on eager); fp32 and Cqk > 256 are correct, not tuned; no double
backward; no masking of ISA's zero padding (none is wanted: spec section 7).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

# --------------------------------------------------------------------------------------------
# Capability probe
# --------------------------------------------------------------------------------------------
try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where Triton is absent (macOS, Windows)
    HAS_TRITON = False

    class _NoTriton:
        """Lets this module import without Triton; every launch is refused by `check_supported`."""

        constexpr = None

        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _NoTriton()  # type: ignore[assignment]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TILE_MAX = 128  # groups of up to this many tokens use the single-tile kernels
_LOG2E = 1.4426950408889634


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


# `triton.jit` reads TRITON_INTERPRET when it decorates a function: for the kernels below, now; for
# Triton's own (tl.sum, tl.max), when Triton was imported. Both must agree, so the variable has to
# be set before the process imports Triton (the tests run the interpreter in a child process).
INTERPRETED = HAS_TRITON and _interpret_requested()


def interpreter_enabled() -> bool:
    """True when this process runs the kernels in Triton's interpreter (CPU tensors accepted)."""
    return INTERPRETED


def _interpreter_error() -> Optional[str]:
    """Why the interpreter setting of this process is unusable, or None."""
    late = "TRITON_INTERPRET=1 must be set before Triton is imported (e.g. `TRITON_INTERPRET=1 python ...`)"
    if INTERPRETED:
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(tl.sum, InterpretedFunction):
            return f"Triton was imported before TRITON_INTERPRET=1 was set: {late}"
    elif HAS_TRITON and _interpret_requested():
        return f"TRITON_INTERPRET=1 was set after isa_triton.kernels was imported: {late}"
    return None


_CUDA_OK: Dict[int, bool] = {}


def cuda_supported(device: torch.device) -> bool:
    """True when Triton can run these kernels on `device` (a CUDA GPU of compute capability 8.0+)."""
    if not HAS_TRITON or device.type != "cuda" or not torch.cuda.is_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    ok = _CUDA_OK.get(index)
    if ok is None:
        ok = torch.cuda.get_device_properties(index).major >= 8
        _CUDA_OK[index] = ok
    return ok


def check_supported(q: torch.Tensor) -> None:
    """Raise a clear error when the Triton kernels cannot run on `q`'s device or dtype."""
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' needs the `triton` package; use backend='eager' or 'sdpa'")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"backend='triton' supports float32, float16 and bfloat16 inputs, got {q.dtype}; "
                         "cast the inputs or use backend='eager'")
    problem = _interpreter_error()
    if problem:
        raise RuntimeError(problem)
    if INTERPRETED:
        if q.dtype == torch.bfloat16:
            raise ValueError("Triton's interpreter (TRITON_INTERPRET=1) computes bfloat16 dot products "
                             "wrongly; test bfloat16 on a GPU or use float16/float32")
        return
    if q.device.type != "cuda":
        raise RuntimeError(f"backend='triton' runs on CUDA tensors, got device {q.device}; to run the kernels "
                           "in Triton's interpreter on the CPU, set TRITON_INTERPRET=1 before Python imports triton")
    if not cuda_supported(q.device):
        raise RuntimeError(f"backend='triton' needs a CUDA GPU of compute capability 8.0 or newer, "
                           f"got {torch.cuda.get_device_name(q.device)}; use backend='sdpa'")


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _pixel_offset(tok, grp, gw, s_h, s_w, BH: tl.constexpr, BW: tl.constexpr, LONG: tl.constexpr):
    """Element offset (rows*s_h + cols*s_w) of tokens `tok` of group `grp` (gw = W // BW)."""
    if LONG:  # group = offset (lh, lw) inside the block, token = block index (i, j)
        row = (tok // gw) * BH + grp // BW
        col = (tok % gw) * BW + grp % BW
    else:  # group = block (i, j), token = offset (lh, lw) inside it
        row = (grp // gw) * BH + tok // BW
        col = (grp % gw) * BW + tok % BW
    return row * s_h + col * s_w


@triton.jit
def _group_block(L, G, BLOCK: tl.constexpr):
    """This program's (flat group, block of BLOCK tokens in it, image as int64, group in the image)."""
    per_group = (L + BLOCK - 1) // BLOCK
    pid = tl.program_id(0)
    bg = pid // per_group
    return bg, pid % per_group, (bg // G).to(tl.int64), bg % G


@triton.jit
def _tile_scores(Qn, Kn, pq, pk, t_ok, sq_c, sk_c, CQK, BLOCK_L: tl.constexpr, BLOCK_DK: tl.constexpr,
                 PREC: tl.constexpr):
    """Unscaled scores Q K^T (BLOCK_L x BLOCK_L, fp32) of one whole group, summed over Cqk chunks."""
    offs_dk0 = tl.arange(0, BLOCK_DK)
    s = tl.full([BLOCK_L, BLOCK_L], 0.0, dtype=tl.float32)
    for d0 in range(0, CQK, BLOCK_DK):
        offs_dk = d0 + offs_dk0
        dk_ok = offs_dk < CQK
        q = tl.load(Qn + pq[:, None] + offs_dk[None, :] * sq_c, mask=t_ok[:, None] & dk_ok[None, :], other=0.0)
        kt = tl.load(Kn + offs_dk[:, None] * sk_c + pk[None, :], mask=dk_ok[:, None] & t_ok[None, :], other=0.0)
        s = tl.dot(q, kt, s, input_precision=PREC)
    return s


@triton.jit
def _fwd_tile_groups(
    Q, K, V, O, LSE,
    sq_n, sq_c, sq_h, sq_w, sk_n, sk_c, sk_h, sk_w, sv_n, sv_c, sv_h, sv_w, so_n, so_c, so_h, so_w,
    L, G, NG, gw, CQK, qk_scale, prog, c_lo, c_hi,
    BH: tl.constexpr, BW: tl.constexpr, LONG: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    GROUPS_PER_PROG: tl.constexpr, PREC: tl.constexpr,
):
    """Groups prog*GROUPS_PER_PROG.. (L <= BLOCK_L tokens each): exact softmax of one score tile, then
    P @ V for the value columns [c_lo, c_hi) by BLOCK_DV chunks; the c_lo == 0 program stores the LSE."""
    offs = tl.arange(0, BLOCK_L)
    t_ok = offs < L
    offs_dv0 = tl.arange(0, BLOCK_DV)
    for i in range(GROUPS_PER_PROG):
        bg_raw = prog * GROUPS_PER_PROG + i
        row_ok = t_ok & (bg_raw < NG)
        bg = tl.minimum(bg_raw, NG - 1)
        n = (bg // G).to(tl.int64)
        grp = bg % G
        pq = _pixel_offset(offs, grp, gw, sq_h, sq_w, BH, BW, LONG)
        pk = _pixel_offset(offs, grp, gw, sk_h, sk_w, BH, BW, LONG)
        s = _tile_scores(Q + n * sq_n, K + n * sk_n, pq, pk, t_ok, sq_c, sk_c, CQK,
                         BLOCK_L, BLOCK_DK, PREC)
        s = tl.where(t_ok[None, :], s * qk_scale, float("-inf"))
        m = tl.max(s, 1)
        p = tl.exp2(s - m[:, None])
        lsum = tl.sum(p, 1)
        tl.store(LSE + bg * L + offs, m + tl.log2(lsum), mask=row_ok & (c_lo == 0))
        p = (p * (1.0 / lsum)[:, None]).to(V.dtype.element_ty)
        pv = _pixel_offset(offs, grp, gw, sv_h, sv_w, BH, BW, LONG)
        po = _pixel_offset(offs, grp, gw, so_h, so_w, BH, BW, LONG)
        for c0 in range(c_lo, c_hi, BLOCK_DV):
            offs_dv = c0 + offs_dv0
            dv_ok = offs_dv < c_hi
            v = tl.load(V + n * sv_n + pv[:, None] + offs_dv[None, :] * sv_c,
                        mask=t_ok[:, None] & dv_ok[None, :], other=0.0)
            o = tl.dot(p, v, input_precision=PREC)
            tl.store(O + n * so_n + po[:, None] + offs_dv[None, :] * so_c, o.to(O.dtype.element_ty),
                     mask=row_ok[:, None] & dv_ok[None, :])


@triton.jit
def _fwd_tile_kernel(
    Q, K, V, O, LSE,
    sq_n, sq_c, sq_h, sq_w, sk_n, sk_c, sk_h, sk_w, sv_n, sv_c, sv_h, sv_w, so_n, so_c, so_h, so_w,
    L, G, NG, gw, CQK, CV, qk_scale,
    BH: tl.constexpr, BW: tl.constexpr, LONG: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    GROUPS_PER_PROG: tl.constexpr, PREC: tl.constexpr,
):
    """Whole groups (L <= BLOCK_L tokens), GROUPS_PER_PROG per program, all Cv columns."""
    _fwd_tile_groups(Q, K, V, O, LSE, sq_n, sq_c, sq_h, sq_w, sk_n, sk_c, sk_h, sk_w, sv_n, sv_c, sv_h, sv_w,
                     so_n, so_c, so_h, so_w, L, G, NG, gw, CQK, qk_scale, tl.program_id(0), 0, CV,
                     BH, BW, LONG, BLOCK_L, BLOCK_DK, BLOCK_DV, GROUPS_PER_PROG, PREC)


@triton.jit
def _fwd_flash_kernel(
    Q, K, V, O, LSE,
    sq_n, sq_c, sq_h, sq_w, sk_n, sk_c, sk_h, sk_w, sv_n, sv_c, sv_h, sv_w, so_n, so_c, so_h, so_w,
    L, G, gw, CQK, CV, NUM_DV, qk_scale,
    BH: tl.constexpr, BW: tl.constexpr, LONG: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    PREC: tl.constexpr,
):
    """Long groups: BLOCK_M queries x BLOCK_DV value columns per program, online softmax over keys."""
    per_group = ((L + BLOCK_M - 1) // BLOCK_M) * NUM_DV  # programs of one group are adjacent: K/V stay in L2
    pid = tl.program_id(0)
    bg = pid // per_group
    m_blk = (pid % per_group) // NUM_DV
    dv_blk = pid % NUM_DV
    n = (bg // G).to(tl.int64)
    grp = bg % G
    offs_m = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = dv_blk * BLOCK_DV + tl.arange(0, BLOCK_DV)
    m_ok = offs_m < L
    dk_ok = offs_dk < CQK
    dv_ok = offs_dv < CV
    pq = _pixel_offset(offs_m, grp, gw, sq_h, sq_w, BH, BW, LONG)
    q = tl.load(Q + n * sq_n + pq[:, None] + offs_dk[None, :] * sq_c,
                mask=m_ok[:, None] & dk_ok[None, :], other=0.0)
    k_base = K + n * sk_n + offs_dk[:, None] * sk_c
    v_base = V + n * sv_n + offs_dv[None, :] * sv_c
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, dtype=tl.float32)
    for start in range(0, L, BLOCK_N):
        offs_n = start + offs_n0
        n_ok = offs_n < L
        pk = _pixel_offset(offs_n, grp, gw, sk_h, sk_w, BH, BW, LONG)
        kt = tl.load(k_base + pk[None, :], mask=dk_ok[:, None] & n_ok[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=PREC) * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        pv = _pixel_offset(offs_n, grp, gw, sv_h, sv_w, BH, BW, LONG)
        v = tl.load(v_base + pv[:, None], mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(V.dtype.element_ty), v, acc, input_precision=PREC)
        m_i = m_new
    acc = acc / l_i[:, None]
    po = _pixel_offset(offs_m, grp, gw, so_h, so_w, BH, BW, LONG)
    tl.store(O + n * so_n + po[:, None] + offs_dv[None, :] * so_c, acc.to(O.dtype.element_ty),
             mask=m_ok[:, None] & dv_ok[None, :])
    tl.store(LSE + bg * L + offs_m, m_i + tl.log2(l_i), mask=m_ok & (dv_blk == 0))


@triton.jit
def _bwd_tile_kernel(
    Q, K, V, DO, DQ, DK, DV, LSE,
    sq_n, sq_c, sq_h, sq_w, sk_n, sk_c, sk_h, sk_w, sv_n, sv_c, sv_h, sv_w,
    sdo_n, sdo_c, sdo_h, sdo_w, sdq_n, sdq_c, sdq_h, sdq_w, sdk_n, sdk_c, sdk_h, sdk_w,
    sdv_n, sdv_c, sdv_h, sdv_w,
    L, G, NG, gw, CQK, CV, qk_scale, scale,
    BH: tl.constexpr, BW: tl.constexpr, LONG: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    GROUPS_PER_PROG: tl.constexpr, PREC: tl.constexpr,
):
    """Whole groups: P from the saved LSE, dP and dV by Cv chunks, then dQ and dK by Cqk chunks."""
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK_L)
    t_ok = offs < L
    offs_dk0 = tl.arange(0, BLOCK_DK)
    offs_dv0 = tl.arange(0, BLOCK_DV)
    for i in range(GROUPS_PER_PROG):
        bg_raw = pid * GROUPS_PER_PROG + i
        row_ok = t_ok & (bg_raw < NG)
        bg = tl.minimum(bg_raw, NG - 1)
        n = (bg // G).to(tl.int64)
        grp = bg % G
        pq = _pixel_offset(offs, grp, gw, sq_h, sq_w, BH, BW, LONG)
        pk = _pixel_offset(offs, grp, gw, sk_h, sk_w, BH, BW, LONG)
        s = _tile_scores(Q + n * sq_n, K + n * sk_n, pq, pk, t_ok, sq_c, sk_c, CQK,
                         BLOCK_L, BLOCK_DK, PREC)
        lse = tl.load(LSE + bg * L + offs, mask=t_ok, other=0.0)
        p = tl.exp2(s * qk_scale - lse[:, None])
        p = tl.where(t_ok[:, None] & t_ok[None, :], p, 0.0)
        pt = tl.trans(p).to(DO.dtype.element_ty)
        pv = _pixel_offset(offs, grp, gw, sv_h, sv_w, BH, BW, LONG)
        pdo = _pixel_offset(offs, grp, gw, sdo_h, sdo_w, BH, BW, LONG)
        pdv = _pixel_offset(offs, grp, gw, sdv_h, sdv_w, BH, BW, LONG)
        dp = tl.full([BLOCK_L, BLOCK_L], 0.0, dtype=tl.float32)
        for c0 in range(0, CV, BLOCK_DV):
            offs_dv = c0 + offs_dv0
            dv_ok = offs_dv < CV
            do = tl.load(DO + n * sdo_n + pdo[:, None] + offs_dv[None, :] * sdo_c,
                         mask=t_ok[:, None] & dv_ok[None, :], other=0.0)
            vt = tl.load(V + n * sv_n + offs_dv[:, None] * sv_c + pv[None, :],
                         mask=dv_ok[:, None] & t_ok[None, :], other=0.0)
            dp = tl.dot(do, vt, dp, input_precision=PREC)
            dv = tl.dot(pt, do, input_precision=PREC)
            tl.store(DV + n * sdv_n + pdv[:, None] + offs_dv[None, :] * sdv_c, dv.to(DV.dtype.element_ty),
                     mask=row_ok[:, None] & dv_ok[None, :])
        delta = tl.sum(p * dp, 1)  # = rowsum(dO * O) of the exact output
        ds = (p * (dp - delta[:, None])).to(Q.dtype.element_ty)
        dst = tl.trans(ds)
        pdq = _pixel_offset(offs, grp, gw, sdq_h, sdq_w, BH, BW, LONG)
        pdk = _pixel_offset(offs, grp, gw, sdk_h, sdk_w, BH, BW, LONG)
        for d0 in range(0, CQK, BLOCK_DK):
            offs_dk = d0 + offs_dk0
            dk_ok = offs_dk < CQK
            k = tl.load(K + n * sk_n + pk[:, None] + offs_dk[None, :] * sk_c,
                        mask=t_ok[:, None] & dk_ok[None, :], other=0.0)
            dq = tl.dot(ds, k, input_precision=PREC) * scale
            tl.store(DQ + n * sdq_n + pdq[:, None] + offs_dk[None, :] * sdq_c, dq.to(DQ.dtype.element_ty),
                     mask=row_ok[:, None] & dk_ok[None, :])
            q = tl.load(Q + n * sq_n + pq[:, None] + offs_dk[None, :] * sq_c,
                        mask=t_ok[:, None] & dk_ok[None, :], other=0.0)
            dk = tl.dot(dst, q, input_precision=PREC) * scale
            tl.store(DK + n * sdk_n + pdk[:, None] + offs_dk[None, :] * sdk_c, dk.to(DK.dtype.element_ty),
                     mask=row_ok[:, None] & dk_ok[None, :])


@triton.jit
def _bwd_delta_kernel(
    O, DO, DELTA,
    so_n, so_c, so_h, so_w, sdo_n, sdo_c, sdo_h, sdo_w,
    L, G, gw, CV,
    BH: tl.constexpr, BW: tl.constexpr, LONG: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """delta[token] = sum_c dO * O (fp32), the softmax-backward row term."""
    bg, m_blk, n, grp = _group_block(L, G, BLOCK_M)
    offs_m = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < L
    offs_dv0 = tl.arange(0, BLOCK_DV)
    po = _pixel_offset(offs_m, grp, gw, so_h, so_w, BH, BW, LONG)
    pdo = _pixel_offset(offs_m, grp, gw, sdo_h, sdo_w, BH, BW, LONG)
    acc = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    for c0 in range(0, CV, BLOCK_DV):
        offs_dv = c0 + offs_dv0
        mask = m_ok[:, None] & (offs_dv < CV)[None, :]
        o = tl.load(O + n * so_n + po[:, None] + offs_dv[None, :] * so_c, mask=mask, other=0.0)
        do = tl.load(DO + n * sdo_n + pdo[:, None] + offs_dv[None, :] * sdo_c, mask=mask, other=0.0)
        acc += tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bg * L + offs_m, acc, mask=m_ok)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA,
    sq_n, sq_c, sq_h, sq_w, sk_n, sk_c, sk_h, sk_w, sv_n, sv_c, sv_h, sv_w,
    sdo_n, sdo_c, sdo_h, sdo_w, sdk_n, sdk_c, sdk_h, sdk_w, sdv_n, sdv_c, sdv_h, sdv_w,
    L, G, gw, CQK, CV, qk_scale, scale,
    BH: tl.constexpr, BW: tl.constexpr, LONG: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    WITH_DV: tl.constexpr, PREC: tl.constexpr,
):
    """Long groups: dK (and dV when Cv <= BLOCK_DV) of BLOCK_N keys, looping over all queries."""
    bg, n_blk, n, grp = _group_block(L, G, BLOCK_N)
    offs_n = n_blk * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < L
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    dk_ok = offs_dk < CQK
    offs_dv0 = tl.arange(0, BLOCK_DV)
    pk = _pixel_offset(offs_n, grp, gw, sk_h, sk_w, BH, BW, LONG)
    pv = _pixel_offset(offs_n, grp, gw, sv_h, sv_w, BH, BW, LONG)
    k = tl.load(K + n * sk_n + pk[:, None] + offs_dk[None, :] * sk_c,
                mask=n_ok[:, None] & dk_ok[None, :], other=0.0)
    dk_acc = tl.full([BLOCK_N, BLOCK_DK], 0.0, dtype=tl.float32)
    if WITH_DV:
        dv_ok = offs_dv0 < CV
        v = tl.load(V + n * sv_n + pv[:, None] + offs_dv0[None, :] * sv_c,
                    mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
        dv_acc = tl.full([BLOCK_N, BLOCK_DV], 0.0, dtype=tl.float32)
    for start in range(0, L, BLOCK_M):
        offs_m = start + offs_m0
        m_ok = offs_m < L
        pq = _pixel_offset(offs_m, grp, gw, sq_h, sq_w, BH, BW, LONG)
        pdo = _pixel_offset(offs_m, grp, gw, sdo_h, sdo_w, BH, BW, LONG)
        qt = tl.load(Q + n * sq_n + offs_dk[:, None] * sq_c + pq[None, :],
                     mask=dk_ok[:, None] & m_ok[None, :], other=0.0)
        lse = tl.load(LSE + bg * L + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + bg * L + offs_m, mask=m_ok, other=0.0)
        st = tl.dot(k, qt, input_precision=PREC)
        pt = tl.exp2(st * qk_scale - lse[None, :])  # (keys, queries); 0 for padded queries
        if WITH_DV:
            do = tl.load(DO + n * sdo_n + pdo[:, None] + offs_dv0[None, :] * sdo_c,
                         mask=m_ok[:, None] & dv_ok[None, :], other=0.0)
            dv_acc = tl.dot(pt.to(DO.dtype.element_ty), do, dv_acc, input_precision=PREC)
            dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
        else:
            dpt = tl.full([BLOCK_N, BLOCK_M], 0.0, dtype=tl.float32)
            for c0 in range(0, CV, BLOCK_DV):
                offs_dv = c0 + offs_dv0
                dvc_ok = offs_dv < CV
                vc = tl.load(V + n * sv_n + pv[:, None] + offs_dv[None, :] * sv_c,
                             mask=n_ok[:, None] & dvc_ok[None, :], other=0.0)
                dot_ = tl.load(DO + n * sdo_n + offs_dv[:, None] * sdo_c + pdo[None, :],
                               mask=dvc_ok[:, None] & m_ok[None, :], other=0.0)
                dpt = tl.dot(vc, dot_, dpt, input_precision=PREC)
        dst = pt * (dpt - delta[None, :])
        dk_acc = tl.dot(dst.to(Q.dtype.element_ty), tl.trans(qt), dk_acc, input_precision=PREC)
    pdk = _pixel_offset(offs_n, grp, gw, sdk_h, sdk_w, BH, BW, LONG)
    tl.store(DK + n * sdk_n + pdk[:, None] + offs_dk[None, :] * sdk_c, (dk_acc * scale).to(DK.dtype.element_ty),
             mask=n_ok[:, None] & dk_ok[None, :])
    if WITH_DV:
        pdv = _pixel_offset(offs_n, grp, gw, sdv_h, sdv_w, BH, BW, LONG)
        tl.store(DV + n * sdv_n + pdv[:, None] + offs_dv0[None, :] * sdv_c, dv_acc.to(DV.dtype.element_ty),
                 mask=n_ok[:, None] & dv_ok[None, :])


@triton.jit
def _bwd_dv_kernel(
    Q, K, DO, DV, LSE,
    sq_n, sq_c, sq_h, sq_w, sk_n, sk_c, sk_h, sk_w, sdo_n, sdo_c, sdo_h, sdo_w, sdv_n, sdv_c, sdv_h, sdv_w,
    L, G, gw, CQK, CV, NUM_DV, qk_scale,
    BH: tl.constexpr, BW: tl.constexpr, LONG: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    PREC: tl.constexpr,
):
    """Long groups: dV = P^T dO for BLOCK_N keys x BLOCK_DV value columns (Cv split over programs)."""
    per_group = ((L + BLOCK_N - 1) // BLOCK_N) * NUM_DV
    pid = tl.program_id(0)
    bg = pid // per_group
    n_blk = (pid % per_group) // NUM_DV
    dv_blk = pid % NUM_DV
    n = (bg // G).to(tl.int64)
    grp = bg % G
    offs_n = n_blk * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < L
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    dk_ok = offs_dk < CQK
    offs_dv = dv_blk * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < CV
    pk = _pixel_offset(offs_n, grp, gw, sk_h, sk_w, BH, BW, LONG)
    k = tl.load(K + n * sk_n + pk[:, None] + offs_dk[None, :] * sk_c,
                mask=n_ok[:, None] & dk_ok[None, :], other=0.0)
    dv_acc = tl.full([BLOCK_N, BLOCK_DV], 0.0, dtype=tl.float32)
    for start in range(0, L, BLOCK_M):
        offs_m = start + offs_m0
        m_ok = offs_m < L
        pq = _pixel_offset(offs_m, grp, gw, sq_h, sq_w, BH, BW, LONG)
        pdo = _pixel_offset(offs_m, grp, gw, sdo_h, sdo_w, BH, BW, LONG)
        qt = tl.load(Q + n * sq_n + offs_dk[:, None] * sq_c + pq[None, :],
                     mask=dk_ok[:, None] & m_ok[None, :], other=0.0)
        lse = tl.load(LSE + bg * L + offs_m, mask=m_ok, other=float("inf"))
        pt = tl.exp2(tl.dot(k, qt, input_precision=PREC) * qk_scale - lse[None, :])
        do = tl.load(DO + n * sdo_n + pdo[:, None] + offs_dv[None, :] * sdo_c,
                     mask=m_ok[:, None] & dv_ok[None, :], other=0.0)
        dv_acc = tl.dot(pt.to(DO.dtype.element_ty), do, dv_acc, input_precision=PREC)
    pdv = _pixel_offset(offs_n, grp, gw, sdv_h, sdv_w, BH, BW, LONG)
    tl.store(DV + n * sdv_n + pdv[:, None] + offs_dv[None, :] * sdv_c, dv_acc.to(DV.dtype.element_ty),
             mask=n_ok[:, None] & dv_ok[None, :])


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA,
    sq_n, sq_c, sq_h, sq_w, sk_n, sk_c, sk_h, sk_w, sv_n, sv_c, sv_h, sv_w,
    sdo_n, sdo_c, sdo_h, sdo_w, sdq_n, sdq_c, sdq_h, sdq_w,
    L, G, gw, CQK, CV, qk_scale, scale,
    BH: tl.constexpr, BW: tl.constexpr, LONG: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    DV_ONE: tl.constexpr, PREC: tl.constexpr,
):
    """Long groups: dQ of BLOCK_M queries, looping over all keys (dP by Cv chunks unless DV_ONE)."""
    bg, m_blk, n, grp = _group_block(L, G, BLOCK_M)
    offs_m = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < L
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    dk_ok = offs_dk < CQK
    offs_dv0 = tl.arange(0, BLOCK_DV)
    pq = _pixel_offset(offs_m, grp, gw, sq_h, sq_w, BH, BW, LONG)
    pdo = _pixel_offset(offs_m, grp, gw, sdo_h, sdo_w, BH, BW, LONG)
    q = tl.load(Q + n * sq_n + pq[:, None] + offs_dk[None, :] * sq_c,
                mask=m_ok[:, None] & dk_ok[None, :], other=0.0)
    lse = tl.load(LSE + bg * L + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + bg * L + offs_m, mask=m_ok, other=0.0)
    if DV_ONE:
        dv_ok = offs_dv0 < CV
        do = tl.load(DO + n * sdo_n + pdo[:, None] + offs_dv0[None, :] * sdo_c,
                     mask=m_ok[:, None] & dv_ok[None, :], other=0.0)
    dq_acc = tl.full([BLOCK_M, BLOCK_DK], 0.0, dtype=tl.float32)
    for start in range(0, L, BLOCK_N):
        offs_n = start + offs_n0
        n_ok = offs_n < L
        pk = _pixel_offset(offs_n, grp, gw, sk_h, sk_w, BH, BW, LONG)
        pv = _pixel_offset(offs_n, grp, gw, sv_h, sv_w, BH, BW, LONG)
        kt = tl.load(K + n * sk_n + offs_dk[:, None] * sk_c + pk[None, :],
                     mask=dk_ok[:, None] & n_ok[None, :], other=0.0)
        p = tl.exp2(tl.dot(q, kt, input_precision=PREC) * qk_scale - lse[:, None])
        p = tl.where(n_ok[None, :], p, 0.0)
        if DV_ONE:
            vt = tl.load(V + n * sv_n + offs_dv0[:, None] * sv_c + pv[None, :],
                         mask=dv_ok[:, None] & n_ok[None, :], other=0.0)
            dp = tl.dot(do, vt, input_precision=PREC)
        else:
            dp = tl.full([BLOCK_M, BLOCK_N], 0.0, dtype=tl.float32)
            for c0 in range(0, CV, BLOCK_DV):
                offs_dv = c0 + offs_dv0
                dvc_ok = offs_dv < CV
                doc = tl.load(DO + n * sdo_n + pdo[:, None] + offs_dv[None, :] * sdo_c,
                              mask=m_ok[:, None] & dvc_ok[None, :], other=0.0)
                vt = tl.load(V + n * sv_n + offs_dv[:, None] * sv_c + pv[None, :],
                             mask=dvc_ok[:, None] & n_ok[None, :], other=0.0)
                dp = tl.dot(doc, vt, dp, input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq_acc = tl.dot(ds.to(K.dtype.element_ty), tl.trans(kt), dq_acc, input_precision=PREC)
    pdq = _pixel_offset(offs_m, grp, gw, sdq_h, sdq_w, BH, BW, LONG)
    tl.store(DQ + n * sdq_n + pdq[:, None] + offs_dk[None, :] * sdq_c, (dq_acc * scale).to(DQ.dtype.element_ty),
             mask=m_ok[:, None] & dk_ok[None, :])


# --------------------------------------------------------------------------------------------
# Launch plans: fixed configurations per (dtype, group length, channel counts, layout)
# --------------------------------------------------------------------------------------------
def _np2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _chunk(c: int, cap: int) -> int:
    """Channel chunk for c channels: the next power of two, at least 16 (tl.dot), at most cap."""
    return min(cap, max(16, _np2(c)))


def _whole(c: int) -> int:
    """A tile width holding all c channels (the flash kernels load whole Cqk rows)."""
    return max(16, _np2(c))


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the kernel, its grid, its runtime arguments and its constexprs."""

    kernel: Any
    grid: Tuple[int, ...]
    args: Dict[str, Any]
    constexprs: Dict[str, Any]
    num_warps: int
    num_stages: int
    name: str

    def config_key(self) -> Tuple:
        """What selects the compiled binary besides strides and pointers."""
        return (self.name, tuple(sorted(self.constexprs.items())), self.num_warps, self.num_stages)


@dataclass(frozen=True)
class Geometry:
    """Group/token bookkeeping of one call: L tokens per group, G groups per image."""

    n: int
    h: int
    w: int
    bh: int
    bw: int
    long_range: bool

    @property
    def gh(self) -> int:
        return self.h // self.bh

    @property
    def gw(self) -> int:
        return self.w // self.bw

    @property
    def groups(self) -> int:
        return self.bh * self.bw if self.long_range else self.gh * self.gw

    @property
    def tokens(self) -> int:
        return self.gh * self.gw if self.long_range else self.bh * self.bw

    def geo_constexprs(self) -> Dict[str, Any]:
        return {"BH": self.bh, "BW": self.bw, "LONG": self.long_range}


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "ieee"  # ignored for 16-bit inputs: tensor cores with fp32 accumulation


def _strides(x: torch.Tensor, prefix: str) -> Dict[str, int]:
    sn, sc, sh, sw = x.stride()
    return {f"{prefix}_n": sn, f"{prefix}_c": sc, f"{prefix}_h": sh, f"{prefix}_w": sw}


class LaunchConfig:
    """Checks shared by the frozen launch configs: a typo in a field name is a TypeError (dataclass
    __init__), a block size must be a power of two >= 16 (tl.arange, tl.dot), warps a power of two."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or isinstance(value, bool):
                continue
            where = f"{type(self).__name__}.{f.name} = {value!r}"
            if not isinstance(value, int):
                raise TypeError(f"{where}: expected an int")
            if "block" in f.name and (value < 16 or value & (value - 1)):
                raise ValueError(f"{where}: block sizes are powers of two >= 16")
            if "warps" in f.name and value not in (1, 2, 4, 8, 16, 32):
                raise ValueError(f"{where}: warps per program are a power of two <= 32")
            if value < 1:
                raise ValueError(f"{where}: must be >= 1")


@dataclass(frozen=True)
class TileConfig(LaunchConfig):
    """Whole-group kernels (forward and backward): a group's BLOCK_L x BLOCK_L score tile per program,
    Cqk and Cv in chunks of block_dk / block_dv; groups_per_prog None: by the number of groups."""

    block_l: int
    block_dk: int
    block_dv: int
    num_warps: int = 4
    num_stages: int = 2
    groups_per_prog: Optional[int] = None

    def _groups(self, geo: Geometry) -> Tuple[int, int]:
        if geo.tokens > self.block_l:
            raise ValueError(f"{self}: a group of {geo.tokens} tokens does not fit block_l = {self.block_l}")
        ng = geo.n * geo.groups
        return ng, self.groups_per_prog or _tile_groups_per_prog(ng)

    def fwd_plan(self, geo: Geometry, scale: float, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 out: torch.Tensor, lse: torch.Tensor) -> List[Launch]:
        ng, gpp = self._groups(geo)
        args = dict(Q=q, K=k, V=v, O=out, LSE=lse, **_strides(q, "sq"), **_strides(k, "sk"), **_strides(v, "sv"),
                    **_strides(out, "so"), L=geo.tokens, G=geo.groups, NG=ng, gw=geo.gw, CQK=q.shape[1],
                    CV=v.shape[1], qk_scale=scale * _LOG2E)
        cx = dict(geo.geo_constexprs(), BLOCK_L=self.block_l, BLOCK_DK=self.block_dk, BLOCK_DV=self.block_dv,
                  GROUPS_PER_PROG=gpp, PREC=_precision(q.dtype))
        return [Launch(_fwd_tile_kernel, (triton.cdiv(ng, gpp),), args, cx, self.num_warps, self.num_stages,
                       "fwd_tile")]

    def bwd_plan(self, geo: Geometry, scale: float, do: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor,
                 dv: torch.Tensor) -> List[Launch]:
        ng, gpp = self._groups(geo)
        args = dict(Q=q, K=k, V=v, DO=do, DQ=dq, DK=dk, DV=dv, LSE=lse, **_strides(q, "sq"), **_strides(k, "sk"),
                    **_strides(v, "sv"), **_strides(do, "sdo"), **_strides(dq, "sdq"), **_strides(dk, "sdk"),
                    **_strides(dv, "sdv"), L=geo.tokens, G=geo.groups, NG=ng, gw=geo.gw, CQK=q.shape[1],
                    CV=v.shape[1], qk_scale=scale * _LOG2E, scale=scale)
        cx = dict(geo.geo_constexprs(), BLOCK_L=self.block_l, BLOCK_DK=self.block_dk, BLOCK_DV=self.block_dv,
                  GROUPS_PER_PROG=gpp, PREC=_precision(q.dtype))
        return [Launch(_bwd_tile_kernel, (triton.cdiv(ng, gpp),), args, cx, self.num_warps, self.num_stages,
                       "bwd_tile")]


@dataclass(frozen=True)
class FlashFwdConfig(LaunchConfig):
    """`_fwd_flash_kernel`: block_m queries x block_dv value columns per program, key tiles of block_n
    (whole Cqk rows)."""

    block_m: int
    block_n: int
    block_dv: int
    num_warps: int = 8
    num_stages: int = 2

    def fwd_plan(self, geo: Geometry, scale: float, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 out: torch.Tensor, lse: torch.Tensor) -> List[Launch]:
        cqk, cv = q.shape[1], v.shape[1]
        num_dv = triton.cdiv(cv, self.block_dv)
        args = dict(Q=q, K=k, V=v, O=out, LSE=lse, **_strides(q, "sq"), **_strides(k, "sk"), **_strides(v, "sv"),
                    **_strides(out, "so"), L=geo.tokens, G=geo.groups, gw=geo.gw, CQK=cqk, CV=cv, NUM_DV=num_dv,
                    qk_scale=scale * _LOG2E)
        cx = dict(geo.geo_constexprs(), BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_DK=_whole(cqk),
                  BLOCK_DV=self.block_dv, PREC=_precision(q.dtype))
        grid = (triton.cdiv(geo.tokens, self.block_m) * num_dv * geo.n * geo.groups,)
        return [Launch(_fwd_flash_kernel, grid, args, cx, self.num_warps, self.num_stages, "fwd_flash")]


def delta_launch(geo: Geometry, out: torch.Tensor, do: torch.Tensor, delta: torch.Tensor, block_dv: int) -> Launch:
    """`_bwd_delta_kernel`: delta = rowsum(dO * O) by Cv chunks of block_dv, 64 tokens per program."""
    args = dict(O=out, DO=do, DELTA=delta, **_strides(out, "so"), **_strides(do, "sdo"), L=geo.tokens, G=geo.groups,
                gw=geo.gw, CV=out.shape[1])
    return Launch(_bwd_delta_kernel, (triton.cdiv(geo.tokens, 64) * geo.n * geo.groups,), args,
                  dict(geo.geo_constexprs(), BLOCK_M=64, BLOCK_DV=block_dv), 4, 1, "bwd_delta")


def dq_launch(geo: Geometry, scale: float, do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              lse: torch.Tensor, delta: torch.Tensor, dq: torch.Tensor, block_m: int, block_n: int, block_dv: int,
              num_warps: int, num_stages: int) -> Launch:
    """`_bwd_dq_kernel`: dQ of block_m queries over all keys; whole dO rows when Cv <= block_dv."""
    cqk, cv = q.shape[1], v.shape[1]
    args = dict(Q=q, K=k, V=v, DO=do, DQ=dq, LSE=lse, DELTA=delta, **_strides(q, "sq"), **_strides(k, "sk"),
                **_strides(v, "sv"), **_strides(do, "sdo"), **_strides(dq, "sdq"), L=geo.tokens, G=geo.groups,
                gw=geo.gw, CQK=cqk, CV=cv, qk_scale=scale * _LOG2E, scale=scale)
    cx = dict(geo.geo_constexprs(), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DK=_whole(cqk), BLOCK_DV=block_dv,
              DV_ONE=cv <= block_dv, PREC=_precision(q.dtype))
    return Launch(_bwd_dq_kernel, (triton.cdiv(geo.tokens, block_m) * geo.n * geo.groups,), args, cx, num_warps,
                  num_stages, "bwd_dq")


@dataclass(frozen=True)
class FlashBwdConfig(LaunchConfig):
    """The long-group backward in four kernels: delta (Cv chunks of delta_block_dv), dK (and dV when
    Cv <= block_dv) per block_n keys, dV per dv_block_dv columns otherwise, dQ per block_m queries;
    the dK and dQ kernels compute dP = dO V^T by Cv chunks of block_dv. None: block_dv."""

    block_m: int
    block_n: int
    block_dv: int
    dv_block_dv: Optional[int] = None
    delta_block_dv: Optional[int] = None
    num_warps: int = 8
    num_stages: int = 2

    def bwd_plan(self, geo: Geometry, scale: float, do: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor,
                 dv: torch.Tensor) -> List[Launch]:
        cqk, cv, ng = q.shape[1], v.shape[1], geo.n * geo.groups
        delta = torch.empty_like(lse)
        one_chunk = cv <= self.block_dv
        blocks = dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_DK=_whole(cqk))
        cx = dict(geo.geo_constexprs(), PREC=_precision(q.dtype), **blocks)
        sizes = dict(L=geo.tokens, G=geo.groups, gw=geo.gw, CQK=cqk, CV=cv)
        plans = [delta_launch(geo, out, do, delta, self.delta_block_dv or self.block_dv), Launch(
            _bwd_dkdv_kernel, (triton.cdiv(geo.tokens, self.block_n) * ng,),
            dict(Q=q, K=k, V=v, DO=do, DK=dk, DV=dv, LSE=lse, DELTA=delta, **_strides(q, "sq"), **_strides(k, "sk"),
                 **_strides(v, "sv"), **_strides(do, "sdo"), **_strides(dk, "sdk"), **_strides(dv, "sdv"),
                 qk_scale=scale * _LOG2E, scale=scale, **sizes),
            dict(cx, BLOCK_DV=self.block_dv, WITH_DV=one_chunk), self.num_warps, self.num_stages, "bwd_dkdv")]
        if not one_chunk:
            dv_block = self.dv_block_dv or self.block_dv
            num_dv = triton.cdiv(cv, dv_block)
            plans.append(Launch(
                _bwd_dv_kernel, (triton.cdiv(geo.tokens, self.block_n) * num_dv * ng,),
                dict(Q=q, K=k, DO=do, DV=dv, LSE=lse, **_strides(q, "sq"), **_strides(k, "sk"), **_strides(do, "sdo"),
                     **_strides(dv, "sdv"), NUM_DV=num_dv, qk_scale=scale * _LOG2E, **sizes),
                dict(cx, BLOCK_DV=dv_block), self.num_warps, self.num_stages, "bwd_dv"))
        plans.append(dq_launch(geo, scale, do, q, k, v, lse, delta, dq, self.block_m, self.block_n, self.block_dv,
                               self.num_warps, self.num_stages))
        return plans


FwdConfig = Union[TileConfig, FlashFwdConfig]  # or any config with a `fwd_plan` (isa_triton.candidates)
BwdConfig = Union[TileConfig, FlashBwdConfig]  # or any config with a `bwd_plan`


def _tile_groups_per_prog(num_groups: int) -> int:
    """Groups per program of the tile kernels: 1 until there are enough groups to fill an H100 ~8x."""
    if num_groups >= 8192:
        return 4
    if num_groups >= 4096:
        return 2
    return 1


def is_gather(long_range: bool, *tensors: torch.Tensor) -> bool:
    """True when long-range tokens must be gathered element by element (channels not contiguous).

    A long-range group takes every bw-th pixel, so only a channel stride of 1 (channels_last)
    gives vector loads; short-range groups read bw-pixel row segments either way.
    """
    return long_range and any(t.stride(1) != 1 for t in tensors)


@functools.lru_cache(maxsize=None)
def fwd_config(dtype: torch.dtype, L: int, cqk: int, cv: int, gather: bool = False) -> FwdConfig:
    """The forward's launch config for one problem class (fixed, no autotuning; cached: configs are frozen).

    Sized for an H100 (227 KB shared memory per block, 64K registers per SM) and checked by
    tests/test_kernel_compile.py: no register spills, shared memory within the limit.
    """
    if _np2(L) <= TILE_MAX:
        block_l = max(16, _np2(L))
        if dtype == torch.float32:  # exact fp32 dot products run on the FMA units: small chunks
            chunk = 32 if block_l <= 64 else 16
            return TileConfig(block_l, _chunk(cqk, chunk), _chunk(cv, chunk), 4 if block_l <= 32 else 8, 1)
        if gather:
            return TileConfig(block_l, _chunk(cqk, 32), _chunk(cv, 64), 4 if block_l <= 32 else 8, 2)
        return TileConfig(block_l, _chunk(cqk, 128 if block_l <= 64 else 64), _chunk(cv, 128),
                          4 if block_l <= 64 else 8, 2)
    if dtype == torch.float32:
        return FlashFwdConfig(32, 32, _chunk(cv, 64), num_warps=4, num_stages=1)
    big = _whole(cqk) > 256
    if gather:
        return FlashFwdConfig(64 if big else 128, 32, _chunk(cv, 64 if big else 128))
    return FlashFwdConfig(64 if big or L <= 256 else 128, 32 if big else 64, _chunk(cv, 128 if big else 256))


@functools.lru_cache(maxsize=None)
def bwd_config(dtype: torch.dtype, L: int, cqk: int, cv: int, gather: bool = False) -> BwdConfig:
    """The backward's launch config for one problem class (fixed, no autotuning; cached: configs are frozen).

    Long groups take the four-kernel backward; the one-pass ones of `isa_triton.candidates` were
    measured faster only for some problems and add an fp32 workspace or are untimed (BENCHMARKS.md).
    """
    if _np2(L) <= TILE_MAX:
        block_l = max(16, _np2(L))
        if dtype == torch.float32:
            chunk = 32 if block_l <= 32 else 16
            return TileConfig(block_l, _chunk(cqk, chunk), _chunk(cv, chunk), 4 if block_l <= 32 else 8, 1)
        if gather:
            chunk = 32 if block_l <= 64 else 16
            return TileConfig(block_l, _chunk(cqk, chunk), _chunk(cv, chunk), 4 if block_l <= 32 else 8, 2)
        if block_l > 64:  # a 16-wide Cqk chunk spills here (ptxas, sm_90); 32 does not
            return TileConfig(block_l, 32, 32, 8, 2)
        return TileConfig(block_l, _chunk(cqk, 64), _chunk(cv, 64), 4, 2)
    if dtype == torch.float32:
        return FlashBwdConfig(32, 32, _chunk(cv, 32), _chunk(cv, 64), _chunk(cv, 32), num_warps=4, num_stages=1)
    if gather or _whole(cqk) > 256:
        return FlashBwdConfig(32, 32, _chunk(cv, 32), _chunk(cv, 64), _chunk(cv, 32))
    return FlashBwdConfig(64, 64, _chunk(cv, 64), _chunk(cv, 256), _chunk(cv, 64))


def _geometry(q: torch.Tensor, long_range: bool, block_h: int, block_w: int) -> Geometry:
    return Geometry(q.shape[0], q.shape[2], q.shape[3], block_h, block_w, long_range)


def _plan_forward(geo: Geometry, scale: float, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  config: Optional[FwdConfig]) -> Tuple[torch.Tensor, torch.Tensor, List[Launch]]:
    out = torch.empty_like(v)
    lse = torch.empty(geo.n * geo.groups, geo.tokens, device=q.device, dtype=torch.float32)
    if config is None:
        config = fwd_config(q.dtype, geo.tokens, q.shape[1], v.shape[1], is_gather(geo.long_range, q, k, v))
    return out, lse, config.fwd_plan(geo, scale, q, k, v, out, lse)


def _plan_backward(geo: Geometry, scale: float, do: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, config: Optional[BwdConfig]
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, List[Launch]]:
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if config is None:
        config = bwd_config(q.dtype, geo.tokens, q.shape[1], v.shape[1], is_gather(geo.long_range, q, k, v, do))
    return dq, dk, dv, config.bwd_plan(geo, scale, do, q, k, v, out, lse, dq, dk, dv)


def launch_plans(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: str, block_size: Tuple[int, int],
                 scale: Optional[float] = None, backward: bool = True, fwd_cfg: Optional[FwdConfig] = None,
                 bwd_cfg: Optional[BwdConfig] = None) -> List[Launch]:
    """The launches the op makes for these inputs (meta tensors are fine): what the compile test compiles.

    A config given replaces the op's own (e.g. a sweep entry)."""
    geo = _geometry(q, pattern == "long", *block_size)
    scale = q.shape[1] ** -0.5 if scale is None else scale
    out, lse, plans = _plan_forward(geo, scale, q, k, v, fwd_cfg)
    if backward:
        plans += _plan_backward(geo, scale, out, q, k, v, out, lse, bwd_cfg)[-1]
    return plans


# --------------------------------------------------------------------------------------------
# Running the kernels, and the autograd wiring
# --------------------------------------------------------------------------------------------
def _launch(plans: Sequence[Launch], device: torch.device) -> None:
    if INTERPRETED:  # CPU tensors; warps and stages mean nothing to the interpreter
        for p in plans:
            p.kernel[p.grid](**p.args, **p.constexprs)
        return
    with torch.cuda.device(device):
        for p in plans:
            p.kernel[p.grid](**p.args, **p.constexprs, num_warps=p.num_warps, num_stages=p.num_stages)


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, long_range: bool, block_h: int,
                      block_w: int, scale: float, config: Optional[FwdConfig] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) from the forward kernels, without autograd (`config`: None for the op's own)."""
    geo = _geometry(q, long_range, block_h, block_w)
    out, lse, plans = _plan_forward(geo, scale, q, k, v, config)
    if out.numel() and q.shape[1]:
        _launch(plans, q.device)
    elif out.numel():
        out.zero_()
    return out, lse


def attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, long_range: bool, block_h: int, block_w: int, scale: float,
                       config: Optional[BwdConfig] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) from the backward kernels for upstream gradient `do` (`config`: None for the op's own)."""
    geo = _geometry(q, long_range, block_h, block_w)
    if not (out.numel() and q.shape[1]):
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dq, dk, dv, plans = _plan_backward(geo, scale, do, q, k, v, out, lse, config)
    _launch(plans, q.device)
    return dq, dk, dv


# What torch.compile sees: two opaque ops with fake implementations (shapes, dtypes, memory formats).
@torch.library.custom_op("isa_triton::attention_fwd", mutates_args=())
def _attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, long_range: bool, block_h: int,
                      block_w: int, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, long_range, block_h, block_w, scale)


@_attention_fwd_op.register_fake
def _(q, k, v, long_range, block_h, block_w, scale):
    geo = _geometry(q, long_range, block_h, block_w)
    return torch.empty_like(v), q.new_empty((geo.n * geo.groups, geo.tokens), dtype=torch.float32)


@torch.library.custom_op("isa_triton::attention_bwd", mutates_args=())
def _attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      lse: torch.Tensor, long_range: bool, block_h: int, block_w: int,
                      scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(do, q, k, v, out, lse, long_range, block_h, block_w, scale)


@_attention_bwd_op.register_fake
def _(do, q, k, v, out, lse, long_range, block_h, block_w, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class _Attention(torch.autograd.Function):
    """The op's one autograd wiring. Eager calls launch the kernels from here: the custom ops' dispatch
    would double the host time per call (see BENCHMARKS.md, kernel history); under torch.compile the
    forward and backward call the custom ops instead, which the compiler keeps as opaque nodes."""

    @staticmethod
    def forward(ctx, q, k, v, long_range, block_h, block_w, scale, fwd_cfg, bwd_cfg):
        if torch.compiler.is_compiling():
            out, lse = _attention_fwd_op(q, k, v, long_range, block_h, block_w, scale)
        else:
            out, lse = attention_forward(q, k, v, long_range, block_h, block_w, scale, fwd_cfg)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.params = (long_range, block_h, block_w, scale, bwd_cfg)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        long_range, block_h, block_w, scale, bwd_cfg = ctx.params
        if torch.compiler.is_compiling():
            grads = _attention_bwd_op(grad_out, q, k, v, out, lse, long_range, block_h, block_w, scale)
        else:
            grads = attention_backward(grad_out, q, k, v, out, lse, long_range, block_h, block_w, scale, bwd_cfg)
        return (*grads, None, None, None, None, None, None)


# --------------------------------------------------------------------------------------------
# Public entry
# --------------------------------------------------------------------------------------------
def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: str,
                     block_size: Tuple[int, int], scale: float, fwd_cfg: Optional[FwdConfig] = None,
                     bwd_cfg: Optional[BwdConfig] = None) -> torch.Tensor:
    """Fused Triton attention on (N, C, H, W) maps (inputs already checked by `check_inputs`).

    `fwd_cfg` / `bwd_cfg` replace the op's launch configs (the sweep and the tests; not under torch.compile).

    Example (CPU; TRITON_INTERPRET=1 set before Python imported triton):
        >>> q = k = torch.randn(1, 16, 16, 16); v = torch.randn(1, 32, 16, 16)
        >>> triton_attention(q, k, v, "short", (8, 8), 0.25).shape      # doctest: +SKIP
        torch.Size([1, 32, 16, 16])
    """
    check_supported(q)
    if (fwd_cfg is not None or bwd_cfg is not None) and torch.compiler.is_compiling():
        raise ValueError("explicit launch configs are for timing and testing eager calls, not torch.compile")
    return _Attention.apply(q, k, v, pattern == "long", int(block_size[0]), int(block_size[1]), float(scale),
                            fwd_cfg, bwd_cfg)
