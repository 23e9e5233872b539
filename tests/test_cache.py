"""SparseKCache and the decode operators (csrc/decode.cpp) against the float64 oracle.

The eviction rule is checked twice: at the operator level, with caches built from the oracle's own
selection (keys dropped, score-only records), and end to end, with teacher-forced cached decoding of
a tiny model equal to its full non-cached forward.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

import oracle
from scorer_helpers import randomise_scorers
import sparsek_hf
from sparsek_hf import SparseKCache, SparseKConfig, _decode_ops
from sparsek_hf.cache import SparseKLayer

pytestmark = pytest.mark.skipif(not _decode_ops.available(), reason="needs the compiled sparsek operators")

SELECTIONS = [  # budget, window, sinks, block_q, soft
    (5, 6, 2, 4, True),
    (7, 3, 0, 1, True),
    (4, 0, 1, 5, True),
    (6, 5, 3, 3, False),
    (0, 4, 2, 4, True),
    (40, 2, 1, 4, True),
]


def _random_case(gen, batch=2, kv_heads=2, group=2, nk=70, nq=6, d=8, ties=False):
    q = torch.randn(batch, kv_heads * group, nq, d, generator=gen)
    k = torch.randn(batch, kv_heads, nk, d, generator=gen)
    v = torch.randn(batch, kv_heads, nk, d, generator=gen)
    u = 2.0 * torch.randn(batch, kv_heads, nk, generator=gen)
    if ties:
        u = u.round()
    return q, k, v, u


def _shuffled_slots(gen, k, v, u, empty=4):
    """The keys of every row at random slots, with `empty` unused slots: a compacted cache's layout."""
    batch, heads, nk, d = k.shape
    slots = nk + empty
    pos = torch.full((batch, heads, slots), -1, dtype=torch.long)
    kc, vc = torch.zeros(batch, heads, slots, d), torch.zeros(batch, heads, slots, d)
    uc = torch.full((batch, heads, slots), math.nan)
    for b in range(batch):
        for h in range(heads):
            where = torch.randperm(slots, generator=gen)[:nk]
            pos[b, h, where] = torch.arange(nk)
            kc[b, h, where], vc[b, h, where], uc[b, h, where] = k[b, h], v[b, h], u[b, h]
    return kc, vc, uc, pos


@pytest.mark.parametrize("budget,window,sinks,block_q,soft", SELECTIONS)
def test_decode_op_on_shuffled_slots_matches_oracle(budget, window, sinks, block_q, soft):
    gen = torch.Generator().manual_seed(budget * 100 + window * 10 + block_q)
    for ties in (False, True):
        q, k, v, u = _random_case(gen, ties=ties)
        ref, lse_ref = oracle.attention(q, k, v, u, budget=budget, window=window, sinks=sinks, block_q=block_q, soft=soft)
        kc, vc, uc, pos = _shuffled_slots(gen, k, v, u)
        nq, nk = q.shape[2], k.shape[2]
        out, lse = _decode_ops.decode(
            q, kc, vc, uc, pos, None, query_pos0=nk - nq, budget=budget, window=window, sinks=sinks,
            block_q=block_q, scale=q.shape[-1] ** -0.5, soft=soft,
        )
        assert oracle.rel_err(out, ref) < 1e-5
        finite = torch.isfinite(lse_ref)
        assert torch.equal(torch.isfinite(lse), finite)
        assert oracle.rel_err(lse[finite], lse_ref[finite]) < 1e-5


def test_decode_select_threshold_matches_oracle():
    gen = torch.Generator().manual_seed(7)
    for trial in range(40):
        n, budget = int(torch.randint(2, 60, (), generator=gen)), int(torch.randint(1, 12, (), generator=gen))
        u = 3.0 * torch.randn(1, 1, n, generator=gen)
        if trial % 2:
            u = (u * 2).round() / 2  # ties and shared breakpoints
        pos = torch.arange(n).view(1, 1, n)
        gate, tau = _decode_ops.decode_select(
            u, pos, None, query_pos0=n + 3, num_queries=1, budget=budget, window=0, sinks=0, block_q=1, soft=True
        )
        want = oracle.block_selection(u[0, 0].double().numpy(), [True] * n, n + 3, budget, 0, 0, True)
        got = {j: float(gate[0, 0, 0, j]) for j in range(n) if gate[0, 0, 0, j] > 0}
        assert set(got) == {j for j, g in want.items() if g > 0}
        for j, g in got.items():
            assert abs(g - want[j]) < 1e-6
        if n > budget:  # tau solves sum clip(u - tau, 0, 1) = budget (not unique where that sum is flat)
            mass = (u[0, 0].double() - float(tau)).clamp(0, 1).sum()
            assert abs(float(mass) - budget) < 1e-9


