"""Scorer calibration (sparsek_hf.calibrate, python -m eval.calibrate) on tiny random Llamas.

- the capture sees exactly what dense SDPA attention computes, and leaves the model as it was;
- calibration lowers the distillation loss on held-out windows, and the reported loss is the one
  the model's own scorers give (recomputed here against the float64 oracle);
- the saved weights load through patch(scorer_path=...) and save_pretrained / from_pretrained;
- bad input raises clear errors.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from test_eval_perplexity import VOCAB, save_tiny, tiny_llama, tiny_tokenizer
from transformers import AutoModelForCausalLM, FalconConfig, FalconForCausalLM, LlamaConfig, LlamaForCausalLM

import oracle
import sparsek_hf
from sparsek_hf import SparseKConfig, calibration, evaluation
from sparsek_hf.calibration import FitOptions
from sparsek_hf.patching import attention_layers

CONFIG = SparseKConfig(budget=16, window=16, sinks=2, block_q=16)
CTX = 128


@pytest.fixture(scope="module")
def text_ids():
    """The calibration part of the shipped text, in the tiny word-level vocabulary."""
    ids = torch.tensor(tiny_tokenizer()(evaluation.load_text())["input_ids"])
    calib, _ = evaluation.split_tokens(ids)
    return calib


MAGNETS = list(range(40, 50))  # word ids of rank 40-49: about 2.7% of the text's tokens


def planted_llama(seed: int = 3) -> LlamaForCausalLM:
    """A random tiny Llama in which a few rare words draw attention from every later query.

    A random model attends almost uniformly, so no query-independent score can beat recency by much.
    Here hidden dimension 0 marks the "magnet" words, every key copies it into the slowest rotary
    pair of its head and every query has a constant bias there: a pretrained model's pattern in
    miniature (some tokens matter to all later queries), which the scorers must find from the values.
    """
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False, pad_token_id=0,
        attention_bias=True,
    )
    model = LlamaForCausalLM(config).eval()
    head_dim, slow_pair = 16, (7, 15)  # rotate_half pairs dims d and d + 8; pair 7 turns slowest
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 0.0
        model.model.embed_tokens.weight[MAGNETS, 0] = 0.1
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.q_proj.bias.zero_()
            for d in slow_pair:
                for h in range(config.num_key_value_heads):
                    attn.k_proj.weight[h * head_dim + d].zero_()
                    attn.k_proj.weight[h * head_dim + d, 0] = 2.0
                    attn.k_proj.bias[h * head_dim + d] = 0.0
                for h in range(config.num_attention_heads):
                    attn.q_proj.bias[h * head_dim + d] = 2.0
    return model


@pytest.fixture(scope="module")
def calibrated(text_ids):
    model = planted_llama(seed=3)
    report = sparsek_hf.calibrate(model, text_ids, CONFIG, ctx=CTX, max_windows=4, options=FitOptions(steps=30))
    return model, report


def _causal_sdpa(q, k, v, scale):
    group = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def test_capture_records_dense_attention_and_restores_the_model(text_ids):
    model = tiny_llama()
    windows = dict(enumerate(calibration.calibration_windows(text_ids, 64, 2)))
    with torch.no_grad():
        before = model(windows[1][None]).logits
    captures = calibration.capture_attention(model, windows)
    assert model.config._attn_implementation == "sdpa"
    assert len(captures) == 2 and sorted(captures[0].q) == [0, 1]
    for cap in captures:
        assert cap.q[0].shape == (1, 4, 64, 16) and cap.k[0].shape == (1, 2, 64, 16)
        for i in windows:
            want = _causal_sdpa(cap.q[i].double(), cap.k[i].double(), cap.v[i].double(), cap.scale)
            assert oracle.rel_err(cap.out[i], want) < 1e-5
    with torch.no_grad():
        assert torch.equal(model(windows[1][None]).logits, before)


def test_calibration_lowers_the_heldout_distillation_loss(calibrated):
    model, report = calibrated
    assert report.train_windows == [0, 1, 2] and report.heldout_windows == [3]
    assert len(report.layers) == 2
    for layer in report.layers:
        assert layer.heldout_after < 0.5 * layer.heldout_init, layer
        assert layer.heldout_after <= layer.heldout_start  # early stopping keeps the best held-out point
    assert model.config._attn_implementation == "sparsek"
    assert sparsek_hf.transformers_integration.settings_of(model.config) == CONFIG


def test_reported_loss_is_what_the_models_scorers_give(calibrated, text_ids):
    """Recompute the held-out loss from a fresh dense capture, the model's scorers and the oracle."""
    model, report = calibrated
    dense = planted_llama(seed=3)
    heldout = calibration.calibration_windows(text_ids, CTX, 4)[3]
    captures = calibration.capture_attention(dense, {0: heldout})
    first = calibration._first_selective_row(CONFIG)
    for index, (layer, cap) in enumerate(zip(attention_layers(model), captures)):
        with torch.no_grad():
            scores = layer.sparsek_scorer(cap.v[0], 0)
        out, _ = oracle.attention(cap.q[0].double(), cap.k[0].double(), cap.v[0].double(), scores.double(),
                               budget=CONFIG.budget, window=CONFIG.window, sinks=CONFIG.sinks,
                               block_q=CONFIG.block_q, scale=cap.scale)
        err = (out[:, :, first:] - cap.out[0][:, :, first:].double()).square().sum()
        loss = float(err / cap.out[0][:, :, first:].double().square().sum())
        assert loss == pytest.approx(report.layers[index].heldout_after, rel=1e-3)


