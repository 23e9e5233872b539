"""SparseK as a Transformers attention implementation: ``attn_implementation="sparsek"``.

Importing ``sparsek_hf`` registers two functions under the name "sparsek":

- ``sparsek_attention_forward`` with ``AttentionInterface``: what every attention layer of a model
  that routes through the interface (Llama, Qwen2/3, Mistral, GPT-2, GPT-NeoX, GPT-J, ...) calls;
- ``sparsek_mask`` with ``AttentionMaskInterface``: without a mask function Transformers would build
  no mask at all for an unknown implementation and silently drop padding. SparseK is always causal,
  so the mask it needs is only which keys are real: a 2-D bool ``[B, Nk]`` (or None).

SparseK settings live in the model config as ``config.sparsek`` (a dict of ``SparseKConfig``
fields, saved in config.json; ``configure`` sets it). Each attention layer gets its scorer
(``sparsek_hf.scorer``) on first use, on the layer's device and dtype, registered as the submodule
``sparsek_scorer`` so it trains with the model and is saved by ``save_pretrained``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import warnings
import weakref
from collections.abc import Mapping

import torch
from torch import nn
from transformers import AttentionInterface, PretrainedConfig
from transformers.cache_utils import Cache
from transformers.masking_utils import AttentionMaskInterface

from . import _decode_ops
from .api import sparsek_attention
from .cache import SparseKLayer, sparsek_layer_for
from .config import SparseKConfig
from .scorer import SCORER_ATTR, SparseKScorer, copy_into, read_scorer_tensors

ATTN_IMPLEMENTATION = "sparsek"
CONFIG_KEY = "sparsek"
# Set in config.json when the model was saved with scorers, so a load that cannot find them warns.
SCORERS_SAVED_KEY = "sparsek_scorers_saved"
_UNSUPPORTED_KWARGS = {
    "softcap": "logit soft-capping",
    "s_aux": "learned attention sinks (s_aux)",
    "position_bias": "an additive position bias",
}
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


# -- settings ----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _settings_from_items(items: tuple) -> SparseKConfig:
    fields = {f.name for f in dataclasses.fields(SparseKConfig)}
    unknown = sorted(k for k, _ in items if k not in fields)
    if unknown:
        raise ValueError(f"config.{CONFIG_KEY} has unknown SparseKConfig fields {unknown}; known: {sorted(fields)}")
    return SparseKConfig(**dict(items))


def settings_of(config: PretrainedConfig) -> SparseKConfig:
    """The ``SparseKConfig`` of a model config: ``config.sparsek``, or the defaults if it has none."""
    raw = getattr(config, CONFIG_KEY, None)
    if raw is None:
        return SparseKConfig()
    if isinstance(raw, SparseKConfig):
        return raw
    if isinstance(raw, Mapping):
        return _settings_from_items(tuple(sorted(raw.items())))
    raise TypeError(f"config.{CONFIG_KEY} must be a dict of SparseKConfig fields, got {type(raw).__name__}")


def configure(target, config: SparseKConfig | None = None, **overrides) -> SparseKConfig:
    """Set the SparseK settings of a model (or of a Transformers config) and return them.

    The settings are stored as ``config.sparsek`` and saved in config.json with the model.
    ``config`` replaces the current settings; keyword ``overrides`` (``budget=``, ``window=``,
    ``sinks=``, ``block_q=``, ``soft=``, ``init_slope=``) change single fields. Call it before
    ``generate``; a cache filled under other settings is not re-evicted.

    Example::

        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sparsek")
        sparsek_hf.configure(model, budget=256, window=128)
    """
    model_config = target.config if isinstance(target, nn.Module) else target
    if not isinstance(model_config, PretrainedConfig):
        raise TypeError(f"configure takes a Transformers model or config, got {type(target).__name__}")
    if config is not None and not isinstance(config, SparseKConfig):
        raise TypeError(f"config must be a sparsek_hf.SparseKConfig, got {type(config).__name__}")
    base = config if config is not None else settings_of(model_config)
    fields = {f.name for f in dataclasses.fields(SparseKConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"configure got unknown SparseKConfig fields {unknown}; known: {sorted(fields)}")
    settings = dataclasses.replace(base, **overrides)
    setattr(model_config, CONFIG_KEY, settings.to_dict())
    return settings


# -- scorers -----------------------------------------------------------------------------------------


def _module_dtype(module: nn.Module, fallback: torch.dtype | None) -> torch.dtype | None:
    """The dtype of a layer's (first floating-point) weights: its scorer is made in it."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return fallback


