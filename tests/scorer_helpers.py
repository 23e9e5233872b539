"""Test helper shared by the Transformers and cache tests: scorers that select something other than
the most recent keys, so that SparseK's selection is exercised rather than its recency initialisation."""

from __future__ import annotations

import torch

from sparsek_hf.patching import attention_layers


def randomise_scorers(model, std: float = 1.0, seed: int = 0, slope: float | None = None) -> None:
    """Random scorer weights (scale ``std``) and biases in every attention layer; ``slope`` if given."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in attention_layers(model):
            scorer = layer.sparsek_scorer
            scorer.weight.copy_(std * torch.randn(scorer.weight.shape, generator=gen))
            scorer.bias.copy_(torch.randn(scorer.bias.shape, generator=gen))
            if slope is not None:
                scorer.slope.fill_(slope)
