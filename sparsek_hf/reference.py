"""Pure-PyTorch SparseK attention: SPEC.md written as plainly as possible.

This is the fallback where no compiled kernel serves the input's device (and the float64 path),
and the partner of the independent oracle in the tests. It favours clarity over speed: the
selection is computed for every query block at once on dense ``[..., blocks, keys]`` tensors and
the threshold by bisection, so memory grows like ``blocks * keys``. It is differentiable in q, k, v
and the scores, with exact gradients (``torch.autograd.gradcheck`` in float64 is its test).
"""

from __future__ import annotations

import math

import torch

from ._geometry import query_block_range

# Bisection halves a bracket of width 1 until it stops moving (adjacent doubles, about 53 steps
# for scores of order 1); 200 is a cap for huge scores.
_BISECTION_STEPS = 200
# Rows of queries attended at once, so the dense bias of a long input stays bounded in memory.
_MAX_BIAS_ELEMENTS = 1 << 26


def _candidate_mask(
    scores: torch.Tensor, key_valid: torch.Tensor | None, block_starts: torch.Tensor, window: int, sinks: int
) -> torch.Tensor:
    """C(p0) of SPEC.md for every block: [B, Hkv, T, Nk] bool."""
    batch, heads, num_keys = scores.shape
    j = torch.arange(num_keys, device=scores.device)
    cand = (j >= sinks) & (j[None, :] <= (block_starts - window)[:, None])  # [T, Nk]
    cand = cand.expand(batch, heads, *cand.shape)
    if key_valid is not None:
        cand = cand & key_valid[:, None, None, :]
    return cand


def _solve_threshold(u: torch.Tensor, cand: torch.Tensor, kth: torch.Tensor, budget: int) -> torch.Tensor:
    """tau with sum_{cand} clip(u - tau, 0, 1) = budget, differentiable in u.

    The root lies in [u_(K) - 1, u_(K)) where u_(K) is the K-th largest candidate score. Bisection
    (no gradient) finds the linear piece of the piecewise-linear sum that holds the root; the root
    is then re-solved on that piece, tau = (sum_F u + |A| - K) / |F|, which carries the exact
    derivative d tau / d u_j = 1 / |F| on the fractional set F (SPEC.md "Gradients").
    """
    with torch.no_grad():
        x = torch.where(cand, u, -math.inf)
        lo, hi = kth - 1.0, kth.clone()
        for _ in range(_BISECTION_STEPS):
            mid = 0.5 * (lo + hi)
            enough = (x - mid[..., None]).clamp(0.0, 1.0).sum(-1) >= budget
            new_lo, new_hi = torch.where(enough, mid, lo), torch.where(enough, hi, mid)
            if torch.equal(new_lo, lo) and torch.equal(new_hi, hi):
                break  # every bracket is down to adjacent doubles
            lo, hi = new_lo, new_hi
        excess = u - lo[..., None]
        ones = cand & (excess >= 1.0)
        frac = cand & (excess > 0.0) & (excess < 1.0)
        nfrac = frac.sum(-1)
    solved = ((u * frac).sum(-1) + ones.sum(-1) - budget) / nfrac.clamp(min=1)
    return torch.where(nfrac > 0, solved, lo)


