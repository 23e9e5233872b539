"""Kernel-time breakdown of SparseK's forward (N=131072) and backward (N=32768) on the benchmark
shape, from torch.profiler: where selection and attention time goes."""

import torch
from torch.profiler import ProfilerActivity, profile

from eval.bench_cuda import make_inputs, sparsek_fn

for n, backward in ((131072, False), (32768, True)):
    q, k, v, u = make_inputs(n, backward, seed=3)
    fn = sparsek_fn(q, k, v, u, backward)
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(f"--- n={n} {'fwd+bwd' if backward else 'fwd'}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70))
    del q, k, v, u, fn
    torch.cuda.empty_cache()
