"""The compiled CPU kernel and the reference against the float64 oracle of SPEC.md, over every option."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import oracle
import sparsek_hf
from sparsek_hf import reference

pytestmark = pytest.mark.skipif("cpu" not in sparsek_hf.compiled_backends(), reason="CPU kernel not built")

# name: (B, Hq, Hkv, Nq, Nk, D, budget, window, sinks, block_q, soft, padding, scores)
CASES = {
    "base": (2, 4, 2, 77, 77, 16, 9, 7, 2, 8, True, False, "randn"),
    "hard": (2, 4, 2, 77, 77, 16, 9, 7, 2, 8, False, False, "randn"),
    "budget0": (1, 4, 2, 50, 50, 8, 0, 6, 3, 4, True, False, "randn"),
    "window0": (1, 2, 1, 61, 61, 8, 11, 0, 2, 8, True, False, "randn"),
    "sinks0": (1, 2, 2, 61, 61, 8, 11, 5, 0, 8, True, False, "randn"),
    "nothing_but_window": (1, 2, 1, 45, 45, 8, 0, 6, 0, 8, True, False, "randn"),
    "budget_ge_n": (2, 4, 1, 40, 40, 16, 64, 3, 1, 8, True, False, "randn"),
    "per_token": (1, 4, 2, 57, 57, 8, 7, 3, 2, 1, True, False, "randn"),
    "block_gt_n": (1, 2, 1, 30, 30, 8, 5, 2, 1, 64, True, False, "randn"),
    "decode": (2, 8, 2, 1, 93, 16, 13, 9, 4, 16, True, False, "randn"),
    "decode_hard": (2, 8, 2, 1, 93, 16, 13, 9, 4, 16, False, False, "randn"),
    "chunked_prefill": (1, 4, 2, 19, 83, 16, 10, 6, 2, 8, True, False, "randn"),
    "padding": (3, 4, 2, 64, 64, 16, 9, 5, 2, 8, True, True, "randn"),
    "padding_decode": (3, 4, 2, 1, 70, 16, 9, 5, 2, 8, True, True, "randn"),
    "ties": (1, 4, 2, 70, 70, 8, 9, 5, 1, 8, True, False, "zeros"),
    "slope_init": (1, 2, 1, 70, 70, 8, 9, 5, 1, 8, True, False, "slope"),
    "fine_slope": (1, 2, 1, 70, 70, 8, 9, 5, 1, 8, True, False, "fine_slope"),
    "mha": (1, 3, 3, 33, 33, 8, 6, 4, 1, 4, True, False, "randn"),
    "gqa4": (1, 8, 2, 33, 33, 8, 6, 4, 1, 4, True, False, "randn"),
    "head_dim_1": (1, 2, 1, 29, 29, 1, 6, 4, 1, 4, True, False, "randn"),
    "head_dim_256": (1, 2, 1, 29, 29, 256, 6, 4, 1, 4, True, False, "randn"),
    "one_key": (1, 2, 1, 1, 1, 8, 3, 0, 0, 4, True, False, "randn"),
}


def make_inputs(case, dtype=torch.float32, seed=None):
    batch, hq, hkv, nq, nk, d, budget, window, sinks, block_q, soft, padding, kind = case
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % (2**31))
    q = torch.randn(batch, hq, nq, d, generator=g).to(dtype)
    k = torch.randn(batch, hkv, nk, d, generator=g).to(dtype)
    v = torch.randn(batch, hkv, nk, d, generator=g).to(dtype)
    if kind == "zeros":
        scores = torch.zeros(batch, hkv, nk)
    elif kind == "slope":
        scores = torch.arange(nk, dtype=torch.float32).expand(batch, hkv, nk).contiguous()
    elif kind == "fine_slope":
        scores = (0.05 * torch.arange(nk, dtype=torch.float32)).expand(batch, hkv, nk).contiguous()
    else:
        scores = 1.5 * torch.randn(batch, hkv, nk, generator=g)
    key_valid = None
    if padding:
        key_valid = torch.rand(batch, nk, generator=g) > 0.25
        key_valid[0] = True  # one row without padding
        key_valid[-1, : nk // 3] = False  # left padding
    opts = dict(budget=budget, window=window, sinks=sinks, block_q=block_q, soft=soft, key_valid=key_valid)
    return q, k, v, scores, opts


def max_abs(x: torch.Tensor) -> float:
    return x.abs().max().item() if x.numel() else 0.0


def assert_close_to_oracle(out, lse, q, k, v, scores, opts, tol):
    ref_out, ref_lse = oracle.attention(q, k, v, scores, **opts)
    if ref_out.norm() > 0:
        assert oracle.rel_err(out, ref_out) < tol
    else:
        assert out.abs().max() == 0
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert max_abs(lse.double()[finite] - ref_lse[finite]) < 10 * tol


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_forward_matches_oracle_fp32(name):
    q, k, v, scores, opts = make_inputs(CASES[name])
    out, lse = sparsek_hf.sparsek_attention(q, k, v, scores, return_lse=True, **opts)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert_close_to_oracle(out, lse, q, k, v, scores, opts, tol=1e-3)


@pytest.mark.parametrize("name", ["base", "decode", "padding", "per_token", "gqa4", "hard"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_forward_matches_oracle_half(name, dtype):
    q, k, v, scores, opts = make_inputs(CASES[name], dtype=dtype)
    out, lse = sparsek_hf.sparsek_attention(q, k, v, scores, return_lse=True, **opts)
    assert out.dtype == dtype
    assert_close_to_oracle(out, lse, q, k, v, scores, opts, tol=1e-2)


@pytest.mark.parametrize("name", ["base", "decode", "padding", "ties", "chunked_prefill"])
def test_reference_forward_matches_oracle(name):
    q, k, v, scores, opts = make_inputs(CASES[name], dtype=torch.float64)
    out, lse = reference.sparsek_attention_reference(q, k, v, scores.double(), **opts)
    assert_close_to_oracle(out, lse, q, k, v, scores, opts, tol=1e-6)


@pytest.mark.parametrize("name", ["budget_ge_n"])
def test_large_budget_is_causal_sdpa(name):
    q, k, v, scores, opts = make_inputs(CASES[name])
    out = sparsek_hf.sparsek_attention(q, k, v, scores, **opts)
    group = q.shape[1] // k.shape[1]
    dense = F.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), is_causal=True
    )
    assert oracle.rel_err(out, dense) < 1e-5


def test_huge_window_is_causal_sdpa_in_decode():
    q, k, v, scores, opts = make_inputs(CASES["decode"])
    opts.update(budget=0, window=k.shape[2])
    out = sparsek_hf.sparsek_attention(q, k, v, scores, **opts)
    group = q.shape[1] // k.shape[1]
    dense = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))
    assert oracle.rel_err(out, dense) < 1e-5


def test_budget0_sinks0_is_sliding_window():
    q, k, v, scores, opts = make_inputs(CASES["nothing_but_window"])
    out = sparsek_hf.sparsek_attention(q, k, v, scores, **opts)
    n, window, block_q = q.shape[2], opts["window"], opts["block_q"]
    p = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    allowed = (j <= p) & (j > p // block_q * block_q - window)
    group = q.shape[1] // k.shape[1]
    dense = F.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=allowed
    )
    assert oracle.rel_err(out, dense) < 1e-5


def test_empty_rows_give_zeros_and_no_nan():
    # W = K = S = 0: the first query of each block has nothing to attend.
    q, k, v, scores, opts = make_inputs(CASES["window0"])
    opts.update(budget=0, sinks=0)
    q.requires_grad_()
    out, lse = sparsek_hf.sparsek_attention(q, k, v, scores, return_lse=True, **opts)
    first_of_block = torch.arange(q.shape[2]) % opts["block_q"] == 0
    assert out[:, :, first_of_block].abs().max() == 0
    assert torch.isneginf(lse[:, :, first_of_block]).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


@pytest.mark.parametrize(
    "name", ["base", "hard", "decode", "chunked_prefill", "padding", "per_token", "gqa4", "ties", "fine_slope", "budget0"]
)
def test_kernel_gradients_match_reference(name):
    q, k, v, scores, opts = make_inputs(CASES[name])
    grad_out = torch.randn(q.shape)
    ref_inputs = [t.double().requires_grad_() for t in (q, k, v, scores)]
    ref_out, _ = reference.sparsek_attention_reference(*ref_inputs, **opts)
    (ref_out * grad_out.double()).sum().backward()
    inputs = [t.clone().requires_grad_() for t in (q, k, v, scores)]
    out = sparsek_hf.sparsek_attention(*inputs, **opts)
    (out * grad_out).sum().backward()
    for name_, got, want in zip("q k v scores".split(), inputs, ref_inputs):
        want_grad = want.grad if want.grad is not None else torch.zeros_like(want)
        if want_grad.norm() > 1e-8:
            assert oracle.rel_err(got.grad, want_grad) < 1e-3, name_
        else:
            assert got.grad.abs().max() < 1e-6, name_
    if not opts["soft"]:
        assert inputs[3].grad.abs().max() == 0  # hard gates: no score gradient


@pytest.mark.parametrize("name", ["base", "padding", "decode"])
def test_kernel_gradients_bf16(name):
    q, k, v, scores, opts = make_inputs(CASES[name])
    grad_out = torch.randn(q.shape)
    ref_inputs = [t.clone().requires_grad_() for t in (q, k, v, scores)]
    ref_out, _ = reference.sparsek_attention_reference(*ref_inputs, **opts)
    (ref_out * grad_out).sum().backward()
    inputs = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)] + [scores.clone().requires_grad_()]
    out = sparsek_hf.sparsek_attention(*inputs, **opts)
    (out.float() * grad_out).sum().backward()
    for got, want in zip(inputs, ref_inputs):
        assert got.grad.dtype == got.dtype
        assert oracle.rel_err(got.grad, want.grad) < 2e-2


GRADCHECK_CASES = {
    "soft": dict(budget=5, window=3, sinks=1, block_q=4, soft=True),
    "hard": dict(budget=5, window=3, sinks=1, block_q=4, soft=False),
    "per_token": dict(budget=4, window=2, sinks=0, block_q=1, soft=True),
    "decode_chunk": dict(budget=4, window=2, sinks=1, block_q=3, soft=True),
}


@pytest.mark.parametrize("name", list(GRADCHECK_CASES))
@pytest.mark.parametrize("padded", [False, True])
def test_reference_gradcheck_float64(name, padded):
    g = torch.Generator().manual_seed(1234)
    nk = 18
    nq = 7 if name == "decode_chunk" else nk
    q = torch.randn(1, 4, nq, 3, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, nk, 3, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, nk, 3, generator=g, dtype=torch.float64, requires_grad=True)
    scores = (0.4 * torch.randn(1, 2, nk, generator=g, dtype=torch.float64)).requires_grad_()
    key_valid = (torch.rand(1, nk, generator=g) > 0.2) if padded else None
    opts = dict(GRADCHECK_CASES[name], key_valid=key_valid)

    def fn(q, k, v, scores):
        return reference.sparsek_attention_reference(q, k, v, scores, **opts)[0]

    assert torch.autograd.gradcheck(fn, (q, k, v, scores), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", ["base", "padding", "ties", "per_token", "chunked_prefill", "budget0", "hard"])
def test_selection_matches_reference(name):
    q, k, v, scores, opts = make_inputs(CASES[name])
    key_valid = opts.pop("key_valid")
    idx, gate, count, tau, nfrac = torch.ops.sparsek.select(
        scores, key_valid, q.shape[2], opts["budget"], opts["window"], opts["sinks"], opts["block_q"], opts["soft"]
    )
    selected, ref_gate, ref_tau = reference.sparsek_gates(scores, q.shape[2], key_valid=key_valid, **opts)
    mask = torch.zeros_like(selected)
    valid_slots = idx >= 0
    assert torch.equal(valid_slots.sum(-1).int(), count)
    b, h, t, s = valid_slots.nonzero(as_tuple=True)
    mask[b, h, t, idx[b, h, t, s].long()] = True
    assert torch.equal(mask, selected)
    assert torch.equal(count, selected.sum(-1).int())
    dense_gate = torch.zeros_like(ref_gate)
    dense_gate[b, h, t, idx[b, h, t, s].long()] = gate[b, h, t, s].double()
    assert (dense_gate - ref_gate).abs().max() < 1e-5
    assert torch.equal(torch.isinf(tau), torch.isinf(ref_tau))
    finite = torch.isfinite(tau)
    assert max_abs(tau[finite] - ref_tau[finite]) < 1e-5
    assert (tau[..., 1:] >= tau[..., :-1]).all()  # the backward relies on this
    assert (idx[..., 1:][valid_slots[..., 1:]] > idx[..., :-1][valid_slots[..., 1:]]).all()  # ascending


@pytest.mark.parametrize("block_q", [1, 16])
def test_selection_at_scale_matches_reference(block_q):
    # Many blocks and keys exercise the Fenwick-tree threshold search and the incremental top-K.
    g = torch.Generator().manual_seed(7)
    n = 800 if block_q == 1 else 4096
    scores = torch.randn(1, 2, n, generator=g) + 0.002 * torch.arange(n)
    opts = dict(budget=100, window=32, sinks=4, block_q=block_q, soft=True)
    idx, gate, count, tau, nfrac = torch.ops.sparsek.select(scores, None, n, 100, 32, 4, block_q, True)
    selected, ref_gate, ref_tau = reference.sparsek_gates(scores, n, **opts)
    assert torch.equal(count, selected.sum(-1).int())
    b, h, t, s = (idx >= 0).nonzero(as_tuple=True)
    assert selected[b, h, t, idx[b, h, t, s].long()].all()
    assert (gate[b, h, t, s].double() - ref_gate[b, h, t, idx[b, h, t, s].long()]).abs().max() < 1e-5
    finite = torch.isfinite(tau)
    assert (tau[finite] - ref_tau[finite]).abs().max() < 1e-5


def test_any_strides_are_accepted():
    q, k, v, scores, opts = make_inputs(CASES["base"])
    out = sparsek_hf.sparsek_attention(q, k, v, scores, **opts)
    # [B, N, H, D] memory viewed as [B, H, N, D] (what Transformers passes), and a strided last dim
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)
    k_wide = torch.cat([k, torch.zeros_like(k)], dim=-1)[..., : k.shape[-1]]
    v_pad = torch.stack([v, v], dim=-1)[..., 0]  # last-dim stride 2: copied by the API
    assert v_pad.stride(-1) == 2
    out2 = sparsek_hf.sparsek_attention(q_t, k_wide, v_pad, scores, **opts)
    assert torch.equal(out, out2)


def test_compiled_backends_lists_cpu():
    assert "cpu" in sparsek_hf.compiled_backends()


def test_fallback_warns_once_and_matches(monkeypatch):
    from sparsek_hf import _ops, api

    q, k, v, scores, opts = make_inputs(CASES["base"])
    want = sparsek_hf.sparsek_attention(q, k, v, scores, **opts)
    monkeypatch.setattr(_ops, "BACKENDS", frozenset())
    monkeypatch.setattr(api, "_fallback_warned", False)
    with pytest.warns(RuntimeWarning, match="pure-PyTorch reference"):
        got = sparsek_hf.sparsek_attention(q, k, v, scores, **opts)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsek_hf.sparsek_attention(q, k, v, scores, **opts)  # no second warning
    assert oracle.rel_err(got, want) < 1e-5


def test_float64_uses_reference_silently():
    q, k, v, scores, opts = make_inputs(CASES["decode"], dtype=torch.float64)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = sparsek_hf.sparsek_attention(q, k, v, scores.double(), **opts)
    ref, _ = oracle.attention(q, k, v, scores, **opts)
    assert oracle.rel_err(out, ref) < 1e-10
    assert math.isfinite(out.sum().item())