def attach_scorer(
    module: nn.Module, kv_heads: int, head_dim: int, *, device=None, dtype=None, tensors: dict | None = None
) -> SparseKScorer:
    """Give an attention layer its scorer (sliding-window initialisation, or ``tensors``) and hooks.

    Idempotent: a layer that has a scorer keeps it. The scorer is the submodule ``sparsek_scorer``.
    """
    scorer = module._modules.get(SCORER_ATTR)
    if scorer is not None:
        return scorer
    settings = settings_of(module.config)
    scorer = SparseKScorer(kv_heads, head_dim, settings.init_slope, device=device, dtype=dtype)
    if tensors is not None:
        copy_into(scorer, tensors, f"layer {getattr(module, 'layer_idx', '?')}")
    module.add_module(SCORER_ATTR, scorer)
    # The cache hooks see the layer's Cache argument, which the attention function does not get.
    module._sparsek_hooks = (
        module.register_forward_pre_hook(_cache_pre_hook, with_kwargs=True),
        module.register_forward_hook(_cache_post_hook, always_call=True),
    )
    _mark_config(module.config, patched=getattr(module, "_sparsek_patched", False))
    return scorer


def detach_scorer(module: nn.Module) -> None:
    """Remove the scorer and the cache hooks that ``attach_scorer`` added to an attention layer."""
    for handle in getattr(module, "_sparsek_hooks", ()):
        handle.remove()
    module.__dict__.pop("_sparsek_hooks", None)
    module.__dict__.pop("_sparsek_cache_layer", None)
    if SCORER_ATTR in module._modules:
        del module._modules[SCORER_ATTR]


# Whether each live model config came with saved scorers (config.json's flag as loaded, before this
# process attached any scorer and set the flag itself), by id with a weak reference to check identity.
_LOADED_WITH_SCORERS: dict[int, tuple[weakref.ref, bool]] = {}


def _loaded_with_scorers(config: PretrainedConfig) -> bool:
    entry = _LOADED_WITH_SCORERS.get(id(config))
    if entry is None or entry[0]() is not config:
        entry = (weakref.ref(config), bool(getattr(config, SCORERS_SAVED_KEY, False)))
        _LOADED_WITH_SCORERS[id(config)] = entry
        weakref.finalize(config, _LOADED_WITH_SCORERS.pop, id(config), None)
    return entry[1]


def _mark_config(config: PretrainedConfig, patched: bool) -> None:
    """Make config.json record the SparseK settings and, where from_pretrained can honour it, the
    attention implementation (families monkeypatched by sparsek_hf.patches cannot be built with it)."""
    if getattr(config, CONFIG_KEY, None) is None:
        setattr(config, CONFIG_KEY, SparseKConfig().to_dict())
    _loaded_with_scorers(config)  # remember the flag as loaded before setting it
    setattr(config, SCORERS_SAVED_KEY, True)
    if not patched:
        config.attn_implementation = ATTN_IMPLEMENTATION


def _scorer_on_first_use(module: nn.Module, value: torch.Tensor) -> SparseKScorer:
    scorer = module._modules.get(SCORER_ATTR)
    if scorer is not None:
        return scorer
    # A model saved with save_pretrained carries its scorers in its weights; Transformers builds the
    # model without them, so they are read back here, when the layer first runs.
    tensors = None
    source = getattr(module.config, "_name_or_path", "") or ""
    layer_idx = getattr(module, "layer_idx", None)
    if _loaded_with_scorers(module.config):
        tensors = read_scorer_tensors(source).get(layer_idx) if source and layer_idx is not None else None
        if tensors is None:
            _warn_once(
                f"scorers-missing-{source}",
                f"sparsek: this model was saved with trained scorers, but none were found at {source!r} "
                "(only local save_pretrained directories are read); the scorers start from the sliding-window "
                "initialisation. Load them with sparsek_hf.patch(model, scorer_path=...)",
            )
    return attach_scorer(
        module, value.shape[1], value.shape[3], device=value.device, dtype=_module_dtype(module, value.dtype),
        tensors=tensors,
    )


# -- cache hooks -------------------------------------------------------------------------------------


def _find_cache(args, kwargs) -> Cache | None:
    for v in (*kwargs.values(), *args):
        if isinstance(v, Cache):
            return getattr(v, "self_attention_cache", v)
    return None


