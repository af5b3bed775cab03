"""Fused Triton kernels for ISA's interlaced sparse self-attention (forward and backward).

One op, `triton_attention(q, k, v, pattern, block_size, scale)`, computes

    out[n, :, p] = sum_{p' in group(p)} softmax_{p'}(scale * q[n, :, p] . k[n, :, p']) v[n, :, p']

straight on (N, C, H, W) maps of any strides (NCHW, channels_last, channel or spatial slices):
every kernel derives the pixel address of a token from its group, its index and the tensor's four
strides, so no permute/reshape copy is made and no (L x L) attention matrix is stored.

- ``pattern="long"``: group = (n, lh, lw), tokens = the (H/bh)*(W/bw) pixels with offset (lh, lw)
  inside their block (MMSegmentation's global relation).
- ``pattern="short"``: group = (n, gh, gw), tokens = the bh*bw pixels of one block (local relation).

Kernels (fp32 accumulation; fp32, fp16 and bf16 inputs):

- short groups (L <= 128 tokens, e.g. 64 for 8x8 blocks): ``_fwd_tile_kernel`` / ``_bwd_tile_kernel``
  hold one group's whole (L x L) score tile in registers, loop over Cqk and Cv in chunks and
  batch ``GROUPS_PER_PROG`` groups per program; the backward computes dq, dk, dv of a group in one
  program with no recomputation (delta_i = sum_j p_ij dp_ij).
- long groups (L > 128, e.g. 512 for a 128x256 feature map): FlashAttention-2 style.
  ``_fwd_flash_kernel`` tiles the keys with an online softmax (base-2) and splits Cv across
  programs (BLOCK_DV columns each; an fp32 accumulator of 128 x 512 does not fit one program),
  saving the row log-sum-exp. ``_fwd_tma_kernel`` (config kind "tma"; channels_last 16-bit maps,
  Cqk <= 256) is the same algorithm fed by Hopper's bulk-tensor copies: a long-range group is a
  strided 3-D box [H/bh, W/bw, C] of its map, described on the device with
  `tl.make_tensor_descriptor` (Triton then multi-buffers K/V through mbarriers); compiled for
  sm_90a (TMA copies, wgmma, no spills) and tested in the interpreter, not yet timed on a GPU, so
  `isa bench kernels --sweep` lists it beside the default. The backward recomputes P from the
  LSE: ``_bwd_delta_kernel`` (rowsum dO*O), ``_bwd_dkdv_kernel`` (dk, and dv when Cv fits one chunk), ``_bwd_dv_kernel``
  (dv per Cv chunk otherwise) and ``_bwd_dq_kernel`` -- S = QK^T is recomputed 3+ times and
  dP = dO V^T twice. The one-pass alternative (config key ``FUSED_DQ``; `long_backward("fused")`, or
  ``ISA_TRITON_LONG_BWD=fused``) is ``_bwd_fused_kernel``:
  32 keys per program with dK^T and dV^T (whole Cqk <= 256 and Cv <= 512) accumulated in
  registers, S and dP computed once per (query block, key block), and dQ added with relaxed
  fp32 atomics into an (N*G, L, Cqk) fp32 workspace that ``_bwd_dq_cast_kernel`` scales and
  writes through dQ's strides (transient N*H*W*Cqk*4 bytes; the sum order of dQ varies run
  to run at the fp32 rounding level). Timed on an H100 (BENCHMARKS.md): 1.21x faster than the
  four-kernel backward at 128x256 batch 8 channels_last, 3.8x for NCHW inputs, no gain at batch 1;
  it stays off by default because it adds that fp32 workspace while the gain is modest, and the
  zoo's training crops (L = 64 and 128) take the tile path anyway. Most of its dot products have
  M = 32 rows, which Triton lowers to mma.sync rather than Hopper's wgmma (PTX, sm_90a).
  ``long_backward("split")`` (``SPLIT_DQ``) runs the same dK/dV pass without dQ, then
  ``_bwd_dq_kernel`` with whole dO rows (DV_ONE): no atomics and no workspace, S and dP computed
  twice instead of four and two times; with ``TMA=True`` (channels_last 16-bit maps) the dQ pass
  is ``_bwd_dq_tma_kernel`` instead, transposed (keys x queries) so that its loop-invariant Q
  and dO tiles stay in shared memory as wgmma B operands. Neither is timed on a GPU yet: the
  sweep times them beside the default. (A TMA dK/dV pass was tried and dropped: Triton keeps
  the reshaped 3-D boxes it multiplies as A operands in registers, which spilled at every tile
  size that gives wgmma; so did a separate TMA dK pass, by 60 B or more with Triton 3.6 and 3.8,
  while a separate dV pass fit.)

Launch configurations are fixed per (kernel, dtype, group length, channel counts, layout) by
`fwd_config`/`bwd_config` (no autotuning; `isa bench kernels --sweep` times alternatives on a GPU);
`launch_plans` lists what the op launches so that tests/test_kernel_compile.py can compile each one
for sm_90 on a machine without a GPU. Long-range groups of NCHW inputs ("gather" configs: the
channel stride is not 1, so every element is its own load) get smaller tiles than channels_last
ones, whose token rows are contiguous channel vectors. fp32 inputs use exact fp32 dot products
(``input_precision="ieee"``, FMA units) unless ``torch.backends.cuda.matmul.allow_tf32`` is set,
matching what eager PyTorch does.

Autograd is one `torch.autograd.Function`: eager calls launch the kernels from it directly (half the
per-call host time of a dispatcher round trip); under torch.compile it calls the custom ops
``isa_triton::attention_fwd`` / ``attention_bwd`` (with fake implementations), so
``torch.compile(fullgraph=True)`` traces it. Nothing inside synchronises with the host. With ``TRITON_INTERPRET=1``
set before Triton is imported, the same launches run in Triton's interpreter on CPU tensors.

What was tested, where:
- CPU (2 cores), Triton 3.8 interpreter, torch 2.14: forward, dq, dk, dv against an fp64 eager
  reference in fp32 and fp16, error <= 2 x eager's error in the same dtype + atol (1e-6 / 1e-4):
  both patterns; 8x8, 4x8, 2x4, 1x2, 2x2, 1x1 and 16x16 blocks; group lengths 6 to 256 (tile and
  flash paths, partial tiles); Cqk != Cv; several Cqk/Cv chunks and a Cv split over programs;
  the FUSED_DQ and SPLIT_DQ backwards (their variants; L = 150-512; through the op and explicit
  configs); the short forward's Cv split over programs (DV_SPLIT);
  NCHW, channels_last, channel-sliced, transposed and column-strided inputs; batch 1-3; only the
  fp32 LSE (N*H*W floats) saved for backward; torch.compile(fullgraph=True, backend="aot_eager")
  of forward+backward; torch.library.opcheck (tests/test_kernels.py, about 35 s).
- CPU, interpreter: the TMA forward and the TMA dQ pass (kind "tma", SPLIT_DQ + TMA) on
  channels_last fp16 maps with gw = 10 and 13 (zero-filled partial rows), partial row blocks, a
  Cv split and Cv = 264 (two boxes), against fp64 like the rest; their fallback to the pointer
  kernels for other layouts.
- CPU: every fp16/bf16 launch configuration the op picks at the ISA shapes (Cqk 256 / Cv 512; and,
  marked slow, 64/64 and 16/24), NCHW and channels_last, batch 1 and 8, and the one-pass backwards'
  configs, compiled for sm_90a with Triton 3.8 and its ptxas: shared memory <= 227 KB and no
  register spills (tests/test_kernel_compile.py, about 75 s from an empty Triton cache); every
  `isa bench kernels --sweep` entry likewise (marked slow). The PTX shows which dot products
  become wgmma (M >= 64 per tile) and that the TMA kernels issue cp.async.bulk.tensor copies.
  The same with Triton 3.6.0, the GPU machine's (`bash scripts/compile_check.sh 3.6.0`): its
  register allocation differs, and the delta kernel's Cv chunk (64), the NCHW dV chunk (64) and
  the NCHW one-pass query block (16) are sized so that no configuration spills with either.
- GPU: NVIDIA H100 80GB HBM3 (torch 2.11, Triton 3.6), 2026-11-26, two runs: scripts/gpu_kernels.py
  -- bf16/fp16/fp32 forward, dq, dk, dv within 2x eager's error at 128x256, 104x104, 64x128 and
  64x88, both patterns and layouts, both long-range backwards (27 cases, all pass); only the LSE
  saved for backward; torch.compile(fullgraph=True) with inductor; the benchmark and the sweep
  (BENCHMARKS.md) -- and tests/test_kernels_gpu.py (12 passed).

Known limits:
- Long-range groups of NCHW inputs are read through 2-byte gathers (a group's tokens are bw
  pixels apart), so each 32-byte sector fetched from L2 serves 2-4 useful bytes: the long relation
  moves about bw (8x) more bytes from L2 than with channels_last inputs and needs smaller tiles
  (no spills). Run the ISA head channels_last for the fast long relation; short-range groups read
  16-byte row segments and are fine either way.
- fp32 is an exactness path, not a tuned one: its long-group kernels (FMA dot products over the
  full Cqk = 256) spill registers on sm_90; the compile test covers fp16 and bf16 only.
- bf16 cannot be checked in Triton's interpreter (its bf16 dot is wrong), so it is refused there.
- Cqk > 256 loads the whole query/key vector per tile in the long-group kernels (smaller tiles
  are picked): correct, not tuned. No double backward. No masking of ISA's zero padding (none is
  wanted: spec §7).
"""
import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

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
def _fwd_tile_kernel(
    Q, K, V, O, LSE,
    sq_n, sq_c, sq_h, sq_w, sk_n, sk_c, sk_h, sk_w, sv_n, sv_c, sv_h, sv_w, so_n, so_c, so_h, so_w,
    L, G, NG, gw, CQK, CV, CV_PER, qk_scale,
    BH: tl.constexpr, BW: tl.constexpr, LONG: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    GROUPS_PER_PROG: tl.constexpr, DV_SPLIT: tl.constexpr, PREC: tl.constexpr,
):
    """Whole groups (L <= BLOCK_L tokens): exact softmax of one score tile, then P @ V by Cv chunks.

    DV_SPLIT > 1 spreads a group's Cv over that many adjacent programs (CV_PER columns each, the
    scores recomputed by each): more programs for small batches, whose few groups leave SMs idle.
    """
    pid = tl.program_id(0) // DV_SPLIT
    c_lo = (tl.program_id(0) % DV_SPLIT) * CV_PER
    c_hi = tl.minimum(c_lo + CV_PER, CV)
    offs = tl.arange(0, BLOCK_L)
    t_ok = offs < L
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
    """Long groups, one pass: dK, dV of BLOCK_N keys and their dQ share (fp32 atomics), all queries.

    Whole Cqk (BLOCK_DK) and Cv (BLOCK_DV) rows per tile: S = Q K^T and dP = dO V^T are computed
    once per (query block, key block) pair and give dV^T += dO^T P, dK^T += Q^T dS (accumulated
    as (channels, keys): M = Cqk / Cv, wgmma-shaped on sm_90) and dQ += dS K, added with relaxed
    fp32 atomics into the workspace DQW laid out (group, token, Cqk) (`_bwd_dq_cast_kernel`
    scales and stores it). RELOAD_KV re-reads the K/V tiles per query block instead of keeping
    them live; DQ_CHUNK < BLOCK_DK computes dQ by Cqk chunks. WITH_DQ=False leaves dQ to
    `_bwd_dq_kernel` (the SPLIT_DQ backward: no atomics, no workspace).
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
# Launch plans: fixed configurations per (dtype, group length, channel counts)
# --------------------------------------------------------------------------------------------
def _np2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


@dataclass
class Launch:
    """One kernel launch: the kernel, its grid, its runtime arguments and its constexprs."""

    kernel: Any
    grid: Tuple[int, ...]
    args: Dict[str, Any]
    constexprs: Dict[str, Any]
    num_warps: int
    num_stages: int
    name: str = field(default="")

    def config_key(self) -> Tuple:
        """What selects the compiled binary besides strides and pointers."""
        cx = tuple(sorted((k, v) for k, v in self.constexprs.items()))
        return (self.name, cx, self.num_warps, self.num_stages)


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
    def gw(self) -> int:
        return self.w // self.bw

    @property
    def groups(self) -> int:
        return self.bh * self.bw if self.long_range else (self.h // self.bh) * (self.w // self.bw)

    @property
    def tokens(self) -> int:
        return (self.h // self.bh) * (self.w // self.bw) if self.long_range else self.bh * self.bw


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "ieee"  # ignored for 16-bit inputs: tensor cores with fp32 accumulation


def _strides(x: torch.Tensor, prefix: str) -> Dict[str, int]:
    sn, sc, sh, sw = x.stride()
    return {f"{prefix}_n": sn, f"{prefix}_c": sc, f"{prefix}_h": sh, f"{prefix}_w": sw}


def _tma_strides(**tensors: torch.Tensor) -> Dict[str, int]:
    """(n, h, w) strides of the TMA kernels' maps, named s{name}_n/h/w (the channel stride is 1)."""
    return {f"s{name}_{dim}": x.stride(i) for name, x in tensors.items() for dim, i in (("n", 0), ("h", 2), ("w", 3))}


