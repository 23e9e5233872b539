"""SparseKBias through xformers.ops.memory_efficient_attention: against xFormers' own reference on
materialize() and the float64 oracle of SPEC.md, gradients, dispatch, errors. CPU, and CUDA where
there is a GPU (the CUDA cases run fp16/bf16 with head dim 64, the kernels' sizes)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import oracle
import sparsek_hf
from sparsek_hf import SparseKBias
from sparsek_hf import xformers as skx

import xformers.ops as xops
from xformers.attn_bias_utils import ref_attention
from xformers.ops import fmha
from xformers.ops.fmha import dispatch as fmha_dispatch
from xformers.ops.fmha.attn_bias import LowerTriangularMask
from xformers.ops.fmha.common import AttentionFwOpBase, Inputs

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# name: (layout, B, Mq, Nk, G, H, Hs, kv, budget, window, sinks, block_q, soft, padding, scale)
#   layout BMHK has Hq = H query heads (G unused), BMGHK has Hq = G * H; scores are [B, Hs, Nk].
#   kv: "own" one kv head per query head; "expand" Hs kv heads expanded (stride 0) over the heads
#   of their group, as xFormers wants GQA; "copies" the same, materialised with repeat_interleave;
#   "group_expand" (BMGHK) one kv head per group G expanded over its H heads, whatever Hs is.
CASES = {
    "bmhk_mha": ("BMHK", 2, 45, 45, 1, 2, 2, "own", 6, 5, 2, 8, True, False, None),
    "bmhk_mqa_expand": ("BMHK", 2, 45, 45, 1, 4, 1, "expand", 6, 5, 2, 8, True, False, None),
    "bmhk_gqa_copies": ("BMHK", 1, 50, 50, 1, 4, 2, "copies", 7, 4, 1, 8, True, False, None),
    "bmhk_shared_scores": ("BMHK", 1, 40, 40, 1, 4, 2, "own", 5, 4, 1, 8, True, False, None),
    "bmghk_gqa_expand": ("BMGHK", 2, 41, 41, 2, 3, 2, "expand", 6, 4, 1, 8, True, False, None),
    "bmghk_gqa_copies": ("BMGHK", 1, 41, 41, 2, 2, 2, "copies", 6, 4, 1, 8, True, False, None),
    "bmghk_scores_per_head": ("BMGHK", 1, 33, 33, 2, 2, 4, "group_expand", 5, 3, 1, 4, True, False, None),
    "bmghk_one_score_head": ("BMGHK", 1, 36, 36, 2, 2, 1, "expand", 5, 3, 1, 4, True, False, None),
    "decode": ("BMHK", 2, 1, 77, 1, 4, 2, "copies", 9, 6, 2, 16, True, False, None),
    "decode_bmghk": ("BMGHK", 2, 1, 70, 2, 2, 2, "expand", 9, 6, 2, 16, True, False, None),
    "chunked_prefill": ("BMHK", 1, 13, 61, 1, 2, 1, "expand", 8, 5, 1, 8, True, False, None),
    "padding": ("BMHK", 3, 48, 48, 1, 2, 2, "own", 7, 4, 2, 8, True, True, None),
    "padding_bmghk": ("BMGHK", 3, 40, 40, 2, 2, 2, "expand", 7, 4, 2, 8, True, True, None),
    "hard": ("BMHK", 2, 45, 45, 1, 2, 1, "expand", 6, 5, 2, 8, False, False, None),
    "per_token": ("BMHK", 1, 30, 30, 1, 2, 2, "own", 4, 3, 1, 1, True, False, None),
    "custom_scale": ("BMHK", 1, 40, 40, 1, 2, 2, "own", 6, 5, 1, 8, True, False, 0.3),
}
BMHK_CASES = [name for name, case in CASES.items() if case[0] == "BMHK"]


def dtype_for(device: str) -> torch.dtype:
    return torch.float32 if device == "cpu" else torch.bfloat16


def tol_for(dtype: torch.dtype) -> float:
    return {torch.float32: 1e-3, torch.float64: 1e-6}.get(dtype, 1e-2)


class Problem:
    """One case: leaf tensors, and how they are presented to xFormers and to the oracle."""

    def __init__(self, case, device="cpu", dtype=torch.float32, seed=None, dim=None):
        layout, batch, nq, nk, groups, heads, score_heads, kv = case[:8]
        budget, window, sinks, block_q, soft, padding, scale = case[8:]
        self.seed = seed if seed is not None else torch.seed() % (2**31)
        g = torch.Generator().manual_seed(self.seed)
        self.layout, self.kv, self.scale = layout, kv, scale
        self.head_shape = (heads,) if layout == "BMHK" else (groups, heads)
        self.q_heads = math.prod(self.head_shape)
        self.group = self.q_heads // score_heads
        dim = dim or (16 if device == "cpu" else 64)
        kv_heads = {"own": self.q_heads, "group_expand": groups}.get(kv, score_heads)
        self.q = torch.randn(batch, nq, *self.head_shape, dim, generator=g).to(device, dtype)
        self.k = torch.randn(batch, nk, kv_heads, dim, generator=g).to(device, dtype)  # leaves: [B, Nk, Hkv, D]
        self.v = torch.randn(batch, nk, kv_heads, dim, generator=g).to(device, dtype)
        self.scores = (1.5 * torch.randn(batch, score_heads, nk, generator=g)).to(device)
        self.key_valid = None
        if padding:
            key_valid = torch.rand(batch, nk, generator=g) > 0.25
            key_valid[0] = True
            key_valid[-1, : nk // 3] = False  # left padding: the first rows of the last batch see nothing
            self.key_valid = key_valid.to(device)
        self.opts = dict(budget=budget, window=window, sinks=sinks, block_q=block_q, soft=soft)

    def bias(self, scores=None) -> SparseKBias:
        return SparseKBias(scores=self.scores if scores is None else scores, key_valid=self.key_valid, **self.opts)

    def present(self, x: torch.Tensor) -> torch.Tensor:
        """A kv leaf [B, Nk, Hkv, D] as xFormers' k / v [B, Nk, (G,) H, D] (differentiable)."""
        if self.kv == "own":
            return x.reshape(*x.shape[:2], *self.head_shape, x.shape[-1])
        batch, nk, kv_heads, dim = x.shape
        if self.kv == "group_expand":
            return x[:, :, :, None].expand(batch, nk, *self.head_shape, dim)
        if self.kv == "expand":
            x = x[:, :, :, None].expand(batch, nk, kv_heads, self.group, dim)
            if self.layout == "BMHK":
                assert kv_heads == 1, "BMHK can only expand one kv head over every head (MQA)"
                return x.reshape(batch, nk, self.q_heads, dim)  # a view: stride 0 over heads
            return x.reshape(batch, nk, *self.head_shape, dim)  # flattened head i reads kv head i // group
        return x.repeat_interleave(self.group, dim=2).reshape(batch, nk, *self.head_shape, dim)

    def xformers_inputs(self, q=None, k=None, v=None):
        k, v = (self.k if k is None else k), (self.v if v is None else v)
        return (self.q if q is None else q), self.present(k), self.present(v)

    def heads_first(self, x: torch.Tensor) -> torch.Tensor:
        """[B, M, (G,) H, D] -> [B, Hq, M, D]."""
        return x.reshape(x.shape[0], x.shape[1], self.q_heads, x.shape[-1]).transpose(1, 2)

    def oracle(self):
        """(out, lse) of SPEC.md in float64, every query head with its own kv head and its group's scores."""
        q, k, v = self.xformers_inputs()
        scores = self.scores.repeat_interleave(self.group, dim=1)
        return oracle.attention(
            self.heads_first(q), self.heads_first(k), self.heads_first(v), scores, scale=self.scale,
            key_valid=self.key_valid, **self.opts,
        )

    def reference_grads(self, dout, wrt_scores=False):
        """float64 gradients of the leaves through the pure-PyTorch reference (gradcheck-tested)."""
        leaves = [t.detach().cpu().double().requires_grad_() for t in (self.q, self.k, self.v, self.scores)]
        q, k, v, scores = leaves
        k, v = self.present(k), self.present(v)
        out, _ = sparsek_hf.sparsek_attention_reference(
            self.heads_first(q), self.heads_first(k), self.heads_first(v), scores.repeat_interleave(self.group, dim=1),
            scale=self.scale, key_valid=None if self.key_valid is None else self.key_valid.cpu(), **self.opts,
        )
        out = out.transpose(1, 2).reshape(self.q.shape)
        grads = torch.autograd.grad(out, leaves if wrt_scores else leaves[:3], dout.detach().cpu().double())
        return grads

    def rows_with_keys(self) -> torch.Tensor:
        """[B, Hq, Mq] bool: the rows whose A(p) is not empty (xFormers' reference gives NaN on the others)."""
        bias = self.bias().materialize((self.q.shape[0], self.q_heads, self.q.shape[1], self.k.shape[1]), torch.float64)
        return ~torch.isinf(bias).all(-1)


