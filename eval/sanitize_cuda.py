"""Small launches of every CUDA kernel, for `compute-sanitizer --tool memcheck|racecheck`:
selection (several rank tiles, padding), forward (bf16/fp16, D 64/128, 2 row chunks, key lists
that wrap the 3-stage ring, split decode + merge), backward (128- and 256-row CTAs, narrow last
tiles, the score gradient's per-block sums in the kernel and its prefix / per-key kernels)."""

import torch

import sparsek_hf


def run(b, hq, hkv, nq, nk, d, dtype, budget, window, sinks, block_q, padding, backward):
    g = torch.Generator(device="cuda").manual_seed(nk + d)
    q = torch.randn(b, hq, nq, d, device="cuda", dtype=dtype, generator=g).requires_grad_(backward)
    k = torch.randn(b, hkv, nk, d, device="cuda", dtype=dtype, generator=g).requires_grad_(backward)
    v = torch.randn(b, hkv, nk, d, device="cuda", dtype=dtype, generator=g).requires_grad_(backward)
    u = torch.randn(b, hkv, nk, device="cuda", generator=g).requires_grad_(backward)
    valid = (torch.rand(b, nk, device="cuda", generator=g) > 0.2) if padding else None
    out = sparsek_hf.sparsek_attention(q, k, v, u, budget=budget, window=window, sinks=sinks, block_q=block_q,
                                       key_valid=valid)
    if backward:
        out.backward(torch.randn_like(out))
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()


run(1, 4, 2, 300, 300, 128, torch.bfloat16, 40, 16, 2, 16, True, True)
run(1, 16, 2, 200, 700, 64, torch.float16, 100, 32, 4, 64, False, True)
run(1, 8, 2, 300, 300, 128, torch.bfloat16, 40, 16, 2, 64, True, True)  # backward: 256-row CTAs, D=128
run(1, 4, 1, 600, 600, 128, torch.bfloat16, 4300, 16, 4, 64, False, False)  # fwd: 10 tiles, the K / V ring wraps three times
run(1, 4, 1, 300, 2600, 64, torch.bfloat16, 2100, 16, 4, 64, False, True)  # bwd: long key list, D=64
run(1, 8, 2, 200, 1300, 128, torch.bfloat16, 600, 64, 4, 64, True, True)  # bwd: 256-row CTAs, D=128, ~11 tiles
run(2, 8, 2, 1, 3000, 128, torch.bfloat16, 512, 64, 4, 64, True, False)  # decode: split + merge
print("sanitize run done")
