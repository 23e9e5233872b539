"""GPT-J in Transformers releases where its attention does not route through the
``AttentionInterface`` (before 5.2x it computed eager attention in ``GPTJAttention._attn``).

The patch replaces ``_attn`` of each layer, which receives the rotated q, k and the cached v in
``[B, H, N, D]`` after the cache update, so GPT-J's projections, rotary embedding and cache stay its
own. (A ``GPTJFlashAttention2`` layer also gets the eager ``forward`` that calls ``_attn``.) Newer
releases route through the interface and need no patch: ``sparsek_hf.patch`` decides.
"""

from __future__ import annotations

from types import MethodType

import torch
from torch import nn

ATTENTION_CLASSES = ("GPTJAttention",)


def kv_heads(module: nn.Module) -> int:
    return module.num_attention_heads


def _sparsek_attn(self, query, key, value, attention_mask=None):
    from ..transformers_integration import sparsek_attention_forward

    out, _ = sparsek_attention_forward(
        self, query, key, value, attention_mask, dropout=self.attn_dropout.p if self.training else 0.0,
        scaling=1.0 / self.scale_attn,
    )
    return out.transpose(1, 2), None  # _merge_heads takes [B, H, N, D]


def apply(module: nn.Module) -> None:
    """Route one GPT-J attention layer through SparseK."""
    module._attn = MethodType(_sparsek_attn, module)
    eager = next(c for c in type(module).__mro__ if c.__name__ == "GPTJAttention")
    if type(module).forward is not eager.forward:  # the flash-attention variant has its own forward
        module.forward = MethodType(eager.forward, module)
    module._sparsek_patched = True


def revert(module: nn.Module) -> None:
    """Give one GPT-J attention layer back its own attention."""
    for attr in ("_attn", "forward", "_sparsek_patched"):
        module.__dict__.pop(attr, None)
