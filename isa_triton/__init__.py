"""Fused Triton kernels for ISANet's interlaced sparse self-attention, with eager fallbacks."""
from .attention import BACKENDS, PATTERNS, sparse_attention

__all__ = ["sparse_attention", "BACKENDS", "PATTERNS"]
