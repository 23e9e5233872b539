"""SparseKCache: a Transformers KV cache that keeps only the keys SparseK can still attend.

SPEC.md's threshold tau(p0) never decreases as the query block start p0 grows, and candidates only
accumulate. So once a candidate key j (S <= j <= p0 - W) is not in Sel(p0):

- if u_j <= tau(p0) it never contributes to any later tau nor is ever selected: it is dropped;
- else it can still never be selected (a key ranked below K-th stays there), but its score still
  counts in later thresholds: only the score is kept, as a *score-only record* (4 bytes).

Every (batch, kv head) row therefore holds, as whole K/V entries, at most
``sinks + budget + window + block_q - 1`` keys (sinks, Sel(p0), the window of the current block and
the block's own keys), whatever the number of tokens generated; the score-only records come on top.
Eviction happens on the first update of each new query block, and the selection it computes serves
every query of the block. Rows keep their keys at arbitrary slots with absolute positions in
``key_pos`` (-1 = empty), so the decode operators of csrc/decode.cpp (not the positional ``fwd``
kernel) attend a compacted cache; ``get_seq_length`` still reports the logical length, which
position ids depend on.

Until the first key is evicted a layer is *dense* (slot c holds position c), and the attention
function uses the regular ``sparsek_attention`` kernel on it, with gradients.
"""

from __future__ import annotations

import math
import warnings

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer

from . import _decode_ops
from .config import SparseKConfig

_NO_OPS_WARNED = False


def _compact(keep: torch.Tensor, *tensors_and_fill: tuple[torch.Tensor, float]) -> tuple[int, list[torch.Tensor]]:
    """Move the kept slots of every row to the front, in their order; pad rows with ``fill``.

    ``keep`` [B, H, C] bool; each tensor is [B, H, C, ...]. Returns (capacity, compacted tensors).
    """
    capacity = int(keep.sum(-1).max()) if keep.numel() else 0
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[..., :capacity]
    kept = keep.gather(-1, order)
    out = []
    for tensor, fill in tensors_and_fill:
        index = order.view(*order.shape, *([1] * (tensor.dim() - 3))).expand(*order.shape, *tensor.shape[3:])
        moved = tensor.gather(2, index)
        mask = kept.view(*kept.shape, *([1] * (tensor.dim() - 3)))
        out.append(torch.where(mask, moved, torch.as_tensor(fill, dtype=tensor.dtype, device=tensor.device)))
    return capacity, out


