"""``patch`` / ``unpatch``: switch an already loaded Transformers model to SparseK and back."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from torch import nn

from . import patches
from .config import SparseKConfig
from .scorer import SCORER_ATTR, SCORER_FILE, read_scorer_tensors
from .transformers_integration import (
    ATTN_IMPLEMENTATION,
    CONFIG_KEY,
    SCORERS_SAVED_KEY,
    _module_dtype,
    attach_scorer,
    configure,
    detach_scorer,
)


@dataclass(frozen=True)
class _Family:
    attention_classes: tuple[str, ...]
    kv_heads: Callable[[nn.Module], int]
    head_dim: Callable[[nn.Module], int]
    patch: object | None = None  # a sparsek_hf.patches module, for when the model cannot use the interface


def _config_kv_heads(m: nn.Module) -> int:
    return m.config.num_key_value_heads


# Families tested against SDPA and the oracle (tests/test_transformers_integration.py).
FAMILIES: dict[str, _Family] = {
    "llama": _Family(("LlamaAttention",), _config_kv_heads, lambda m: m.head_dim),
    "mistral": _Family(("MistralAttention",), _config_kv_heads, lambda m: m.head_dim),
    "qwen2": _Family(("Qwen2Attention",), _config_kv_heads, lambda m: m.head_dim),
    "qwen3": _Family(("Qwen3Attention",), _config_kv_heads, lambda m: m.head_dim),
    "gpt2": _Family(("GPT2Attention",), lambda m: m.num_heads, lambda m: m.head_dim),
    "gpt_neox": _Family(("GPTNeoXAttention",), lambda m: m.config.num_attention_heads, lambda m: m.head_size),
    "gptj": _Family(patches.gptj.ATTENTION_CLASSES, patches.gptj.kv_heads, lambda m: m.head_dim, patches.gptj),
    "falcon": _Family(patches.falcon.ATTENTION_CLASSES, patches.falcon.kv_heads, lambda m: m.head_dim,
                      patches.falcon),
}


def _needs_monkeypatch(model: nn.Module, family: _Family, layers: list[nn.Module]) -> bool:
    """Whether this model's attention ignores the AttentionInterface, so sparsek_hf.patches must step in."""
    if family.patch is None:
        return False
    if family.patch is patches.falcon:  # Transformers' source heuristic misjudges the inline Falcon
        return patches.falcon.computes_attention_inline(layers[0])
    can_set = getattr(type(model), "_can_set_attn_implementation", None)  # Transformers' own check
    return not can_set() if can_set is not None else True


def supported_families() -> list[str]:
    """``model_type`` values ``patch`` accepts."""
    return sorted(FAMILIES)


def _family_of(model: nn.Module) -> tuple[str, _Family]:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"sparsek_hf.patch does not support model_type {model_type!r}; supported: {', '.join(supported_families())}"
        )
    return model_type, FAMILIES[model_type]


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The self-attention layers of a supported model, in order."""
    _, family = _family_of(model)
    layers = []
    for module in model.modules():
        names = {cls.__name__ for cls in type(module).__mro__}
        if names.intersection(family.attention_classes) and not getattr(module, "is_cross_attention", False):
            layers.append(module)
    return layers


def _stored_scorers(model: nn.Module, scorer_path) -> dict[int, dict]:
    if scorer_path is not None:
        path = os.fspath(scorer_path)
        if not os.path.exists(path):
            raise ValueError(f"scorer_path {path!r} does not exist")
        found = read_scorer_tensors(path)
        if not found:
            raise ValueError(f"scorer_path {path!r} holds no SparseK scorer weights (expected {SCORER_FILE} "
                             "or a model saved in sparsek mode)")
        return found
    source = getattr(model.config, "_name_or_path", "") or ""
    return read_scorer_tensors(source) if os.path.isdir(source) else {}


def patch(model: nn.Module, config: SparseKConfig | None = None, scorer_path=None) -> nn.Module:
    """Switch a loaded model to SparseK attention, in place; returns the model.

    Args:
        model: a Transformers model of a supported family (``supported_families()``).
        config: the ``SparseKConfig`` to use; default: the model's ``config.sparsek`` if it has one,
            else ``SparseKConfig()``.
        scorer_path: trained scorer weights: a file from ``save_scorers``, or a directory holding one
            or a model saved in sparsek mode. Default: the scorers stored with the model, if any, else
            the sliding-window initialisation.

    Every attention layer gets its scorer now (so ``model.parameters()`` includes them before the
    first forward), ``generate`` then keeps a constant-size ``SparseKCache``, and
    ``save_pretrained`` stores the scorers and settings with the model. ``unpatch`` undoes it.
    """
    if config is not None and not isinstance(config, SparseKConfig):
        raise TypeError(f"config must be a sparsek_hf.SparseKConfig, got {type(config).__name__}")
    model_type, family = _family_of(model)
    layers = attention_layers(model)
    if not layers:
        raise ValueError(f"found no {'/'.join(family.attention_classes)} layers in this {model_type} model")
    stored = _stored_scorers(model, scorer_path)

    previous = model.config._attn_implementation
    if previous != ATTN_IMPLEMENTATION and "_sparsek_previous_attn" not in model.__dict__:
        model._sparsek_previous_attn = previous
    configure(model, config)
    if _needs_monkeypatch(model, family, layers):
        for module in layers:
            family.patch.apply(module)
        model.config._attn_implementation = ATTN_IMPLEMENTATION
    else:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)

    for i, module in enumerate(layers):
        layer_idx = getattr(module, "layer_idx", None)
        layer_idx = i if layer_idx is None else layer_idx
        tensors = stored.get(layer_idx)
        existing = module._modules.get(SCORER_ATTR)
        if existing is not None and tensors is not None:
            detach_scorer(module)  # explicit weights replace the current ones
        attach_scorer(
            module, family.kv_heads(module), family.head_dim(module),
            device=next(module.parameters()).device, dtype=_module_dtype(module, None), tensors=tensors,
        )
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo ``patch`` (or a load with ``attn_implementation="sparsek"``), in place; returns the model.

    Removes the scorers (save them first with ``sparsek_hf.save_scorers`` to keep them), the
    monkeypatches and the SparseK settings, and restores the previous attention implementation
    (``"sdpa"`` for a model loaded in sparsek mode).
    """
    _, family = _family_of(model)
    monkeypatched = False
    for module in attention_layers(model):
        detach_scorer(module)
        if module.__dict__.get("_sparsek_patched"):
            family.patch.revert(module)
            monkeypatched = True
    previous = model.__dict__.pop("_sparsek_previous_attn", None) or "sdpa"
    if monkeypatched:
        model.config._attn_implementation = previous
    else:
        model.set_attn_implementation(previous)
    for attr in (CONFIG_KEY, SCORERS_SAVED_KEY, "attn_implementation"):
        model.config.__dict__.pop(attr, None)
    return model