def _cache_pre_hook(module: nn.Module, args, kwargs):
    module._sparsek_cache_layer = None
    if module.config._attn_implementation != ATTN_IMPLEMENTATION:
        return None
    cache = _find_cache(args, kwargs)
    if cache is None or getattr(module, "layer_idx", None) is None:
        return None
    layer = sparsek_layer_for(cache, module.layer_idx, settings_of(module.config))
    if layer.is_initialized and layer.unscored:
        # Keys this hook has not seen yet (a DynamicLayer turned into a SparseK layer, or the forward
        # that created the scorer): score them and drop their padding before they can be evicted.
        scorer = module._modules[SCORER_ATTR]
        with torch.no_grad():
            layer.fill_missing_scores(scorer(layer.values, layer.key_pos.clamp(min=0)))
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            layer.mark_invalid(mask[:, : layer.cumulative_length].to(torch.bool))
    module._sparsek_cache_layer = layer
    return None


def _cache_post_hook(module: nn.Module, args, output):
    module._sparsek_cache_layer = None
    return None


def _current_layer(module: nn.Module, key: torch.Tensor) -> SparseKLayer | None:
    layer = module.__dict__.get("_sparsek_cache_layer")
    if layer is None:
        return None
    if layer.keys is key or (layer.dense and key.shape[-2] == layer.num_slots()):
        return layer
    raise RuntimeError(
        "sparsek: the keys given to the attention function are not the SparseK cache's keys; this model "
        "transforms its cached keys before attention, which a compacted cache cannot support"
    )


# -- masks -------------------------------------------------------------------------------------------


def _refuse_alibi(config) -> None:
    """ALiBi (Falcon's ``config.alibi``) is an additive position bias, which SparseK cannot apply.
    Such models fold the bias into the mask, so this runs where the mask is built (before the model
    adds the bias to it), and where attention is called for callers of the attention function that
    bring their own mask."""
    if getattr(config, "alibi", False) is True:
        raise ValueError(
            "sparsek does not support ALiBi position bias (this model's config.alibi is True); only rotary or "
            "learned-position models"
        )


def sparsek_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """The mask SparseK needs: which keys are real, a 2-D bool ``[B, kv_length]``, or None if all are.

    SparseK is causal by definition and brings its own window, so the causal (and any sliding-window)
    pattern of ``mask_function`` is not materialised; only padding is.
    """
    _refuse_alibi(kwargs.get("config"))
    if kv_offset != 0:
        raise ValueError(
            "sparsek needs every key from position 0, but this model's cache dropped the first "
            f"{kv_offset} (a sliding-window cache layer). Switch the model to sparsek before its first forward "
            "(sparsek_hf.patch(model)) or pass past_key_values=sparsek_hf.SparseKCache()"
        )
    if attention_mask is None:
        return None
    mask = attention_mask.to(torch.bool)
    if mask.dim() != 2:
        return mask
    if mask.shape[-1] < kv_length:  # as Transformers does: positions past the mask are not attended
        mask = torch.nn.functional.pad(mask, (0, kv_length - mask.shape[-1]), value=False)
    mask = mask[:, :kv_length]
    if mask.shape[0] != batch_size and mask.shape[0] == 1:
        mask = mask.expand(batch_size, -1)
    return None if bool(mask.all()) else mask


def key_valid_from_mask(mask: torch.Tensor | None, batch: int, num_keys: int) -> torch.Tensor | None:
    """``key_valid [B, num_keys]`` from what the attention function received as its mask.

    A 2-D mask is ``sparsek_mask``'s output. A 4-D mask (a user's own, passed through by Transformers)
    contributes only which keys its last query row may see: SparseK adds causality and its own window.
    """
    if mask is None:
        return None
    if mask.dim() == 4:
        last_row = mask[:, 0, -1, :]
        mask = last_row if last_row.dtype == torch.bool else last_row > torch.finfo(last_row.dtype).min / 2
    if mask.dim() != 2:
        raise ValueError(f"sparsek takes a 2-D [B, Nk] or 4-D attention mask, got shape {list(mask.shape)}")
    mask = mask.to(torch.bool)
    if mask.shape[0] == 1 and batch > 1:
        mask = mask.expand(batch, -1)
    if tuple(mask.shape) != (batch, num_keys):
        raise ValueError(f"the attention mask covers shape {list(mask.shape)}, expected [B, Nk] = [{batch}, {num_keys}]")
    return mask


# -- the attention function --------------------------------------------------------------------------


def _check_call(module: nn.Module, is_causal, dropout: float, kwargs: dict) -> None:
    for name, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"sparsek attention does not support {what} ('{name}'); use another attn_implementation")
    _refuse_alibi(getattr(module, "config", None))
    if is_causal is False or getattr(module, "is_causal", True) is False:
        raise ValueError(
            f"sparsek attention is causal only; {type(module).__name__} is a non-causal (e.g. encoder or "
            "cross-) attention layer"
        )
    if dropout and module.training:
        _warn_once("dropout", "sparsek attention has no attention dropout; the layer's dropout is ignored")


