"""CUDA benchmark (Hopper): SparseK against dense SDPA (cuDNN, flash) and FlexAttention running the
same SparseK mask as a mask_mod.

    python -m eval.bench --device cuda            # or: python -m eval.bench_cuda [--json PATH]
    python -m eval.bench_cuda --ncu-fwd 131072    # one forward, for `ncu --clock-control none`
    python -m eval.bench_cuda --ncu-bwd 32768     # one forward+backward, for ncu on the bwd kernel

Shape (issue 3): B=1, Hq=32, Hkv=8, D=128, bf16, budget=2048, window=512, sinks=4, block_q=64;
forward at N in {8192, 32768, 131072}, forward+backward at 32768. SparseK's time includes its
selection (the op selects and attends in one call); FlexAttention's block mask is built outside
its timed region (and without the gates: mask only). Effective TFLOP/s for every impl counts
the pairs SparseK attends, 4 * D per pair forward and 2.5x that more for the backward, so the
columns compare. Medians of CUDA-event timings after warm-up; fresh random inputs.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

import sparsek_hf

RESULTS = Path(__file__).resolve().parent / "results"
SHAPE = dict(batch=1, q_heads=32, kv_heads=8, head_dim=128, budget=2048, window=512, sinks=4, block_q=64)


def attended_pairs(n: int, budget: int, window: int, sinks: int, block_q: int) -> int:
    """(query, key) pairs one head attends in a prefill of n tokens without padding; |Sel| =
    min(budget, |C|) does not depend on the scores, so this is exact for every head."""
    p = torch.arange(n, dtype=torch.float64)
    p0 = torch.div(p, block_q, rounding_mode="floor") * block_q
    wb = torch.clamp(p0 - window + 1, min=0)
    candidates = torch.clamp(p0 - window - sinks + 1, min=0)
    return int(((p - wb + 1) + torch.clamp(wb, max=sinks) + torch.clamp(candidates, max=budget)).sum())


def cuda_ms(fn, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def make_inputs(n: int, requires_grad: bool, seed: int):
    s = SHAPE
    g = torch.Generator(device="cuda").manual_seed(seed)
    dt = torch.bfloat16
    q = torch.randn(s["batch"], s["q_heads"], n, s["head_dim"], device="cuda", dtype=dt, generator=g)
    k = torch.randn(s["batch"], s["kv_heads"], n, s["head_dim"], device="cuda", dtype=dt, generator=g)
    v = torch.randn(s["batch"], s["kv_heads"], n, s["head_dim"], device="cuda", dtype=dt, generator=g)
    u = torch.randn(s["batch"], s["kv_heads"], n, device="cuda", generator=g)
    for t in (q, k, v, u):
        t.requires_grad_(requires_grad)
    return q, k, v, u


def sparsek_opts():
    return {key: SHAPE[key] for key in ("budget", "window", "sinks", "block_q")}


def sparsek_fn(q, k, v, u, backward: bool):
    opts = sparsek_opts()
    if not backward:
        def run():
            with torch.no_grad():
                sparsek_hf.sparsek_attention(q, k, v, u, **opts)
        return run
    dout = torch.randn_like(q)

    def run_bwd():
        for t in (q, k, v, u):
            t.grad = None  # as after zero_grad(): time the gradients, not their accumulation
        out = sparsek_hf.sparsek_attention(q, k, v, u, **opts)
        out.backward(dout)
    return run_bwd


def sdpa_fn(q, k, v, backend, backward: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = q.shape[1] // k.shape[1]
    kf = k.detach().repeat_interleave(group, 1).requires_grad_(backward)
    vf = v.detach().repeat_interleave(group, 1).requires_grad_(backward)
    be = {"sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_flash": SDPBackend.FLASH_ATTENTION}[backend]
    dout = torch.randn_like(q) if backward else None

    def run():
        for t in (q, kf, vf):
            t.grad = None
        with sdpa_kernel(be):
            if backward:
                F.scaled_dot_product_attention(q, kf, vf, is_causal=True).backward(dout)
            else:
                with torch.no_grad():
                    F.scaled_dot_product_attention(q, kf, vf, is_causal=True)
    return run


def flex_fn(q, k, v, u, backward: bool):
    """FlexAttention with SparseK's mask (sinks + Sel(p0) + window, causal) as a mask_mod."""
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

    s = SHAPE
    n, bq, window, sinks = q.shape[2], s["block_q"], s["window"], s["sinks"]
    group = q.shape[1] // k.shape[1]
    with torch.no_grad():
        idx, *_ = torch.ops.sparsek.select(u.detach(), None, n, s["budget"], window, sinks, bq, True)
        selected = torch.zeros(*idx.shape[:3], n, dtype=torch.bool, device=q.device)
        selected.scatter_(-1, idx.clamp(min=0).long(), idx >= 0)
    del idx

    def kv_mask(b, h, q_idx, kv_idx):
        t = q_idx // bq
        keep = (kv_idx > t * bq - window) | (kv_idx < sinks) | selected[b, h, t, kv_idx]
        return (kv_idx <= q_idx) & keep

    def q_mask(b, h, q_idx, kv_idx):
        return kv_mask(b, h // group, q_idx, kv_idx)

    # Built per kv head (the mask is shared by the group), then repeated for the query heads.
    bm = create_block_mask(kv_mask, q.shape[0], k.shape[1], n, n, device=q.device, BLOCK_SIZE=128, _compile=True)
    rep = lambda x: None if x is None else x.repeat_interleave(group, 1)  # noqa: E731
    block_mask = BlockMask.from_kv_blocks(
        rep(bm.kv_num_blocks), rep(bm.kv_indices), rep(bm.full_kv_num_blocks), rep(bm.full_kv_indices),
        BLOCK_SIZE=bm.BLOCK_SIZE, mask_mod=q_mask, seq_lengths=(n, n),
    )
    flex = torch.compile(flex_attention, dynamic=False)
    kd, vd = k.detach().requires_grad_(backward), v.detach().requires_grad_(backward)
    dout = torch.randn_like(q) if backward else None

    def run():
        for t in (q, kd, vd):
            t.grad = None
        if backward:
            flex(q, kd, vd, block_mask=block_mask, enable_gqa=True).backward(dout)
        else:
            with torch.no_grad():
                flex(q, kd, vd, block_mask=block_mask, enable_gqa=True)
    return run


def bench(ns, fwd_bwd_ns, impls, reps_fast: int, reps_slow: int) -> dict:
    s = SHAPE
    rows, extra = [], {}
    plan = [(n, "fwd") for n in ns] + [(n, "fwd+bwd") for n in fwd_bwd_ns]
    for n, pass_ in plan:
        backward = pass_ == "fwd+bwd"
        pairs = attended_pairs(n, s["budget"], s["window"], s["sinks"], s["block_q"]) * s["batch"] * s["q_heads"]
        flops = 4.0 * s["head_dim"] * pairs * (3.5 if backward else 1.0)
        for impl in impls:
            q, k, v, u = make_inputs(n, backward, seed=n + len(impl))
            try:
                if impl == "sparsek":
                    fn = sparsek_fn(q, k, v, u, backward)
                elif impl == "flex_sparsek":
                    fn = flex_fn(q, k, v, u, backward)
                else:
                    fn = sdpa_fn(q, k, v, impl, backward)
                slow = impl != "sparsek" and n >= 65536 or (backward and impl == "flex_sparsek")
                ms = cuda_ms(fn, warmup=1 if slow else 3, reps=reps_slow if slow else reps_fast)
            except Exception as exc:  # a peer that cannot run this shape is reported, not fatal
                print(f"  {impl} n={n} {pass_}: failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                extra.setdefault("failed", []).append(f"{impl} n={n} {pass_}: {type(exc).__name__}")
                continue
            finally:
                del q, k, v, u
                torch.cuda.empty_cache()
            row = dict(impl=impl, n=n, **{"pass": pass_}, ms=ms, tflops=flops / ms / 1e9,
                       us_per_head=ms * 1e3 / (s["batch"] * s["q_heads"]))
            rows.append(row)
            print(f"  {impl:13s} n={n:6d} {pass_:8s} {ms:9.3f} ms {row['tflops']:7.1f} TFLOP/s", flush=True)
        if "sparsek" in impls and not backward:
            q, k, v, u = make_inputs(n, False, seed=1)
            sel = lambda: torch.ops.sparsek.select(u, None, n, s["budget"], s["window"], s["sinks"], s["block_q"], True)  # noqa: E731
            extra.setdefault("select_ms", {})[str(n)] = cuda_ms(sel, 2, reps_fast)
            del q, k, v, u
    return {"rows": rows, "extra": extra}


def print_table(rows) -> None:
    by = {(r["impl"], r["n"], r["pass"]): r for r in rows}
    print(f"\n{'n':>7s} {'pass':8s} {'impl':13s} {'ms':>9s} {'TFLOP/s':>8s} {'us/head':>9s} {'sparsek x':>9s}")
    for r in rows:
        mine = by.get(("sparsek", r["n"], r["pass"]))
        speed = f"{r['ms'] / mine['ms']:8.1f}x" if mine else ""
        print(f"{r['n']:7d} {r['pass']:8s} {r['impl']:13s} {r['ms']:9.3f} {r['tflops']:8.1f} {r['us_per_head']:9.1f} {speed}")


def main(args=None) -> None:
    if args is None or not hasattr(args, "ns"):
        parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--json", type=Path, default=None)
        parser.add_argument("--ns", type=int, nargs="*", default=[8192, 32768, 131072])
        parser.add_argument("--fwd-bwd-ns", type=int, nargs="*", default=[32768])
        parser.add_argument("--impls", nargs="*", default=["sparsek", "sdpa_cudnn", "sdpa_flash", "flex_sparsek"])
        parser.add_argument("--reps", type=int, default=10)
        parser.add_argument("--ncu-fwd", type=int, default=0, help="run one SparseK forward at this N and exit")
        parser.add_argument("--ncu-bwd", type=int, default=0, help="run one SparseK forward+backward at this N and exit")
        json_default = getattr(args, "json", None)
        args, _ = parser.parse_known_args(None if args is None else [])
        args.json = args.json or json_default
    if args.ncu_fwd or args.ncu_bwd:
        backward = bool(args.ncu_bwd)
        q, k, v, u = make_inputs(args.ncu_bwd or args.ncu_fwd, backward, seed=0)
        run = sparsek_fn(q, k, v, u, backward)
        for _ in range(2):
            run()
        torch.cuda.synchronize()
        return
    name = torch.cuda.get_device_name()
    print(f"SparseK CUDA benchmark on {name}, torch {torch.__version__}", flush=True)
    result = bench(args.ns, args.fwd_bwd_ns, args.impls, args.reps, max(2, args.reps // 4))
    out = args.json or RESULTS / "bench_cuda.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"device": name, "torch": torch.__version__, "shape": SHAPE, "rows": result["rows"], "extra": result["extra"]}
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {out}; selection alone (ms): {result['extra'].get('select_ms')}")
    print_table(result["rows"])


if __name__ == "__main__":
    main()
