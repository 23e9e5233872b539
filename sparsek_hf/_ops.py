"""The compiled sparsek:: operators: loading, fake (meta) kernels, autograd, backend discovery."""

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

    def _fwd_setup(ctx, inputs, output):
        q, k, v, scores, key_valid, budget, window, sinks, block_q, scale, soft = inputs
        out, lse, idx, gate, count, tau, nfrac = output
        ctx.save_for_backward(q, k, v, scores, key_valid, out, lse, idx, gate, count, tau, nfrac)
        ctx.config = (window, sinks, block_q, scale, soft)
        ctx.mark_non_differentiable(lse, idx, gate, count, tau, nfrac)
        # Only out carries a gradient: no zero-filled gradients for the six other outputs.
        ctx.set_materialize_grads(False)

    def _fwd_backward(ctx, grad_out, *unused_grads):
        q, k, v, scores, key_valid, out, lse, idx, gate, count, tau, nfrac = ctx.saved_tensors
        window, sinks, block_q, scale, soft = ctx.config
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv, dscores = torch.ops.sparsek.bwd(
            grad_out.contiguous(), q, k, v, out, lse, scores, key_valid, idx, gate, count, tau, nfrac,
            window, sinks, block_q, scale, soft, bool(ctx.needs_input_grad[3]),
        )
        return dq, dk, dv, dscores, None, None, None, None, None, None, None

    torch.library.register_autograd("sparsek::fwd", _fwd_backward, setup_context=_fwd_setup)
