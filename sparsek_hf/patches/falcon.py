"""Falcon in Transformers releases whose ``FalconAttention.forward`` takes ``alibi`` and computes SDPA
or eager attention inline: SparseK replaces the forward of each ``FalconAttention`` (and
``FalconFlashAttention2``) layer. Newer releases route Falcon through the ``AttentionInterface``
(the ALiBi bias folded into the attention mask) and need no patch: ``sparsek_hf.patch`` decides.

The replacement keeps Falcon's projections, rotary embedding and cache update, and attends with
the true number of kv heads (new decoder architecture: ``num_kv_heads``; multi-query: 1) instead of
broadcasting keys to every query head, so the cache stays small. ALiBi variants are refused: SparseK
has no additive position bias.
"""

from __future__ import annotations

import inspect
from types import MethodType

import torch
from torch import nn

ATTENTION_CLASSES = ("FalconAttention",)


def computes_attention_inline(module: nn.Module) -> bool:
    """Whether this Falcon attention layer is the inline kind this patch replaces (its forward takes
    ``alibi``), rather than one that calls the AttentionInterface."""
    return "alibi" in inspect.signature(type(module).forward).parameters


def kv_heads(module: nn.Module) -> int:
    if module.new_decoder_architecture:
        return module.config.num_kv_heads
    return 1 if module.multi_query else module.num_heads


def _split_heads(module: nn.Module, fused_qkv: torch.Tensor):
    """q [B, S, Hq, D], k and v [B, S, Hkv, D] without broadcasting k, v to the query heads."""
    batch, seq_len, _ = fused_qkv.shape
    head_dim = module.head_dim
    if module.new_decoder_architecture:
        groups = module.num_heads // module.config.num_kv_heads
        qkv = fused_qkv.view(batch, seq_len, -1, groups + 2, head_dim)
        return qkv[:, :, :, :-2].flatten(2, 3), qkv[:, :, :, -2], qkv[:, :, :, -1]
    if module.multi_query:
        qkv = fused_qkv.view(batch, seq_len, module.num_heads + 2, head_dim)
        return qkv[:, :, :-2], qkv[:, :, -2:-1], qkv[:, :, -1:]
    qkv = fused_qkv.view(batch, seq_len, module.num_heads, 3, head_dim)
    return qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]


def sparsek_falcon_forward(
    self,
    hidden_states: torch.Tensor,
    alibi: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    position_ids: torch.LongTensor | None = None,
    layer_past=None,
    use_cache: bool = False,
    output_attentions: bool = False,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs,
):
    from transformers.models.falcon.modeling_falcon import apply_rotary_pos_emb

    from ..transformers_integration import sparsek_attention_forward

    if alibi is not None:
        raise ValueError("sparsek does not support Falcon's ALiBi position bias; only rotary Falcon models")
    batch, seq_len, _ = hidden_states.shape
    query, key, value = (t.transpose(1, 2) for t in _split_heads(self, self.query_key_value(hidden_states)))
    cos, sin = position_embeddings
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    out, _ = sparsek_attention_forward(
        self, query, key, value, attention_mask, dropout=self.attention_dropout.p if self.training else 0.0,
        scaling=self.inv_norm_factor,
    )
    return self.dense(out.reshape(batch, seq_len, self.num_heads * self.head_dim)), None


def apply(module: nn.Module) -> None:
    """Route one Falcon attention layer through SparseK."""
    module.forward = MethodType(sparsek_falcon_forward, module)
    module._sparsek_patched = True


def revert(module: nn.Module) -> None:
    """Give one Falcon attention layer back its own forward."""
    module.__dict__.pop("forward", None)
    module.__dict__.pop("_sparsek_patched", None)