def assert_close(got, want, tol, what, seed):
    err = oracle.rel_err(got, want)
    assert err < tol, f"{what}: relative error {err:.2e} >= {tol:.0e} (seed {seed})"


# ---------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CASES))
def test_forward_matches_oracle_and_xformers_reference(name, device):
    dtype = dtype_for(device)
    pb = Problem(CASES[name], device, dtype)
    q, k, v = pb.xformers_inputs()
    out = xops.memory_efficient_attention(q, k, v, attn_bias=pb.bias(), scale=pb.scale)  # no op=: the hook routes
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()

    ref_out, _ = pb.oracle()
    got = pb.heads_first(out)
    assert_close(got, ref_out, tol_for(dtype), "vs SPEC.md oracle", pb.seed)
    rows = pb.rows_with_keys()
    assert (got.cpu()[~rows] == 0).all()  # a query with no key to attend outputs zeros

    # xFormers' own reference attention on the materialised bias (full shape: the heads pick their scores).
    full_shape = (q.shape[0], *pb.head_shape, q.shape[1], k.shape[1])
    dense = pb.bias().materialize(full_shape, device=device)
    xref = pb.heads_first(ref_attention(q.float(), k.float(), v.float(), dense, scale=pb.scale))
    assert_close(got.cpu()[rows], xref.cpu()[rows], tol_for(dtype), "vs xFormers ref_attention", pb.seed)