def sparsek_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SparseK attention of one layer, with the signature of Transformers' attention functions.

    ``query`` [B, Hq, Nq, D], ``key``/``value`` [B, Hkv, Nk, D] (after the cache update); returns
    ``(out [B, Nq, Hq, D], None)``. Scores come from the layer's scorer; keys sit at positions
    0..Nk-1, or at the positions a compacted ``SparseKCache`` layer records.
    """
    _check_call(module, is_causal, dropout, kwargs)
    settings = settings_of(module.config)
    scorer = _scorer_on_first_use(module, value)
    layer = _current_layer(module, key)
    if scaling is None:
        scaling = getattr(module, "scaling", None)
    batch, num_queries = query.shape[0], query.shape[2]
    selection = {
        "budget": settings.budget, "window": settings.window, "sinks": settings.sinks,
        "block_q": settings.block_q, "soft": settings.soft,
    }

    if layer is not None and not layer.dense:
        key_valid = key_valid_from_mask(attention_mask, batch, layer.cumulative_length)
        start = layer.cumulative_length - num_queries
        layer.fill_scores(scorer(value[:, :, value.shape[2] - num_queries :], start))
        layer.mark_invalid(key_valid)
        if torch.is_grad_enabled() and (query.requires_grad or scorer.weight.requires_grad):
            _warn_once(
                "decode-grad",
                "sparsek: attention over a compacted SparseKCache (decoding) carries no gradient; "
                "run it under torch.no_grad() or train without a cache",
            )
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        gate = layer.block_selection(start, num_queries)
        bias = layer.step_bias(start) if num_queries == 1 else None
        if bias is not None:  # the common decode step: one query, its block's selection known
            group = query.shape[1] // bias.shape[1]
            mask = bias[:, :, None, None, :].expand(-1, -1, group, 1, -1).reshape(batch, query.shape[1], 1, -1)
            out = torch.nn.functional.scaled_dot_product_attention(
                query, layer.keys, layer.values, attn_mask=mask.to(query.dtype), scale=scale, enable_gqa=group > 1
            )
            if key_valid is not None:  # a padding query sees no key: zeros (SPEC), where SDPA gives NaN
                out = torch.nan_to_num(out, nan=0.0)
        elif gate is not None:
            out, _ = _decode_ops.decode_attend(
                query, layer.keys, layer.values, layer.key_pos, gate, query_pos0=start, window=settings.window,
                sinks=settings.sinks, block_q=settings.block_q, scale=scale,
            )
        else:
            out, _ = _decode_ops.decode(
                query, layer.keys, layer.values, layer.scores, layer.key_pos, layer.tail_scores, query_pos0=start,
                scale=scale, **selection,
            )
    else:
        key_valid = key_valid_from_mask(attention_mask, batch, key.shape[2])
        scores = scorer(value, 0)
        if layer is not None:
            layer.fill_scores(scores[..., scores.shape[-1] - num_queries :])
            layer.mark_invalid(key_valid)
        out = sparsek_attention(query, key, value, scores, key_valid=key_valid, scale=scaling, **selection)
    return out.transpose(1, 2).contiguous(), None


class _ScorerLoadReportFilter(logging.Filter):
    """Drop Transformers' load report when all it lists is the scorers of a sparsek checkpoint.

    Transformers builds a model before SparseK gives its attention layers their scorers, so loading a
    model saved in sparsek mode reports the scorer tensors as "unexpected"; each layer reads its own
    back on its first forward (``_scorer_on_first_use``). A report with anything else in it is kept,
    and so is any report whose format this filter does not recognise.
    """

    _ansi = re.compile(r"\x1b\[[0-9;]*m")

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = self._ansi.sub("", record.getMessage())
        except Exception:  # noqa: BLE001 - never break logging
            return True
        if "LOAD REPORT" not in message:
            return True
        rows = [line for line in message.splitlines() if "|" in line and not line.lstrip().startswith(("Key", "-"))]
        only_scorers = bool(rows) and all(
            f".{SCORER_ATTR}." in row.split("|")[0] and "UNEXPECTED" in row for row in rows
        )
        return not only_scorers


def register() -> None:
    """Register "sparsek" with Transformers' attention and mask interfaces (done on import)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, sparsek_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sparsek_mask)
    report_logger = logging.getLogger("transformers.modeling_utils")
    if not any(isinstance(f, _ScorerLoadReportFilter) for f in report_logger.filters):
        report_logger.addFilter(_ScorerLoadReportFilter())


register()
