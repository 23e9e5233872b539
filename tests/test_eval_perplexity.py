"""The perplexity parity eval (sparsek_hf.evaluation, python -m eval.perplexity) on tiny random Llamas.

- windows count every token once; the NLL equals a float64 hand computation;
- a budget covering the context gives the dense perplexity, and SparseK at its initial scorer
  equals the matched sliding window;
- the CLI writes the documented JSON and a PNG, reloads the scorers it saved, and rejects bad input;
- two processes under ``accelerate launch`` give the one-process results (eval and calibration).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections import Counter

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sparsek_hf import SparseKConfig, evaluation
from sparsek_hf.calibration import apply_scorers
from sparsek_hf.patching import attention_layers

VOCAB = 160


def tiny_tokenizer(vocab: int = VOCAB):
    """A word-level tokenizer over the shipped text's most frequent words (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    with open(evaluation.default_text_path(), encoding="utf-8") as f:
        words = Counter(re.findall(r"\w+|[^\w\s]+", f.read()))
    table = {"[UNK]": 0}
    for word, _ in words.most_common(vocab - 1):
        table[word] = len(table)
    tok = Tokenizer(models.WordLevel(table, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def tiny_llama(seed: int = 0, dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False, pad_token_id=0,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def save_tiny(path, seed: int = 0) -> str:
    tiny_llama(seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def _random_scorers(model, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        i: {"weight": torch.randn(2, 16, generator=gen), "bias": torch.randn(2, generator=gen),
            "slope": torch.tensor(0.05)}
        for i in range(len(model.model.layers))
    }


# -- text and windows ----------------------------------------------------------------------------------


def test_shipped_text_is_package_data_and_splits_disjointly():
    path = evaluation.default_text_path()
    assert os.path.isfile(path) and os.path.dirname(path).endswith(os.path.join("sparsek_hf", "data"))
    text = evaluation.load_text()
    assert text.startswith("Shakespeare, William") and len(text) > 200_000
    ids = torch.arange(1000)
    calib, held = evaluation.split_tokens(ids, 0.3)
    assert calib.numel() == 300 and torch.equal(torch.cat([calib, held]), ids)
    with pytest.raises(ValueError, match="calib_fraction"):
        evaluation.split_tokens(ids, 1.0)


def test_text_files_load_through_datasets(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("first line\nsecond line\n")
    b.write_text("another file")
    text = evaluation.load_text([str(a), str(b)])
    assert "first line\nsecond line" in text and text.endswith("another file")
    with pytest.raises(ValueError, match="not found"):
        evaluation.load_text([str(tmp_path / "missing.txt")])
    with pytest.raises(ValueError, match="not both"):
        evaluation.load_text([str(a)], dataset="wikitext")


@pytest.mark.parametrize("n, ctx, stride", [(100, 32, 32), (100, 32, 12), (97, 40, 40), (10, 64, 64), (65, 32, 1)])
def test_windows_count_every_token_once(n, ctx, stride):
    windows = evaluation.make_windows(n, ctx, stride)
    counted = [t for w in windows for t in range(w.target_begin, w.end)]
    first_of_window = {w.begin for w in windows} if stride == ctx else {0}
    assert sorted(counted) == [t for t in range(n) if t not in first_of_window]  # each token at most once
    assert all(w.end - w.begin <= ctx and w.target_begin > w.begin for w in windows)
    if stride < ctx:  # overlapping windows: only the very first token goes uncounted
        assert len(counted) == n - 1
    with pytest.raises(ValueError, match="stride"):
        evaluation.make_windows(n, ctx, ctx + 1)


def test_window_nll_equals_a_hand_computation():
    model = tiny_llama()
    ids = _ids(150)
    windows = evaluation.make_windows(150, 64, 40)
    got = evaluation.window_nlls(model, ids, windows)
    reference = tiny_llama().double()
    want = []
    with torch.no_grad():
        for w in windows:
            logp = torch.log_softmax(reference(ids[None, w.begin : w.end]).logits[0].double(), dim=-1)
            want.append(-sum(float(logp[t - w.begin - 1, ids[t]]) for t in range(w.target_begin, w.end)))
    for g, h in zip(got, want):
        assert abs(g - h) < 1e-5 * abs(h)
    batched = evaluation.window_nlls(model, ids, evaluation.make_windows(150, 40, 40), batch_size=3)
    single = evaluation.window_nlls(model, ids, evaluation.make_windows(150, 40, 40), batch_size=1)
    assert max(abs(a - b) for a, b in zip(batched, single)) < 1e-4
    result = evaluation.run_method(model, ids, windows, method="dense", budget=None)
    assert result["tokens"] == 149
    assert result["nll"] == pytest.approx(sum(want) / 149, rel=1e-6)
    assert result["ppl"] == pytest.approx(math.exp(sum(want) / 149), rel=1e-6)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_budget_covering_the_context_gives_the_dense_perplexity(dtype, tol):
    model = tiny_llama(dtype=dtype)
    ids = _ids(200, seed=1)
    results = evaluation.evaluate(model, ids, ctx=64, budgets=[64], window=8, sinks=2, block_q=16,
                                  scorers={64: _random_scorers(model)})
    assert [r["method"] for r in results] == ["dense", "sliding_window", "sparsek_init", "sparsek"]
    dense = results[0]["ppl"]
    for r in results[1:]:
        assert abs(r["ppl"] / dense - 1) < tol, r


def test_initial_scorer_equals_the_matched_sliding_window_and_calibrated_scorers_change_it():
    model = tiny_llama()
    ids = _ids(256, seed=2)
    results = evaluation.evaluate(model, ids, ctx=128, budgets=[16], window=8, sinks=2, block_q=16,
                                  scorers={16: _random_scorers(model)})
    ppl = {r["method"]: r["ppl"] for r in results}
    assert abs(ppl["sparsek_init"] / ppl["sliding_window"] - 1) < 1e-6
    assert abs(ppl["sliding_window"] / ppl["dense"] - 1) > 1e-4  # the budget really drops keys
    assert abs(ppl["sparsek"] / ppl["sparsek_init"] - 1) > 1e-4  # and the scorers really select
    assert evaluation.matched_sliding_window(SparseKConfig(budget=16, window=8, sinks=2, block_q=16)) == SparseKConfig(
        budget=0, window=24, sinks=2, block_q=16)


def test_apply_scorers_switches_between_initial_and_given_scorers():
    model = tiny_llama()
    config = SparseKConfig(budget=16, window=8, sinks=2, block_q=16)
    scorers = _random_scorers(model)
    apply_scorers(model, config, scorers)
    layers = attention_layers(model)
    assert torch.equal(layers[1].sparsek_scorer.weight, scorers[1]["weight"])
    apply_scorers(model, config, {})
    assert not layers[1].sparsek_scorer.weight.any() and float(layers[1].sparsek_scorer.slope.detach()) == config.init_slope


# -- command line --------------------------------------------------------------------------------------

CLI_ARGS = ["--ctx", "128", "--budgets", "16,32", "--window", "16", "--sinks", "2", "--block-q", "16",
            "--max-tokens", "700", "--calib-windows", "3", "--calib-steps", "6", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny_llama"))


def _check_schema(data: dict) -> None:
    assert isinstance(data["model"], str)
    assert data["ctx"] == 128 and data["window"] == 16 and data["sinks"] == 2
    for r in data["results"]:
        assert set(r) == {"method", "budget", "ppl", "nll", "tokens", "seconds"}
        assert r["method"] in evaluation.METHODS
        assert (r["budget"] is None) == (r["method"] == "dense")
        assert isinstance(r["ppl"], float) and isinstance(r["nll"], float) and isinstance(r["tokens"], int)
        assert isinstance(r["seconds"], float) and r["seconds"] >= 0
        assert r["ppl"] == pytest.approx(math.exp(r["nll"]), rel=1e-12)


def test_cli_writes_the_json_schema_a_plot_and_scorers_that_reload(tiny_dir, tmp_path, capsys):
    out, png, scorers = tmp_path / "r.json", tmp_path / "r.png", tmp_path / "scorers"
    evaluation.main(["--model", tiny_dir, *CLI_ARGS, "--json", str(out), "--plot", str(png),
                     "--save-scorers", str(scorers)])
    table = capsys.readouterr().out
    assert "sliding_window" in table and "vs dense" in table and "held-out distillation loss" in table
    data = json.loads(out.read_text())
    _check_schema(data)
    methods = [(r["method"], r["budget"]) for r in data["results"]]
    assert methods == [("dense", None)] + [(m, k) for k in (16, 32) for m in ("sliding_window", "sparsek_init", "sparsek")]
    assert len({r["tokens"] for r in data["results"]}) == 1 and data["results"][0]["tokens"] == 700 - math.ceil(700 / 128)
    assert data["command"].startswith("python -m eval.perplexity --model")
    assert set(data["calibration"]) == {"16", "32"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(scorers)) == ["scorers_K16.safetensors", "scorers_K32.safetensors"]

    # The saved scorers give the same calibrated perplexity when passed back with --scorers.
    again = evaluation.main(["--model", tiny_dir, *CLI_ARGS, "--methods", "sparsek", "--scorers", str(scorers)])
    calibrated = {r["budget"]: r["ppl"] for r in data["results"] if r["method"] == "sparsek"}
    assert {r["budget"]: r["ppl"] for r in again} == pytest.approx(calibrated, rel=1e-9)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ctx", "1"], "--ctx must be >= 2"),
        (["--stride", "0"], "--stride must be in"),
        (["--ctx", "64", "--stride", "65"], "--stride must be in"),
        (["--budgets", "128,abc"], "comma-separated integers"),
        (["--budgets", "-1"], "comma-separated integers"),
        (["--window", "-1"], "--window must be >= 0"),
        (["--block-q", "0"], "--block-q must be >= 1"),
        (["--max-tokens", "1"], "--max-tokens"),
        (["--calib-windows", "1"], "--calib-windows must be >= 2"),
        (["--calib-fraction", "1.5"], "--calib-fraction"),
        (["--methods", "dense,magic"], "--methods: unknown"),
        (["--text", "/nonexistent/text.txt"], "not found"),
        (["--text", __file__, "--dataset", "wikitext"], "not both"),
        (["--budgets", "16,32,64", "--scorers", __file__, __file__], "one path per budget"),
        (["--scorers", "/nonexistent.safetensors"], "does not exist"),
        (["--dtype", "int8"], "invalid choice"),
        (["--no-calibrate", "--save-scorers", "/tmp/x"], "--save-scorers"),
    ],
)
def test_cli_rejects_bad_arguments(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        evaluation.main(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_rejects_scorer_files_missing_layers(tiny_dir, tmp_path, capsys):
    from safetensors.torch import save_file

    path = tmp_path / "partial.safetensors"
    save_file({"model.layers.0.self_attn.sparsek_scorer." + n: t for n, t in _random_scorers(tiny_llama())[0].items()},
              str(path))
    with pytest.raises(SystemExit):
        evaluation.main(["--model", tiny_dir, *CLI_ARGS, "--methods", "sparsek", "--scorers", str(path)])
    assert "no scorer for layers [1]" in capsys.readouterr().err


# -- accelerate --------------------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _RecordingAccelerator:
    def __init__(self, num_processes: int):
        self.num_processes, self.calls = num_processes, []

    def wait_for_everyone(self):
        self.calls.append("wait")

    def end_training(self):
        self.calls.append("end")


@pytest.mark.parametrize("processes, calls", [(1, ["end"]), (2, ["wait", "end"])])
def test_end_processes_waits_for_every_rank_then_destroys_the_group(processes, calls):
    """A rank that left without destroying its gloo group aborted in interpreter finalisation (SIGABRT)."""
    accelerator = _RecordingAccelerator(processes)
    evaluation.end_processes(accelerator)
    assert accelerator.calls == calls


@pytest.mark.timeout(300)
def test_two_processes_under_accelerate_give_the_one_process_results(tiny_dir, tmp_path):
    """Eval windows and calibration windows split over 2 CPU processes (gloo); results gathered."""
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("the accelerate launcher is not installed")
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    evaluation.main(["--model", tiny_dir, *CLI_ARGS, "--json", str(one)])
    # On a machine without GPUs accelerate's multi-process launcher runs torch.distributed with gloo on CPU.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "sparsek_hf.evaluation", "--model", tiny_dir, *CLI_ARGS, "--json", str(two)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["processes"] == 1 and b["processes"] == 2
    assert [(r["method"], r["budget"], r["tokens"]) for r in a["results"]] == [
        (r["method"], r["budget"], r["tokens"]) for r in b["results"]]
    for ra, rb in zip(a["results"], b["results"]):
        # Same weights, same windows: only the summation order of a few float32 reductions can differ.
        tol = 1e-4 if ra["method"] == "sparsek" else 1e-6
        assert rb["ppl"] == pytest.approx(ra["ppl"], rel=tol), (ra, rb)
    for budget, ca in a["calibration"].items():
        cb = b["calibration"][budget]
        assert cb["heldout_loss_init"] == pytest.approx(ca["heldout_loss_init"], rel=1e-5)
        assert cb["heldout_loss_after"] == pytest.approx(ca["heldout_loss_after"], rel=1e-3)
        assert [layer["steps"] for layer in cb["layers"]] == [layer["steps"] for layer in ca["layers"]]
