"""The compiled sparsek:: operators: loading, fake (meta) kernels, backend discovery (autograd: csrc/autograd.cpp)."""

from __future__ import annotations

import torch

from ._geometry import query_block_range, selection_width

try:
    from . import _C  # noqa: F401  (importing registers torch.ops.sparsek.*)

    LOAD_ERROR: Exception | None = None
except ImportError as exc:  # not built: everything falls back to the reference
    _C = None
    LOAD_ERROR = exc


def _discover_backends() -> frozenset[str]:
    if _C is None:
        return frozenset()
    backends = {"cpu"}
    if torch._C._dispatch_has_kernel_for_dispatch_key("sparsek::fwd", "CUDA"):
        backends.add("cuda")
    return frozenset(backends)


# Fixed once the extension is loaded; a constant, so torch.compile can trace the dispatch on it.
BACKENDS = _discover_backends()


def compiled_backends() -> set[str]:
    """Device types with a compiled SparseK kernel loaded, e.g. ``{"cpu"}`` or ``{"cpu", "cuda"}``."""
    return set(BACKENDS)


def _selection_like(scores: torch.Tensor, num_queries: int, budget: int, window: int, sinks: int, block_q: int):
    batch, heads, num_keys = scores.shape
    _, blocks = query_block_range(num_queries, num_keys, block_q)
    width = selection_width(num_queries, num_keys, budget, window, sinks, block_q)
    return (
        scores.new_empty((batch, heads, blocks, width), dtype=torch.int32),
        scores.new_empty((batch, heads, blocks, width), dtype=torch.float32),
        scores.new_empty((batch, heads, blocks), dtype=torch.int32),
        scores.new_empty((batch, heads, blocks), dtype=torch.float64),
        scores.new_empty((batch, heads, blocks), dtype=torch.int32),
    )


if _C is not None:

    @torch.library.register_fake("sparsek::select")
    def _select_fake(scores, key_valid, num_queries, budget, window, sinks, block_q, soft):
        return _selection_like(scores, num_queries, budget, window, sinks, block_q)

    @torch.library.register_fake("sparsek::fwd")
    def _fwd_fake(q, k, v, scores, key_valid, budget, window, sinks, block_q, scale, soft):
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = q.new_empty(q.shape[:3], dtype=torch.float32)
        return (out, lse, *_selection_like(scores, q.shape[2], budget, window, sinks, block_q))

    @torch.library.register_fake("sparsek::bwd")
    def _bwd_fake(dout, q, k, v, out, lse, scores, key_valid, idx, gate, count, tau, nfrac, window, sinks,
                  block_q, scale, soft, scores_grad):
        return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(scores))

    # Autograd of sparsek::fwd is registered in C++ (csrc/autograd.cpp): one C++ call per forward.
