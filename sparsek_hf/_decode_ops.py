"""Fake (meta) kernels of the decode operators in csrc/decode.cpp, and their Python entry points.

``sparsek::decode_select`` and ``sparsek::decode`` compute SPEC.md over a compacted KV cache, where
slot ``c`` of a (batch, kv head) row holds the key at absolute position ``key_pos[..., c]``
(-1 = empty). They are inference-only (no autograd) and serve every device through one
ATen-ops implementation.
"""

from __future__ import annotations

import torch

from . import _ops


def available() -> bool:
    """Whether the compiled decode operators are loaded (they ship with the CPU kernels)."""
    return _ops._C is not None and hasattr(torch.ops.sparsek, "decode")


def _num_blocks(query_pos0: int, num_queries: int, block_q: int) -> int:
    return (query_pos0 + num_queries - 1) // block_q - query_pos0 // block_q + 1


if available():

    @torch.library.register_fake("sparsek::decode_select")
    def _decode_select_fake(scores, key_pos, tail_scores, query_pos0, num_queries, budget, window, sinks, block_q,
                            soft):
        batch, heads, slots = scores.shape
        blocks = _num_blocks(query_pos0, num_queries, block_q)
        return (
            scores.new_empty((batch, heads, blocks, slots)),
            scores.new_empty((batch, heads, blocks), dtype=torch.float64),
        )

    @torch.library.register_fake("sparsek::decode_attend")
    def _decode_attend_fake(q, k_cache, v_cache, key_pos, gate, query_pos0, window, sinks, block_q, scale):
        return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)

    @torch.library.register_fake("sparsek::decode")
    def _decode_fake(q, k_cache, v_cache, scores, key_pos, tail_scores, query_pos0, budget, window, sinks, block_q,
                     scale, soft):
        return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


def decode_select(
    scores: torch.Tensor,
    key_pos: torch.Tensor,
    tail_scores: torch.Tensor | None,
    *,
    query_pos0: int,
    num_queries: int,
    budget: int,
    window: int,
    sinks: int,
    block_q: int,
    soft: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate [B, Hkv, T, C] float32, tau [B, Hkv, T] float64) of the T query blocks of the call.

    ``gate`` is the SparseK gate of the slots in Sel(p0) and 0 elsewhere.
    """
    return torch.ops.sparsek.decode_select(
        scores, key_pos, tail_scores, query_pos0, num_queries, budget, window, sinks, block_q, soft
    )


def decode_attend(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key_pos: torch.Tensor,
    gate: torch.Tensor,
    *,
    query_pos0: int,
    window: int,
    sinks: int,
    block_q: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of queries at ``query_pos0 + r`` over a compacted cache, given the selection ``gate``
    [B, Hkv, T, C] of the call's T query blocks (``decode_select``'s first output).

    Returns ``(out [B, Hq, Nq, D] in q's dtype, lse [B, Hq, Nq] float32)``; no gradient.
    """
    return torch.ops.sparsek.decode_attend(q, k_cache, v_cache, key_pos, gate, query_pos0, window, sinks, block_q,
                                           float(scale))


def decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    scores: torch.Tensor,
    key_pos: torch.Tensor,
    tail_scores: torch.Tensor | None,
    *,
    query_pos0: int,
    budget: int,
    window: int,
    sinks: int,
    block_q: int,
    scale: float,
    soft: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseK attention of queries at positions ``query_pos0 + r`` over a compacted cache.

    Returns ``(out [B, Hq, Nq, D] in q's dtype, lse [B, Hq, Nq] float32)``; no gradient.
    """
    return torch.ops.sparsek.decode(
        q, k_cache, v_cache, scores, key_pos, tail_scores, query_pos0, budget, window, sinks, block_q,
        float(scale), bool(soft),
    )
