"""``sparsek_attention``: the one function every integration calls."""

from __future__ import annotations

import warnings

import torch

from . import _ops
from ._validation import check_attention
from .reference import sparsek_attention_reference

_CUDA_HEAD_DIMS = (64, 128)
_fallback_warned = False


def kernel_supports(q: torch.Tensor) -> bool:
    """Whether a compiled kernel serves q's device, dtype and head dim."""
    device = q.device.type
    if device not in _ops.BACKENDS:
        return False
    if device == "cpu":
        return q.dtype in (torch.float32, torch.bfloat16, torch.float16)
    if device == "cuda":
        return q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in _CUDA_HEAD_DIMS
    return False


def _warn_fallback(q: torch.Tensor) -> None:
    global _fallback_warned
    if _fallback_warned:
        return
    _fallback_warned = True
    reason = (
        f"sparsek_hf was installed without compiled kernels ({_ops.LOAD_ERROR})"
        if _ops.LOAD_ERROR is not None
        else f"no compiled SparseK kernel takes {q.device.type} {q.dtype} with head dim {q.shape[-1]}"
    )
    warnings.warn(
        f"{reason}; using the pure-PyTorch reference, which is exact but slow and uses memory that grows "
        "like Nq * Nk. This warning is shown once per process.",
        RuntimeWarning,
        stacklevel=3,
    )


def sparsek_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scores: torch.Tensor,
    *,
    budget: int,
    window: int,
    sinks: int = 0,
    block_q: int = 64,
    scale: float | None = None,
    soft: bool = True,
    key_valid: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """SparseK attention (SPEC.md): each query block attends sinks + a local window + the ``budget``
    highest-scoring earlier keys, gated by the differentiable SparseK mask.

    Args:
        q: [B, Hq, Nq, D]; k, v: [B, Hkv, Nk, D] with Hq % Hkv == 0 (GQA). Query r sits at position
            Nk - Nq + r, so Nq < Nk is decoding or chunked prefill. Any strides.
        scores: [B, Hkv, Nk] float32, one score per key and kv head (see ``sparsek_hf.scorer``).
        budget, window, sinks: selected keys per query block, local window, attention sinks.
        block_q: queries of one block share one selection (1 = per token).
        scale: softmax scale, default D ** -0.5.
        soft: SparseK soft gates (True) or a hard top-k gate of 1 (False).
        key_valid: optional [B, Nk] bool; False keys (padding) are never attended.
        return_lse: also return the row log-sum-exp [B, Hq, Nq] float32 (no gradient).

    Returns ``out`` [B, Hq, Nq, D] in q's dtype (or ``(out, lse)``), differentiable in q, k, v and
    scores. float64 inputs, and devices or dtypes without a compiled kernel, use the reference.
    """
    check_attention(q, k, v, scores, key_valid, budget, window, sinks, block_q, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    soft = bool(soft)
    if kernel_supports(q):
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        out, lse, *_ = torch.ops.sparsek.fwd(q, k, v, scores, key_valid, budget, window, sinks, block_q, scale, soft)
    else:
        if q.dtype != torch.float64:
            _warn_fallback(q)
        out, lse = sparsek_attention_reference(
            q, k, v, scores, budget=budget, window=window, sinks=sinks, block_q=block_q, scale=scale, soft=soft,
            key_valid=key_valid,
        )
    return (out, lse) if return_lse else out
