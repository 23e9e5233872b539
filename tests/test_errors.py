"""Bad input gets a clear ValueError / TypeError naming the argument: one test per kind of mistake."""

from __future__ import annotations

import pytest
import torch

import sparsek_hf


def inputs(b=1, hq=4, hkv=2, nq=16, nk=16, d=8, dtype=torch.float32):
    q = torch.randn(b, hq, nq, d, dtype=dtype)
    k = torch.randn(b, hkv, nk, d, dtype=dtype)
    v = torch.randn(b, hkv, nk, d, dtype=dtype)
    scores = torch.randn(b, hkv, nk)
    return q, k, v, scores


OPTS = dict(budget=4, window=4, sinks=1, block_q=4)


def call(q, k, v, scores, **overrides):
    return sparsek_hf.sparsek_attention(q, k, v, scores, **{**OPTS, **overrides})


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda q, k, v, s: (q[0], k, v, s), ValueError, r"q must be 4-D"),
        (lambda q, k, v, s: (q, k[0], v, s), ValueError, r"k must be 4-D"),
        (lambda q, k, v, s: (q, k, v[:, :, :-1], s), ValueError, r"v must have the shape of k"),
        (lambda q, k, v, s: (q, k.double(), v, s), TypeError, r"share one dtype"),
        (lambda q, k, v, s: (q.int(), k.int(), v.int(), s), TypeError, r"q must be float16, bfloat16, float32"),
        (lambda q, k, v, s: (q, k[:, :1].expand(1, 3, 16, 8), v[:, :1].expand(1, 3, 16, 8), s[:, :1].expand(1, 3, 16)), ValueError, r"multiple of the kv heads"),
        (lambda q, k, v, s: (torch.cat([q, q], 2), k, v, s), ValueError, r"more positions"),
        (lambda q, k, v, s: (q[..., :4], k, v, s), ValueError, r"head dim of q"),
        (lambda q, k, v, s: (torch.cat([q, q], 0), k, v, s), ValueError, r"batch size of q"),
        (lambda q, k, v, s: (q, k, v, s[:, :, :-1]), ValueError, r"scores must have shape \[B, Hkv, Nk\]"),
        (lambda q, k, v, s: (q, k, v, s.to(torch.bfloat16)), TypeError, r"scores must be float32"),
        (lambda q, k, v, s: (q, k, v, s.tolist()), TypeError, r"scores must be a tensor"),
        (lambda q, k, v, s: (q, k.to("meta"), v.to("meta"), s), ValueError, r"one device"),
        (lambda q, k, v, s: (q, k, v, s.to("meta")), ValueError, r"scores must be on cpu"),
    ],
)
def test_bad_tensors(mutate, error, match):
    with pytest.raises(error, match=match):
        call(*mutate(*inputs()))


def test_head_dim_above_256():
    with pytest.raises(ValueError, match=r"head dim D must be between 1 and 256"):
        call(*inputs(d=300))


@pytest.mark.parametrize(
    "name, value, error, match",
    [
        ("budget", -1, ValueError, r"budget must be >= 0"),
        ("budget", 2.5, TypeError, r"budget must be an int"),
        ("window", -3, ValueError, r"window must be >= 0"),
        ("sinks", -1, ValueError, r"sinks must be >= 0"),
        ("block_q", 0, ValueError, r"block_q must be >= 1"),
        ("block_q", True, TypeError, r"block_q must be an int"),
        ("scale", "big", TypeError, r"scale must be a float"),
    ],
)
def test_bad_settings(name, value, error, match):
    with pytest.raises(error, match=match):
        call(*inputs(), **{name: value})


@pytest.mark.parametrize(
    "key_valid, error, match",
    [
        (torch.ones(1, 16), TypeError, r"key_valid must be a bool tensor"),
        (torch.ones(1, 15, dtype=torch.bool), ValueError, r"key_valid must have shape \[B, Nk\]"),
        (torch.ones(1, 16, dtype=torch.bool, device="meta"), ValueError, r"key_valid must be on cpu"),
    ],
)
def test_bad_key_valid(key_valid, error, match):
    with pytest.raises(error, match=match):
        call(*inputs(), key_valid=key_valid)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(budget=-1), ValueError, r"budget must be >= 0"),
        (dict(block_q=0), ValueError, r"block_q must be >= 1"),
    ],
)
def test_config_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        sparsek_hf.SparseKConfig(**kwargs)


@pytest.mark.skipif("cpu" not in sparsek_hf.compiled_backends(), reason="CPU kernel not built")
class TestLowLevelOperator:
    """torch.ops.sparsek.* check their own arguments: they are public too."""

    def run(self, q, k, v, scores, key_valid=None, budget=4, window=4, sinks=1, block_q=4):
        return torch.ops.sparsek.fwd(q, k, v, scores, key_valid, budget, window, sinks, block_q, 0.3, True)

    def test_strided_last_dim(self):
        q, k, v, scores = inputs()
        wide = torch.randn(1, 4, 16, 16)[..., ::2]
        with pytest.raises(ValueError, match=r"contiguous last dimension"):
            self.run(wide, k, v, scores)

    def test_float64_not_taken(self):
        q, k, v, scores = inputs(dtype=torch.float64)
        with pytest.raises(TypeError, match=r"CPU kernel takes float32, bfloat16 or float16"):
            self.run(q, k, v, scores)

    def test_negative_budget(self):
        with pytest.raises(ValueError, match=r"budget must be >= 0"):
            self.run(*inputs(), budget=-2)

    def test_scores_dtype(self):
        q, k, v, scores = inputs()
        with pytest.raises(TypeError, match=r"scores must be float32"):
            self.run(q, k, v, scores.double())

    def test_bad_key_valid(self):
        with pytest.raises(ValueError, match=r"key_valid must have shape"):
            self.run(*inputs(), key_valid=torch.ones(2, 16, dtype=torch.bool))

    def test_select_too_many_queries(self):
        with pytest.raises(ValueError, match=r"number of queries"):
            torch.ops.sparsek.select(torch.randn(1, 2, 8), None, 9, 2, 2, 0, 4, True)