def test_materialize_is_the_oracle_bias():
    pb = Problem(CASES["padding_bmghk"])
    batch, nq, nk = pb.q.shape[0], pb.q.shape[1], pb.k.shape[1]
    want = oracle.bias(pb.scores, nq, pb.q_heads, key_valid=pb.key_valid, **pb.opts)  # [B, Hq, Mq, Nk]
    got = pb.bias().materialize((batch, pb.q_heads, nq, nk), dtype=torch.float64)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    assert (got[finite] - want[finite]).abs().max() < 1e-9
    got5 = pb.bias().materialize((batch, *pb.head_shape, nq, nk), dtype=torch.float64)
    assert torch.equal(got5.reshape(got.shape), got)
    assert pb.bias().materialize((batch, pb.q_heads, nq, nk), dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["bmhk_gqa_copies", "bmghk_gqa_expand", "decode_bmghk", "padding"])
def test_lse_in_xformers_layout(name, device):
    pb = Problem(CASES[name], device, dtype_for(device))
    q, k, v = pb.xformers_inputs()
    out, lse = xops.fmha.memory_efficient_attention_forward_requires_grad(q, k, v, attn_bias=pb.bias())
    assert lse.shape == (q.shape[0], *pb.head_shape, q.shape[1]) and lse.dtype == torch.float32
    _, ref_lse = pb.oracle()
    lse = lse.reshape(ref_lse.shape).double().cpu()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert (lse[finite] - ref_lse[finite]).abs().max() < 10 * tol_for(dtype_for(device))


