"""The SparseK scorer (SPEC.md "The scorer"): one small module per attention layer.

    u_j = v_j . weight[h] + bias[h] + slope * j        (float32)

``v_j`` is key j's value vector in kv head h: free of rotary embedding and present in every
attention call and in the KV cache, so prefill, cached decoding and the xFormers path score a key
identically. ``j`` is the key's absolute position (its index in the un-evicted sequence).

The scorer starts as ``weight = 0, bias = 0, slope = init_slope > 0``: the selection is then the
most recent candidates, so SparseK begins as a sliding window of ``window + budget`` plus sinks,
a safe starting point for a pretrained model. Its parameters are the only new ones; they train by
distillation and are saved beside the model (see ``save_scorers`` / ``load_scorers``).
"""

from __future__ import annotations

import json
import os
import re

import torch
from torch import nn

SCORER_ATTR = "sparsek_scorer"
SCORER_FILE = "sparsek_scorer.safetensors"
_SCORER_KEY = re.compile(r"^(?:(?P<prefix>.*)\.)?" + SCORER_ATTR + r"\.(?P<param>weight|bias|slope)$")


class SparseKScorer(nn.Module):
    """Key scores of one attention layer: ``u [B, Hkv, N] float32`` from values ``[B, Hkv, N, D]``."""

    def __init__(self, kv_heads: int, head_dim: int, init_slope: float = 1.0, *, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.zeros(kv_heads, head_dim, **factory))
        self.bias = nn.Parameter(torch.zeros(kv_heads, **factory))
        self.slope = nn.Parameter(torch.full((), float(init_slope), **factory))

    @property
    def kv_heads(self) -> int:
        return self.weight.shape[0]

    @property
    def head_dim(self) -> int:
        return self.weight.shape[1]

    def forward(self, value: torch.Tensor, positions: torch.Tensor | int = 0) -> torch.Tensor:
        """Scores of the keys whose values are ``value`` [B, Hkv, N, D].

        ``positions``: absolute key positions broadcastable to [B, Hkv, N] (int tensor), or an int,
        the position of the first of N consecutive keys.
        """
        if value.dim() != 4 or value.shape[1] != self.kv_heads or value.shape[3] != self.head_dim:
            raise ValueError(
                f"value must be [B, Hkv, N, D] with Hkv = {self.kv_heads} and D = {self.head_dim}, "
                f"got shape {list(value.shape)}"
            )
        if isinstance(positions, int):
            positions = torch.arange(positions, positions + value.shape[2], device=value.device)
        w = self.weight.to(device=value.device, dtype=torch.float32)
        # Elementwise product and sum rather than a matmul: the score of a key must not depend on how
        # many keys are scored at once (prefill vs. one decode step), or selections could differ.
        u = (value.float() * w[None, :, None, :]).sum(-1)
        u = u + self.bias.to(device=value.device, dtype=torch.float32)[None, :, None]
        return u + self.slope.to(device=value.device, dtype=torch.float32) * positions.to(torch.float32)

    def extra_repr(self) -> str:
        return f"kv_heads={self.kv_heads}, head_dim={self.head_dim}"


def scorers_of(model: nn.Module) -> dict[str, SparseKScorer]:
    """The attached scorers of a model, by qualified name (``model.layers.0.self_attn.sparsek_scorer``)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SparseKScorer)}


def scorer_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The scorer tensors of a model, under the names ``model.state_dict()`` gives them."""
    return {k: v for k, v in model.state_dict().items() if _SCORER_KEY.match(k)}


def save_scorers(model: nn.Module, path: str | os.PathLike) -> str:
    """Write the model's scorer weights (and its SparseK settings, as metadata) to a safetensors file.

    ``path`` may be a directory (the file is then ``sparsek_scorer.safetensors`` inside it).
    Returns the file path. ``patch(model, scorer_path=...)`` and ``load_scorers`` read it back.
    """
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in scorer_state_dict(model).items()}
    if not tensors:
        raise ValueError("the model has no SparseK scorers: switch it to sparsek (sparsek_hf.patch) first")
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, SCORER_FILE)
    metadata = {}
    settings = getattr(getattr(model, "config", None), "sparsek", None)
    if isinstance(settings, dict):
        metadata["sparsek_config"] = json.dumps(settings, sort_keys=True)
    save_file(tensors, path, metadata=metadata)
    return path


def _layer_index(prefix: str | None) -> int | None:
    """The layer number in a module path such as ``model.layers.3.self_attn`` (its last integer part)."""
    if not prefix:
        return None
    numbers = [int(part) for part in prefix.split(".") if part.isdigit()]
    return numbers[-1] if numbers else None


def _checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a scorer file, a saved model directory, or a cached Hub checkpoint."""
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        own = os.path.join(path, SCORER_FILE)
        if os.path.isfile(own):
            return [own]
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(path, s) for s in shards]
        single = os.path.join(path, "model.safetensors")
        return [single] if os.path.isfile(single) else []
    return []


def read_scorer_tensors(path: str | os.PathLike) -> dict[int, dict[str, torch.Tensor]]:
    """Scorer tensors stored at ``path``, grouped by layer number: ``{layer: {"weight": ..., ...}}``.

    ``path``: a file written by ``save_scorers``, or a directory holding one or a model saved with
    ``save_pretrained`` (its scorers are part of the model's weights). Missing files give ``{}``.
    """
    from safetensors import safe_open

    found: dict[int, dict[str, torch.Tensor]] = {}
    for file in _checkpoint_files(os.fspath(path)):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                match = _SCORER_KEY.match(key)
                if match is None:
                    continue
                layer = _layer_index(match.group("prefix"))
                if layer is not None:
                    found.setdefault(layer, {})[match.group("param")] = f.get_tensor(key)
    return found


def copy_into(scorer: SparseKScorer, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Load one layer's stored tensors into ``scorer``, checking the shapes."""
    for name in ("weight", "bias", "slope"):
        if name not in tensors:
            raise ValueError(f"{where}: the stored scorer has no '{name}' tensor")
        target = getattr(scorer, name)
        if tuple(tensors[name].shape) != tuple(target.shape):
            raise ValueError(
                f"{where}: stored scorer {name} has shape {list(tensors[name].shape)}, "
                f"the layer needs {list(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(tensors[name])


def load_scorers(model: nn.Module, path: str | os.PathLike) -> int:
    """Load stored scorer weights into a model's attached scorers; returns how many were loaded.

    ``path`` as in ``read_scorer_tensors``. Layers are matched by their number, so scorers saved from
    one model load into another of the same architecture. Every attached scorer must find weights.
    """
    scorers = scorers_of(model)
    if not scorers:
        raise ValueError("the model has no SparseK scorers: switch it to sparsek (sparsek_hf.patch) first")
    stored = read_scorer_tensors(path)
    if not stored:
        raise ValueError(f"{os.fspath(path)!r} holds no SparseK scorer weights")
    for name, scorer in scorers.items():
        layer = _layer_index(name.rsplit(".", 1)[0] if "." in name else None)
        if layer not in stored:
            raise ValueError(f"{os.fspath(path)!r} has no scorer for layer {layer} ({name})")
        copy_into(scorer, stored[layer], name)
    return len(scorers)