class SparseKLayer(CacheLayerMixin):
    """One layer of ``SparseKCache``.

    Tensors (per batch row b and kv head h), all aligned on the slot axis C:

    - ``keys``/``values`` [B, H, C, D];
    - ``key_pos`` [B, H, C] int64: absolute positions, -1 = empty slot;
    - ``scores`` [B, H, C] float32: the scorer's u (NaN until the attention function fills in the
      scores of new keys);
    - ``block_gate`` / ``block_bias`` [B, H, C] float32: the selection for the query block
      ``evicted_for`` (gate, 0 = not selected) and the attention bias it gives a decoding query of
      that block (log gate on Sel, 0 on sinks and window, -inf elsewhere). A block's selection holds
      for its ``block_q`` queries, so decoding reuses it instead of selecting every token;

    and ``tail_scores`` [B, H, R] float32 (score-only records, -inf = empty) or None.

    ``settings`` (a ``SparseKConfig``) is set by the model's sparsek attention before each update;
    a layer without settings never evicts and behaves like a ``DynamicLayer``.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    # slot-aligned tensors: (name, value of an empty slot, value of a newly appended slot)
    _SLOT_TENSORS = (
        ("keys", 0.0, None),
        ("values", 0.0, None),
        ("key_pos", -1, None),
        ("scores", math.nan, math.nan),
        ("block_gate", 0.0, 0.0),  # new keys are in the window, never selected
        ("block_bias", -math.inf, 0.0),  # ... so a decoding query attends them with bias 0
    )

    def __init__(self, settings: SparseKConfig | None = None, **kwargs):
        super().__init__()
        self.settings = settings
        self.key_pos = self.scores = self.tail_scores = None
        self.block_gate = self.block_bias = None
        self.block_complete = False  # every candidate of block `evicted_for` was cached when it was selected
        self.cumulative_length = 0
        self.dense = True  # slot c holds position c (or is empty): no key evicted yet
        self.evicted_for = -1  # start of the query block the cache was last evicted (and selected) for
        self.unscored = False  # some slots still wait for their scores

    # -- Transformers' CacheLayerMixin --------------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        batch, heads, _, _ = key_states.shape
        self.keys = key_states.new_empty((batch, heads, 0, key_states.shape[-1]))
        self.values = value_states.new_empty((batch, heads, 0, value_states.shape[-1]))
        self.key_pos = torch.empty((batch, heads, 0), dtype=torch.long, device=self.device)
        self.scores = torch.empty((batch, heads, 0), dtype=torch.float32, device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Evict what the new queries can no longer attend, append the new keys, return all slots."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[:2] != self.keys.shape[:2] or key_states.shape[-1] != self.keys.shape[-1]:
            raise ValueError(
                f"new keys {list(key_states.shape)} do not match the cache's [B, Hkv, C, D] = {list(self.keys.shape)}"
            )
        start, count = self.cumulative_length, key_states.shape[-2]
        if self.settings is not None and start > 0:
            self._evict(start)
        batch, heads = key_states.shape[:2]
        new = {"keys": key_states, "values": value_states,
               "key_pos": torch.arange(start, start + count, device=self.device).expand(batch, heads, count)}
        for name, _, fill in self._SLOT_TENSORS:
            current = getattr(self, name)
            if current is not None:
                extra = new[name] if fill is None else current.new_full((batch, heads, count), fill)
                setattr(self, name, torch.cat([current, extra], dim=2))
        self.cumulative_length += count
        self.unscored = True
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Masks cover the logical positions; the attention function maps them onto the slots.
        return self.cumulative_length + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # transformers < 5.16
        return -1

    def reset(self) -> None:
        for name, _, _ in self._SLOT_TENSORS:
            setattr(self, name, None)
        self.tail_scores = None
        self.is_initialized = False
        self.cumulative_length = 0
        self.dense = True
        self.evicted_for = -1
        self.block_complete = False
        self.unscored = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        if not self.dense or tokens_to_remove > 0:
            raise ValueError(
                "SparseKCache evicts keys for good and cannot be cropped once it has evicted any (assisted "
                "decoding and DoLa need a cache that can roll back: pass a DynamicCache)"
            )
        keep = self.keys.shape[-2] + tokens_to_remove
        for name, _, _ in self._SLOT_TENSORS:
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name)[:, :, :keep])
        self.cumulative_length = keep
        self.evicted_for = -1  # the block selection may have counted removed keys
        self.block_gate = self.block_bias = None

    def _batch_index(self, fn) -> None:
        if not self.is_initialized:
            return
        for name in [n for n, _, _ in self._SLOT_TENSORS] + ["tail_scores"]:
            if getattr(self, name) is not None:
                setattr(self, name, fn(getattr(self, name)))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._batch_index(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._batch_index(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._batch_index(lambda t: t[indices, ...])

    def offload(self):
        self._batch_index(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.is_initialized and self.keys.device != self.device:
            self._batch_index(lambda t: t.to(self.device, non_blocking=True))

    # -- SparseK -------------------------------------------------------------------------------------

    @classmethod
    def from_layer(cls, layer: CacheLayerMixin, settings: SparseKConfig | None) -> "SparseKLayer":
        """A SparseK layer holding a DynamicLayer's keys (positions 0..N-1, scores not yet known)."""
        new = cls(settings)
        if isinstance(layer, DynamicSlidingWindowLayer) and layer.get_seq_length() > (
            0 if layer.keys is None else layer.keys.shape[-2]
        ):
            raise ValueError(
                "this model's cache already dropped keys outside its sliding window; SparseK needs every key. "
                "Switch the model to sparsek before the first forward (sparsek_hf.patch) or pass a SparseKCache"
            )
        if layer.is_initialized and layer.keys is not None and layer.keys.numel() > 0:
            new.lazy_initialization(layer.keys, layer.values)
            new.update(layer.keys, layer.values)
        return new

    def num_slots(self) -> int:
        """Capacity C of the K/V tensors (the largest row, padded)."""
        return 0 if self.keys is None else self.keys.shape[-2]

    def num_entries(self) -> torch.Tensor:
        """Whole K/V entries of every (batch, kv head) row, [B, H]."""
        return (self.key_pos >= 0).sum(-1)

    def num_score_records(self) -> torch.Tensor:
        """Score-only records of every (batch, kv head) row, [B, H]."""
        if self.tail_scores is None:
            return torch.zeros(self.key_pos.shape[:2], dtype=torch.long, device=self.key_pos.device)
        return torch.isfinite(self.tail_scores).sum(-1)

    def fill_scores(self, new_scores: torch.Tensor) -> None:
        """Record the scores of the keys appended by the last update ([B, H, n], float32)."""
        count = new_scores.shape[-1]
        self.scores[..., self.scores.shape[-1] - count :] = new_scores.detach().float()
        self.unscored = False

    def fill_missing_scores(self, scores: torch.Tensor) -> None:
        """Give the slots that have no score yet theirs from ``scores`` [B, H, C] (float32): keys cached
        before the model's scorer saw this cache (a migrated DynamicLayer, a layer's first forward)."""
        self.scores = torch.where(torch.isnan(self.scores), scores.detach().float(), self.scores)
        self.unscored = False

    def mark_invalid(self, key_valid: torch.Tensor | None) -> None:
        """Empty the slots of padding keys: ``key_valid`` [B, N] bool over the logical positions."""
        if key_valid is None or self.key_pos.numel() == 0:
            return
        batch, heads, slots = self.key_pos.shape
        if key_valid.shape[-1] < self.cumulative_length:
            raise ValueError(
                f"the attention mask covers {key_valid.shape[-1]} positions, the cache holds {self.cumulative_length}"
            )
        at = self.key_pos.clamp(min=0).reshape(batch, heads * slots)
        valid = key_valid.to(torch.bool).gather(1, at).view(batch, heads, slots) & (self.key_pos >= 0)
        self.key_pos = torch.where(valid, self.key_pos, -1)
        if self.block_bias is not None:
            self.block_bias = torch.where(valid, self.block_bias, -math.inf)

    def block_selection(self, first_query_pos: int, num_queries: int) -> torch.Tensor | None:
        """Gates [B, H, 1, C] of the slots for queries at ``first_query_pos ..``, if they all lie in the
        block this layer last selected for and that selection saw every candidate; else None."""
        if not self._in_selected_block(first_query_pos, num_queries):
            return None
        return self.block_gate[:, :, None, :]

    def step_bias(self, query_pos: int) -> torch.Tensor | None:
        """Attention bias [B, H, C] of one decoding query at ``query_pos`` (the newest key's position),
        if its block's selection is known; else None."""
        if query_pos != self.cumulative_length - 1 or not self._in_selected_block(query_pos, 1):
            return None
        return self.block_bias

    def _in_selected_block(self, first_query_pos: int, num_queries: int) -> bool:
        settings = self.settings
        if settings is None or self.block_gate is None or not self.block_complete:
            return False
        first = first_query_pos // settings.block_q * settings.block_q
        last = (first_query_pos + num_queries - 1) // settings.block_q * settings.block_q
        return first == last == self.evicted_for

    def _evict(self, first_query_pos: int) -> None:
        settings = self.settings
        block_start = first_query_pos // settings.block_q * settings.block_q
        if block_start <= self.evicted_for:
            return  # same query block as the last eviction: nothing new can be dead
        self.evicted_for = block_start
        self.block_gate = self.block_bias = None
        if not _decode_ops.available():
            _warn_no_ops()
            return
        last_candidate = block_start - settings.window
        # The keys cached now are those before first_query_pos: the block's candidates are all here
        # unless window == 0 lets this very update's first key be one.
        self.block_complete = last_candidate < first_query_pos
        candidate = (self.key_pos >= settings.sinks) & (self.key_pos <= last_candidate)
        if last_candidate < settings.sinks or self.key_pos.numel() == 0:
            self.block_gate = self.scores.new_zeros(self.key_pos.shape)  # no candidate yet: sinks and window
        else:
            if bool(torch.isnan(self.scores).logical_and(candidate).any()):
                raise RuntimeError(
                    "SparseKCache: keys of an earlier update were never scored. The cache evicts by SparseK "
                    "scores, so the model must run its attention in sparsek mode (attn_implementation='sparsek' "
                    "or sparsek_hf.patch)"
                )
            gate, tau = _decode_ops.decode_select(
                self.scores, self.key_pos, self.tail_scores, query_pos0=block_start, num_queries=1,
                budget=settings.budget, window=settings.window, sinks=settings.sinks, block_q=settings.block_q,
                soft=settings.soft,
            )
            self._drop_dead(candidate, gate[:, :, 0], tau[:, :, 0, None])  # sets block_gate
            candidate = (self.key_pos >= settings.sinks) & (self.key_pos <= last_candidate)
        # The bias of this block's decoding queries: every cached key precedes them (causal holds).
        seen = (self.key_pos >= 0) & ~candidate
        self.block_bias = torch.where(
            self.block_gate > 0, self.block_gate.log(), torch.where(seen, 0.0, -math.inf)
        )

    def _drop_dead(self, candidate: torch.Tensor, gate: torch.Tensor, tau: torch.Tensor) -> None:
        """Evict the candidates outside Sel(p0); keep the scores of those still above tau."""
        selected = gate > 0
        keep = (self.key_pos >= 0) & (~candidate | selected)
        still_counts = candidate & ~selected & (self.scores.double() > tau)
        records = torch.where(still_counts, self.scores, -math.inf)
        if self.tail_scores is not None:
            old = torch.where(self.tail_scores.double() > tau, self.tail_scores, -math.inf)
            records = torch.cat([old, records], dim=-1)
        if self.dense and not bool(((self.key_pos >= 0) & ~keep).any()):
            self.block_gate = gate
            return  # nothing evicted: stay dense (slot c = position c) for the positional kernel
        self.dense = False
        self.block_gate = gate
        fields = [(name, empty) for name, empty, _ in self._SLOT_TENSORS if name not in ("block_bias",)]
        _, compacted = _compact(keep, *((getattr(self, name), empty) for name, empty in fields))
        for (name, _), tensor in zip(fields, compacted):
            setattr(self, name, tensor)
        capacity, (tail,) = _compact(torch.isfinite(records), (records, -math.inf))
        self.tail_scores = tail if capacity > 0 else None


