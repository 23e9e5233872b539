"""xFormers integration: ``SparseKBias`` for ``xformers.ops.memory_efficient_attention``.

    import xformers.ops as xops
    from sparsek_hf import SparseKBias

    bias = SparseKBias(scores=u, budget=512, window=256, sinks=4)   # u: [B, Hkv, Nk] float32
    out = xops.memory_efficient_attention(q, k, v, attn_bias=bias)  # q, k, v: BMHK or BMGHK

Importing this module (which ``sparsek_hf.SparseKBias`` does on first use) wraps the dispatch of
``xformers.ops.fmha`` so that a call with a ``SparseKBias`` and no ``op=`` goes to ``SparseKFwOp`` /
``SparseKBwOp``; every other call reaches xFormers' own dispatch untouched. The ops run the
``torch.ops.sparsek`` kernels (CPU, CUDA), never xFormers' C++ kernels, and fall back to the
pure-PyTorch reference where no kernel serves the input (float64, or a dtype / head dim without one).

Layouts. q is ``[B, Mq, H, K]`` (BMHK) or ``[B, Mq, G, H, K]`` (BMGHK); its Hq = H or G * H heads,
flattened in that order, are the query heads of SPEC.md. ``scores`` is ``[B, Hs, Nk]`` with Hq % Hs
== 0: query head i uses score head ``i // (Hq // Hs)``, e.g. ``[B, G, Nk]`` for BMGHK, one score per
group. Pass k and v the way xFormers wants them for GQA, expanded (stride 0) over the heads of a
group: the op then reads only Hs kv heads. k and v with materialised copies give the same result at
the cost of attending every head separately. Query row r sits at position Nk - Mq + r (decode and
chunked prefill: Mq < Nk), as in ``LowerTriangularFromBottomRightMask``; attention is always causal.

Gradients. xFormers' autograd differentiates q, k and v only: gradients of tensors inside a bias are
dropped. So ``xops.memory_efficient_attention`` refuses a ``SparseKBias`` whose scores require grad
(instead of silently not training the scorer); ``sparsek_hf.xformers.memory_efficient_attention``
takes the same arguments and differentiates q, k, v and the scores.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple, Union

import torch

# Absolute imports: this module is sparsek_hf.xformers, the package below is the real xFormers.
import xformers.ops as xops
import xformers.ops.fmha as fmha
from xformers.ops.fmha import dispatch as fmha_dispatch
from xformers.ops.fmha.attn_bias import AttentionBias
from xformers.ops.fmha.common import AttentionBwOpBase, AttentionFwOpBase, Context, Gradients, Inputs

from . import api
from ._validation import check_attention, check_selection
from .config import SparseKConfig
from .reference import sparsek_attention_reference, sparsek_bias

__all__ = [
    "SparseKBias",
    "SparseKFwOp",
    "SparseKBwOp",
    "SparseKOp",
    "memory_efficient_attention",
    "install_dispatch",
    "uninstall_dispatch",
    "dispatch_installed",
]


@dataclass(eq=False)  # eq=False: comparing tensor fields with == has no single truth value
class SparseKBias(AttentionBias):
    """SparseK attention (SPEC.md) as an xFormers attention bias.

    Each query block of ``block_q`` queries attends ``sinks`` first keys, a local ``window`` and the
    ``budget`` highest-scoring earlier keys, gated by the differentiable SparseK mask of ``scores``.

    Args:
        scores: [B, Hs, Nk] float32, one score per key and score head (float64 is accepted for
            float64 inputs); query head i uses score head ``i // (Hq // Hs)``.
        budget, window, sinks, block_q, soft: as in ``sparsek_hf.sparsek_attention``.
        key_valid: optional [B, Nk] bool; False keys (padding) are never attended.
    """

    scores: torch.Tensor
    budget: int
    window: int
    sinks: int = 0
    block_q: int = 64
    soft: bool = True
    key_valid: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        check_selection(self.budget, self.window, self.sinks, self.block_q)
        if not isinstance(self.soft, bool):
            raise TypeError(f"soft must be a bool, got {type(self.soft).__name__}")
        if not isinstance(self.scores, torch.Tensor):
            raise TypeError(f"scores must be a tensor [B, Hkv, Nk], got {type(self.scores).__name__}")
        if self.scores.dim() != 3:
            raise ValueError(f"scores must be 3-D [B, Hkv, Nk], got shape {list(self.scores.shape)}")
        if self.scores.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"scores must be float32 (one score per key and kv head), got {self.scores.dtype}")
        if self.key_valid is not None:
            kv = self.key_valid
            if not isinstance(kv, torch.Tensor) or kv.dtype != torch.bool:
                got = kv.dtype if isinstance(kv, torch.Tensor) else type(kv).__name__
                raise TypeError(f"key_valid must be a bool tensor [B, Nk] (True = real key), got {got}")
            expected = (self.scores.shape[0], self.scores.shape[2])
            if tuple(kv.shape) != expected:
                raise ValueError(f"key_valid must have shape [B, Nk] = {list(expected)}, got {list(kv.shape)}")
            if kv.device != self.scores.device:
                raise ValueError(f"key_valid must be on {self.scores.device} like scores, got {kv.device}")

    @classmethod
    def from_config(
        cls, config: SparseKConfig, scores: torch.Tensor, key_valid: Optional[torch.Tensor] = None
    ) -> "SparseKBias":
        """The bias of a model's ``SparseKConfig`` for one call's scores."""
        return cls(
            scores=scores, budget=config.budget, window=config.window, sinks=config.sinks,
            block_q=config.block_q, soft=config.soft, key_valid=key_valid,
        )

    def to(self, device: Union[str, torch.device]) -> "SparseKBias":
        """The same bias with its tensors on ``device`` (differentiable in the scores)."""
        key_valid = None if self.key_valid is None else self.key_valid.to(device)
        return dataclasses.replace(self, scores=self.scores.to(device), key_valid=key_valid)

    def materialize(
        self,
        shape: Tuple[int, ...],
        dtype: torch.dtype = torch.float32,
        device: Union[str, torch.device] = "cpu",
    ) -> torch.Tensor:
        """The exact additive bias of SPEC.md: log gate on the attended keys, -inf elsewhere.

        ``shape`` is the full shape of the attention matrix, ``[B, H, Mq, Nk]`` (BMHK) or
        ``[B, G, H, Mq, Nk]`` (BMGHK). Slow and memory-hungry (Mq * Nk per head): for tests and
        debugging, like every ``materialize``. Differentiable in the scores.
        """
        shape = tuple(int(s) for s in shape)
        if len(shape) not in (4, 5):
            raise ValueError(
                "SparseKBias.materialize needs the full shape [B, H, Mq, Nk] or [B, G, H, Mq, Nk] (the query "
                f"heads pick their scores), got {list(shape)}"
            )
        batch, num_queries, num_keys = shape[0], shape[-2], shape[-1]
        q_heads = math.prod(shape[1:-2])
        reason = _bias_shape_reason(self, batch, q_heads, num_queries, num_keys)
        if reason:
            raise ValueError(f"SparseKBias.materialize{list(shape)}: {reason}")
        key_valid = None if self.key_valid is None else self.key_valid.to(device)
        bias = sparsek_bias(
            self.scores.to(device), num_queries, budget=self.budget, window=self.window, sinks=self.sinks,
            block_q=self.block_q, soft=self.soft, key_valid=key_valid,
        )
        bias = bias.repeat_interleave(q_heads // self.scores.shape[1], dim=1)
        return bias.to(dtype).reshape(shape)


def _bias_shape_reason(bias: SparseKBias, batch: int, q_heads: int, num_queries: int, num_keys: int) -> str:
    """Why the bias cannot serve these inputs, or ""."""
    sb, hs, sn = bias.scores.shape
    if sb != batch or sn != num_keys or hs < 1 or q_heads % hs != 0:
        return (
            f"attn_bias.scores must have shape [B, Hs, Nk] = [{batch}, Hs, {num_keys}] with the {q_heads} query "
            f"heads a multiple of Hs, got {list(bias.scores.shape)}"
        )
    if num_queries > num_keys:
        return f"more queries ({num_queries}) than keys ({num_keys}): query r sits at position Nk - Mq + r"
    return ""


# --------------------------------------------------------------------------------------------------
# Layouts: xFormers' [B, M, (G,) H, K] to the op's [B, H, N, D] and back.


def _num_heads(x: torch.Tensor) -> int:
    return x.shape[2] * x.shape[3] if x.dim() == 5 else x.shape[2]


def _head_offset(x: torch.Tensor, i: int) -> int:
    if x.dim() == 5:
        g, h = divmod(i, x.shape[3])
        return g * x.stride(2) + h * x.stride(3)
    return i * x.stride(2)


def _groups_alias(x: torch.Tensor, group: int) -> bool:
    """Whether the heads of each score group of x are one memory (expanded with stride 0)."""
    return all(_head_offset(x, i) == _head_offset(x, i - i % group) for i in range(_num_heads(x)))


def _leader_index(x: torch.Tensor, group: int):
    """Index of x's heads axes that picks the first head of every group: ([B, M, Hs, K] from x)."""
    if x.dim() == 4:
        return (slice(None), slice(None), slice(None, None, group))
    heads = x.shape[3]
    if group % heads == 0:
        return (slice(None), slice(None), slice(None, None, group // heads), 0)
    first = torch.arange(0, _num_heads(x), group, device=x.device)
    return (slice(None), slice(None), first // heads, first % heads)


def _leaders(x: torch.Tensor, group: int) -> torch.Tensor:
    """[B, M, Hs, K]: the first head of every group (a view where strides allow)."""
    if x.dim() == 5 and x.shape[3] % group == 0:
        return x[:, :, :, ::group].flatten(2, 3)
    return x[_leader_index(x, group)]


def _scatter_leaders(like: torch.Tensor, group: int, grad: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like x holding ``grad`` [B, M, Hs, K] on the group leaders and 0 elsewhere.

    This is the gradient of ``_leaders``: with k expanded (stride 0) over a group, autograd then
    sums it over the group into the tensor that was expanded.
    """
    full = torch.zeros(like.shape, dtype=grad.dtype, device=grad.device)
    if like.dim() == 5 and like.shape[3] % group == 0:
        full[:, :, :, ::group] = grad.unflatten(2, (like.shape[2], like.shape[3] // group))
    else:
        full[_leader_index(like, group)] = grad
    return full


@dataclass
class _Call:
    """One SparseK call in the op's layout, derived from xFormers' inputs."""

    q: torch.Tensor  # [B, Hq, Mq, D]
    k: torch.Tensor  # [B, Hkv, Nk, D]
    v: torch.Tensor
    scores: torch.Tensor  # [B, Hkv, Nk]
    group: int  # query heads per score head
    shared_kv: bool  # k / v read once per score group (their heads alias), else per query head
    scale: float
    bias: SparseKBias
    q_shape: torch.Size

    @classmethod
    def from_inputs(cls, inp: Inputs) -> "_Call":
        """Views of the inputs (copies only where strides forbid a view); differentiable."""
        bias = inp.attn_bias
        q_heads = _num_heads(inp.query)
        group = q_heads // bias.scores.shape[1]
        shared = group > 1 and _groups_alias(inp.key, group) and _groups_alias(inp.value, group)
        if shared:
            k, v, scores = _leaders(inp.key, group), _leaders(inp.value, group), bias.scores
        else:  # every query head attends its own kv head, with its group's scores
            k, v = (_flat_heads(x) for x in (inp.key, inp.value))
            scores = bias.scores if group == 1 else bias.scores.repeat_interleave(group, dim=1)
        return cls(
            q=_flat_heads(inp.query).transpose(1, 2), k=k.transpose(1, 2), v=v.transpose(1, 2), scores=scores,
            group=group, shared_kv=shared, scale=inp.scale_float, bias=bias, q_shape=inp.query.shape,
        )

    def options(self) -> dict:
        b = self.bias
        return dict(
            budget=b.budget, window=b.window, sinks=b.sinks, block_q=b.block_q, soft=b.soft, key_valid=b.key_valid
        )

    def heads_first(self, x: torch.Tensor) -> torch.Tensor:
        """xFormers' [B, M, (G,) H, K] as [B, Hq, M, K]."""
        return _flat_heads(x).transpose(1, 2)

    def heads_last(self, x: torch.Tensor) -> torch.Tensor:
        """[B, Hq, M, K] as a contiguous xFormers [B, M, (G,) H, K] shaped like q."""
        return x.transpose(1, 2).contiguous().view(*self.q_shape[:-1], x.shape[-1])

    def kv_grad(self, grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The op's dk / dv [B, Hkv, Nk, D] as the gradient of xFormers' k / v."""
        grad = grad.transpose(1, 2)
        if self.shared_kv:
            return _scatter_leaders(like, self.group, grad)
        return grad.contiguous().view(like.shape)


def _flat_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, M, (G,) H, K] as [B, M, Hq, K] (a view unless expanded heads must be copied)."""
    return x.flatten(2, 3) if x.dim() == 5 else x


# --------------------------------------------------------------------------------------------------
# The xFormers operators.


@dataclass
class _Selection:
    """The selection ``torch.ops.sparsek.fwd`` made, kept for the backward.

    It travels in ``Context.rng_state``: the one slot xFormers' autograd carries from an operator's
    forward to its backward untouched (and the selection is, like an rng state, what makes the
    backward reproduce the forward's choices).
    """

    tensors: List[torch.Tensor]


def _not_supported_reasons(op, d: Inputs) -> List[str]:
    q, k, v, bias = d.query, d.key, d.value, d.attn_bias
    reasons = []
    if not isinstance(bias, SparseKBias):
        reasons.append(f"attn_bias type is {type(bias)} (supported: SparseKBias)")
    if q.ndim not in (4, 5):
        reasons.append(f"query must be BMHK [B, M, H, K] or BMGHK [B, M, G, H, K], got {q.ndim}-D")
    if q.device.type not in op.SUPPORTED_DEVICES:
        reasons.append(f"device={q.device.type} (supported: {sorted(op.SUPPORTED_DEVICES)})")
    if q.dtype not in op.SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        reasons.append(f"dtypes q={q.dtype}, k={k.dtype}, v={v.dtype} (supported: one of float16, bfloat16, float32, "
                       "float64)")
    if q.shape[-1] != v.shape[-1] or q.shape[-1] != k.shape[-1]:
        reasons.append("query.shape[-1] != value.shape[-1]: SparseK needs one head dim")
    if max(q.shape[-1], v.shape[-1]) > op.SUPPORTED_MAX_K:
        reasons.append(f"head dim > {op.SUPPORTED_MAX_K}")
    if d.p != 0.0:
        reasons.append(f"dropout p={d.p}: SparseK attention has no dropout (use p=0.0)")
    if d.output_dtype is not None and d.output_dtype is not q.dtype:
        reasons.append("custom output_dtype not supported (the output has q's dtype)")
    if d.is_partial:
        reasons.append("partial attention not supported (the selection needs every key)")
    if isinstance(bias, SparseKBias) and q.ndim in (4, 5):
        reason = _bias_shape_reason(bias, q.shape[0], _num_heads(q), q.shape[1], k.shape[1])
        if reason:
            reasons.append(reason)
        elif bias.scores.device != q.device:
            reasons.append(f"attn_bias is on {bias.scores.device}, query on {q.device} (use attn_bias.to(device))")
        elif bias.scores.dtype == torch.float64 and q.dtype != torch.float64:
            reasons.append("attn_bias.scores must be float32 (float64 only with float64 q, k, v)")
    return reasons


class _SparseKOpMixin:
    SUPPORTED_DEVICES = {"cpu", "cuda"}
    SUPPORTED_DTYPES = {torch.float16, torch.bfloat16, torch.float32, torch.float64}
    SUPPORTED_MAX_K = 256
    SUPPORTED_ATTN_BIAS_TYPES = (SparseKBias,)
    SUPPORTS_DROPOUT = False
    SUPPORTS_CUSTOM_SCALE = True
    SUPPORTS_DIFFERENT_VALUE_EMBED = False
    SUPPORTS_BMGHK = True
    # Anything not None counts as built: the reference serves inputs that no kernel takes.
    OPERATOR = api.sparsek_attention

    @classmethod
    def not_supported_reasons(cls, d: Inputs) -> List[str]:
        # Not xFormers' base checks: they require its own C++ build for CUDA and refuse bf16 on the CPU.
        return _not_supported_reasons(cls, d)


def _refuse_unfinishable_autograd(inp: Inputs, needs_gradient: bool) -> None:
    """Errors for the two cases where xFormers' own autograd would go wrong after our forward."""
    if needs_gradient and inp.query.ndim == 5 and any(t.requires_grad for t in (inp.query, inp.key, inp.value)):
        # xFormers 0.0.35's backward reshapes every non-4-D gradient as BMK (bmk2bmhk) and fails.
        raise ValueError(
            "xformers.ops.memory_efficient_attention cannot differentiate BMGHK (5-D) inputs: its backward "
            "only takes BMHK. Call sparsek_hf.xformers.memory_efficient_attention (same arguments), which "
            "differentiates BMGHK inputs and the scores, or pass BMHK inputs."
        )
    bias = inp.attn_bias
    if bias.scores.requires_grad and (needs_gradient or torch.is_grad_enabled()):
        raise ValueError(
            "attn_bias.scores requires grad, but xformers.ops.memory_efficient_attention drops the gradients of "
            "tensors inside an attention bias, so the scores would silently not be trained. Call "
            "sparsek_hf.xformers.memory_efficient_attention (same arguments) to differentiate the scores too, or "
            "pass SparseKBias(scores=scores.detach(), ...) to train q, k and v only."
        )


class SparseKFwOp(_SparseKOpMixin, AttentionFwOpBase):
    """xFormers forward operator for ``SparseKBias`` on the ``torch.ops.sparsek`` kernels (CPU, CUDA)."""

    NAME = "sparsekF"

    @classmethod
    def apply(cls, inp: Inputs, needs_gradient: bool) -> Tuple[torch.Tensor, Optional[Context]]:
        _refuse_unfinishable_autograd(inp, needs_gradient)
        call = _Call.from_inputs(inp)
        opts = call.options()
        if api.kernel_supports(call.q):
            q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (call.q, call.k, call.v))
            check_attention(q, k, v, call.scores, opts["key_valid"], opts["budget"], opts["window"], opts["sinks"],
                            opts["block_q"], call.scale)
            out, lse, *selection = torch.ops.sparsek.fwd(
                q, k, v, call.scores.detach(), opts["key_valid"], opts["budget"], opts["window"], opts["sinks"],
                opts["block_q"], call.scale, opts["soft"],
            )
            saved = _Selection(selection)
        else:  # no kernel for this device / dtype / head dim: the reference (warns once)
            out, lse = api.sparsek_attention(
                call.q, call.k, call.v, call.scores.detach(), scale=call.scale, return_lse=True, **opts
            )
            saved = None
        out = call.heads_last(out)
        if not needs_gradient:
            return out, None
        # xFormers' autograd wants lse as [B, (G,) H, Mq]: the op's [B, Hq, Mq] with the heads unflattened.
        lse = lse.reshape(*inp.query.shape[:1], *inp.query.shape[2:-1], inp.query.shape[1])
        return out, Context(lse=lse, out=out, op_bw=SparseKBwOp, rng_state=saved)


class SparseKBwOp(_SparseKOpMixin, AttentionBwOpBase):
    """xFormers backward operator for ``SparseKBias``: gradients of q, k and v.

    The gradient of the scores never reaches this operator (xFormers' autograd drops it); use
    ``sparsek_hf.xformers.memory_efficient_attention`` for that.
    """

    NAME = "sparsekB"

    @classmethod
    def apply(cls, ctx: Context, inp: Inputs, grad: torch.Tensor) -> Gradients:
        call = _Call.from_inputs(inp)
        opts = call.options()
        dout = call.heads_first(grad).contiguous()
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (call.q, call.k, call.v))
        scores = call.scores.detach()
        if api.kernel_supports(q):
            num_queries = q.shape[2]
            out = call.heads_first(ctx.out).contiguous()
            lse = ctx.lse.reshape(q.shape[0], q.shape[1], -1)[..., :num_queries].contiguous()
            if isinstance(ctx.rng_state, _Selection):
                selection = ctx.rng_state.tensors
            else:  # the non-autograd API (memory_efficient_attention_backward): select again, deterministically
                selection = torch.ops.sparsek.select(
                    scores, opts["key_valid"], num_queries, opts["budget"], opts["window"], opts["sinks"],
                    opts["block_q"], opts["soft"],
                )
            dq, dk, dv, _ = torch.ops.sparsek.bwd(
                dout, q, k, v, out, lse, scores, opts["key_valid"], *selection, opts["window"], opts["sinks"],
                opts["block_q"], call.scale, opts["soft"], False,
            )
        else:  # the reference, differentiated by autograd
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_() for t in (q, k, v)]
                out, _ = sparsek_attention_reference(*leaves, scores, scale=call.scale, **opts)
                dq, dk, dv = torch.autograd.grad(out, leaves, dout)
        return Gradients(dq=call.heads_last(dq), dk=call.kv_grad(dk, inp.key), dv=call.kv_grad(dv, inp.value))


SparseKOp = (SparseKFwOp, SparseKBwOp)


def _ensure_supported(op, inp: Inputs) -> None:
    fmha_dispatch._ensure_op_supports_or_raise(ValueError, "memory_efficient_attention", op, inp)


# --------------------------------------------------------------------------------------------------
# The route with score gradients.


def memory_efficient_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_bias: Optional[Union[torch.Tensor, AttentionBias]] = None,
    p: float = 0.0,
    scale: Optional[float] = None,
    *,
    op: Optional[Any] = None,
    output_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``xformers.ops.memory_efficient_attention`` that also differentiates ``SparseKBias.scores``.

    With a ``SparseKBias`` it runs ``sparsek_hf.sparsek_attention`` under autograd, so gradients reach
    q, k, v and the scores (training the scorer); any other ``attn_bias`` goes to xFormers unchanged.
    """
    if not isinstance(attn_bias, SparseKBias):
        return xops.memory_efficient_attention(query, key, value, attn_bias, p, scale, op=op, output_dtype=output_dtype)
    if op is not None and op[0] is not SparseKFwOp:
        raise ValueError(f"op must be None or sparsek_hf.xformers.SparseKOp with a SparseKBias, got {op}")
    inp = Inputs(query=query, key=key, value=value, attn_bias=attn_bias, p=p, scale=scale, output_dtype=output_dtype)
    inp.validate_inputs()
    output_shape = inp.normalize_bmhk()
    _ensure_supported(SparseKFwOp, inp)
    call = _Call.from_inputs(inp)
    out = api.sparsek_attention(call.q, call.k, call.v, call.scores, scale=call.scale, **call.options())
    return call.heads_last(out).reshape(output_shape)


# --------------------------------------------------------------------------------------------------
# The dispatch hook: only SparseKBias is routed; xFormers has no registration API for new ops.


def _route_fw(original):
    def _dispatch_fw(inp: Inputs, *args, **kwargs):
        if isinstance(inp.attn_bias, SparseKBias):
            _ensure_supported(SparseKFwOp, inp)
            return SparseKFwOp
        return original(inp, *args, **kwargs)

    _dispatch_fw.sparsek_original = original
    return _dispatch_fw


def _route_bw(original):
    def _dispatch_bw(inp: Inputs, *args, **kwargs):
        if isinstance(inp.attn_bias, SparseKBias):
            _ensure_supported(SparseKBwOp, inp)
            return SparseKBwOp
        return original(inp, *args, **kwargs)

    _dispatch_bw.sparsek_original = original
    return _dispatch_bw


_HOOKS = (("_dispatch_fw", _route_fw), ("_dispatch_bw", _route_bw))


def dispatch_installed() -> bool:
    """Whether bare ``memory_efficient_attention`` calls with a ``SparseKBias`` reach the SparseK ops."""
    return all(hasattr(getattr(fmha, name), "sparsek_original") for name, _ in _HOOKS)


def install_dispatch() -> None:
    """Route ``SparseKBias`` calls of xFormers' dispatch to the SparseK ops. Idempotent; done at import."""
    for name, route in _HOOKS:
        current = getattr(fmha, name)
        if not hasattr(current, "sparsek_original"):
            setattr(fmha, name, route(current))


def uninstall_dispatch() -> None:
    """Give xFormers its own dispatch back (``op=SparseKOp`` keeps working). Idempotent."""
    for name, _ in _HOOKS:
        current = getattr(fmha, name)
        if hasattr(current, "sparsek_original"):
            setattr(fmha, name, current.sparsek_original)


install_dispatch()