def test_saved_scorers_load_through_patch_and_from_pretrained(calibrated, text_ids, tmp_path):
    model, _ = calibrated
    ids = text_ids[:200][None]
    with torch.no_grad():
        want = model(ids).logits
    path = sparsek_hf.save_scorers(model, tmp_path / "scorers.safetensors")
    with safe_open(path, framework="pt") as f:
        assert json.loads(f.metadata()["sparsek_config"]) == CONFIG.to_dict()
    fresh = sparsek_hf.patch(planted_llama(seed=3), CONFIG, scorer_path=path)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, want)
    model.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", attn_implementation="sparsek").eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)


def test_calibrate_saves_where_asked_and_is_deterministic(text_ids, tmp_path):
    options = FitOptions(steps=4, eval_every=2)
    a, b = planted_llama(), planted_llama()
    ra = sparsek_hf.calibrate(a, text_ids, CONFIG, ctx=64, max_windows=3, options=options,
                              save_path=tmp_path / "a.safetensors")
    rb = sparsek_hf.calibrate(b, text_ids, CONFIG, ctx=64, max_windows=3, options=options)
    assert os.path.isfile(tmp_path / "a.safetensors")
    assert ra.to_dict() == rb.to_dict()
    for la, lb in zip(attention_layers(a), attention_layers(b)):
        assert torch.equal(la.sparsek_scorer.weight, lb.sparsek_scorer.weight)
        assert torch.equal(la.sparsek_scorer.slope, lb.sparsek_scorer.slope)
    assert any(la.sparsek_scorer.weight.any() for la in attention_layers(a))  # moved away from the initialisation


def test_a_context_that_never_selects_keeps_the_initial_scorer(text_ids):
    model = tiny_llama()
    report = sparsek_hf.calibrate(model, text_ids, SparseKConfig(budget=64, window=16, sinks=2, block_q=16), ctx=64,
                                  max_windows=2, options=FitOptions(steps=3))
    assert all(layer.steps == 0 and layer.heldout_init == 0.0 for layer in report.layers)
    assert all(not layer.sparsek_scorer.weight.any() for layer in attention_layers(model))


def test_calibrate_rejects_bad_input(text_ids):
    model = tiny_llama()
    with pytest.raises(ValueError, match="at least 2 windows"):
        sparsek_hf.calibrate(model, text_ids[:100], CONFIG, ctx=64)
    with pytest.raises(ValueError, match="heldout_windows"):
        sparsek_hf.calibrate(model, text_ids, CONFIG, ctx=64, heldout_windows=0)
    with pytest.raises(TypeError, match="integer tensor"):
        sparsek_hf.calibrate(model, text_ids.float(), CONFIG, ctx=64)
    with pytest.raises(ValueError, match="1-D"):
        sparsek_hf.calibrate(model, text_ids[:256].view(2, 128), CONFIG, ctx=64)
    with pytest.raises(TypeError, match="SparseKConfig"):
        sparsek_hf.calibrate(model, text_ids, {"budget": 16}, ctx=64)
    with pytest.raises(TypeError, match="FitOptions"):
        sparsek_hf.calibrate(model, text_ids, CONFIG, ctx=64, options={"steps": 3})
    with pytest.raises(ValueError, match="steps"):
        FitOptions(steps=-1)
    with pytest.raises(ValueError, match="lr"):
        FitOptions(lr=0.0)
    falcon = FalconForCausalLM(FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                            num_attention_heads=4, new_decoder_architecture=True, alibi=False))
    with pytest.raises(ValueError, match="AttentionInterface"):
        sparsek_hf.calibrate(falcon, text_ids, CONFIG, ctx=64)
    assert model.config._attn_implementation == "sdpa"  # nothing was changed by the refused calls


def test_calibrate_cli_writes_scorers_and_report(tmp_path, capsys):
    model_dir = save_tiny(tmp_path / "model")
    out, report = tmp_path / "scorers", tmp_path / "report.json"
    calibration.main(["--model", model_dir, "--ctx", "64", "--windows", "3", "--steps", "4", "--budgets", "16,32",
                      "--window", "16", "--sinks", "2", "--block-q", "16", "--out", str(out), "--report", str(report),
                      "--device", "cpu", "--no-progress"])
    assert sorted(os.listdir(out)) == ["scorers_K16.safetensors", "scorers_K32.safetensors"]
    data = json.loads(report.read_text())
    assert set(data["budgets"]) == {"16", "32"} and len(data["budgets"]["16"]["layers"]) == 2
    assert "held-out distillation loss" in capsys.readouterr().out
    for args, message in [(["--ctx", "1"], "--ctx"), (["--windows", "1"], "--windows"),
                          (["--budgets", "16,32", "--out", "x.safetensors"], "directory"),
                          (["--steps", "-2"], "steps")]:
        with pytest.raises(SystemExit):
            calibration.main(["--model", model_dir, *args])
        assert message in capsys.readouterr().err


def test_received_attention_equals_a_dense_float64_computation():
    gen = torch.Generator().manual_seed(5)
    q, k = torch.randn(4, 70, 8, generator=gen), torch.randn(2, 70, 8, generator=gen)
    gap = 9
    received, count = calibration._received_attention(q, k, None, gap, chunk=16)
    logits = (q.double() @ k.double().repeat_interleave(2, 0).transpose(1, 2)) * 8**-0.5
    p, j = torch.arange(70)[:, None], torch.arange(70)[None, :]
    probs = torch.softmax(logits.masked_fill(j > p, float("-inf")), dim=-1)
    want = (probs * (p - j >= gap)).sum(1).view(2, 2, 70).mean(1)
    assert torch.allclose(received, want, rtol=1e-5, atol=1e-7)
    assert count.tolist() == [max(0, 70 - gap - i) for i in range(70)]
