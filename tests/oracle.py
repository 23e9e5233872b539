"""The independent oracle of SPEC.md: a dense float64 bias built key by key, then float64 SDPA.

Written separately from the package on purpose (numpy loops, an exact breakpoint sweep for tau),
so the reference, the CPU kernel and the CUDA kernels are all checked against something that
shares none of their code.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def threshold(x: np.ndarray, budget: int) -> float:
    """The tau with sum clip(x - tau, 0, 1) = budget, by sweeping every breakpoint of the sum."""
    breakpoints = np.unique(np.concatenate([x, x - 1.0]))
    sums = np.clip(x[None, :] - breakpoints[:, None], 0.0, 1.0).sum(1)  # non-increasing
    for i in range(len(breakpoints) - 1):
        if sums[i] >= budget >= sums[i + 1]:
            if sums[i] == sums[i + 1]:
                return float(breakpoints[i])
            step = breakpoints[i + 1] - breakpoints[i]
            return float(breakpoints[i] + (sums[i] - budget) * step / (sums[i] - sums[i + 1]))
    raise AssertionError("no root: budget must be below the number of candidates")


def block_selection(u, valid, p0, budget, window, sinks, soft):
    """{key: gate} of Sel(p0) for one batch row and kv head."""
    cand = [j for j in range(len(u)) if sinks <= j <= p0 - window and valid[j]]
    if len(cand) <= budget:
        return {j: 1.0 for j in cand}
    ranked = sorted(cand, key=lambda j: (u[j], j), reverse=True)[:budget]
    if not ranked:
        return {}
    tau = threshold(np.array([u[j] for j in cand]), budget)
    return {j: (min(1.0, max(0.0, u[j] - tau)) if soft else 1.0) for j in ranked}


def bias(scores, num_queries, q_heads, *, budget, window, sinks=0, block_q=64, soft=True, key_valid=None):
    """Dense additive bias [B, Hq, Nq, Nk] float64: log gate on A(p), -inf elsewhere."""
    batch, kv_heads, num_keys = scores.shape
    u_all = scores.detach().double().cpu().numpy()
    valid_all = np.ones((batch, num_keys), bool) if key_valid is None else key_valid.cpu().numpy()
    out = np.full((batch, kv_heads, num_queries, num_keys), -np.inf)
    for b in range(batch):
        valid = valid_all[b]
        for h in range(kv_heads):
            u = u_all[b, h]
            cache = {}
            for r in range(num_queries):
                p = num_keys - num_queries + r
                p0 = p // block_q * block_q
                if p0 not in cache:
                    cache[p0] = block_selection(u, valid, p0, budget, window, sinks, soft)
                for j, g in cache[p0].items():
                    out[b, h, r, j] = math.log(g)
                for j in range(p + 1):
                    if valid[j] and (p0 - window < j or j < sinks):
                        out[b, h, r, j] = 0.0
    t = torch.from_numpy(out)
    return t.repeat_interleave(q_heads // kv_heads, dim=1)


def attention(q, k, v, scores, *, budget, window, sinks=0, block_q=64, scale=None, soft=True, key_valid=None):
    """(out, lse) in float64 on the CPU."""
    q64, k64, v64 = (t.detach().double().cpu() for t in (q, k, v))
    q_heads, num_queries, head_dim = q.shape[1], q.shape[2], q.shape[3]
    group = q_heads // k.shape[1]
    scale = head_dim**-0.5 if scale is None else scale
    b = bias(
        scores, num_queries, q_heads, budget=budget, window=window, sinks=sinks, block_q=block_q, soft=soft,
        key_valid=key_valid,
    )
    k64 = k64.repeat_interleave(group, dim=1)
    v64 = v64.repeat_interleave(group, dim=1)
    empty = torch.isinf(b).all(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=b.masked_fill(empty, 0.0), scale=scale)
    out = out.masked_fill(empty, 0.0)
    lse = torch.logsumexp(q64 @ k64.transpose(-1, -2) * scale + b, dim=-1)
    return out, lse


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error ||x - ref|| / ||ref||, computed in float64; NaN never passes."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(x).all():
        return math.inf
    return float((x - ref).norm() / ref.norm().clamp(min=1e-30))
