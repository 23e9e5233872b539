"""attn_implementation="sparsek" in Transformers: tiny random models of every supported family.

- with a budget covering the whole sequence, SparseK is causal attention: logits equal SDPA's;
- with a small budget, each layer's output equals the float64 oracle on that layer's q, k, v and
  the scores its scorer gives (recomputed here from the scorer's parameters);
- greedy generation with the evicting cache equals generation without any cache;
- save/load round trips, patch/unpatch, and the errors.
"""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    BertConfig,
    BertModel,
    FalconConfig,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

import oracle
from scorer_helpers import randomise_scorers
import sparsek_hf
from sparsek_hf import SparseKConfig, transformers_integration
from sparsek_hf.patching import attention_layers
from sparsek_hf.scorer import SCORER_FILE

VOCAB = 61


def _configs():
    common = {"vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    llama_like = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4}
    return {
        "llama": LlamaConfig(**llama_like, num_key_value_heads=2, **common),
        "qwen2": Qwen2Config(**llama_like, num_key_value_heads=2, **common),
        "qwen3": Qwen3Config(**llama_like, num_key_value_heads=1, head_dim=16, **common),
        "mistral": MistralConfig(**llama_like, num_key_value_heads=2, sliding_window=None, **common),
        "gpt2": GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common),
        "gpt_neox": GPTNeoXConfig(**llama_like, **common),
        "gptj": GPTJConfig(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=256, **common),
        # Falcon: sparsek_hf.patches.falcon where it does not route through the AttentionInterface
        "falcon": FalconConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True,
            alibi=False, **common,
        ),
    }


FAMILIES = list(_configs())


def _model(family, seed=0, **kwargs):
    """A random model with SDPA attention (eager where this Transformers has no SDPA for the family)."""
    for implementation in ("sdpa", "eager"):
        torch.manual_seed(seed)
        try:
            return AutoModelForCausalLM.from_config(
                _configs()[family], attn_implementation=implementation, **kwargs
            ).eval()
        except ValueError:
            continue
    raise AssertionError(f"cannot build a {family} model")


def _batch(seed=0, length=48, pad=6):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_budget_covering_the_sequence_equals_sdpa(family):
    model = _model(family)
    ids, mask = _batch()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        sparsek_hf.patch(model, SparseKConfig(budget=ids.shape[1], window=3, sinks=1, block_q=8))
        got = model(ids, attention_mask=mask).logits
    valid = mask.bool()  # padded query rows attend nothing in SparseK; SDPA gives them arbitrary values
    assert oracle.rel_err(got[valid], want[valid]) < 1e-5


@pytest.fixture
def recorded_calls(monkeypatch):
    """Every call of the sparsek attention function: (module, q, k, v, mask, scaling, output)."""
    calls = []
    real = transformers_integration.sparsek_attention_forward

    def recording(module, query, key, value, attention_mask, *args, **kwargs):
        out, weights = real(module, query, key, value, attention_mask, *args, **kwargs)
        calls.append((module, query, key, value, attention_mask, kwargs.get("scaling"), out))
        return out, weights

    monkeypatch.setitem(AttentionInterface._global_mapping, "sparsek", recording)
    monkeypatch.setattr(transformers_integration, "sparsek_attention_forward", recording)  # the Falcon patch
    return calls


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("soft", [True, False])
def test_small_budget_layer_equals_oracle(family, soft, recorded_calls):
    settings = SparseKConfig(budget=5, window=6, sinks=2, block_q=4, soft=soft)
    model = sparsek_hf.patch(_model(family), settings)
    randomise_scorers(model, slope=0.5)
    ids, mask = _batch(seed=1)
    with torch.no_grad():
        model(ids, attention_mask=mask, use_cache=False)
    assert len(recorded_calls) == len(attention_layers(model)) == 2
    for module, q, k, v, attn_mask, scaling, out in recorded_calls:
        scorer = module.sparsek_scorer
        positions = torch.arange(k.shape[2], dtype=torch.float64)
        u = torch.einsum("bhnd,hd->bhn", v.double(), scorer.weight.double())
        u = u + scorer.bias.double()[:, None] + scorer.slope.double() * positions
        key_valid = attn_mask  # what sparsek_mask made of the padding mask
        assert key_valid.dtype == torch.bool and torch.equal(key_valid, mask.bool())
        want, _ = oracle.attention(
            q, k, v, u, budget=5, window=6, sinks=2, block_q=4, scale=scaling, soft=soft, key_valid=key_valid
        )
        assert oracle.rel_err(out.transpose(1, 2), want) < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_with_the_evicting_cache_equals_no_cache(family):
    model = sparsek_hf.patch(_model(family), SparseKConfig(budget=5, window=4, sinks=1, block_q=4))
    randomise_scorers(model, slope=0.5)
    ids, mask = _batch(seed=2, length=20, pad=3)
    kwargs = {"attention_mask": mask, "max_new_tokens": 36, "do_sample": False}
    out = model.generate(ids, return_dict_in_generate=True, **kwargs)
    assert torch.equal(out.sequences, model.generate(ids, use_cache=False, **kwargs))
    cache = out.past_key_values
    assert cache.get_seq_length() == ids.shape[1] + 35
    assert all(type(layer).__name__ == "SparseKLayer" and not layer.dense for layer in cache.layers)
    assert max(layer.num_slots() for layer in cache.layers) <= 1 + 4 + 4 + 5