def sparsek_gates(
    scores: torch.Tensor,
    num_queries: int,
    *,
    budget: int,
    window: int,
    sinks: int = 0,
    block_q: int = 64,
    soft: bool = True,
    key_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The selection of every query block of the call.

    Returns ``(selected, gate, tau)``: ``selected`` [B, Hkv, T, Nk] bool is Sel(p0), ``gate``
    [B, Hkv, T, Nk] float64 its gates (zero off Sel; differentiable in the scores in soft mode), and
    ``tau`` [B, Hkv, T] float64 the threshold (-inf for blocks with at most ``budget`` candidates,
    +inf for ``budget == 0`` with candidates).
    """
    num_keys = scores.shape[-1]
    first, count = query_block_range(num_queries, num_keys, block_q)
    block_starts = (first + torch.arange(count, device=scores.device)) * block_q
    cand = _candidate_mask(scores, key_valid, block_starts, window, sinks)
    u = scores.to(torch.float64)[:, :, None, :].expand(cand.shape)
    num_cand = cand.sum(-1)

    # Rank candidates by (score, position), both descending: sort the key axis reversed, stably.
    x = torch.where(cand, u, -math.inf).detach()
    _, order_rev = torch.sort(x.flip(-1), dim=-1, descending=True, stable=True)
    order = num_keys - 1 - order_rev
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(num_keys, device=scores.device).expand_as(order))
    selected = cand & (rank < budget)

    overfull = num_cand > budget
    if 0 < budget <= num_keys:
        kth = torch.gather(x, -1, order[..., budget - 1 : budget]).squeeze(-1)
        kth = torch.where(overfull, kth, 0.0)
        tau = _solve_threshold(u, cand, kth, budget)
    else:  # budget 0 (nothing is selected) or more than there are keys (never overfull)
        tau = torch.full(num_cand.shape, math.inf, dtype=torch.float64, device=scores.device)
    tau = torch.where(overfull, tau, -math.inf)

    if soft:
        # clip(u - tau, 0, 1), with a gradient only strictly inside (0, 1): at a kink (u - tau exactly
        # 0 or 1) the derivative is taken as 0, like the kernels do.
        excess = u - torch.where(overfull, tau, 0.0)[..., None]
        fixed = excess.detach()
        inside = (fixed > 0.0) & (fixed < 1.0)
        gate_value = torch.where(inside, excess, (fixed >= 1.0).to(excess.dtype))
        gate_value = torch.where(overfull[..., None], gate_value, 1.0)
    else:
        gate_value = torch.ones_like(u)
    gate = torch.where(selected, gate_value, 0.0)
    return selected, gate, tau.detach()


def sparsek_bias(
    scores: torch.Tensor,
    num_queries: int,
    *,
    budget: int,
    window: int,
    sinks: int = 0,
    block_q: int = 64,
    soft: bool = True,
    key_valid: torch.Tensor | None = None,
    rows: slice | None = None,
) -> torch.Tensor:
    """The additive bias of SPEC.md, [B, Hkv, Nq, Nk] float64: log gate on A(p), -inf elsewhere.

    ``rows`` limits the result to a slice of the query rows (the gates are computed all the same).
    """
    selected, gate, _ = sparsek_gates(
        scores, num_queries, budget=budget, window=window, sinks=sinks, block_q=block_q, soft=soft, key_valid=key_valid
    )
    return _bias_rows(selected, gate, scores.shape[-1], num_queries, window, sinks, block_q, key_valid, rows)


def _bias_rows(selected, gate, num_keys, num_queries, window, sinks, block_q, key_valid, rows):
    device = gate.device
    first, _ = query_block_range(num_queries, num_keys, block_q)
    r = torch.arange(num_queries, device=device)[rows if rows is not None else slice(None)]
    pos = num_keys - num_queries + r
    block = pos // block_q
    block_start = block * block_q
    j = torch.arange(num_keys, device=device)
    causal = j[None, :] <= pos[:, None]
    dense = causal & ((j[None, :] > (block_start - window)[:, None]) | (j[None, :] < sinks))  # [n, Nk]
    dense = dense.expand(gate.shape[0], gate.shape[1], *dense.shape)
    if key_valid is not None:
        dense = dense & key_valid[:, None, None, :]
    sel_rows = selected[:, :, block - first, :]
    gate_rows = gate[:, :, block - first, :]
    log_gate = torch.log(torch.where(sel_rows, gate_rows, 1.0))
    bias = torch.where(sel_rows, log_gate, torch.where(dense, 0.0, -math.inf))
    return bias


def _attend(q, k, v, bias, scale):
    """Softmax attention with an additive bias; rows with no finite bias give zeros and lse -inf."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale + bias
    m = s.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0)
    p = torch.exp(s - m)
    denom = p.sum(-1, keepdim=True)
    out = torch.matmul(p, v) / torch.where(denom > 0, denom, 1.0)
    lse = (m + torch.log(denom)).squeeze(-1)
    return out, lse.detach()


def sparsek_attention_reference(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseK attention, (out [B, Hq, Nq, D] in q's dtype, lse [B, Hq, Nq] float32).

    Computes in float64 for float64 inputs and in float32 otherwise. ``lse`` carries no gradient.
    """
    batch, q_heads, num_queries, head_dim = q.shape
    kv_heads, num_keys = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32

    selected, gate, _ = sparsek_gates(
        scores, num_queries, budget=budget, window=window, sinks=sinks, block_q=block_q, soft=soft, key_valid=key_valid
    )
    qc = q.to(compute)
    kc = k.to(compute).repeat_interleave(group, dim=1)
    vc = v.to(compute).repeat_interleave(group, dim=1)

    rows_per_chunk = max(1, _MAX_BIAS_ELEMENTS // max(1, batch * q_heads * num_keys))
    outs, lses = [], []
    for start in range(0, num_queries, rows_per_chunk):
        rows = slice(start, min(num_queries, start + rows_per_chunk))
        bias = _bias_rows(selected, gate, num_keys, num_queries, window, sinks, block_q, key_valid, rows)
        bias = bias.to(compute).repeat_interleave(group, dim=1)
        out, lse = _attend(qc[:, :, rows], kc, vc, bias, scale)
        outs.append(out)
        lses.append(lse)
    if not outs:  # zero queries
        return q.new_zeros(q.shape), q.new_zeros((batch, q_heads, 0), dtype=torch.float32)
    out = torch.cat(outs, dim=2).to(q.dtype)
    lse = torch.cat(lses, dim=2).to(torch.float32)
    return out, lse
