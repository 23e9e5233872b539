"""CUDA kernels (csrc/cuda): selection vs the CPU kernel, attention vs the float64 oracle and the CPU
kernel, gradients vs the reference. Skipped on machines without a GPU."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import oracle
import sparsek_hf
from sparsek_hf import sparsek_attention
from sparsek_hf.api import kernel_supports

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _scores(gen, batch, heads, n, kind):
    u = torch.randn(batch, heads, n, generator=gen)
    if kind == "slope":  # recent keys score higher, plus noise: the scorer's initialisation
        u = 0.01 * torch.arange(n).float() + 0.3 * u
    elif kind == "ties":
        u = (u * 2).round() / 2
    return u


def _inputs(seed, batch, q_heads, kv_heads, nq, nk, d, dtype, kind="randn", padding=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, nq, d, generator=gen)
    k = torch.randn(batch, kv_heads, nk, d, generator=gen)
    v = torch.randn(batch, kv_heads, nk, d, generator=gen)
    u = _scores(gen, batch, kv_heads, nk, kind)
    valid = None
    if padding:
        valid = torch.rand(batch, nk, generator=gen) > 0.2
    return q.to(dtype), k.to(dtype), v.to(dtype), u, valid


def _cuda(*ts):
    return [None if t is None else t.cuda() for t in ts]


def test_cuda_backend_is_compiled():
    assert "cuda" in sparsek_hf.compiled_backends()


SELECT_CASES = [
    # batch, kv heads, nk, nq, budget, window, sinks, block_q, soft, score kind, padding
    (2, 2, 700, 700, 37, 50, 3, 16, True, "randn", False),
    (1, 2, 300, 300, 20, 8, 0, 1, True, "randn", False),
    (1, 3, 1000, 1, 100, 64, 4, 64, True, "slope", False),
    (2, 1, 900, 77, 64, 32, 2, 32, True, "randn", True),
    (1, 2, 500, 500, 0, 16, 1, 16, True, "randn", False),
    (1, 2, 400, 400, 1000, 16, 1, 16, True, "randn", False),
    (1, 2, 600, 600, 50, 0, 0, 8, False, "ties", False),
    (1, 2, 20000, 20000, 2048, 512, 4, 64, True, "randn", False),
    (1, 2, 20000, 20000, 2048, 512, 4, 64, True, "ties", False),  # ties through every radix pass
    (1, 1, 30000, 30000, 700, 100, 4, 64, True, "slope", True),
]


def _near_kink(u, valid, tau, nq, nk, window, sinks, block_q, eps=1e-9):
    """[B, Hkv, T] bool: some candidate of the block has u - tau within eps of 0 or 1."""
    first = (nk - nq) // block_q
    blocks = tau.shape[-1]
    p0 = (first + torch.arange(blocks)) * block_q
    j = torch.arange(nk)
    cand = (j >= sinks) & (j[None, :] <= (p0 - window)[:, None])  # [T, Nk]
    if valid is not None:
        cand = cand[None] & valid[:, None, :]  # [B, T, Nk]
        cand = cand[:, None]
    excess = u.double()[:, :, None, :] - tau[..., None]
    near = ((excess.abs() < eps) | ((excess - 1).abs() < eps)) & cand
    return near.any(-1)


@pytest.mark.parametrize("row_sorts", [False, True], ids=["packed_sorts", "row_sorts"])
@pytest.mark.parametrize("case", SELECT_CASES)
def test_select_matches_cpu(case, row_sorts, monkeypatch):
    # row_sorts: the ATen row-by-row sorts that shapes too large for the packed radix sort and the
    # per-tile block sort take (forced through the environment, read on every call).
    if row_sorts:
        monkeypatch.setenv("SPARSEK_CUDA_ROW_SORTS", "1")
    batch, heads, nk, nq, budget, window, sinks, block_q, soft, kind, padding = case
    gen = torch.Generator().manual_seed(nk + budget)
    u = _scores(gen, batch, heads, nk, kind)
    valid = (torch.rand(batch, nk, generator=gen) > 0.2) if padding else None
    args = (nq, budget, window, sinks, block_q, soft)
    cpu = torch.ops.sparsek.select(u, valid, *args)
    gpu = torch.ops.sparsek.select(u.cuda(), None if valid is None else valid.cuda(), *args)
    idx, gate, count, tau, nfrac = (t.cpu() for t in gpu)
    assert torch.equal(count, cpu[2])
    assert torch.equal(idx, cpu[0])
    assert torch.equal(torch.isinf(tau), torch.isinf(cpu[3]))
    finite = torch.isfinite(cpu[3])
    assert torch.allclose(tau[finite], cpu[3][finite], rtol=1e-12, atol=1e-9)
    assert torch.equal(tau[~finite], cpu[3][~finite])
    # |F| agrees except where tau sits on a kink (u - tau = 0 or 1 up to rounding): there the
    # summation order of either backend decides, and the derivative is undefined anyway.
    degenerate = _near_kink(u, valid, tau, nq, nk, window, sinks, block_q)
    assert torch.equal(nfrac[~degenerate], cpu[4][~degenerate])
    assert (degenerate.float().mean() < 0.05).item()
    assert torch.allclose(gate, cpu[1], atol=1e-6, rtol=0)
    # tau never decreases over blocks
    assert (tau[..., 1:] >= tau[..., :-1]).all()


ORACLE_CASES = [
    # batch, hq, hkv, nq, nk, budget, window, sinks, block_q, soft, kind, padding
    (1, 4, 2, 160, 160, 24, 16, 2, 16, True, "randn", False),
    (2, 2, 2, 130, 130, 10, 0, 0, 8, True, "ties", False),
    (1, 4, 1, 1, 200, 30, 20, 3, 16, True, "slope", False),
    (1, 8, 2, 37, 190, 16, 24, 1, 32, False, "randn", True),
    (1, 2, 1, 200, 200, 12, 8, 2, 1, True, "randn", False),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("case", ORACLE_CASES)
def test_forward_matches_oracle(case, head_dim, dtype):
    batch, hq, hkv, nq, nk, budget, window, sinks, block_q, soft, kind, padding = case
    q, k, v, u, valid = _inputs(7 * nk + head_dim, batch, hq, hkv, nq, nk, head_dim, dtype, kind, padding)
    opts = dict(budget=budget, window=window, sinks=sinks, block_q=block_q, soft=soft)
    out, lse = sparsek_attention(*_cuda(q, k, v, u), key_valid=None if valid is None else valid.cuda(),
                                 return_lse=True, **opts)
    ref_out, ref_lse = oracle.attention(q, k, v, u, key_valid=valid, **opts)
    assert out.dtype == dtype and out.is_cuda
    assert oracle.rel_err(out, ref_out) < 1e-2
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    assert (lse.cpu().double()[finite] - ref_lse[finite]).abs().max() < 2e-2


CPU_CASES = [
    # batch, hq, hkv, nq, nk, budget, window, sinks, block_q, kind, padding
    (1, 8, 2, 3000, 3000, 300, 128, 4, 64, "randn", False),  # 256-row CTAs
    (1, 16, 2, 1200, 1200, 200, 64, 4, 64, "slope", True),  # 512 rows: two row chunks
    (1, 4, 1, 6000, 6000, 5000, 64, 4, 64, "randn", False),  # 5000-key lists: the K / V ring wraps many times
    (2, 8, 2, 1, 5000, 1024, 256, 4, 64, "randn", False),  # decode: split keys across CTAs
    (1, 8, 4, 5, 4000, 512, 128, 0, 16, "slope", False),  # short chunk, split
    (1, 4, 4, 700, 700, 64, 32, 2, 7, "randn", False),  # block_q not a power of two
]


@pytest.mark.parametrize("case", CPU_CASES)
def test_forward_matches_cpu_kernel(case):
    batch, hq, hkv, nq, nk, budget, window, sinks, block_q, kind, padding = case
    q, k, v, u, valid = _inputs(nk + nq, batch, hq, hkv, nq, nk, 128, torch.bfloat16, kind, padding)
    opts = dict(budget=budget, window=window, sinks=sinks, block_q=block_q)
    out, lse = sparsek_attention(*_cuda(q, k, v, u), key_valid=None if valid is None else valid.cuda(),
                                 return_lse=True, **opts)
    ref, ref_lse = sparsek_attention(q.float(), k.float(), v.float(), u, key_valid=valid, return_lse=True, **opts)
    assert oracle.rel_err(out, ref) < 1e-2
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    assert (lse.cpu()[finite] - ref_lse[finite]).abs().max() < 2e-2


def test_full_window_is_causal_attention():
    q, k, v, u, _ = _inputs(3, 1, 8, 2, 1000, 1000, 128, torch.bfloat16)
    q, k, v, u = _cuda(q, k, v, u)
    out = sparsek_attention(q, k, v, u, budget=16, window=1000, sinks=0, block_q=64)
    ref = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(4, 1),
                                         v.float().repeat_interleave(4, 1), is_causal=True)
    assert oracle.rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_growing_logits_move_the_running_max(dtype):
    """Keys whose norm grows with position: each row's max passes the forward's rescale slack
    (2^8) many times over its key list, so the conditional rescale of the accumulator runs, in
    tiles with and without the causal mask; out, lse and the gradients that use lse must hold."""
    q, k, v, u, _ = _inputs(5, 1, 8, 2, 1500, 1500, 128, torch.float32)
    ramp = 1 + 0.01 * torch.arange(1500).float()
    k = (k * ramp[:, None]).to(dtype)
    q, v = q.to(dtype), v.to(dtype)
    scores = (q.double() @ k.double().repeat_interleave(4, 1).transpose(-1, -2)) / math.sqrt(128)
    assert scores.amax().item() - scores[..., :64].amax().item() > 16 * math.log(2)  # the test bites
    opts = dict(budget=200, window=64, sinks=4, block_q=64)
    out, lse = sparsek_attention(*_cuda(q, k, v, u), return_lse=True, **opts)
    ref_out, ref_lse = oracle.attention(q, k, v, u, **opts)
    assert oracle.rel_err(out, ref_out) < 1e-2
    assert (lse.cpu().double() - ref_lse).abs().max() < 2e-2
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    got = _grads(*_cuda(q, k, v, u), None, dout.cuda(), **opts)
    ref = _grads(q.float(), k.float(), v.float(), u, None, dout.float(), **opts)
    for name, g, r in zip(("q", "k", "v", "scores"), got, ref):
        assert oracle.rel_err(g, r) < 2e-2, name


def _grads(q, k, v, u, valid, dout, **opts):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, u)]
    out = sparsek_attention(*leaves, key_valid=valid, **opts)
    out.backward(dout)
    return [t.grad for t in leaves]


GRAD_CASES = [
    # batch, hq, hkv, nq, nk, budget, window, sinks, block_q, soft, kind, padding
    (1, 8, 2, 1500, 1500, 200, 64, 4, 64, True, "randn", False),
    (1, 16, 2, 700, 700, 100, 32, 2, 64, True, "slope", True),  # 2 row chunks of 256 in the backward
    (2, 4, 4, 600, 600, 80, 16, 0, 16, False, "randn", False),
    (1, 4, 2, 3, 900, 100, 64, 4, 32, True, "randn", False),
    (1, 4, 1, 3000, 3000, 2500, 64, 4, 64, True, "randn", False),  # 2631-key lists: 41 tiles and 7 keys
    (1, 8, 2, 700, 700, 129, 4, 2, 8, True, "randn", False),  # 142-key lists: a 14-key last tile with 3 of Sel
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("case", GRAD_CASES)
def test_gradients_match_cpu_kernel(case, head_dim, dtype):
    batch, hq, hkv, nq, nk, budget, window, sinks, block_q, soft, kind, padding = case
    q, k, v, u, valid = _inputs(nk * 3 + head_dim, batch, hq, hkv, nq, nk, head_dim, dtype, kind, padding)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q.dtype)
    opts = dict(budget=budget, window=window, sinks=sinks, block_q=block_q, soft=soft)
    got = _grads(*_cuda(q, k, v, u), None if valid is None else valid.cuda(), dout.cuda(), **opts)
    ref = _grads(q.float(), k.float(), v.float(), u, valid, dout.float(), **opts)
    for name, g, r in zip(("q", "k", "v", "scores"), got, ref):
        if name == "scores" and not soft:
            assert (g == 0).all()
            continue
        assert oracle.rel_err(g, r) < 2e-2, name


def test_gradients_match_float64_reference():
    q, k, v, u, valid = _inputs(11, 1, 4, 2, 96, 96, 64, torch.bfloat16, "randn", True)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(q.dtype)
    opts = dict(budget=12, window=8, sinks=2, block_q=8)
    got = _grads(*_cuda(q, k, v, u), valid.cuda(), dout.cuda(), **opts)
    ref = _grads(q.double(), k.double(), v.double(), u.double(), valid, dout.double(), **opts)
    for name, g, r in zip(("q", "k", "v", "scores"), got, ref):
        assert oracle.rel_err(g, r) < 2e-2, name


def test_outputs_are_written_and_finite_on_fresh_memory():
    # Fill the caching allocator with NaN so that an unwritten element shows.
    junk = torch.full((64 << 20,), math.nan, device="cuda")
    del junk
    q, k, v, u, valid = _inputs(9, 1, 8, 2, 777, 777, 128, torch.float16, "randn", True)
    out, lse = sparsek_attention(*_cuda(q, k, v, u), key_valid=valid.cuda(), budget=50, window=40, sinks=3,
                                 block_q=32, return_lse=True)
    assert torch.isfinite(out).all()
    assert not torch.isnan(lse).any()


def test_unsupported_head_dim_is_a_clear_error_and_falls_back():
    q, k, v, u, _ = _inputs(5, 1, 2, 1, 64, 64, 96, torch.bfloat16)
    q, k, v, u = _cuda(q, k, v, u)
    with pytest.raises(ValueError, match="head dim 64 or 128"):
        torch.ops.sparsek.fwd(q, k, v, u, None, 8, 8, 0, 16, 96**-0.5, True)
    assert not kernel_supports(q)
    with pytest.warns(RuntimeWarning):
        sparsek_hf.api._fallback_warned = False
        out = sparsek_attention(q, k, v, u, budget=8, window=8, block_q=16)
    ref, _ = oracle.attention(q, k, v, u, budget=8, window=8, block_q=16)
    assert oracle.rel_err(out, ref) < 1e-2
