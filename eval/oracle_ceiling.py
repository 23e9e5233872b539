"""How far can a query-independent score go? SparseK perplexity with *oracle* scores.

    python -m eval.oracle_ceiling --ctx 4096 --budget 512 --scorers eval/results/scorers_smollm2 \
        --json eval/results/oracle_smollm2.json

SPEC.md's scorer gives every key one score, the same for every query. Issue 6 bounds what any such
score can do by a cheating one: per window, layer and kv head, the attention each key receives from
all queries of the window in the dense model (future queries included), summed over the group's
query heads. This script runs SparseK (the real attention path, same selection and kernels) with
that score as u = log(received) ("oracle_sum", the issue's definition) and as the mean over the
queries that can see the key ("oracle_mean"), hard gates, next to dense attention, the sliding
window with the same keys, and optionally calibrated scorers. Same text, split and windows as
``python -m eval.perplexity``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

from sparsek_hf import SparseKConfig
from sparsek_hf import calibration
from sparsek_hf import evaluation as ev
from sparsek_hf.patching import attention_layers, patch
from sparsek_hf.scorer import SCORER_ATTR, SparseKScorer
from sparsek_hf.transformers_integration import detach_scorer


class _FixedScorer(SparseKScorer):
    """A layer's scorer that returns the scores set for the current window, whatever it is given."""

    def __init__(self, kv_heads: int, head_dim: int):
        super().__init__(kv_heads, head_dim)
        self.fixed: torch.Tensor | None = None

    def forward(self, value: torch.Tensor, positions=0) -> torch.Tensor:
        if self.fixed is None or self.fixed.shape[-1] != value.shape[2]:
            raise RuntimeError("oracle scores were not set for this window")
        return self.fixed


def oracle_scores(captures: list[calibration.LayerCapture], index: int) -> dict[str, list[torch.Tensor]]:
    """u [1, Hkv, N] per layer for each oracle: log of the dense attention each key receives in window
    ``index``, summed over the queries ("oracle_sum") or averaged over those that see it ("oracle_mean")."""
    scores = {"oracle_sum": [], "oracle_mean": []}
    for cap in captures:
        received, count = calibration._received_attention(cap.q[index][0], cap.k[index][0], cap.scale, gap=0)
        for mode, total in (("oracle_sum", received), ("oracle_mean", received / count.clamp_min(1).double())):
            scores[mode].append(total.clamp_min(1e-30).log().float()[None].contiguous())
    return scores


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m eval.oracle_ceiling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_model_and_text_arguments(p)
    p.add_argument("--calib-fraction", type=float, default=ev.CALIB_FRACTION)
    p.add_argument("--ctx", type=int, default=4096)
    p.add_argument("--budget", type=int, default=512)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--block-q", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=0, help="evaluate at most this many tokens (0: all)")
    p.add_argument("--scorers", help="calibrated scorers (a file, or a directory with scorers_K{budget}.safetensors)")
    p.add_argument("--dtype", choices=sorted(ev._DTYPES), default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="write the results as JSON")
    a = p.parse_args(argv)
    a.device_map = None
    device = torch.device(a.device)

    model, tokenizer, name = ev._load(a, device)
    text = ev.load_text(a.text, a.dataset, a.dataset_config, a.split, a.column)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    _, eval_ids = ev.split_tokens(ids, a.calib_fraction)
    if a.max_tokens:
        eval_ids = eval_ids[: a.max_tokens]
    windows = ev.make_windows(eval_ids.numel(), a.ctx)
    config = SparseKConfig(budget=a.budget, window=a.window, sinks=a.sinks, block_q=a.block_q)
    layers = attention_layers(model)
    calibrated = None
    if a.scorers:
        calibrated = ev._read_scorers([a.scorers], [a.budget], len(layers))[a.budget]

    def set_method(method: str) -> None:
        for module in layers:  # the oracles' fixed scorers make way for real ones
            if isinstance(module._modules.get(SCORER_ATTR), _FixedScorer):
                detach_scorer(module)
        if method == "dense":
            model.set_attn_implementation("sdpa")
        elif method == "sliding_window":
            calibration.apply_scorers(model, ev.matched_sliding_window(config), {})
        elif method == "sparsek":
            calibration.apply_scorers(model, config, calibrated)
        else:  # the oracles: hard gates (a log-attention score has no meaningful unit scale)
            patch(model, SparseKConfig(**{**config.to_dict(), "soft": False}))
            for module in layers:
                ref = module._modules[SCORER_ATTR]
                module._modules[SCORER_ATTR] = _FixedScorer(ref.kv_heads, ref.head_dim).to(device)

    methods = ["dense", "sliding_window"] + (["sparsek"] if calibrated else []) + ["oracle_sum", "oracle_mean"]
    nll = {m: 0.0 for m in methods}
    tokens, start = 0, time.perf_counter()
    for i, window in enumerate(windows):
        window_ids = eval_ids[window.begin : window.end]
        oracles = oracle_scores(calibration.capture_attention(model, {0: window_ids}), 0)
        for method in methods:
            set_method(method)
            if method in oracles:
                for module, u in zip(layers, oracles[method]):
                    module._modules[SCORER_ATTR].fixed = u.to(device)
            nll[method] += ev.window_nlls(model, eval_ids, [window])[0]
        del oracles
        tokens += window.tokens
        dense = math.exp(nll["dense"] / tokens)
        print(f"window {i + 1}/{len(windows)}, {tokens} tokens, {time.perf_counter() - start:.0f} s: " + ", ".join(
            f"{m} {math.exp(nll[m] / tokens):.2f} ({100 * (math.exp(nll[m] / tokens) / dense - 1):+.2f}%)"
            for m in methods), flush=True)

    dense = math.exp(nll["dense"] / tokens)
    result = {
        "model": name, "ctx": a.ctx, "budget": a.budget, "window": a.window, "sinks": a.sinks, "block_q": a.block_q,
        "dtype": a.dtype, "tokens": tokens, "scorers": a.scorers,
        "results": [{"method": m, "ppl": math.exp(nll[m] / tokens), "nll": nll[m] / tokens,
                     "vs_dense_percent": 100 * (math.exp(nll[m] / tokens) / dense - 1)} for m in methods],
    }
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