def test_bf16_on_cpu_uses_the_kernel():
    """xFormers' base checks refuse bf16 off-GPU; the SparseK ops take it (CPU kernel)."""
    pb = Problem(CASES["bmhk_mqa_expand"], "cpu", torch.bfloat16)
    out = xops.memory_efficient_attention(*pb.xformers_inputs(), attn_bias=pb.bias())
    assert_close(pb.heads_first(out), pb.oracle()[0], 1e-2, "bf16", pb.seed)


def test_float64_uses_the_reference():
    pb = Problem(CASES["bmghk_gqa_expand"], "cpu", torch.float64)
    out = xops.memory_efficient_attention(*pb.xformers_inputs(), attn_bias=pb.bias(pb.scores.double()))
    assert_close(pb.heads_first(out), pb.oracle()[0], 1e-9, "float64", pb.seed)


# ---------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["bmhk_mha", "bmhk_mqa_expand", "bmhk_gqa_copies", "decode", "padding", "hard"])
def test_xformers_autograd_gradients_of_q_k_v(name, device):
    """The plain xFormers path: its autograd calls SparseKBwOp; gradients reach the leaves."""
    dtype = dtype_for(device)
    pb = Problem(CASES[name], device, dtype)
    leaves = [t.clone().requires_grad_() for t in (pb.q, pb.k, pb.v)]
    out = xops.memory_efficient_attention(*pb.xformers_inputs(*leaves), attn_bias=pb.bias(), scale=pb.scale)
    assert out.grad_fn is not None
    dout = torch.randn_like(out)
    out.backward(dout)
    want = pb.reference_grads(dout)
    for label, leaf, ref in zip("qkv", leaves, want):
        assert_close(leaf.grad, ref, tol_for(dtype) * 2, f"d{label}", pb.seed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["bmhk_mha", "bmhk_shared_scores", "bmghk_gqa_expand", "bmghk_gqa_copies",
                                  "bmghk_scores_per_head", "decode_bmghk", "padding_bmghk", "chunked_prefill"])
def test_sparsek_route_gradients_of_q_k_v_and_scores(name, device):
    """sparsek_hf.xformers.memory_efficient_attention: the documented route that trains the scores."""
    dtype = dtype_for(device)
    pb = Problem(CASES[name], device, dtype)
    leaves = [t.clone().requires_grad_() for t in (pb.q, pb.k, pb.v, pb.scores)]
    q, k, v = pb.xformers_inputs(*leaves[:3])
    out = skx.memory_efficient_attention(q, k, v, attn_bias=pb.bias(leaves[3]), scale=pb.scale)
    assert_close(pb.heads_first(out), pb.oracle()[0], tol_for(dtype), "out", pb.seed)
    dout = torch.randn_like(out)
    out.backward(dout)
    want = pb.reference_grads(dout, wrt_scores=True)
    for label, leaf, ref in zip(["q", "k", "v", "scores"], leaves, want):
        assert_close(leaf.grad, ref, tol_for(dtype) * 2, f"d{label}", pb.seed)


def test_non_autograd_backward_api_selects_again():
    """memory_efficient_attention_backward has no forward context: SparseKBwOp recomputes the selection."""
    pb = Problem(CASES["padding"])
    q, k, v = pb.xformers_inputs()
    out, lse = xops.fmha.memory_efficient_attention_forward_requires_grad(q, k, v, attn_bias=pb.bias())
    dout = torch.randn_like(out)
    dq, dk, dv = xops.fmha.memory_efficient_attention_backward(dout, out, lse, q, k, v, attn_bias=pb.bias())
    want = pb.reference_grads(dout)
    for label, got, ref in zip("qkv", (dq, dk, dv), want):
        assert_close(got, ref, 2e-3, f"d{label}", pb.seed)


