"""Kernel benchmark: SparseK against dense attention, forward and forward+backward.

    python -m eval.bench                      # CPU: the issue's fp32 shape, JSON to eval/results/cpu.json
    python -m eval.bench --device cuda        # Hopper: see eval/bench_cuda.py
    python -m eval.bench --decode             # per-token decode time vs generated length

Selection time is inside SparseK's time (the operator selects and attends in one call). Timings
are medians of repeated runs after a warm-up. Results are written as JSON with the machine's
description; the table is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import sparsek_hf

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_description() -> str:
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def attended_pairs(n: int, budget: int, window: int, sinks: int, block_q: int) -> int:
    """Number of (query, key) pairs SparseK attends for a prefill of n tokens (no padding)."""
    p = torch.arange(n, dtype=torch.float64)
    p0 = torch.div(p, block_q, rounding_mode="floor") * block_q
    window_keys = p - torch.clamp(p0 - window + 1, min=0) + 1
    sink_keys = torch.clamp(torch.clamp(p0 - window + 1, min=0), max=sinks)
    candidates = torch.clamp(p0 - window - sinks + 1, min=0)
    return int((window_keys + sink_keys + torch.clamp(candidates, max=budget)).sum())


def bench_cpu(args) -> dict:
    shape = dict(batch=1, q_heads=8, kv_heads=2, head_dim=64, n=args.n, budget=512, window=256, sinks=4, block_q=64)
    g = torch.Generator().manual_seed(0)
    b, hq, hkv, d, n = shape["batch"], shape["q_heads"], shape["kv_heads"], shape["head_dim"], shape["n"]
    q = torch.randn(b, hq, n, d, generator=g)
    k = torch.randn(b, hkv, n, d, generator=g)
    v = torch.randn(b, hkv, n, d, generator=g)
    scores = torch.randn(b, hkv, n, generator=g)
    opts = dict(budget=shape["budget"], window=shape["window"], sinks=shape["sinks"], block_q=shape["block_q"])
    group = hq // hkv
    k_full, v_full = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)

    def sparsek_fwd():
        with torch.no_grad():
            sparsek_hf.sparsek_attention(q, k, v, scores, **opts)

    def dense_fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k_full, v_full, is_causal=True)

    grads = [t.clone().requires_grad_() for t in (q, k, v, scores)]
    dense_grads = [t.clone().requires_grad_() for t in (q, k_full, v_full)]
    grad_out = torch.randn(q.shape, generator=g)

    def sparsek_fwd_bwd():
        for t in grads:
            t.grad = None
        sparsek_hf.sparsek_attention(*grads, **opts).backward(grad_out)

    def dense_fwd_bwd():
        for t in dense_grads:
            t.grad = None
        F.scaled_dot_product_attention(*dense_grads, is_causal=True).backward(grad_out)

    def selection_only():
        torch.ops.sparsek.select(scores, None, n, opts["budget"], opts["window"], opts["sinks"], opts["block_q"], True)

    rows = []
    for name, fn, pass_ in (
        ("sparsek", sparsek_fwd, "fwd"),
        ("sdpa_dense_causal", dense_fwd, "fwd"),
        ("sparsek", sparsek_fwd_bwd, "fwd+bwd"),
        ("sdpa_dense_causal", dense_fwd_bwd, "fwd+bwd"),
        ("sparsek_selection_only", selection_only, "fwd"),
    ):
        seconds = median_seconds(fn, args.repeats)
        rows.append({"impl": name, "pass": pass_, "n": n, "ms": 1e3 * seconds})
        print(f"  {name:24s} {pass_:8s} {1e3 * seconds:10.1f} ms", flush=True)

    pairs = attended_pairs(n, **{k_: shape[k_] for k_ in ("budget", "window", "sinks", "block_q")})
    for row in rows:
        flops = 4 * d * hq * pairs * (3.5 if row["pass"] == "fwd+bwd" else 1.0)
        row["gflops_on_sparsek_pairs"] = flops / (row["ms"] * 1e-3) / 1e9
    by = {(r["impl"], r["pass"]): r["ms"] for r in rows}
    speedups = {
        "fwd_vs_dense": by[("sdpa_dense_causal", "fwd")] / by[("sparsek", "fwd")],
        "fwd_bwd_vs_dense": by[("sdpa_dense_causal", "fwd+bwd")] / by[("sparsek", "fwd+bwd")],
    }
    return {
        "device": cpu_description(),
        "torch": torch.__version__,
        "dtype": "float32",
        "shape": shape,
        "attended_pairs": pairs,
        "dense_pairs": n * (n + 1) // 2,
        "rows": rows,
        "speedups": speedups,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--decode", action="store_true", help="per-token decode time vs generated length")
    parser.add_argument("--n", type=int, default=8192, help="sequence length (CPU section)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="where to write the results")
    args = parser.parse_args(argv)

    if args.decode:
        from eval import bench_decode

        bench_decode.main(args)
        return
    if args.device == "cuda":
        from eval import bench_cuda

        bench_cuda.main(args)
        return

    print(f"SparseK CPU benchmark on {cpu_description()}", flush=True)
    result = bench_cpu(args)
    out = args.json or RESULTS / "cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    s = result["speedups"]
    print(f"\nwrote {out}")
    print(f"{'pass':10s} {'sparsek ms':>12s} {'dense ms':>12s} {'speedup':>9s}")
    by = {(r["impl"], r["pass"]): r["ms"] for r in result["rows"]}
    for pass_, key in (("fwd", "fwd_vs_dense"), ("fwd+bwd", "fwd_bwd_vs_dense")):
        print(f"{pass_:10s} {by[('sparsek', pass_)]:12.1f} {by[('sdpa_dense_causal', pass_)]:12.1f} {s[key]:8.2f}x")


if __name__ == "__main__":
    main()