def test_scorers_are_parameters_that_train():
    model = sparsek_hf.patch(_model("llama"), SparseKConfig(budget=4, window=4, sinks=1, block_q=4))
    names = [n for n, _ in model.named_parameters() if ".sparsek_scorer." in n]
    assert len(names) == 2 * 3  # weight, bias, slope per layer
    randomise_scorers(model, slope=0.5)
    ids, _ = _batch(seed=3)
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if n.endswith("sparsek_scorer.weight")]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_scorers_appear_on_first_use_on_the_layers_dtype():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        _configs()["llama"], attn_implementation="sparsek", dtype=torch.bfloat16
    ).eval()
    assert not any(".sparsek_scorer." in n for n, _ in model.named_parameters())
    ids, _ = _batch()
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    scorers = [layer.sparsek_scorer for layer in attention_layers(model)]
    assert len(scorers) == 2 and all(s.weight.dtype == torch.bfloat16 for s in scorers)
    assert all(float(s.slope.detach()) == SparseKConfig().init_slope and s.weight.abs().sum() == 0 for s in scorers)
    assert model.config.sparsek == SparseKConfig().to_dict()


class _ReportCatcher(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def load_reports():
    catcher = _ReportCatcher()
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addHandler(catcher)
    yield catcher.messages
    logger.removeHandler(catcher)


def test_save_pretrained_round_trip(tmp_path, load_reports):
    settings = SparseKConfig(budget=5, window=3, sinks=2, block_q=4, soft=False, init_slope=0.25)
    model = sparsek_hf.patch(_model("llama"), settings)
    randomise_scorers(model, seed=4, slope=0.5)
    ids, mask = _batch(seed=4)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # implementation and settings from config.json
    assert loaded.config._attn_implementation == "sparsek"
    assert transformers_integration.settings_of(loaded.config) == settings
    assert not any("LOAD REPORT" in m for m in load_reports)  # the scorer tensors are not reported as unexpected
    with torch.no_grad():
        got = loaded(ids, attention_mask=mask).logits
    assert torch.equal(got, want)
    for old, new in zip(attention_layers(model), attention_layers(loaded)):
        for name in ("weight", "bias", "slope"):
            assert torch.equal(getattr(old.sparsek_scorer, name), getattr(new.sparsek_scorer, name))


def test_patched_family_round_trip_and_scorer_files(tmp_path):
    model = sparsek_hf.patch(_model("falcon"), SparseKConfig(budget=5, window=3, sinks=1, block_q=4))
    randomise_scorers(model, seed=5, slope=0.5)
    ids, mask = _batch(seed=5)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path / "model")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    # An inline Falcon (older Transformers) cannot be built with "sparsek" and loads as SDPA; one that
    # routes through the AttentionInterface loads in sparsek mode. patch() serves both.
    inline = sparsek_hf.patches.falcon.computes_attention_inline(attention_layers(loaded)[0])
    assert loaded.config._attn_implementation == ("sdpa" if inline else "sparsek")
    sparsek_hf.patch(loaded)  # settings from config.json, scorers from the checkpoint
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, want)

    path = sparsek_hf.save_scorers(model, tmp_path)
    assert path.endswith(SCORER_FILE)
    fresh = sparsek_hf.patch(_model("falcon"), SparseKConfig(budget=5, window=3, sinks=1, block_q=4), scorer_path=path)
    for old, new in zip(attention_layers(model), attention_layers(fresh)):
        assert torch.equal(old.sparsek_scorer.weight, new.sparsek_scorer.weight)
    randomise_scorers(fresh, seed=99, slope=0.5)
    assert sparsek_hf.load_scorers(fresh, tmp_path) == 2
    assert torch.equal(attention_layers(fresh)[1].sparsek_scorer.bias, attention_layers(model)[1].sparsek_scorer.bias)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gptj", "falcon"])
