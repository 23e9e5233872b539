"""Decode benchmark: per-token time and KV-cache size against the number of generated tokens.

    python -m eval.bench --decode                       # CPU, a small random Llama, 8448 tokens
    python -m eval.bench_decode --device cuda --tokens 16384
    python -m eval.bench_decode --model smollm2         # the real SmolLM2-135M (slow on CPU: hours)

The model generates greedily, one token per forward call, from a short prompt: SparseK with its
evicting ``SparseKCache`` (default ``SparseKConfig``: budget 512, window 256, sinks 4, block_q 64)
against SDPA with Transformers' ``DynamicCache`` (on CUDA the two take steps in turns). Every step is timed
(synchronised on CUDA); the reported time at N generated tokens is the median over the 128 steps
before N. On CUDA the GPU kernel time per token is measured too (torch.profiler, 32 steps after each
checkpoint): a small model's decode step is bound by kernel launches on the host, so the wall time
shows the host and the kernel time shows the work that grows with the cache. SparseK's cost per
token should not grow with N: its cache holds at most sinks + window + block_q + budget keys per
layer and kv head, where SDPA's grows by one key per token. On CUDA both run SDPA without its cuDNN
backend (``_sdpa_backends`` says why).
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
PROFILED_STEPS = 32  # CUDA: steps after each checkpoint whose GPU kernel time is measured


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


def _sdpa_backends(device: str):
    """SDPA's backends for the benchmark. On CUDA cuDNN is left out: it builds a new execution plan for
    every new key length (measured on an H100: 12 ms of CPU per attention call, 48 ms per token for the
    4-layer model), which would time cuDNN's planner rather than attention; flash and memory-efficient
    take every length without re-planning."""
    from contextlib import nullcontext

    if device != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class _Decoder:
    """One implementation generating greedily, one token per forward call."""

    def __init__(self, impl: str, model, cache, prompt: torch.Tensor):
        self.impl, self.model, self.cache = impl, model, cache
        self.step_ms: dict[int, float] = {}  # generated token -> wall milliseconds of its step
        self.kv_entries: dict[int, int] = {}
        self.kernel_ms: dict[int, float] = {}  # checkpoint -> GPU kernel milliseconds per token
        self.generated = 0
        self.next_id = self._forward(prompt)

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.model(ids, **_cache_kwargs(self.model, self.cache)).logits
        return logits[:, -1:].argmax(-1)

    def step(self, sync) -> float:
        sync()
        start = time.perf_counter()
        self.next_id = self._forward(self.next_id)
        sync()
        self.generated += 1
        return time.perf_counter() - start

    def kernel_time(self, steps: int) -> float:
        """GPU kernel milliseconds per token over the next `steps` steps (torch.profiler, CUDA only)."""
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                self.step(torch.cuda.synchronize)
        busy_us = sum(e.self_device_time_total for e in prof.key_averages())
        return busy_us / 1e3 / steps


def time_decode(decoders: list[_Decoder], tokens: int, checkpoints: list[int], device: str) -> None:
    """Generate `tokens` tokens with every decoder.

    On CUDA the implementations take steps in turns, which puts them under the same host load: a GPU
    decode step of a small model is bound by kernel launches, so its wall time follows whatever else
    the host runs. After each checkpoint, PROFILED_STEPS more steps measure the GPU kernel time per
    token (left out of the wall-time medians). On the CPU they run one after the other: in turns,
    SDPA's growing cache would evict SparseK's working set from the CPU caches.
    """
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    groups = [decoders] if device == "cuda" else [[d] for d in decoders]
    with torch.no_grad():
        for group in groups:
            while group[0].generated < tokens:
                for d in group:
                    d.step_ms[d.generated + 1] = 1e3 * d.step(sync)
                step = group[0].generated
                if step in checkpoints:
                    for d in group:
                        _report_checkpoint(d, step, device)


def _report_checkpoint(d: _Decoder, step: int, device: str) -> None:
    d.kv_entries[step] = _kv_entries(d.cache)
    recent = statistics.median(_window(d.step_ms, step))
    line = f"  {d.impl:8s} {step:6d} generated: {recent:7.2f} ms/token, {d.kv_entries[step]} KV entries/head"
    if device == "cuda":
        d.kernel_ms[step] = d.kernel_time(PROFILED_STEPS)
        line += f", GPU kernels {d.kernel_ms[step]:.3f} ms/token"
    # printed as it goes, so a run cut short by a time limit still reports what it measured
    print(line, flush=True)


def _window(step_ms: dict[int, float], last: int) -> list[float]:
    return [step_ms[s] for s in range(max(1, last - WINDOW + 1), last + 1) if s in step_ms]


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
        "stepping": "in turns (same host load)" if device == "cuda" else "one implementation after the other",
        "sdpa_backends": "flash, efficient, math (cuDNN left out)" if device == "cuda" else "default",
        "rows": [],
    }
    decoders = []
    for impl in impls:
        model = _load(model_name, impl, settings, device, dtype)
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=gen).to(device)
        if impl == "sparsek":
            cache = SparseKCache()
        else:
            from transformers import DynamicCache

            cache = DynamicCache()
        with _sdpa_backends(device), torch.no_grad():
            decoders.append(_Decoder(impl, model, cache, prompt))
    print(f"{', '.join(impls)}: generating {tokens} tokens on {device}", flush=True)
    with _sdpa_backends(device):
        time_decode(decoders, tokens, checkpoints, device)
    for d in decoders:
        for c in checkpoints:
            row = {"impl": d.impl, "generated": c, "ms_per_token": statistics.median(_window(d.step_ms, c)),
                   "kv_entries_per_head": d.kv_entries[c]}
            if c in d.kernel_ms:
                row["gpu_kernel_ms_per_token"] = d.kernel_ms[c]
            result["rows"].append(row)
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
    print(f"{'impl':8s} {'generated':>10s} {'ms/token':>9s} {'GPU kernel ms/token':>20s} {'KV entries/head':>16s}")
    for row in result["rows"]:
        kernel = f"{row['gpu_kernel_ms_per_token']:20.3f}" if "gpu_kernel_ms_per_token" in row else f"{'-':>20s}"
        print(f"{row['impl']:8s} {row['generated']:10d} {row['ms_per_token']:9.2f} {kernel} {row['kv_entries_per_head']:16d}")
    for impl, growth in result["growth_first_to_last"].items():
        print(f"{impl}: time per token at {result['generated_tokens']} / at {result['rows'][0]['generated']} = "
              f"{growth:.2f}")


if __name__ == "__main__":
    main()