def _tma_rows(geo: "Geometry", block_m: int, block_n: int) -> Tuple[int, int, int]:
    """TMA tiles are whole rows of a group's token grid: (rows per query tile, per key tile, padded row)."""
    gwb = _np2(geo.gw)
    return max(1, block_m // gwb), max(1, block_n // gwb), gwb


TMA_MAX_BOX = 256  # elements per dimension of one bulk-tensor copy
TMA_MAX_GW = 128  # a tile holds at least one whole row of a group's tokens


def tma_eligible(geo: "Geometry", block_dk: int, block_dv: int, *tensors: torch.Tensor) -> bool:
    """Whether `_fwd_tma_kernel` can read these maps: long range, 16-bit, channels_last with channel
    counts that are multiples of 8 (16-byte aligned rows and strides), whole Cqk in one box."""
    q = tensors[0]
    return (geo.long_range and q.dtype in (torch.float16, torch.bfloat16) and _np2(geo.gw) <= TMA_MAX_GW
            and block_dk >= q.shape[1] and max(block_dk, block_dv) <= TMA_MAX_BOX
            and all(t.dtype == q.dtype and t.stride(1) == 1 and t.shape[1] % 8 == 0
                    and all(st % 8 == 0 for st in (t.stride(0), t.stride(2), t.stride(3)))
                    and (t.device.type == "meta" or t.data_ptr() % 16 == 0) for t in tensors))


def _geo_args(geo: Geometry) -> Dict[str, Any]:
    return {"BH": geo.bh, "BW": geo.bw, "LONG": geo.long_range}


def _tile_groups_per_prog(num_groups: int) -> int:
    """Groups per program of the tile kernels: 1 until there are enough groups to fill an H100 ~8x."""
    if num_groups >= 8192:
        return 4
    if num_groups >= 4096:
        return 2
    return 1


def _chunk(c: int, cap: int) -> int:
    return min(cap, max(16, _np2(c)))


def is_gather(long_range: bool, *tensors: torch.Tensor) -> bool:
    """True when long-range tokens must be gathered element by element (channels not contiguous).

    A long-range group takes every bw-th pixel, so only a channel stride of 1 (channels_last)
    gives vector loads; short-range groups read bw-pixel row segments either way.
    """
    return long_range and any(t.stride(1) != 1 for t in tensors)


def fwd_config(dtype: torch.dtype, L: int, cqk: int, cv: int, gather: bool = False) -> Dict[str, Any]:
    """Block sizes and launch options of the forward for one problem class (fixed, no autotuning).

    Sized for an H100 (227 KB shared memory per block, 64K registers per SM) and checked by
    tests/test_kernel_compile.py: no register spills, shared memory within the limit.
    """
    block_dk = max(16, _np2(cqk))
    if dtype == torch.float32:  # exact fp32 dot products run on the FMA units: small tiles
        if _np2(L) <= TILE_MAX:
            block_l = max(16, _np2(L))
            return dict(kind="tile", BLOCK_L=block_l, BLOCK_DK=_chunk(cqk, 32 if block_l <= 64 else 16),
                        BLOCK_DV=_chunk(cv, 32 if block_l <= 64 else 16), num_warps=4 if block_l <= 32 else 8,
                        num_stages=1)
        return dict(kind="flash", BLOCK_M=32, BLOCK_N=32, BLOCK_DK=block_dk, BLOCK_DV=_chunk(cv, 64),
                    num_warps=4, num_stages=1)
    if _np2(L) <= TILE_MAX:
        block_l = max(16, _np2(L))
        if gather:
            return dict(kind="tile", BLOCK_L=block_l, BLOCK_DK=_chunk(cqk, 32), BLOCK_DV=_chunk(cv, 64),
                        num_warps=4 if block_l <= 32 else 8, num_stages=2)
        return dict(kind="tile", BLOCK_L=block_l, BLOCK_DK=_chunk(cqk, 128 if block_l <= 64 else 64),
                    BLOCK_DV=_chunk(cv, 128), num_warps=4 if block_l <= 64 else 8, num_stages=2)
    big = block_dk > 256
    if gather:
        return dict(kind="flash", BLOCK_M=64 if big else 128, BLOCK_N=32, BLOCK_DK=block_dk,
                    BLOCK_DV=_chunk(cv, 64 if big else 128), num_warps=8, num_stages=2)
    return dict(kind="flash", BLOCK_M=64 if big or L <= 256 else 128, BLOCK_N=32 if big else 64, BLOCK_DK=block_dk,
                BLOCK_DV=_chunk(cv, 128 if big else 256), num_warps=8, num_stages=2)


# Long-group backward: "four" (delta, dK(+dV), dV by Cv chunks, dQ: the default), "fused" (one pass,
# dQ by fp32 atomics: FUSED_DQ) or "split" (one pass for dK and dV, then dQ: SPLIT_DQ). None -> the
# environment variable ISA_TRITON_LONG_BWD (default "four"); see `long_backward`. The H100 timings
# that chose the default are in BENCHMARKS.md.
LONG_BWD_MODES = ("four", "fused", "split")
LONG_BWD: Optional[str] = None
ONE_PASS_MAX_DK, ONE_PASS_MAX_DV = 256, 512  # the one-pass dK/dV kernel holds whole Cqk and Cv rows per tile


def long_backward_mode() -> str:
    """Which backward `bwd_config` picks for long groups: one of `LONG_BWD_MODES`."""
    mode = LONG_BWD if LONG_BWD is not None else os.environ.get("ISA_TRITON_LONG_BWD", "four").strip().lower()
    if mode not in LONG_BWD_MODES:
        raise ValueError(f"ISA_TRITON_LONG_BWD={mode!r}: expected one of {', '.join(LONG_BWD_MODES)}")
    return mode


@contextlib.contextmanager
def long_backward(mode: str):
    """Temporarily pick the long-group backward ("four", "fused" or "split"), e.g. for a timing comparison."""
    global LONG_BWD
    if mode not in LONG_BWD_MODES:
        raise ValueError(f"long_backward({mode!r}): expected one of {', '.join(LONG_BWD_MODES)}")
    old, LONG_BWD = LONG_BWD, mode
    try:
        yield
    finally:
        LONG_BWD = old


def one_pass_bwd_config(dtype: torch.dtype, cqk: int, cv: int, gather: bool = False,
                        mode: str = "fused") -> Dict[str, Any]:
    """The one-pass long-group backward (`_bwd_fused_kernel`): dK, dV, and dQ by atomics or by `_bwd_dq_kernel`.

    BLOCK_N = 32 keys per program keep dK^T (Cqk x 32) and dV^T (Cv x 32) fp32 accumulators in
    registers (96 per thread with 8 warps at 256/512); compiled for sm_90a without spills
    (tests/test_kernel_compile.py). mode "split" (SPLIT_DQ) computes dQ in a second kernel of
    DQ_BLOCK_M queries holding whole dO rows (DQ_BLOCK_DV, by chunks when smaller than Cv) instead of
    fp32 atomics.
    """
    block_dk, block_dv = max(16, _np2(cqk)), max(16, _np2(cv))
    base = dict(kind="flash", BLOCK_DK=block_dk, BLOCK_DV=block_dv, DELTA_DV=_chunk(cv, 32 if gather else 64))
    base.update(FUSED_DQ=True) if mode == "fused" else base.update(SPLIT_DQ=True)
    if dtype == torch.float32:  # FMA dot products: exact, small tiles, not tuned
        return dict(base, BLOCK_M=16, BLOCK_N=16, DQ_BLOCK_M=16, DQ_BLOCK_N=16, num_warps=4, num_stages=1)
    if gather:  # dQ as the four-kernel backward's (dP by Cv chunks): whole gathered dO rows spill
        return dict(base, BLOCK_M=16, BLOCK_N=32, DQ_BLOCK_M=32, DQ_BLOCK_N=32, DQ_BLOCK_DV=_chunk(cv, 32),
                    num_warps=8, num_stages=1)
    return dict(base, BLOCK_M=32, BLOCK_N=32, DQ_BLOCK_M=64, DQ_BLOCK_N=32, num_warps=8, num_stages=2)


def bwd_config(dtype: torch.dtype, L: int, cqk: int, cv: int, gather: bool = False,
               mode: Optional[str] = None) -> Dict[str, Any]:
    """Block sizes and launch options of the backward for one problem class (fixed, no autotuning).

    `mode` (default: `long_backward_mode()`) "fused" or "split" picks a one-pass backward for long
    groups whose Cqk <= 256 and Cv <= 512; otherwise (and for "four") the four-kernel one.
    """
    block_dk = max(16, _np2(cqk))
    mode = long_backward_mode() if mode is None else mode
    if (mode != "four" and _np2(L) > TILE_MAX and _np2(cqk) <= ONE_PASS_MAX_DK
            and _np2(cv) <= ONE_PASS_MAX_DV):
        return one_pass_bwd_config(dtype, cqk, cv, gather, mode)
    if dtype == torch.float32:
        if _np2(L) <= TILE_MAX:
            block_l = max(16, _np2(L))
            return dict(kind="tile", BLOCK_L=block_l, BLOCK_DK=_chunk(cqk, 32 if block_l <= 32 else 16),
                        BLOCK_DV=_chunk(cv, 32 if block_l <= 32 else 16), num_warps=4 if block_l <= 32 else 8,
                        num_stages=1)
        return dict(kind="flash", BLOCK_M=32, BLOCK_N=32, BLOCK_DK=block_dk, BLOCK_DV=_chunk(cv, 32),
                    DV_BLOCK=_chunk(cv, 64), DELTA_DV=_chunk(cv, 32), num_warps=4, num_stages=1)
    if _np2(L) <= TILE_MAX:
        block_l = max(16, _np2(L))
        if gather:
            chunk = 32 if block_l <= 64 else 16
            return dict(kind="tile", BLOCK_L=block_l, BLOCK_DK=_chunk(cqk, chunk), BLOCK_DV=_chunk(cv, chunk),
                        num_warps=4 if block_l <= 32 else 8, num_stages=2)
        if block_l > 64:  # a 16-wide Cqk chunk spills here (ptxas, sm_90); 32 does not
            return dict(kind="tile", BLOCK_L=block_l, BLOCK_DK=32, BLOCK_DV=32, num_warps=8, num_stages=2)
        return dict(kind="tile", BLOCK_L=block_l, BLOCK_DK=_chunk(cqk, 64), BLOCK_DV=_chunk(cv, 64), num_warps=4,
                    num_stages=2)
    big = block_dk > 256
    if gather or big:
        return dict(kind="flash", BLOCK_M=32, BLOCK_N=32, BLOCK_DK=block_dk, BLOCK_DV=_chunk(cv, 32),
                    DV_BLOCK=_chunk(cv, 64), DELTA_DV=_chunk(cv, 32), num_warps=8, num_stages=2)
    return dict(kind="flash", BLOCK_M=64, BLOCK_N=64, BLOCK_DK=block_dk, BLOCK_DV=_chunk(cv, 64),
                DV_BLOCK=_chunk(cv, 256), DELTA_DV=_chunk(cv, 64), num_warps=8, num_stages=2)


def _fwd_plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
              geo: Geometry, scale: float, config: Optional[Dict[str, int]] = None) -> List[Launch]:
    L, G, ng = geo.tokens, geo.groups, geo.n * geo.groups
    cqk, cv = q.shape[1], v.shape[1]
    cfg = dict(config or fwd_config(q.dtype, L, cqk, cv, is_gather(geo.long_range, q, k, v)))
    common = dict(Q=q, K=k, V=v, O=out, LSE=lse, **_strides(q, "sq"), **_strides(k, "sk"), **_strides(v, "sv"),
                  **_strides(out, "so"))
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    kind = cfg.pop("kind")
    cx = dict(_geo_args(geo), PREC=_precision(q.dtype), **cfg)
    if kind == "tile":
        gpp = cx.setdefault("GROUPS_PER_PROG", _tile_groups_per_prog(ng))
        split = cx.setdefault("DV_SPLIT", 1)
        cv_per = triton.cdiv(triton.cdiv(cv, split), cx["BLOCK_DV"]) * cx["BLOCK_DV"]
        args = dict(common, L=L, G=G, NG=ng, gw=geo.gw, CQK=cqk, CV=cv, CV_PER=cv_per, qk_scale=scale * _LOG2E)
        return [Launch(_fwd_tile_kernel, (triton.cdiv(ng, gpp) * split,), args, cx, warps, stages, "fwd_tile")]
    num_dv = triton.cdiv(cv, cx["BLOCK_DV"])
    # "tma" falls back to the pointer kernel (same blocks) for maps a tensor descriptor cannot describe
    if kind == "tma" and tma_eligible(geo, cx["BLOCK_DK"], cx["BLOCK_DV"], q, k, v, out):
        rows_m, rows_n, gwb = _tma_rows(geo, cx.pop("BLOCK_M"), cx.pop("BLOCK_N"))
        cx = dict(BH=geo.bh, BW=geo.bw, ROWS_M=rows_m, ROWS_N=rows_n, GWB=gwb, BLOCK_DK=cx["BLOCK_DK"],
                  BLOCK_DV=cx["BLOCK_DV"])
        args = dict(Q=q, K=k, V=v, O=out, LSE=lse, **_tma_strides(q=q, k=k, v=v, o=out), G=G, gh=geo.h // geo.bh,
                    gw=geo.gw, CQK=cqk, CV=cv, NUM_DV=num_dv, qk_scale=scale * _LOG2E)
        grid = (triton.cdiv(geo.h // geo.bh, rows_m) * num_dv * ng,)
        return [Launch(_fwd_tma_kernel, grid, args, cx, warps, stages, "fwd_tma")]
    args = dict(common, L=L, G=G, gw=geo.gw, CQK=cqk, CV=cv, NUM_DV=num_dv, qk_scale=scale * _LOG2E)
    grid = (triton.cdiv(L, cx["BLOCK_M"]) * num_dv * ng,)
    return [Launch(_fwd_flash_kernel, grid, args, cx, warps, stages, "fwd_flash")]


def _bwd_plan(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              lse: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, delta: Optional[torch.Tensor],
              geo: Geometry, scale: float, config: Optional[Dict[str, int]] = None,
              dq_ws: Optional[torch.Tensor] = None) -> List[Launch]:
    L, G, ng = geo.tokens, geo.groups, geo.n * geo.groups
    cqk, cv = q.shape[1], v.shape[1]
    cfg = dict(config or bwd_config(q.dtype, L, cqk, cv, is_gather(geo.long_range, q, k, v, do)))
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    kind = cfg.pop("kind")
    delta_dv = cfg.pop("DELTA_DV", None)
    geo_cx = dict(_geo_args(geo), PREC=_precision(q.dtype))
    sizes = dict(L=L, G=G, gw=geo.gw, CQK=cqk, CV=cv)
    if kind == "tile":
        cx = dict(geo_cx, **cfg)
        gpp = cx.setdefault("GROUPS_PER_PROG", _tile_groups_per_prog(ng))
        args = dict(Q=q, K=k, V=v, DO=do, DQ=dq, DK=dk, DV=dv, LSE=lse, **_strides(q, "sq"), **_strides(k, "sk"),
                    **_strides(v, "sv"), **_strides(do, "sdo"), **_strides(dq, "sdq"), **_strides(dk, "sdk"),
                    **_strides(dv, "sdv"), NG=ng, qk_scale=scale * _LOG2E, scale=scale, **sizes)
        return [Launch(_bwd_tile_kernel, (triton.cdiv(ng, gpp),), args, cx, warps, stages, "bwd_tile")]
    assert delta is not None
    fused = cfg.pop("FUSED_DQ", False)
    bm, bn, bdk, bdv = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("BLOCK_DK"), cfg.pop("BLOCK_DV")
    blocks = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_DK=bdk, BLOCK_DV=bdv)
    one_chunk = cv <= bdv
    plans = []
    delta_dv = delta_dv or bdv
    plans.append(Launch(
        _bwd_delta_kernel, (triton.cdiv(L, 64) * ng,),
        dict(O=out, DO=do, DELTA=delta, **_strides(out, "so"), **_strides(do, "sdo"), L=L, G=G, gw=geo.gw, CV=cv),
        dict(_geo_args(geo), BLOCK_M=64, BLOCK_DV=delta_dv), 4, 1, "bwd_delta"))
    split_dq = cfg.pop("SPLIT_DQ", False)
    if fused or split_dq:
        if bdk < cqk or bdv < cv:
            raise ValueError(f"the one-pass dK/dV kernel holds all of Cqk and Cv per tile: BLOCK_DK {bdk} >= {cqk} "
                             f"and BLOCK_DV {bdv} >= {cv} needed")
        if fused:
            assert dq_ws is not None and dq_ws.dtype == torch.float32 and dq_ws.numel() >= ng * L * cqk
        plans.append(Launch(
            _bwd_fused_kernel, (triton.cdiv(L, bn) * ng,),
            dict(Q=q, K=k, V=v, DO=do, DQW=dq_ws if fused else dk, DK=dk, DV=dv, LSE=lse, DELTA=delta,
                 **_strides(q, "sq"), **_strides(k, "sk"), **_strides(v, "sv"), **_strides(do, "sdo"),
                 **_strides(dk, "sdk"), **_strides(dv, "sdv"), qk_scale=scale * _LOG2E, scale=scale, **sizes),
            dict(geo_cx, RELOAD_KV=cfg.pop("RELOAD_KV", False), DQ_CHUNK=cfg.pop("DQ_CHUNK", bdk),
                 WITH_DQ=not split_dq, **blocks),
            warps, stages, "bwd_fused" if fused else "bwd_kv"))
    box_dv = min(TMA_MAX_BOX, max(16, _np2(cv)))
    if (split_dq and cfg.pop("TMA", False) and cv <= 2 * TMA_MAX_BOX
            and tma_eligible(geo, bdk, box_dv, q, k, v, do, dq)):  # dQ through TMA boxes (Cv: 1 or 2 boxes)
        rows_m, rows_n, gwb = _tma_rows(geo, cfg.pop("DQ_BLOCK_M", bm), cfg.pop("DQ_BLOCK_N", bn))
        plans.append(Launch(
            _bwd_dq_tma_kernel, (triton.cdiv(geo.h // geo.bh, rows_m) * ng,),
            dict(Q=q, K=k, V=v, DO=do, DQ=dq, LSE=lse, DELTA=delta, **_tma_strides(q=q, k=k, v=v, do=do, dq=dq),
                 G=G, gh=geo.h // geo.bh, gw=geo.gw, CQK=cqk, CV=cv, qk_scale=scale * _LOG2E, scale=scale),
            dict(BH=geo.bh, BW=geo.bw, GWB=gwb, BLOCK_DK=bdk, BOX_DV=box_dv, TWO_DV=cv > box_dv,
                 ROWS_M=rows_m, ROWS_N=rows_n),
            cfg.pop("DQ_WARPS", warps), cfg.pop("DQ_STAGES", stages), "bwd_dq_tma"))
        return plans
    if split_dq:  # dQ of DQ_BLOCK_M queries (whole dO rows unless DQ_BLOCK_DV < Cv): S and dP once more
        dq_bm, dq_bn, dq_bdv = cfg.pop("DQ_BLOCK_M", bm), cfg.pop("DQ_BLOCK_N", bn), cfg.pop("DQ_BLOCK_DV", bdv)
        plans.append(Launch(
            _bwd_dq_kernel, (triton.cdiv(L, dq_bm) * ng,),
            dict(Q=q, K=k, V=v, DO=do, DQ=dq, LSE=lse, DELTA=delta, **_strides(q, "sq"), **_strides(k, "sk"),
                 **_strides(v, "sv"), **_strides(do, "sdo"), **_strides(dq, "sdq"), qk_scale=scale * _LOG2E,
                 scale=scale, **sizes),
            dict(geo_cx, DV_ONE=cv <= dq_bdv, BLOCK_M=dq_bm, BLOCK_N=dq_bn, BLOCK_DK=bdk, BLOCK_DV=dq_bdv),
            cfg.pop("DQ_WARPS", warps), cfg.pop("DQ_STAGES", stages), "bwd_dq"))
        return plans
    if fused:
        plans.append(Launch(
            _bwd_dq_cast_kernel, (triton.cdiv(L, 64) * ng,),
            dict(DQW=dq_ws, DQ=dq, **_strides(dq, "sdq"), L=L, G=G, gw=geo.gw, CQK=cqk, scale=scale),
            dict(_geo_args(geo), BLOCK_M=64, BLOCK_DK=_chunk(cqk, 64)), 4, 1, "bwd_dq_cast"))
        return plans
    plans.append(Launch(
        _bwd_dkdv_kernel, (triton.cdiv(L, bn) * ng,),
        dict(Q=q, K=k, V=v, DO=do, DK=dk, DV=dv, LSE=lse, DELTA=delta, **_strides(q, "sq"), **_strides(k, "sk"),
             **_strides(v, "sv"), **_strides(do, "sdo"), **_strides(dk, "sdk"), **_strides(dv, "sdv"),
             qk_scale=scale * _LOG2E, scale=scale, **sizes),
        dict(geo_cx, WITH_DV=one_chunk, **blocks), warps, stages, "bwd_dkdv"))
    if not one_chunk:
        dv_block = cfg.pop("DV_BLOCK", bdv)
        num_dv = triton.cdiv(cv, dv_block)
        plans.append(Launch(
            _bwd_dv_kernel, (triton.cdiv(L, bn) * num_dv * ng,),
            dict(Q=q, K=k, DO=do, DV=dv, LSE=lse, **_strides(q, "sq"), **_strides(k, "sk"), **_strides(do, "sdo"),
                 **_strides(dv, "sdv"), NUM_DV=num_dv, qk_scale=scale * _LOG2E, **sizes),
            dict(geo_cx, BLOCK_M=bm, BLOCK_N=bn, BLOCK_DK=bdk, BLOCK_DV=dv_block), warps, stages, "bwd_dv"))
    plans.append(Launch(
        _bwd_dq_kernel, (triton.cdiv(L, bm) * ng,),
        dict(Q=q, K=k, V=v, DO=do, DQ=dq, LSE=lse, DELTA=delta, **_strides(q, "sq"), **_strides(k, "sk"),
             **_strides(v, "sv"), **_strides(do, "sdo"), **_strides(dq, "sdq"), qk_scale=scale * _LOG2E,
             scale=scale, **sizes),
        dict(geo_cx, DV_ONE=one_chunk, **blocks), warps, stages, "bwd_dq"))
    return plans


# --------------------------------------------------------------------------------------------
# Running launches (compiled on CUDA, interpreted on the CPU under TRITON_INTERPRET=1)
# --------------------------------------------------------------------------------------------
def _scratch(size: int, alignment: int, stream: Optional[int]) -> torch.Tensor:
    """Global scratch for kernels that build TMA descriptors on the device (128 bytes each)."""
    on_gpu = torch.cuda.is_available() and not INTERPRETED
    return torch.empty(size, dtype=torch.int8, device="cuda" if on_gpu else "cpu")


def _launch(plans: Sequence[Launch], device: torch.device) -> None:
    if any(p.name.endswith("tma") for p in plans):
        # device-side tensor descriptors need Triton's allocator, set as Triton's tutorials do; a
        # context variable (per thread: autograd's backward may run in another), so set at each launch
        triton.set_allocator(_scratch)
    if INTERPRETED:  # CPU tensors; warps and stages mean nothing to the interpreter
        for p in plans:
            p.kernel[p.grid](**p.args, **p.constexprs)
        return
    with torch.cuda.device(device):
        for p in plans:
            p.kernel[p.grid](**p.args, **p.constexprs, num_warps=p.num_warps, num_stages=p.num_stages)


def launch_plans(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: str, block_size: Tuple[int, int],
                 scale: Optional[float] = None, backward: bool = True,
                 bwd_cfg: Optional[Dict[str, Any]] = None) -> List[Launch]:
    """The launches the op makes for these inputs (meta tensors are fine): used by the compile test.

    `bwd_cfg` replaces the default backward configuration (e.g. a sweep entry)."""
    geo = Geometry(q.shape[0], q.shape[2], q.shape[3], block_size[0], block_size[1], pattern == "long")
    scale = q.shape[1] ** -0.5 if scale is None else scale
    out = torch.empty_like(v)
    lse = torch.empty(geo.n * geo.groups, geo.tokens, device=q.device, dtype=torch.float32)
    plans = _fwd_plan(q, k, v, out, lse, geo, scale)
    if backward:
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        cfg = bwd_cfg or bwd_config(q.dtype, geo.tokens, q.shape[1], v.shape[1],
                                    is_gather(geo.long_range, q, k, v))
        ws = _dq_workspace(q, geo, cfg)
        plans += _bwd_plan(out, q, k, v, out, lse, dq, dk, dv, torch.empty_like(lse), geo, scale, cfg, ws)
    return plans


# --------------------------------------------------------------------------------------------
# The custom op: forward, backward, fake implementations and the autograd formula
# --------------------------------------------------------------------------------------------
def _forward_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, long_range: bool, block_h: int, block_w: int,
                  scale: float, config: Optional[Dict[str, int]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    geo = Geometry(q.shape[0], q.shape[2], q.shape[3], block_h, block_w, long_range)
    out = torch.empty_like(v)
    lse = torch.empty(geo.n * geo.groups, geo.tokens, device=q.device, dtype=torch.float32)
    if out.numel() and q.shape[1]:
        _launch(_fwd_plan(q, k, v, out, lse, geo, scale, config), q.device)
    elif out.numel():
        out.zero_()
    return out, lse


def _dq_workspace(q: torch.Tensor, geo: Geometry, cfg: Dict[str, Any]) -> Optional[torch.Tensor]:
    """The zeroed fp32 (group, token, Cqk) dQ accumulator of the FUSED_DQ backward (None otherwise)."""
    if not cfg.get("FUSED_DQ"):
        return None
    return torch.zeros(geo.n * geo.groups, geo.tokens, q.shape[1], device=q.device, dtype=torch.float32)


def _backward_impl(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, long_range: bool, block_h: int, block_w: int, scale: float,
                   config: Optional[Dict[str, int]] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    geo = Geometry(q.shape[0], q.shape[2], q.shape[3], block_h, block_w, long_range)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if not (out.numel() and q.shape[1]):
        return dq.zero_(), dk.zero_(), dv.zero_()
    cfg = config or bwd_config(q.dtype, geo.tokens, q.shape[1], v.shape[1], is_gather(long_range, q, k, v, do))
    delta = torch.empty_like(lse) if cfg["kind"] == "flash" else None
    ws = _dq_workspace(q, geo, cfg)
    _launch(_bwd_plan(do, q, k, v, out, lse, dq, dk, dv, delta, geo, scale, cfg, ws), q.device)
    return dq, dk, dv


# What torch.compile sees: two opaque ops with fake implementations (shapes, dtypes, memory formats).
@torch.library.custom_op("isa_triton::attention_fwd", mutates_args=())
def _attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, long_range: bool, block_h: int,
                      block_w: int, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return _forward_impl(q, k, v, long_range, block_h, block_w, scale)


@_attention_fwd_op.register_fake
def _(q, k, v, long_range, block_h, block_w, scale):
    geo = Geometry(q.shape[0], q.shape[2], q.shape[3], block_h, block_w, long_range)
    return torch.empty_like(v), q.new_empty((geo.n * geo.groups, geo.tokens), dtype=torch.float32)


@torch.library.custom_op("isa_triton::attention_bwd", mutates_args=())
def _attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      lse: torch.Tensor, long_range: bool, block_h: int, block_w: int,
                      scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_impl(do, q, k, v, out, lse, long_range, block_h, block_w, scale)


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
            out, lse = _forward_impl(q, k, v, long_range, block_h, block_w, scale, fwd_cfg)
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
            grads = _backward_impl(grad_out, q, k, v, out, lse, long_range, block_h, block_w, scale, bwd_cfg)
        return (*grads, None, None, None, None, None, None)


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: str,
                     block_size: Tuple[int, int], scale: float, fwd_cfg: Optional[Dict[str, Any]] = None,
                     bwd_cfg: Optional[Dict[str, Any]] = None) -> torch.Tensor:
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