def _warn_no_ops() -> None:
    global _NO_OPS_WARNED
    if not _NO_OPS_WARNED:
        _NO_OPS_WARNED = True
        warnings.warn(
            "sparsek_hf was installed without compiled kernels: SparseKCache keeps every key (no eviction)",
            RuntimeWarning,
            stacklevel=3,
        )


class SparseKCache(Cache):
    """A Transformers ``Cache`` for SparseK models that keeps each layer at constant size.

    Pass it to ``generate(..., past_key_values=SparseKCache())`` or to a forward call; a model in
    sparsek mode also turns the ``DynamicCache`` that ``generate`` creates into SparseK layers by
    itself. Layers are created on first use and take their SparseK settings from the model.

    Args:
        config: optional model config; with it the cache creates one layer per hidden layer upfront.
        settings: optional ``SparseKConfig`` for every layer (by default each layer gets the settings of
            the model that updates it).
    """

    def __init__(self, config=None, settings: SparseKConfig | None = None, **kwargs):
        num_layers = None
        if config is not None:
            text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
            num_layers = getattr(text_config, "num_hidden_layers", None)
        self._settings = settings
        if num_layers is not None:
            super().__init__(layers=[SparseKLayer(settings) for _ in range(num_layers)], **kwargs)
        else:
            super().__init__(layer_class_to_replicate=self._new_layer, **kwargs)

    def _new_layer(self) -> SparseKLayer:
        return SparseKLayer(self._settings)


def sparsek_layer_for(cache: Cache, layer_idx: int, settings: SparseKConfig) -> SparseKLayer:
    """The SparseK layer ``layer_idx`` of ``cache``, turning a dynamic layer into one if needed.

    Raises a ValueError for cache layers SparseK cannot work with (static, quantized, offloaded...).
    """
    layers = cache.layers
    replicate = getattr(cache, "layer_class_to_replicate", None)
    while len(layers) <= layer_idx and replicate is not None:
        layers.append(replicate())
    if layer_idx >= len(layers):
        raise ValueError(f"the cache has {len(layers)} layers, the model asked for layer {layer_idx}")
    layer = layers[layer_idx]
    if isinstance(layer, SparseKLayer):
        if layer.settings is None or layer.settings != settings:
            layer.settings = settings
        return layer
    if type(layer) in (DynamicLayer, DynamicSlidingWindowLayer):
        new = SparseKLayer.from_layer(layer, settings)
        layers[layer_idx] = new
        return new
    raise ValueError(
        f"SparseK attention works with DynamicCache or SparseKCache, not with a {type(cache).__name__} "
        f"holding {type(layer).__name__} layers"
    )