def test_patch_then_unpatch_restores_the_model(family):
    model = _model(family)
    original = model.config._attn_implementation
    before = {n: p.clone() for n, p in model.named_parameters()}
    ids, mask = _batch(seed=6)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        sparsek_hf.patch(model, SparseKConfig(budget=3, window=2, sinks=1, block_q=4))
        randomise_scorers(model, slope=0.5)
        changed = model(ids, attention_mask=mask).logits
        assert oracle.rel_err(changed, want) > 1e-3  # a small budget really changes the attention
        sparsek_hf.unpatch(model)
        got = model(ids, attention_mask=mask).logits
    assert torch.equal(got, want)
    assert {n for n, _ in model.named_parameters()} == set(before)
    assert model.config._attn_implementation == original
    assert not hasattr(model.config, "sparsek") and not hasattr(model.config, "attn_implementation")


def test_bad_settings_and_unsupported_models_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="budget must be >= 0"):
        SparseKConfig(budget=-1)
    with pytest.raises(TypeError, match="window must be an int"):
        SparseKConfig(window=2.5)
    with pytest.raises(ValueError, match="init_slope must be a positive"):
        SparseKConfig(init_slope=0.0)

    model = _model("llama")
    with pytest.raises(TypeError, match=r"unknown SparseKConfig fields \['budgett'\]"):
        sparsek_hf.configure(model, budgett=3)
    with pytest.raises(TypeError, match="config must be a sparsek_hf.SparseKConfig"):
        sparsek_hf.configure(model, {"budget": 3})
    with pytest.raises(TypeError, match="takes a Transformers model or config"):
        sparsek_hf.configure("llama")
    with pytest.raises(TypeError, match="config must be a sparsek_hf.SparseKConfig"):
        sparsek_hf.patch(model, config={"budget": 3})
    with pytest.raises(ValueError, match="scorer_path .* does not exist"):
        sparsek_hf.patch(model, scorer_path=tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="holds no SparseK scorer weights"):
        sparsek_hf.patch(model, scorer_path=tmp_path)

    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    with pytest.raises(ValueError, match="does not support model_type 'bert'; supported: falcon, gpt2, gpt_neox"):
        sparsek_hf.patch(bert)

    ids, _ = _batch()
    sparsek_hf.patch(model)
    model.config.sparsek = {"budget": 4, "windw": 2}
    with pytest.raises(ValueError, match=r"unknown SparseKConfig fields \['windw'\]"):
        model(ids)
    model.config.sparsek = {"budget": -4}
    with pytest.raises(ValueError, match="budget must be >= 0"):
        model(ids)

    alibi = _configs()["falcon"]
    alibi.alibi, alibi.new_decoder_architecture = True, False
    falcon = sparsek_hf.patch(AutoModelForCausalLM.from_config(alibi).eval())
    with pytest.raises(ValueError, match="ALiBi"):
        falcon(ids)


def test_attention_function_refuses_what_it_cannot_compute():
    model = sparsek_hf.patch(_model("llama"))
    layer = attention_layers(model)[0]
    q, kv = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="soft-capping"):
        transformers_integration.sparsek_attention_forward(layer, q, kv, kv, None, softcap=30.0)
    with pytest.raises(ValueError, match="causal only"):
        transformers_integration.sparsek_attention_forward(layer, q, kv, kv, None, is_causal=False)
    alibi = _configs()["falcon"]
    alibi.alibi, alibi.new_decoder_architecture = True, False
    alibi_layer = attention_layers(AutoModelForCausalLM.from_config(alibi))[0]  # with a caller's own mask
    with pytest.raises(ValueError, match="ALiBi"):
        transformers_integration.sparsek_attention_forward(alibi_layer, q, kv, kv, torch.zeros(1, 1, 5, 5))
    with pytest.raises(ValueError, match="expected \\[B, Nk\\] = \\[1, 5\\]"):
        transformers_integration.sparsek_attention_forward(layer, q, kv, kv, torch.ones(1, 7, dtype=torch.bool))
    # a user's 4-D mask contributes which keys are real
    four_d = torch.ones(1, 1, 5, 5, dtype=torch.bool).tril()
    four_d[..., 1] = False
    out, _ = transformers_integration.sparsek_attention_forward(layer, q, kv, kv, four_d)
    two_d, _ = transformers_integration.sparsek_attention_forward(layer, q, kv, kv, four_d[:, 0, -1])
    assert torch.equal(out, two_d)


def test_from_pretrained_with_sparsek_on_a_plain_checkpoint(tmp_path):
    model = _model("qwen2")
    model.save_pretrained(tmp_path)
    ids, mask = _batch(seed=7)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sparsek").eval()
    sparsek_hf.configure(loaded, budget=64, window=8, sinks=0, block_q=16)
    with torch.no_grad():
        got = loaded(ids, attention_mask=mask).logits
    valid = mask.bool()
    assert oracle.rel_err(got[valid], want[valid]) < 1e-5
