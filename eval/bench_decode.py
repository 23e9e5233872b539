"""Decode benchmark: per-token time and KV-cache size against the number of generated tokens.

    python -m eval.bench --decode                       # CPU, a small random Llama, 8448 tokens
    python -m eval.bench_decode --device cuda --tokens 16384
    python -m eval.bench_decode --model smollm2         # the real SmolLM2-135M (slow on CPU: hours)

The model generates greedily, one token per forward call, from a short prompt: SparseK with its
evicting ``SparseKCache`` (default ``SparseKConfig``: budget 512, window 256, sinks 4, block_q 64)
against SDPA with Transformers' ``DynamicCache``. Every step is timed (synchronised on CUDA); the
reported time at N generated tokens is the median over the 128 steps before N. SparseK's cost per
token should not grow with N: its cache holds at most sinks + window + block_q + budget keys per
layer and kv head, where SDPA's grows by one key per token.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import time
from pathlib import Path

import torch

import sparsek_hf
from sparsek_hf import SparseKCache, SparseKConfig
from sparsek_hf.models import load_default_model

RESULTS = Path(__file__).resolve().parent / "results"
WINDOW = 128  # steps per reported median


def _device_description(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    from eval.bench import cpu_description

    return cpu_description()


def _tiny_model(attn_implementation: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        # head dim 64, which the CUDA kernels take (a smaller one would run the reference on the GPU)
        hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        vocab_size=1024, max_position_embeddings=1 << 16,
    )
    return LlamaForCausalLM._from_config(config, attn_implementation=attn_implementation).eval()


def _load(model_name: str, impl: str, settings: SparseKConfig, device: str, dtype: torch.dtype):
    if model_name == "tiny":
        model = _tiny_model(impl)
        if impl == "sparsek":
            sparsek_hf.configure(model, settings)
    else:
        model = load_default_model(impl, settings if impl == "sparsek" else None, dtype=dtype)
    return model.to(device=device, dtype=dtype).eval()


def _cache_kwargs(model, cache) -> dict:
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def _kv_entries(cache) -> int:
    """K/V entries of the largest layer, per (batch row, kv head)."""
    sizes = []
    for layer in cache.layers:
        if hasattr(layer, "num_slots"):
            sizes.append(layer.num_slots())
        elif getattr(layer, "keys", None) is not None:
            sizes.append(layer.keys.shape[-2])
    return max(sizes) if sizes else 0


def time_decode(model, cache, prompt: torch.Tensor, tokens: int, checkpoints: list[int], device: str) -> dict:
    """Generate `tokens` tokens greedily; per-step seconds and the cache size at each checkpoint."""
    step_seconds, entries = [], {}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.no_grad():
        logits = model(prompt, **_cache_kwargs(model, cache)).logits
        next_id = logits[:, -1:].argmax(-1)
        for step in range(1, tokens + 1):
            sync()
            start = time.perf_counter()
            logits = model(next_id, **_cache_kwargs(model, cache)).logits
            next_id = logits[:, -1:].argmax(-1)
            sync()
            step_seconds.append(time.perf_counter() - start)
            if step in checkpoints:
                entries[step] = _kv_entries(cache)
                # printed as it goes, so a run cut short by a time limit still reports what it measured
                recent = 1e3 * statistics.median(step_seconds[-WINDOW:])
                print(f"  {step:6d} generated: {recent:7.2f} ms/token, {entries[step]} KV entries/head", flush=True)
    return {"step_seconds": step_seconds, "kv_entries": entries}


def run(args) -> dict:
    device = getattr(args, "device", "cpu")
    tokens = getattr(args, "tokens", 8448)
    model_name = getattr(args, "model", "tiny")
    impls = getattr(args, "impls", ["sparsek", "sdpa"])
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    settings = SparseKConfig()
    checkpoints = [c for c in (1024, 2048, 4096, 8192, 16384, 32768) if c <= tokens] + [tokens]
    checkpoints = sorted(set(checkpoints))
    prompt_len = 32
    result = {
        "device": _device_description(device),
        "model": "SmolLM2-135M-Instruct" if model_name == "smollm2" else "random Llama (4 layers, hidden 512, 8 heads / 2 kv heads of dim 64)",
        "dtype": str(dtype).removeprefix("torch."),
        "settings": settings.to_dict(),
        "kv_bound": settings.sinks + settings.window + settings.block_q + settings.budget,
        "prompt_tokens": prompt_len,
        "generated_tokens": tokens,
        "median_over_steps": WINDOW,
        "rows": [],
    }
    for impl in impls:
        model = _load(model_name, impl, settings, device, dtype)
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=gen).to(device)
        cache = SparseKCache() if impl == "sparsek" else None
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache()
        print(f"{impl}: generating {tokens} tokens on {device}", flush=True)
        timed = time_decode(model, cache, prompt, tokens, checkpoints, device)
        for c in checkpoints:
            window = timed["step_seconds"][max(0, c - WINDOW) : c]
            result["rows"].append({
                "impl": impl, "generated": c, "ms_per_token": 1e3 * statistics.median(window),
                "kv_entries_per_head": timed["kv_entries"][c],
            })
        del model, cache
        if device == "cuda":
            torch.cuda.empty_cache()
    by = {(r["impl"], r["generated"]): r["ms_per_token"] for r in result["rows"]}
    first, last = checkpoints[0], checkpoints[-1]
    result["growth_first_to_last"] = {impl: by[(impl, last)] / by[(impl, first)] for impl in impls}
    return result


def main(args=None) -> None:
    if args is None or isinstance(args, list):
        parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
        parser.add_argument("--tokens", type=int, default=8448, help="tokens to generate")
        parser.add_argument("--model", default="tiny", choices=["tiny", "smollm2"],
                            help="tiny: a random 4-layer Llama (default, quick); smollm2: SmolLM2-135M")
        parser.add_argument("--impls", nargs="+", default=["sparsek", "sdpa"], choices=["sparsek", "sdpa"])
        parser.add_argument("--json", type=Path, default=None, help="where to write the results")
        args = parser.parse_args(args)
    result = run(args)
    out = getattr(args, "json", None) or RESULTS / f"decode_{getattr(args, 'device', 'cpu')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}\n{result['model']} on {result['device']}, {result['dtype']}")
    print(f"{'impl':8s} {'generated':>10s} {'ms/token':>9s} {'KV entries/head':>16s}")
    for row in result["rows"]:
        print(f"{row['impl']:8s} {row['generated']:10d} {row['ms_per_token']:9.2f} {row['kv_entries_per_head']:16d}")
    for impl, growth in result["growth_first_to_last"].items():
        print(f"{impl}: time per token at {result['generated_tokens']} / at {result['rows'][0]['generated']} = "
              f"{growth:.2f}")


if __name__ == "__main__":
    main()
