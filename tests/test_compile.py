"""torch.compile(fullgraph=True) sees one sparsek node and matches eager, forward and backward."""

from __future__ import annotations

import pytest
import torch

import sparsek_hf

pytestmark = pytest.mark.skipif("cpu" not in sparsek_hf.compiled_backends(), reason="CPU kernel not built")


def loss(q, k, v, scores):
    out = sparsek_hf.sparsek_attention(q, k, v, scores, budget=8, window=8, sinks=2, block_q=16)
    return (out * out).sum()


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    g = torch.Generator().manual_seed(3)
    tensors = [
        torch.randn(1, 4, 90, 16, generator=g),
        torch.randn(1, 2, 90, 16, generator=g),
        torch.randn(1, 2, 90, 16, generator=g),
        torch.randn(1, 2, 90, generator=g),
    ]
    eager_inputs = [t.clone().requires_grad_() for t in tensors]
    loss(*eager_inputs).backward()

    compiled = torch.compile(loss, fullgraph=True, backend=backend)
    compiled_inputs = [t.clone().requires_grad_() for t in tensors]
    value = compiled(*compiled_inputs)
    value.backward()

    assert len(graphs) == 1
    calls = [n for n in graphs[0].graph.nodes if n.op == "call_function" and "sparsek" in str(n.target)]
    assert len(calls) == 1, [str(n.target) for n in calls]
    assert torch.allclose(value, loss(*tensors), rtol=1e-5)
    for a, b in zip(compiled_inputs, eager_inputs):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_compile_inductor_runs():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, 40, 16, generator=g)
    k, v = torch.randn(1, 2, 40, 16, generator=g), torch.randn(1, 2, 40, 16, generator=g)
    scores = torch.randn(1, 2, 40, generator=g)
    compiled = torch.compile(loss, fullgraph=True)
    assert torch.allclose(compiled(q, k, v, scores), loss(q, k, v, scores), rtol=1e-5)


def test_opcheck():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 24, 8, generator=g)
    k, v = torch.randn(1, 2, 24, 8, generator=g), torch.randn(1, 2, 24, 8, generator=g)
    scores = torch.randn(1, 2, 24, generator=g)
    torch.library.opcheck(torch.ops.sparsek.fwd.default, (q, k, v, scores, None, 4, 4, 1, 8, 0.35, True))
    torch.library.opcheck(torch.ops.sparsek.select.default, (scores, None, 24, 4, 4, 1, 8, True))
