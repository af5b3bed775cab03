"""Accuracy and memory checks of the attention backends, shared by the tests, the GPU script, the demo
and the sweep.

- `forward_backward`: [out, dq, dk, dv] of one attention function for an upstream gradient.
- `errors_vs_fp64`: forward and dq, dk, dv of a backend against an fp64 eager reference, with
  the tolerance rule of flash-attention's tests: error <= 2 x eager's error in the same dtype + atol.
- `saved_bytes`: bytes autograd keeps for the backward beyond the inputs and the output (via
  `torch.autograd.graph.saved_tensors_hooks`): O(N G L) for the fused kernels, O(N G L^2) for eager.

Example:
    >>> q = k = torch.randn(1, 16, 8, 8); v = torch.randn(1, 16, 8, 8)
    >>> r = errors_vs_fp64(q, k, v, "long", (4, 4), backend="eager")
    >>> all(x["ok"] for x in r.values())
    True
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .attention import _pair, check_inputs, eager_attention, sparse_attention

# atol added to 2 x eager's max error (GPU; the CPU interpreter tests use their own)
ATOL = {torch.float32: 1e-5, torch.float16: 5e-4, torch.bfloat16: 4e-3}


def forward_backward(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], q: torch.Tensor,
                     k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor) -> List[torch.Tensor]:
    """[out, dq, dk, dv] of `fn(q, k, v)` for upstream gradient `grad` (on fresh leaves: q, k, v untouched).

    Example:
        >>> q = torch.randn(1, 4, 4, 4)
        >>> out, dq, dk, dv = forward_backward(lambda a, b, c: a * b + c, q, q, q, torch.ones_like(q))
        >>> bool((dv == 1).all())
        True
    """
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves]


def reference_fp64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: str, block: Tuple[int, int],
                   scale: float, grad: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """[out, dq, dk, dv] of eager attention in fp64, and of eager attention in the inputs' dtype."""
    def eager(a, b, c):
        return eager_attention(a, b, c, pattern, block, scale)

    ref = forward_backward(eager, q.double(), k.double(), v.double(), grad.double())
    return ref, forward_backward(eager, q, k, v, grad)


def compare(got: Sequence[Optional[torch.Tensor]], ref: Sequence[torch.Tensor], base: Sequence[torch.Tensor],
            atol: float) -> Dict[str, Dict]:
    """Error of each of [out, dq, dk, dv] in `got` (None: not computed) against the fp64 `ref`,
    within 2 x the same-dtype eager error in `base` + atol; shape and dtype must be eager's."""
    result = {}
    for name, g, e, r in zip(("out", "dq", "dk", "dv"), got, base, ref):
        if g is None:
            continue
        if g.shape != e.shape or g.dtype != e.dtype:
            result[name] = dict(err=float("inf"), eager_err=float("nan"), bound=atol, ok=False, finite=False,
                                ref_max=float("nan"), problem=f"{tuple(g.shape)} {g.dtype}, eager: "
                                                              f"{tuple(e.shape)} {e.dtype}")
            continue
        err = (g.double() - r).abs().max().item()
        eager_err = (e.double() - r).abs().max().item()
        bound = 2 * eager_err + atol
        finite = bool(torch.isfinite(g).all().item())
        result[name] = dict(err=err, eager_err=eager_err, bound=bound, ok=bool(err <= bound) and finite,
                            finite=finite, ref_max=r.abs().max().item())
    return result


def errors_vs_fp64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: str, block: Tuple[int, int],
                   scale: Optional[float] = None, backend: str = "triton", grad: Optional[torch.Tensor] = None,
                   atol: Optional[float] = None, fwd_cfg: Optional[Any] = None,
                   bwd_cfg: Optional[Any] = None) -> Dict[str, Dict]:
    """Max abs error of out, dq, dk, dv of `backend` and of eager (same dtype) against fp64 eager.

    `fwd_cfg` / `bwd_cfg` (backend "triton" only): launch configs replacing the op's own (e.g. a
    sweep entry).
    """
    scale = q.shape[1] ** -0.5 if scale is None else scale
    if grad is None:
        gen = torch.Generator(device=q.device).manual_seed(1234)
        grad = torch.randn(v.shape, device=q.device, generator=gen).to(v.dtype)
    ref, base = reference_fp64(q, k, v, pattern, block, scale, grad)
    if fwd_cfg is None and bwd_cfg is None:
        def fn(a, b, c):
            return sparse_attention(a, b, c, pattern, block, scale, backend)
    else:
        if backend != "triton":
            raise ValueError(f"launch configs are for backend='triton', got backend={backend!r}")
        from .kernels import triton_attention

        check_inputs(q, k, v, pattern, _pair(block))

        def fn(a, b, c):
            return triton_attention(a, b, c, pattern, _pair(block), scale, fwd_cfg, bwd_cfg)
    return compare(forward_backward(fn, q, k, v, grad), ref, base, ATOL[q.dtype] if atol is None else atol)


def saved_bytes(fn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """Bytes of the tensors `fn(q, k, v)` saves for backward, not counting q, k, v and the output."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    storages = {}

    def pack(t):
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*leaves)
    for t in (*leaves, out):
        storages.pop(t.untyped_storage().data_ptr(), None)
    return int(sum(storages.values()))