@pytest.mark.parametrize("budget,window,sinks,block_q,soft", SELECTIONS[:4])
def test_oracle_eviction_keeps_later_blocks_exact(budget, window, sinks, block_q, soft):
    """Drop what the oracle's selection at p0 says is dead, keep score-only records of the rest of
    the candidates: every later query block still gets the oracle's answer on the full sequence."""
    gen = torch.Generator().manual_seed(11 + budget)
    q, k, v, u = _random_case(gen, nk=80, nq=12)
    nk, nq = k.shape[2], q.shape[2]
    p0 = (nk - nq) // block_q * block_q
    ref, _ = oracle.attention(q, k, v, u, budget=budget, window=window, sinks=sinks, block_q=block_q, soft=soft)
    batch, heads = u.shape[:2]
    rows, tails = [], []
    for b in range(batch):
        for h in range(heads):
            ub = u[b, h].double().numpy()
            chosen = oracle.block_selection(ub, [True] * nk, p0, budget, window, sinks, soft)
            cand = [j for j in range(sinks, p0 - window + 1)]
            tau = oracle.threshold(ub[cand], budget) if len(cand) > budget and budget > 0 else -math.inf
            keep = [j for j in range(nk) if j < sinks or j > p0 - window or j in chosen]
            tail = [float(u[b, h, j]) for j in cand if j not in chosen and ub[j] > tau and budget > 0]
            rows.append(keep)
            tails.append(tail)
    slots, records = max(map(len, rows)), max(1, max(map(len, tails)))
    d = k.shape[-1]
    kc, vc = torch.zeros(batch, heads, slots, d), torch.zeros(batch, heads, slots, d)
    uc, pos = torch.full((batch, heads, slots), math.nan), torch.full((batch, heads, slots), -1)
    tail = torch.full((batch, heads, records), -math.inf)
    for i, (keep, rec) in enumerate(zip(rows, tails)):
        b, h = divmod(i, heads)
        idx = torch.tensor(keep)
        kc[b, h, : len(keep)], vc[b, h, : len(keep)] = k[b, h, idx], v[b, h, idx]
        uc[b, h, : len(keep)], pos[b, h, : len(keep)] = u[b, h, idx], idx
        tail[b, h, : len(rec)] = torch.tensor(rec)
    out, _ = _decode_ops.decode(
        q, kc, vc, uc, pos, tail, query_pos0=nk - nq, budget=budget, window=window, sinks=sinks, block_q=block_q,
        scale=d**-0.5, soft=soft,
    )
    assert oracle.rel_err(out, ref) < 1e-5


# -- a tiny model: cached decoding equals the full forward -------------------------------------------