def test_gradcheck_float64_both_routes():
    pb = Problem(("BMHK", 1, 10, 10, 1, 2, 1, "expand", 3, 2, 1, 4, True, False, None), "cpu", torch.float64, dim=4)

    def plain(q, k, v):
        bias = SparseKBias(pb.scores.double(), **pb.opts)
        return xops.memory_efficient_attention(q, pb.present(k), pb.present(v), attn_bias=bias)

    def route(q, scores):
        return skx.memory_efficient_attention(*pb.xformers_inputs(q), attn_bias=SparseKBias(scores, **pb.opts))

    q, k, v = (t.clone().requires_grad_() for t in (pb.q, pb.k, pb.v))
    assert torch.autograd.gradcheck(plain, (q, k, v), eps=1e-6, atol=1e-5, fast_mode=True)
    scores = pb.scores.double().requires_grad_()
    assert torch.autograd.gradcheck(route, (q, scores), eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize("name, shared", [("bmhk_mqa_expand", True), ("bmghk_gqa_expand", True),
                                          ("bmghk_one_score_head", True), ("decode_bmghk", True),
                                          ("bmhk_gqa_copies", False), ("bmghk_scores_per_head", False)])
def test_expanded_kv_is_read_once_per_kv_head(name, shared):
    """k / v expanded with stride 0 are recognised from their strides: Hs kv heads, views, no copy."""
    pb = Problem(CASES[name])
    q, k, v = pb.xformers_inputs()
    call = skx._Call.from_inputs(Inputs(q, k, v, attn_bias=pb.bias()))
    assert call.shared_kv is shared
    if shared:
        assert call.k.shape[1] == pb.scores.shape[1] and call.k.data_ptr() == k.data_ptr()
    else:
        assert call.k.shape[1] == pb.q_heads and call.scores.shape[1] == pb.q_heads


def test_plain_path_refuses_scores_that_require_grad():
    pb = Problem(CASES["bmhk_mha"])
    bias = pb.bias(pb.scores.clone().requires_grad_())
    q, k, v = pb.xformers_inputs()
    with pytest.raises(ValueError, match="sparsek_hf.xformers.memory_efficient_attention"):
        xops.memory_efficient_attention(q, k, v, attn_bias=bias)  # forward-only fast path
    with pytest.raises(ValueError, match="drops the gradients"):
        xops.memory_efficient_attention(q.clone().requires_grad_(), k, v, attn_bias=bias)  # autograd path
    with torch.no_grad():  # nothing to drop
        xops.memory_efficient_attention(q, k, v, attn_bias=bias)
    xops.memory_efficient_attention(q, k, v, attn_bias=pb.bias(bias.scores.detach()))


def test_plain_path_refuses_bmghk_autograd():
    """xFormers 0.0.35's backward cannot take 5-D inputs: a clear error, not a reshape failure later."""
    pb = Problem(CASES["bmghk_gqa_expand"])
    q, k, v = pb.xformers_inputs()
    with pytest.raises(ValueError, match="BMGHK"):
        xops.memory_efficient_attention(q.clone().requires_grad_(), k, v, attn_bias=pb.bias())


# ---------------------------------------------------------------------------------------------- dispatch


class _TorchCausalOp(AttentionFwOpBase):
    """A stand-in for xFormers' own kernels (which do not load here): causal SDPA, CPU and CUDA."""

    OPERATOR = F.scaled_dot_product_attention
    SUPPORTED_DEVICES = {"cpu", "cuda"}
    SUPPORTED_DTYPES = {torch.float32, torch.float16, torch.bfloat16}
    SUPPORTED_MAX_K = 256
    SUPPORTED_ATTN_BIAS_TYPES = (LowerTriangularMask,)
    SUPPORTS_DROPOUT = False
    NAME = "torch_causal_for_tests"
    calls = 0

    @classmethod
    def not_supported_reasons(cls, d):
        return [] if type(d.attn_bias) is LowerTriangularMask and d.query.ndim == 4 else ["not causal BMHK"]

    @classmethod
    def apply(cls, inp, needs_gradient):
        cls.calls += 1
        q, k, v = (t.transpose(1, 2) for t in (inp.query, inp.key, inp.value))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out.transpose(1, 2), None


def test_other_biases_still_go_to_xformers_dispatch(monkeypatch):
    assert skx.dispatch_installed()
    monkeypatch.setattr(fmha_dispatch, "_dispatch_fw_priority_list", lambda inp, needs_gradient: [_TorchCausalOp])
    pb = Problem(CASES["bmhk_mha"])
    q, k, v = pb.xformers_inputs()
    calls = _TorchCausalOp.calls
    out = xops.memory_efficient_attention(q, k, v, attn_bias=LowerTriangularMask())
    assert _TorchCausalOp.calls == calls + 1  # xFormers' own priority list was consulted and chose its op
    want = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True).transpose(1, 2)
    assert_close(out, want, 1e-5, "causal", pb.seed)
    # A SparseKBias never reaches that list.
    out = xops.memory_efficient_attention(q, k, v, attn_bias=pb.bias())
    assert _TorchCausalOp.calls == calls + 1
    assert_close(pb.heads_first(out), pb.oracle()[0], 1e-3, "sparsek", pb.seed)


