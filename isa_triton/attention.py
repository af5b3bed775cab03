"""The public sparse-attention op of ISA and its eager PyTorch paths.

`sparse_attention(q, k, v, pattern, block_size, scale, backend)` computes one of ISA's two
relations straight on (N, C, H, W) feature maps:

- ``pattern="long"``: every pixel attends to all pixels with the same offset inside their
  ``block_size`` block (the interlaced, dilated sub-lattice; group length (H/bh)*(W/bw)).
- ``pattern="short"``: every pixel attends to all pixels of its own block (group length bh*bw).

The eager path reproduces MMSegmentation's ISAHead permutes (spec §1.3, steps 3-5) and is the
reference every other backend is tested against. Backends: "triton" (fused kernels reading the
maps through their strides, `isa_triton.kernels`), "eager", "sdpa" (permute +
`F.scaled_dot_product_attention`) and "auto" (Triton on a CUDA GPU of compute capability 8.0+,
SDPA on other GPUs, eager on the CPU; $ISA_BACKEND overrides it).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

PATTERNS = ("long", "short")
BACKENDS = ("auto", "triton", "eager", "sdpa")


def _pair(block_size: int | Sequence[int]) -> Tuple[int, int]:
    if isinstance(block_size, int):
        return block_size, block_size
    bh, bw = block_size
    return int(bh), int(bw)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: str,
                 block_size: Tuple[int, int]) -> None:
    """Raise a ValueError naming the problem and the fix for bad attention inputs."""
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be a 4-d (N, C, H, W) tensor, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[0] != q.shape[0] or v.shape[2:] != q.shape[2:]:
        raise ValueError(f"v must share N, H, W with q: q {tuple(q.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    bh, bw = block_size
    if bh <= 0 or bw <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    h, w = q.shape[2:]
    if h % bh or w % bw:
        raise ValueError(
            f"H, W = {h}, {w} must be multiples of block_size {block_size}: zero-pad the feature map "
            f"first (ISAHead pads to ({-(-h // bh) * bh}, {-(-w // bw) * bw}))")


def to_groups(x: torch.Tensor, pattern: str, block_size: Tuple[int, int]) -> torch.Tensor:
    """(N, C, H, W) -> (N * groups, tokens, C) in MMSegmentation's group and token order."""
    n, c, h, w = x.shape
    bh, bw = block_size
    gh, gw = h // bh, w // bw
    x = x.view(n, c, gh, bh, gw, bw)
    if pattern == "long":
        # groups (n, lh, lw), tokens (gh, gw): spec step 3, permute (0,3,5,1,2,4) then to tokens
        return x.permute(0, 3, 5, 2, 4, 1).reshape(n * bh * bw, gh * gw, c)
    # groups (n, gh, gw), tokens (lh, lw): spec step 4
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n * gh * gw, bh * bw, c)


def from_groups(x: torch.Tensor, pattern: str, block_size: Tuple[int, int], n: int, h: int,
                w: int) -> torch.Tensor:
    """Inverse of `to_groups`: (N * groups, tokens, C) -> (N, C, H, W)."""
    bh, bw = block_size
    gh, gw = h // bh, w // bw
    c = x.shape[-1]
    if pattern == "long":
        x = x.view(n, bh, bw, gh, gw, c).permute(0, 5, 3, 1, 4, 2)  # (n, c, gh, lh, gw, lw)
    else:
        x = x.view(n, gh, gw, bh, bw, c).permute(0, 5, 1, 3, 2, 4)  # (n, c, gh, lh, gw, lw)
    return x.reshape(n, c, h, w)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: str,
                    block_size: Tuple[int, int], scale: float) -> torch.Tensor:
    """MMSegmentation-style reference: permute, matmul, softmax, matmul, permute back."""
    n, _, h, w = q.shape
    qg, kg, vg = (to_groups(t, pattern, block_size) for t in (q, k, v))
    sim = torch.matmul(qg, kg.transpose(1, 2)) * scale  # (B, L, L)
    attn = sim.softmax(dim=-1)
    out = torch.matmul(attn, vg)  # (B, L, Cv)
    return from_groups(out, pattern, block_size, n, h, w)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: str,
                   block_size: Tuple[int, int], scale: float) -> torch.Tensor:
    """Permute + `F.scaled_dot_product_attention` (flash / memory-efficient where PyTorch has them)."""
    n, _, h, w = q.shape
    qg, kg, vg = (to_groups(t, pattern, block_size) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qg, kg, vg, scale=scale)
    return from_groups(out, pattern, block_size, n, h, w)


def resolve_backend(backend: str, device: torch.device, dtype: Optional[torch.dtype] = None,
                    gather: bool = False) -> str:
    """Pick the concrete backend for `backend` ('auto' honours $ISA_BACKEND).

    'auto' is the fused Triton kernels where they were measured faster (H100, BENCHMARKS.md): a
    CUDA GPU of compute capability 8.0+, fp16 or bf16 inputs, and for the long-range pattern
    channels_last inputs (`gather=False`). Elsewhere it is the eager path, which beat SDPA at every
    ISA shape on the H100 and on the CPU: fp32 Triton kernels use exact FMA dot products (an
    accuracy path, about 2x slower than cuBLAS), and NCHW long-range groups need element gathers.
    Setting TRITON_INTERPRET=1 does not change 'auto': the interpreter is only for testing the
    kernels with backend='triton'.
    """
    if backend == "auto":
        backend = os.environ.get("ISA_BACKEND", "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r} (check $ISA_BACKEND)")
    if backend != "auto":
        return backend
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and not gather:
        from . import kernels

        if kernels.cuda_supported(device):
            return "triton"
    return "eager"


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: str,
                     block_size: int | Sequence[int] = (8, 8), scale: Optional[float] = None,
                     backend: str = "auto") -> torch.Tensor:
    """ISA's long- or short-range attention on (N, C, H, W) maps; returns (N, Cv, H, W).

    Example:
        >>> q = k = torch.randn(1, 16, 16, 16); v = torch.randn(1, 32, 16, 16)
        >>> sparse_attention(q, k, v, "long", (8, 8)).shape
        torch.Size([1, 32, 16, 16])
    """
    block = _pair(block_size)
    check_inputs(q, k, v, pattern, block)
    if scale is None:
        scale = q.shape[1] ** -0.5
    gather = pattern == "long" and any(t.stride(1) != 1 for t in (q, k, v))
    name = resolve_backend(backend, q.device, q.dtype, gather)
    if name == "triton":
        from .kernels import triton_attention

        return triton_attention(q, k, v, pattern, block, scale)
    if name == "sdpa":
        return sdpa_attention(q, k, v, pattern, block, scale)
    return eager_attention(q, k, v, pattern, block, scale)
