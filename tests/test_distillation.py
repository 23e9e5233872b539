"""End-to-end scorer distillation (sparsek_hf.distillation, eval.calibrate --end-to-end-steps).

- the KL it minimises is the KL of the model's next-token distributions (checked against
  torch.nn.functional.kl_div), and is 0 when SparseK attends every key;
- starting from layer-local calibration, it lowers the KL on held-out windows, moves only the
  scorers (content weights and slopes), and gives the model back as it was otherwise;
- the CLI chains it after the layer-local fit or after saved scorers; bad input raises clear errors.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from test_calibrate import CONFIG, CTX, planted_llama
from test_eval_perplexity import save_tiny, tiny_llama, tiny_tokenizer

import sparsek_hf
from sparsek_hf import SparseKConfig, calibration, evaluation
from sparsek_hf.calibration import FitOptions
from sparsek_hf.distillation import EndToEndOptions, _dense_log_probs, _kl, distill_end_to_end
from sparsek_hf.patching import attention_layers


@pytest.fixture(scope="module")
def windows():
    ids = torch.tensor(tiny_tokenizer()(evaluation.load_text())["input_ids"])
    calib, _ = evaluation.split_tokens(ids)
    return calibration.calibration_windows(calib, CTX, 6)


def test_kl_is_the_kl_of_the_next_token_distributions(windows):
    model = planted_llama()
    sparsek_hf.patch(model, CONFIG)
    first = 40
    teacher = _dense_log_probs(model, windows[:1], first)[0]
    with torch.no_grad():
        got = _kl(model, windows[0], teacher, first)
        logits = model(input_ids=windows[0][None], use_cache=False).logits[0, first - 1 : -1]
    expected = torch.nn.functional.kl_div(torch.log_softmax(logits.double(), -1), teacher.double(), log_target=True,
                                          reduction="batchmean")
    assert float(got) > 1e-4  # SparseK at K=16 does differ from dense here
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-7)

    sparsek_hf.configure(model, SparseKConfig(budget=CTX, window=16, sinks=2, block_q=16))  # every key attended
    with torch.no_grad():
        assert float(_kl(model, windows[0], teacher, first)) < 1e-6


def test_end_to_end_lowers_the_heldout_kl_and_moves_only_the_scorers(windows):
    model = planted_llama()
    sparsek_hf.calibrate(model, torch.cat(windows), CONFIG, ctx=CTX, options=FitOptions(steps=30))
    others = {n: p.detach().clone() for n, p in model.named_parameters() if "sparsek_scorer" not in n}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "sparsek_scorer" in n}
    report = distill_end_to_end(model, windows, CONFIG, options=EndToEndOptions(steps=40, eval_every=5))
    assert report.heldout_kl_after < 0.9 * report.heldout_kl_start
    after = dict(model.named_parameters())
    for name, value in others.items():
        assert torch.equal(after[name], value) and after[name].requires_grad
    moved = [n for n, v in before.items() if not torch.equal(after[n].detach(), v.to(after[n].dtype))]
    assert any(n.endswith("weight") for n in moved) and not any(n.endswith("bias") for n in moved)
    assert all(layer.sparsek_scorer.weight.dtype == torch.float32 for layer in attention_layers(model))

    # the kept state is the reported one
    teacher = _dense_log_probs(model, windows[-1:], 48)
    with torch.no_grad():
        assert abs(float(_kl(model, windows[-1], teacher[0], 48)) - report.heldout_kl_after) < 1e-6


def test_end_to_end_rejects_bad_input(windows):
    model = tiny_llama()
    with pytest.raises(ValueError, match="sparsek mode"):
        distill_end_to_end(model, windows, CONFIG)
    sparsek_hf.patch(model, CONFIG)
    with pytest.raises(ValueError, match="same number of tokens"):
        distill_end_to_end(model, [windows[0], windows[1][:64], windows[2]], CONFIG)
    with pytest.raises(ValueError, match="at least 2 windows"):
        distill_end_to_end(model, windows[:1], CONFIG)
    with pytest.raises(ValueError, match="never select"):
        distill_end_to_end(model, windows, SparseKConfig(budget=CTX, window=16, sinks=2, block_q=16))
    with pytest.raises(TypeError, match="EndToEndOptions"):
        distill_end_to_end(model, windows, CONFIG, options={"steps": 3})
    with pytest.raises(ValueError, match="lr"):
        EndToEndOptions(lr=-1.0)
    with pytest.raises(ValueError, match="steps"):
        EndToEndOptions(steps=-1)


def test_calibrate_cli_chains_end_to_end(tmp_path, capsys):
    model_dir = save_tiny(tmp_path / "model")
    common = ["--model", model_dir, "--ctx", "64", "--windows", "3", "--budgets", "16", "--window", "16",
              "--sinks", "2", "--block-q", "16", "--device", "cpu", "--no-progress"]
    first, report = tmp_path / "local", tmp_path / "report.json"
    calibration.main([*common, "--steps", "4", "--end-to-end-steps", "3", "--out", str(first),
                      "--report", str(report)])
    data = json.loads(report.read_text())["budgets"]["16"]
    assert len(data["layers"]) == 2 and data["end_to_end"]["steps"] == 3
    assert "end to end, held-out KL" in capsys.readouterr().out

    second = tmp_path / "e2e"
    calibration.main([*common, "--from-scorers", str(first), "--end-to-end-steps", "2", "--out", str(second),
                      "--report", str(report)])
    data = json.loads(report.read_text())["budgets"]["16"]
    assert data["from_scorers"] == str(first) and data["end_to_end"]["steps"] == 2
    assert os.listdir(second) == ["scorers_K16.safetensors"]
    for args, message in [(["--from-scorers", str(tmp_path / "missing")], "--from-scorers"),
                          (["--end-to-end-steps", "-1"], "steps")]:
        with pytest.raises(SystemExit):
            calibration.main([*common, *args])
        assert message in capsys.readouterr().err