def test_other_biases_get_xformers_own_errors():
    q = torch.randn(1, 8, 2, 16)
    messages = []
    for installed in (True, False):
        (skx.install_dispatch if installed else skx.uninstall_dispatch)()
        try:
            with pytest.raises(NotImplementedError) as info:
                xops.memory_efficient_attention(q, q, q, attn_bias=LowerTriangularMask())
            messages.append(str(info.value))
        finally:
            skx.install_dispatch()
    assert messages[0] == messages[1] and "sparsek" not in messages[0]


def test_hook_is_idempotent_and_removable():
    pb = Problem(CASES["bmhk_mqa_expand"])
    q, k, v = pb.xformers_inputs()
    try:
        skx.install_dispatch()
        hooked = fmha._dispatch_fw, fmha._dispatch_bw
        skx.install_dispatch()
        assert (fmha._dispatch_fw, fmha._dispatch_bw) == hooked
        skx.uninstall_dispatch()
        skx.uninstall_dispatch()
        assert not skx.dispatch_installed()
        assert fmha._dispatch_fw is fmha_dispatch._dispatch_fw and fmha._dispatch_bw is fmha_dispatch._dispatch_bw
        with pytest.raises(NotImplementedError, match="No operator found"):
            xops.memory_efficient_attention(q, k, v, attn_bias=pb.bias())
        out = xops.memory_efficient_attention(q, k, v, attn_bias=pb.bias(), op=skx.SparseKOp)  # explicit op=
        assert_close(pb.heads_first(out), pb.oracle()[0], 1e-3, "op=SparseKOp", pb.seed)
    finally:
        skx.install_dispatch()
    assert skx.dispatch_installed()


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(p=0.1), "dropout"),
        (dict(value_dim=8), "value.shape"),
        (dict(head_dim=320), "head dim"),
        (dict(score_heads=3), "attn_bias.scores must have shape"),
        (dict(num_keys=20), "attn_bias.scores must have shape"),
        (dict(more_queries=True), "more queries"),
        (dict(output_dtype=torch.float16), "output_dtype"),
    ],
)
def test_unsupported_inputs_raise_clear_errors(change, match):
    batch, nq, heads = 2, 24, 4
    dim = change.get("head_dim", 16)
    nk = nq - 4 if change.get("more_queries") else nq
    q = torch.randn(batch, nq, heads, dim)
    k = torch.randn(batch, nk, heads, dim)
    v = torch.randn(batch, nk, heads, change.get("value_dim", dim))
    scores = torch.randn(batch, change.get("score_heads", 2), change.get("num_keys", nk))
    bias = SparseKBias(scores=scores, budget=4, window=3)
    kwargs = {key: change[key] for key in ("p", "output_dtype") if key in change}
    for call in (xops.memory_efficient_attention, skx.memory_efficient_attention):
        with pytest.raises(ValueError, match=match):
            call(q, k, v, attn_bias=bias, **kwargs)


