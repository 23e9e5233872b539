"""Argument checks of the public API: a clear ValueError / TypeError naming the argument."""

from __future__ import annotations

import torch

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_selection(budget, window, sinks, block_q) -> None:
    check_int("budget", budget, 0)
    check_int("window", window, 0)
    check_int("sinks", sinks, 0)
    check_int("block_q", block_q, 1)


def check_scores(scores: torch.Tensor, batch: int, kv_heads: int, num_keys: int, device, allow_float64: bool) -> None:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a tensor, got {type(scores).__name__}")
    if tuple(scores.shape) != (batch, kv_heads, num_keys):
        raise ValueError(f"scores must have shape [B, Hkv, Nk] = [{batch}, {kv_heads}, {num_keys}], got {list(scores.shape)}")
    allowed = (torch.float32, torch.float64) if allow_float64 else (torch.float32,)
    if scores.dtype not in allowed:
        raise TypeError(f"scores must be float32 (one score per key and kv head), got {scores.dtype}")
    if scores.device != device:
        raise ValueError(f"scores must be on {device} like q, got {scores.device}")


def check_key_valid(key_valid, batch: int, num_keys: int, device) -> None:
    if key_valid is None:
        return
    if not isinstance(key_valid, torch.Tensor) or key_valid.dtype != torch.bool:
        got = key_valid.dtype if isinstance(key_valid, torch.Tensor) else type(key_valid).__name__
        raise TypeError(f"key_valid must be a bool tensor [B, Nk] (True = real key), got {got}")
    if tuple(key_valid.shape) != (batch, num_keys):
        raise ValueError(f"key_valid must have shape [B, Nk] = [{batch}, {num_keys}], got {list(key_valid.shape)}")
    if key_valid.device != device:
        raise ValueError(f"key_valid must be on {device} like q, got {key_valid.device}")


def check_attention(q, k, v, scores, key_valid, budget, window, sinks, block_q, scale) -> None:
    """Every check of sparsek_attention's arguments that needs no look at tensor values."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            layout = "[B, Hq, Nq, D]" if name == "q" else "[B, Hkv, Nk, D]"
            raise ValueError(f"{name} must be 4-D {layout}, got shape {list(t.shape)}")
    if q.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {list(k.shape)}, got {list(v.shape)}")
    batch, q_heads, num_queries, head_dim = q.shape
    kv_heads, num_keys = k.shape[1], k.shape[2]
    if k.shape[0] != batch:
        raise ValueError(f"k must have the batch size of q ({batch}), got {k.shape[0]}")
    if k.shape[3] != head_dim:
        raise ValueError(f"k must have the head dim of q ({head_dim}), got {k.shape[3]}")
    if not 1 <= head_dim <= 256:
        raise ValueError(f"head dim D must be between 1 and 256, got {head_dim}")
    if kv_heads < 1 or q_heads % kv_heads != 0:
        raise ValueError(f"the query heads Hq ({q_heads}) must be a multiple of the kv heads Hkv ({kv_heads})")
    if num_queries > num_keys:
        raise ValueError(
            f"q cannot have more positions ({num_queries}) than k ({num_keys}): query r sits at position Nk - Nq + r"
        )
    check_scores(scores, batch, kv_heads, num_keys, q.device, allow_float64=q.dtype == torch.float64)
    check_key_valid(key_valid, batch, num_keys, q.device)
    check_selection(budget, window, sinks, block_q)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