def _with_cache(model, cache) -> dict:
    """The cache keyword: ``cache`` since Transformers 5.24, ``past_key_values`` before (the GPU has 5.17)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def _tiny_llama(seed=0, layers=2, hidden=32):
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("budget,window,sinks,block_q,soft", SELECTIONS)
@pytest.mark.parametrize("padded", [False, True])
def test_teacher_forced_cached_decoding_equals_full_forward(budget, window, sinks, block_q, soft, padded):
    model = _tiny_llama()
    sparsek_hf.patch(model, SparseKConfig(budget=budget, window=window, sinks=sinks, block_q=block_q, soft=soft))
    randomise_scorers(model, std=1.0)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 64, (2, 90), generator=gen)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :9] = 0
    prefill = 13
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=False).logits
        cache = SparseKCache()
        steps = [model(ids[:, :prefill], attention_mask=mask[:, :prefill], **_with_cache(model, cache)).logits]
        for t in range(prefill, ids.shape[1]):
            steps.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], **_with_cache(model, cache)).logits)
    cached = torch.cat(steps, dim=1)
    valid = mask.bool()
    assert oracle.rel_err(cached[valid], full[valid]) < 1e-5
    layer = cache.layers[0]
    assert layer.get_seq_length() == ids.shape[1]
    if budget < 40:  # something was evicted, so the compacted decode path ran
        assert not layer.dense
        assert layer.num_slots() <= sinks + window + block_q + budget


def test_generate_turns_dynamic_cache_into_sparsek_layers():
    model = _tiny_llama()
    sparsek_hf.patch(model, SparseKConfig(budget=6, window=5, sinks=2, block_q=4))
    randomise_scorers(model, std=1.0)
    ids = torch.randint(1, 64, (2, 20), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    out = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, return_dict_in_generate=True)
    no_cache = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, use_cache=False)
    assert torch.equal(out.sequences, no_cache)
    cache = out.past_key_values
    assert all(isinstance(layer, SparseKLayer) for layer in cache.layers)
    assert cache.get_seq_length() == 59
    assert max(layer.num_slots() for layer in cache.layers) <= 2 + 5 + 4 + 6


def test_beam_search_reorders_the_cache():
    model = _tiny_llama(seed=1)
    sparsek_hf.patch(model, SparseKConfig(budget=5, window=4, sinks=1, block_q=4))
    randomise_scorers(model, std=1.0)
    ids = torch.randint(1, 64, (1, 12), generator=torch.Generator().manual_seed(6))
    kwargs = {"max_new_tokens": 30, "do_sample": False, "num_beams": 3, "early_stopping": False}
    cached = model.generate(ids, **_with_cache(model, SparseKCache()), **kwargs)
    uncached = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_cache_stays_bounded_while_generating_4096_tokens():
    """Memory: every layer keeps at most sinks + window + block_q + budget whole K/V entries per kv head
    (the stated margin on top is 0), plus a few score-only records (4 bytes each)."""
    sinks, window, block_q, budget = 4, 32, 16, 32
    bound = sinks + window + block_q + budget
    model = _tiny_llama(layers=1, hidden=16)
    sparsek_hf.patch(model, SparseKConfig(budget=budget, window=window, sinks=sinks, block_q=block_q))
    randomise_scorers(model, std=1.0)
    ids = torch.randint(1, 64, (1, 4096 + 8), generator=torch.Generator().manual_seed(8))
    cache = SparseKCache()
    most_slots = most_records = 0
    with torch.no_grad():
        model(ids[:, :8], **_with_cache(model, cache))
        for t in range(8, ids.shape[1]):
            model(ids[:, t : t + 1], **_with_cache(model, cache))
            layer = cache.layers[0]
            most_slots = max(most_slots, layer.num_slots())
            most_records = max(most_records, int(layer.num_score_records().max()))
    layer = cache.layers[0]
    assert layer.get_seq_length() == ids.shape[1]
    assert cache.get_mask_sizes(1, 0) == (ids.shape[1] + 1, 0)
    assert most_slots <= bound
    assert layer.keys.shape[-2] == layer.num_slots() <= bound
    assert most_records <= budget  # score-only records: candidates still fractional at tau
    assert int(layer.num_entries().max()) <= bound


# -- the cache API -----------------------------------------------------------------------------------


def test_layer_without_scores_refuses_to_evict():
    layer = SparseKLayer(SparseKConfig(budget=2, window=2, sinks=0, block_q=2))
    k = torch.randn(1, 1, 8, 4)
    layer.update(k, k)  # nobody fills the scores: the model was not in sparsek mode
    with pytest.raises(RuntimeError, match="never scored"):
        layer.update(k[:, :, :1], k[:, :, :1])


def test_layer_without_settings_keeps_everything():
    layer = SparseKLayer()
    for _ in range(5):
        k = torch.randn(2, 2, 3, 4)
        keys, values = layer.update(k, k)
    assert keys.shape == (2, 2, 15, 4) and layer.dense and layer.get_seq_length() == 15


def test_crop_after_eviction_is_refused_and_batch_ops_follow_the_batch():
    model = _tiny_llama()
    sparsek_hf.patch(model, SparseKConfig(budget=3, window=3, sinks=1, block_q=2))
    cache = SparseKCache(model.config)
    ids = torch.randint(1, 64, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(ids[:, :10], **_with_cache(model, cache))
        for t in range(10, 30):
            model(ids[:, t : t + 1], **_with_cache(model, cache))
    layer = cache.layers[0]
    assert not layer.dense
    with pytest.raises(ValueError, match="cannot be cropped"):
        cache.crop(-1)
    before = (layer.keys[1].clone(), layer.key_pos[1].clone(), layer.scores[1].clone())
    cache.reorder_cache(torch.tensor([1, 1]))
    assert torch.equal(layer.keys[0], before[0]) and torch.equal(layer.key_pos[0], before[1])
    assert torch.allclose(layer.scores[0], before[2], equal_nan=True)
    cache.batch_select_indices(torch.tensor([0]))
    assert layer.keys.shape[0] == layer.key_pos.shape[0] == layer.block_gate.shape[0] == 1


def test_static_cache_is_refused():
    model = _tiny_llama()
    sparsek_hf.patch(model, SparseKConfig(budget=3, window=3, sinks=1, block_q=2))
    ids = torch.randint(1, 64, (1, 8))
    cache = StaticCache(config=model.config, max_cache_len=32)
    with pytest.raises(ValueError, match="DynamicCache or SparseKCache"):
        with torch.no_grad():
            model(ids, **_with_cache(model, cache))


def test_decode_op_errors_name_the_argument():
    q, k = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 5, 8)
    u, pos = torch.randn(1, 2, 5), torch.arange(5).expand(1, 2, 5).contiguous()
    common = {"query_pos0": 5, "budget": 2, "window": 1, "sinks": 0, "block_q": 2, "scale": 0.3, "soft": True}
    with pytest.raises(TypeError, match="key_pos must be int64"):
        _decode_ops.decode(q, k, k, u, pos.int(), None, **common)
    with pytest.raises(ValueError, match="scores must have shape"):
        _decode_ops.decode(q, k, k, u[..., :4], pos, None, **common)
    with pytest.raises(ValueError, match="multiple of the kv heads"):
        _decode_ops.decode(q[:, :3], k, k, u, pos, None, **common)
    with pytest.raises(ValueError, match="budget must be >= 0"):
        _decode_ops.decode(q, k, k, u, pos, None, **{**common, "budget": -1})
    with pytest.raises(TypeError, match="tail_scores must be float32"):
        _decode_ops.decode(q, k, k, u, pos, torch.zeros(1, 2, 3, dtype=torch.float64), **common)


def test_a_model_loaded_in_sparsek_mode_scores_keys_cached_before_its_scorers_existed():
    """attn_implementation="sparsek" creates the scorers inside the first forward, after that forward
    already cached its keys: the cache hook scores them on the next call, before any eviction."""
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(_tiny_llama().config, attn_implementation="sparsek").eval()
    sparsek_hf.configure(model, budget=4, window=3, sinks=1, block_q=4)
    ids = torch.randint(1, 64, (1, 40), generator=torch.Generator().manual_seed(9))
    cache = SparseKCache()
    with torch.no_grad():
        steps = [model(ids[:, :10], **_with_cache(model, cache)).logits]
        assert cache.layers[0].unscored  # the scorers were made after this forward cached its keys
        for t in range(10, 40):
            steps.append(model(ids[:, t : t + 1], **_with_cache(model, cache)).logits)
        full = model(ids, use_cache=False).logits
    assert oracle.rel_err(torch.cat(steps, 1), full) < 1e-5
    assert not cache.layers[0].dense


# -- CUDA ----------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("budget,window,sinks,block_q,soft", SELECTIONS[:4])
def test_decode_op_on_cuda_matches_oracle(dtype, budget, window, sinks, block_q, soft):
    gen = torch.Generator().manual_seed(budget + 7 * window)
    q, k, v, u = _random_case(gen, d=64)
    ref, _ = oracle.attention(q, k, v, u, budget=budget, window=window, sinks=sinks, block_q=block_q, soft=soft)
    kc, vc, uc, pos = _shuffled_slots(gen, k, v, u)
    nq, nk = q.shape[2], k.shape[2]
    out, lse = _decode_ops.decode(
        q.cuda().to(dtype), kc.cuda().to(dtype), vc.cuda().to(dtype), uc.cuda(), pos.cuda(), None,
        query_pos0=nk - nq, budget=budget, window=window, sinks=sinks, block_q=block_q, scale=0.125, soft=soft,
    )
    assert out.dtype == dtype and out.is_cuda
    assert oracle.rel_err(out, ref) < 1e-2


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_teacher_forced_cached_decoding_on_cuda(dtype):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64)  # head dim 64: the CUDA kernel's
    model = LlamaForCausalLM(config).eval()
    sparsek_hf.patch(model, SparseKConfig(budget=8, window=16, sinks=2, block_q=8))
    randomise_scorers(model, std=0.5)
    model = model.to("cuda", dtype)
    ids = torch.randint(1, 64, (2, 160), generator=torch.Generator().manual_seed(4)).cuda()
    cache = SparseKCache()
    with torch.no_grad():
        full = model(ids, use_cache=False).logits.float()
        steps = [model(ids[:, :24], **_with_cache(model, cache)).logits]
        for t in range(24, ids.shape[1]):
            steps.append(model(ids[:, t : t + 1], **_with_cache(model, cache)).logits)
    cached = torch.cat(steps, dim=1).float()
    assert oracle.rel_err(cached, full) < 3e-2
    layer = cache.layers[0]
    assert layer.keys.is_cuda and not layer.dense and layer.num_slots() <= 2 + 16 + 8 + 8