def test_other_unsupported_calls():
    q = torch.randn(1, 8, 2, 16)
    bias = SparseKBias(scores=torch.randn(1, 2, 8), budget=2, window=2)
    with pytest.raises(ValueError, match="attn_bias type"):  # our op, someone else's bias
        xops.memory_efficient_attention(q, q, q, attn_bias=LowerTriangularMask(), op=skx.SparseKOp)
    with pytest.raises(ValueError, match="partial"):
        xops.fmha.memory_efficient_attention_partial(q, q, q, attn_bias=bias)
    with pytest.raises(ValueError, match="BMHK"):  # 3-D BMK: xFormers' own check for custom biases
        xops.memory_efficient_attention(q[:, :, 0], q[:, :, 0], q[:, :, 0], attn_bias=bias)
    with pytest.raises(ValueError, match="op must be None"):
        skx.memory_efficient_attention(q, q, q, attn_bias=bias, op=(_TorchCausalOp, None))


# ---------------------------------------------------------------------------------------------- the bias


def test_bias_checks_its_fields():
    scores = torch.randn(2, 2, 10)
    with pytest.raises(TypeError, match="scores"):
        SparseKBias(scores=scores.long(), budget=2, window=2)
    with pytest.raises(ValueError, match="scores"):
        SparseKBias(scores=scores[0], budget=2, window=2)
    with pytest.raises(ValueError, match="budget"):
        SparseKBias(scores=scores, budget=-1, window=2)
    with pytest.raises(TypeError, match="window"):
        SparseKBias(scores=scores, budget=2, window=2.5)
    with pytest.raises(TypeError, match="key_valid"):
        SparseKBias(scores=scores, budget=2, window=2, key_valid=torch.ones(2, 10))
    with pytest.raises(ValueError, match="key_valid"):
        SparseKBias(scores=scores, budget=2, window=2, key_valid=torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="full shape"):
        SparseKBias(scores=scores, budget=2, window=2).materialize((10, 10))
    with pytest.raises(ValueError, match="attn_bias.scores"):
        SparseKBias(scores=scores, budget=2, window=2).materialize((2, 3, 10, 10))


def test_from_config_and_to():
    config = sparsek_hf.SparseKConfig(budget=8, window=4, sinks=1, block_q=16, soft=False)
    scores = torch.randn(1, 2, 10, requires_grad=True)
    bias = SparseKBias.from_config(config, scores, key_valid=torch.ones(1, 10, dtype=torch.bool))
    assert (bias.budget, bias.window, bias.sinks, bias.block_q, bias.soft) == (8, 4, 1, 16, False)
    device = DEVICES[-1]
    moved = bias.to(device)
    assert moved.scores.device.type == device and moved.key_valid.device.type == device
    assert moved.scores.requires_grad and (moved.budget, moved.soft) == (8, False)
    assert isinstance(sparsek_hf.SparseKBias(scores=scores, budget=1, window=1), fmha.attn_bias.AttentionBias)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_bias_on_another_device_is_refused():
    pb = Problem(CASES["bmhk_mha"], "cuda", torch.bfloat16)
    with pytest.raises(ValueError, match="attn_bias.to"):
        xops.memory_efficient_attention(*pb.xformers_inputs(), attn_bias=pb.bias().to("cpu"))


def test_import_sparsek_hf_does_not_import_xformers():
    code = (
        "import sys, sparsek_hf; assert 'xformers' not in sys.modules; "
        "sparsek_hf.SparseKBias; assert 'xformers' in sys.modules and sparsek_hf.xformers.dispatch_installed()"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
