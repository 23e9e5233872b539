"""Scorer calibration: layer-local distillation of SparseK attention towards dense attention.

The scorers are the only parameters SparseK adds (SPEC.md "The scorer"). They are trained here
without backpropagating through the model:

1. ``capture_attention``: one dense forward per calibration window, through a capturing attention
   function ("sparsek_capture": Transformers' SDPA attention that also records what it saw), keeps
   every layer's q, k (post-rotary, as an attention function sees them), v and dense output.
2. ``fit_scorers``: per layer, Adam on that layer's scorer alone, minimising

       sum || sparsek_attention(q, k, v, u(v)) - dense_out ||^2  /  sum || dense_out ||^2

   over the query rows where SparseK selects (elsewhere it is exact). Gradients reach u through the
   soft SparseK gates. Steps sample block-aligned chunks of queries (a chunk ending at position e
   needs only keys < e), so a step costs a few small kernel calls, not a full-context attention.
   The last calibration window(s) are held out: early stopping and the reported losses use them.

Why the score can learn, and where the fit starts: u = v . w + b + slope * j, and the loss sees u
only through the gates clip(u - tau, 0, 1), which are fractional only for keys within 1 of tau. The
recency initialisation (w = 0, slope = 1 on integer positions) has no fractional key, hence no
gradient at all, and a key the selection never reaches gets none either. So before any Adam step,
the fit picks a starting point on the held-out windows (a small coordinate search):

- softer recency scores (slope x 1/4 ... 1/4096), whose gates ramp over 1/slope keys;
- a content direction that is informative from the start: per kv head, the weighted least-squares
  fit of log(attention a key receives from queries too far away to see it in their window) on the
  key's value vector (plus a constant and the position), computed from the dense captures; tried at
  a few scales (the scale sets how many keys sit in the fractional band, i.e. how much gradient
  Adam gets).

Adam then trains ``w`` (per kv head, in units of the head's value scale) and ``log slope`` with early
stopping on the held-out loss. ``b`` shifts every candidate of a head alike, which moves tau with it:
it cannot change any gate and is left at 0.

``sparsek_hf.distillation`` then fine-tunes all scorers together on the model's output distribution
(``--end-to-end-steps`` on the command line).

Data parallel (``accelerator`` with several processes): each process captures the windows
``i % num_processes == rank``; every step samples the same chunks everywhere (one seed), each
process runs the chunks of its windows, and the gradients are summed across processes, so the
result equals the single-process fit up to floating-point summation order.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .api import sparsek_attention
from .config import SparseKConfig
from .patching import FAMILIES, attention_layers, patch
from .scorer import SCORER_ATTR
from .transformers_integration import ATTN_IMPLEMENTATION, configure

CAPTURE_IMPLEMENTATION = "sparsek_capture"
_CAPTURE_ATTR = "_sparsek_capture"


# -- capture -----------------------------------------------------------------------------------------


def _capture_attention_forward(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """Transformers' SDPA attention, recording (q, k, v, out [B, Hq, N, D], scale) on the layer."""
    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    store = module.__dict__.get(_CAPTURE_ATTR)
    if store is not None:
        scale = kwargs.get("scaling")
        if scale is None:
            scale = getattr(module, "scaling", None)
        store.append((query.detach(), key.detach(), value.detach(), out.detach().transpose(1, 2), scale))
    return out, weights


AttentionInterface.register(CAPTURE_IMPLEMENTATION, _capture_attention_forward)
AttentionMaskInterface.register(CAPTURE_IMPLEMENTATION, sdpa_mask)


@dataclass
class LayerCapture:
    """What one attention layer saw in the dense forwards, by calibration window index."""

    q: dict[int, torch.Tensor] = field(default_factory=dict)  # [1, Hq, N, D]
    k: dict[int, torch.Tensor] = field(default_factory=dict)  # [1, Hkv, N, D]
    v: dict[int, torch.Tensor] = field(default_factory=dict)  # [1, Hkv, N, D]
    out: dict[int, torch.Tensor] = field(default_factory=dict)  # [1, Hq, N, D], dense attention output
    scale: float | None = None


def _check_capturable(model: nn.Module) -> list[nn.Module]:
    layers = attention_layers(model)  # raises a ValueError naming the supported families
    family = FAMILIES[model.config.model_type]
    if family.patch is not None:
        raise ValueError(
            f"calibration captures attention through Transformers' AttentionInterface, which "
            f"{model.config.model_type} models do not use; supported: "
            + ", ".join(sorted(k for k, f in FAMILIES.items() if f.patch is None))
        )
    return layers


def capture_attention(
    model: nn.Module,
    windows: dict[int, torch.Tensor],
    *,
    storage_device: torch.device | str | None = None,
    progress: bool = False,
) -> list[LayerCapture]:
    """Run a dense forward on each window (1-D token ids, by index) and keep every layer's q, k, v, out.

    The model's attention implementation is switched to the capturing SDPA function for the
    forwards and restored afterwards. Memory: about 4 * (2 Hq + 2 Hkv) * N * D bytes per layer and
    window in float32 (SmolLM2-135M, N = 4096: 0.75 GB per window); ``storage_device="cpu"`` keeps
    the captures off the GPU.
    """
    layers = _check_capturable(model)
    device = next(model.parameters()).device
    previous = model.config._attn_implementation
    captures = [LayerCapture() for _ in layers]
    for layer in layers:
        layer.__dict__[_CAPTURE_ATTR] = []
    model.set_attn_implementation(CAPTURE_IMPLEMENTATION)
    try:
        from tqdm.auto import tqdm

        with torch.no_grad():
            for index, ids in tqdm(list(windows.items()), desc="capture", disable=not progress, leave=False):
                if ids.dim() != 1:
                    raise ValueError(f"each calibration window must be 1-D token ids, got shape {list(ids.shape)}")
                model(input_ids=ids[None].to(device), use_cache=False)
                for layer, cap in zip(layers, captures):
                    store = layer.__dict__[_CAPTURE_ATTR]
                    if len(store) != 1:
                        raise RuntimeError(f"expected one attention call per layer and forward, got {len(store)}")
                    q, k, v, out, scale = store.pop()
                    target = storage_device if storage_device is not None else q.device
                    cap.q[index], cap.k[index], cap.v[index], cap.out[index] = (
                        t.to(target) for t in (q, k, v, out)
                    )
                    cap.scale = scale
    finally:
        for layer in layers:
            layer.__dict__.pop(_CAPTURE_ATTR, None)
        model.set_attn_implementation(previous)
    return captures


# -- fit ---------------------------------------------------------------------------------------------


def check_options(options, counts: tuple[str, ...], rates: tuple[str, ...]) -> None:
    """Raise a ValueError naming the first of ``counts`` that is not an int >= 1 (``steps``: >= 0) or
    of ``rates`` that is not a positive number (bools are neither)."""
    for name in counts:
        value = getattr(options, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "steps" else 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    for name in rates:
        value = getattr(options, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a positive float, got {value!r}")


@dataclass
class FitOptions:
    """How ``fit_scorers`` trains each layer (defaults: SmolLM2-135M on CPU in minutes)."""

    steps: int = 120  # Adam steps per layer (at most; early stopping may end sooner)
    lr: float = 0.05  # content weights, in units of the head's value scale
    lr_slope: float = 0.05  # log of the position slope
    chunk_queries: int = 256  # queries per sampled chunk (rounded to whole query blocks)
    chunks_per_step: int = 4
    eval_every: int = 10  # held-out loss every this many steps
    patience: int = 4  # stop after this many held-out evaluations without improvement
    # Starting points tried on the held-out windows: position slopes (x init_slope) and, with warm_start,
    # scales of the received-attention direction (see _LayerFit.attention_direction).
    start_slopes: tuple[float, ...] = (1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 1024, 1 / 4096)
    warm_start: bool = True
    warm_scales: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
    seed: int = 0

    def __post_init__(self) -> None:
        check_options(self, ("steps", "chunk_queries", "chunks_per_step", "eval_every", "patience"), ("lr", "lr_slope"))
        for name in ("start_slopes", "warm_scales"):
            values = getattr(self, name)
            if not values or any(isinstance(x, bool) or not (isinstance(x, (int, float)) and x > 0) for x in values):
                raise ValueError(f"{name} must be positive floats, got {values!r}")


@dataclass
class LayerReport:
    layer: int
    heldout_init: float  # relative held-out loss of the recency initialisation (= window W + K, sinks)
    heldout_start: float  # of the softer recency score the fit started from
    heldout_after: float  # of the trained scorer
    steps: int
    slope: float
    start_content: float = 0.0  # scale of the received-attention direction at the start
    start_slope: float = 1.0  # x init_slope at the start


@dataclass
class CalibrationReport:
    """Held-out distillation losses (relative squared error of the attention output) per layer."""

    config: SparseKConfig
    train_windows: list[int]
    heldout_windows: list[int]
    layers: list[LayerReport]
    scorers: dict[int, dict[str, torch.Tensor]] = field(repr=False, default_factory=dict)

    @property
    def heldout_init(self) -> float:
        return sum(r.heldout_init for r in self.layers) / max(1, len(self.layers))

    @property
    def heldout_after(self) -> float:
        return sum(r.heldout_after for r in self.layers) / max(1, len(self.layers))

    def to_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "train_windows": self.train_windows,
            "heldout_windows": self.heldout_windows,
            "heldout_loss_init": self.heldout_init,
            "heldout_loss_after": self.heldout_after,
            "layers": [dataclasses.asdict(r) for r in self.layers],
        }


class _Reducer:
    """Sums tensors across the processes of an ``accelerate.Accelerator`` (identity for one process)."""

    def __init__(self, accelerator=None):
        self.accelerator = accelerator
        self.world = 1 if accelerator is None else accelerator.num_processes
        self.rank = 0 if accelerator is None else accelerator.process_index

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return t
        return self.accelerator.reduce(t.contiguous(), reduction="sum")


def _first_selective_row(config: SparseKConfig) -> int:
    """The first block start p0 whose candidates outnumber the budget (rows before it are exact)."""
    need = config.budget + config.window + config.sinks  # |C(p0)| = p0 - W - S + 1 > K
    return -(-need // config.block_q) * config.block_q


class _LayerFit:
    """The distillation problem of one layer: u(v) = v . (w / sigma) + exp(log_slope) * j."""

    def __init__(self, cap: LayerCapture, config: SparseKConfig, train: list[int], heldout: list[int],
                 reducer: _Reducer, num_keys: int):
        self.cap, self.config, self.reducer = cap, config, reducer
        self.train = [i for i in train if i in cap.v]  # this process's windows
        self.heldout = [i for i in heldout if i in cap.v]
        self.num_keys = num_keys
        self.first = _first_selective_row(config)
        if not cap.v:
            raise ValueError("this process holds no calibration window: use at least as many calibration windows "
                             "as processes")
        any_v = next(iter(cap.v.values()))
        self.device = any_v.device
        kv_heads, head_dim = any_v.shape[1], any_v.shape[3]
        # Per-head value scale over the training keys (all processes), so one lr fits every layer.
        sq = torch.zeros(kv_heads, dtype=torch.float64, device=self.device)
        count = torch.zeros((), dtype=torch.float64, device=self.device)
        for i in self.train:
            v = cap.v[i][0].double()
            sq += v.square().sum(dim=(1, 2))
            count += v.shape[1] * v.shape[2]
        sq, count = reducer.sum(sq), reducer.sum(count)
        self.sigma = (sq / count.clamp_min(1)).sqrt().clamp_min(1e-6).float()
        # Normalisers: sum of ||dense_out||^2 over selective rows, for the training and held-out sets.
        self.train_norm = self._dense_norm(train)
        self.heldout_norm = self._dense_norm(heldout)
        self.positions = torch.arange(num_keys, device=self.device, dtype=torch.float32)
        self.weight = torch.zeros(kv_heads, head_dim, device=self.device, requires_grad=True)
        self.log_slope = torch.zeros((), device=self.device, requires_grad=True)

    def _dense_norm(self, windows: list[int]) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for i in windows:
            if i in self.cap.out:
                total += self.cap.out[i][:, :, self.first :].double().square().sum()
        return self.reducer.sum(total).clamp_min(1e-30)

    def scores(self, v: torch.Tensor, n: int) -> torch.Tensor:
        w = self.weight / self.sigma[:, None]
        u = (v[:, :, :n].float() * w[None, :, None, :]).sum(-1)
        return u + self.log_slope.exp() * self.positions[:n]

    def _error(self, i: int, start: int, end: int) -> torch.Tensor:
        """Squared error of SparseK vs dense for query rows [start, end) of window i (keys < end)."""
        cap, c = self.cap, self.config
        q = cap.q[i][:, :, start:end]
        out = sparsek_attention(
            q, cap.k[i][:, :, :end], cap.v[i][:, :, :end], self.scores(cap.v[i], end), budget=c.budget,
            window=c.window, sinks=c.sinks, block_q=c.block_q, scale=cap.scale, soft=c.soft,
        )
        return (out.float() - cap.out[i][:, :, start:end].float()).square().sum(dtype=torch.float32)

    def heldout_loss(self) -> float:
        with torch.no_grad():
            total = torch.zeros((), dtype=torch.float64, device=self.device)
            for i in self.heldout:
                total += self._error(i, self.first, self.num_keys).double()
            return float(self.reducer.sum(total) / self.heldout_norm)

    def attention_direction(self, ridge: float = 1e-3) -> torch.Tensor:
        """Content weights (per kv head, value-scale units) that predict the log of the attention a key
        receives from queries too far away to have it in their window: a weighted least-squares fit over
        the training windows, with a constant and the position as covariates."""
        c = self.config
        kv_heads, head_dim = self.weight.shape
        gap = c.window + c.block_q  # a query p sees key j only through the selection once p - j >= gap
        features = head_dim + 2
        xtx = torch.zeros(kv_heads, features, features, dtype=torch.float64, device=self.device)
        xty = torch.zeros(kv_heads, features, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for i in self.train:
                received, count = _received_attention(self.cap.q[i][0], self.cap.k[i][0], self.cap.scale, gap)
                keep = count >= c.block_q  # enough far queries for a stable mean
                keep[: c.sinks] = False  # sinks are always attended: they need no score
                if not bool(keep.any()):
                    continue
                target = (received[:, keep] / count[keep]).clamp_min(1e-9).log()  # [Hkv, n]
                v = self.cap.v[i][0][:, keep].double() / self.sigma.double()[:, None, None]  # [Hkv, n, D]
                pos = torch.nonzero(keep)[:, 0].double() / self.num_keys
                x = torch.cat([v, torch.ones_like(v[..., :1]), pos[None, :, None].expand(kv_heads, -1, 1)], -1)
                weight = count[keep].double()[None, :, None]
                xtx += (x * weight).transpose(1, 2) @ x
                xty += ((x * weight) * target[..., None]).sum(1)
        xtx, xty = self.reducer.sum(xtx), self.reducer.sum(xty)
        scale = torch.diagonal(xtx, dim1=1, dim2=2).mean(-1).clamp_min(1e-30)
        eye = torch.eye(features, dtype=torch.float64, device=self.device)
        solution = torch.linalg.solve(xtx + ridge * scale[:, None, None] * eye, xty[..., None])[..., 0]
        return solution[:, :head_dim].float()

    def set_recency(self, slope: float) -> None:
        with torch.no_grad():
            self.weight.zero_()
            self.log_slope.fill_(math.log(slope))

    def set(self, weight: torch.Tensor, slope: float) -> None:
        with torch.no_grad():
            self.weight.copy_(weight)
            self.log_slope.fill_(math.log(slope))

    def state(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weight.detach().clone(), self.log_slope.detach().clone()

    def load(self, state) -> None:
        with torch.no_grad():
            self.weight.copy_(state[0])
            self.log_slope.copy_(state[1])

    def scorer_tensors(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {
                "weight": (self.weight / self.sigma[:, None]).to(dtype).cpu(),
                "bias": torch.zeros(self.weight.shape[0], dtype=dtype),
                "slope": self.log_slope.exp().to(dtype).cpu(),
            }


def _received_attention(q: torch.Tensor, k: torch.Tensor, scale: float | None, gap: int, chunk: int = 512):
    """Dense causal attention that each key receives from queries at least ``gap`` positions later.

    q [Hq, N, D], k [Hkv, N, D]. Returns (received [Hkv, N], summed over the queries and the query heads
    of each kv head, divided by the group size; count [N], the number of such queries per key).
    """
    heads, n, dim = q.shape
    group = heads // k.shape[0]
    scale = dim**-0.5 if scale is None else scale
    keys = k.float().repeat_interleave(group, 0)
    received = torch.zeros(heads, n, dtype=torch.float64, device=q.device)
    j = torch.arange(n, device=q.device)
    for start in range(0, n, chunk):
        p = torch.arange(start, min(start + chunk, n), device=q.device)
        logits = (q[:, p].float() @ keys.transpose(1, 2)) * scale
        logits.masked_fill_(j[None, None, :] > p[None, :, None], float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        far = (p[:, None] - j[None, :]) >= gap
        received += (probs * far).sum(1).double()
    count = (n - gap - j).clamp_min(0)
    return received.view(k.shape[0], group, n).mean(1), count


def _sample_chunks(gen: torch.Generator, train: list[int], config: SparseKConfig, num_keys: int,
                   opts: FitOptions) -> list[tuple[int, int, int]]:
    """``chunks_per_step`` (window, start, end) chunks of whole query blocks inside the selective rows."""
    first = _first_selective_row(config)
    bq = config.block_q
    size = max(bq, (opts.chunk_queries // bq) * bq)
    size = min(size, ((num_keys - first) // bq) * bq) if num_keys - first >= bq else num_keys - first
    starts = list(range(first, num_keys - size + 1, bq))
    chunks = []
    for _ in range(opts.chunks_per_step):
        w = train[int(torch.randint(len(train), (1,), generator=gen))]
        s = starts[int(torch.randint(len(starts), (1,), generator=gen))]
        chunks.append((w, s, s + size))
    return chunks


def fit_layer(
    cap: LayerCapture,
    config: SparseKConfig,
    train: list[int],
    heldout: list[int],
    num_keys: int,
    options: FitOptions | None = None,
    *,
    layer: int = 0,
    accelerator=None,
) -> tuple[dict[str, torch.Tensor] | None, LayerReport]:
    """Fit one layer's scorer; returns its tensors (None if the context never selects) and a report."""
    opts = options or FitOptions()
    reducer = _Reducer(accelerator)
    fit = _LayerFit(cap, config, train, heldout, reducer, num_keys)
    if fit.first >= num_keys:  # every query attends every earlier key: nothing to learn
        return None, LayerReport(layer, 0.0, 0.0, 0.0, 0, config.init_slope)

    fit.set_recency(config.init_slope)
    init_loss = fit.heldout_loss()
    # Start from the best held-out point of a small grid: softer recency scores (see the module
    # docstring) and, with warm_start, the received-attention direction at a few scales.
    direction = fit.attention_direction() if opts.warm_start else torch.zeros_like(fit.weight)
    tried: dict[tuple[float, float], float] = {}

    def try_start(content: float, factor: float) -> float:
        if (content, factor) not in tried:
            fit.set(direction * content, config.init_slope * factor)
            tried[(content, factor)] = fit.heldout_loss()
        return tried[(content, factor)]

    content, factor = 0.0, min(opts.start_slopes, key=lambda f: try_start(0.0, f))
    if opts.warm_start:  # coordinate search: the direction's scale, the slope, the scale again
        content = min(opts.warm_scales, key=lambda c: try_start(c, factor))
        factor = min(opts.start_slopes, key=lambda f: try_start(content, f))
        content = min(opts.warm_scales, key=lambda c: try_start(c, factor))
        if try_start(0.0, factor) <= try_start(content, factor):
            content = 0.0
    start_loss = try_start(content, factor)
    fit.set(direction * content, config.init_slope * factor)
    best_state, best_loss, bad, steps = fit.state(), start_loss, 0, 0

    optimizer = torch.optim.Adam([
        {"params": [fit.weight], "lr": opts.lr},
        {"params": [fit.log_slope], "lr": opts.lr_slope},
    ])
    for p in (fit.weight, fit.log_slope):
        p.grad = torch.zeros_like(p)  # a process may own none of a step's chunks
    gen = torch.Generator().manual_seed(opts.seed * 1_000_003 + layer)
    for step in range(1, opts.steps + 1):
        chunks = _sample_chunks(gen, train, config, num_keys, opts)
        rows = sum(e - s for _, s, e in chunks)
        # Scale by the training set's mean squared output per row, a constant every process knows.
        norm = float(fit.train_norm) * rows / (len(train) * (num_keys - fit.first))
        optimizer.zero_grad(set_to_none=False)
        for i, s, e in chunks:
            if i in cap.v:
                (fit._error(i, s, e) / norm).backward()
        for p in (fit.weight, fit.log_slope):
            p.grad.copy_(reducer.sum(p.grad))
        optimizer.step()
        steps = step
        if step % opts.eval_every == 0 or step == opts.steps:
            loss = fit.heldout_loss()
            if loss < best_loss:
                best_state, best_loss, bad = fit.state(), loss, 0
            else:
                bad += 1
                if bad >= opts.patience:
                    break
    fit.load(best_state)
    report = LayerReport(layer, init_loss, start_loss, best_loss, steps, float(fit.log_slope.detach().exp()),
                         content, factor)
    return fit.scorer_tensors(torch.float32), report


def split_windows(num_windows: int, heldout: int) -> tuple[list[int], list[int]]:
    """Training and held-out window indices: the last ``heldout`` windows are held out."""
    if isinstance(heldout, bool) or not isinstance(heldout, int) or heldout < 1:
        raise ValueError(f"heldout_windows must be an int >= 1, got {heldout!r}")
    if num_windows < heldout + 1:
        raise ValueError(
            f"calibration needs at least {heldout + 1} windows ({heldout} held out), got {num_windows}: "
            "give more calibration text or a shorter ctx"
        )
    return list(range(num_windows - heldout)), list(range(num_windows - heldout, num_windows))


def calibration_windows(input_ids: torch.Tensor, ctx: int, max_windows: int | None = None) -> list[torch.Tensor]:
    """Non-overlapping windows of exactly ``ctx`` tokens from 1-D (or [1, N]) token ids."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError("input_ids must be an integer tensor of token ids")
    if input_ids.dim() == 2 and input_ids.shape[0] == 1:
        input_ids = input_ids[0]
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be 1-D (or [1, N]) token ids, got shape {list(input_ids.shape)}")
    if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 2:
        raise ValueError(f"ctx must be an int >= 2, got {ctx!r}")
    count = input_ids.numel() // ctx
    if max_windows is not None:
        count = min(count, max_windows)
    return [input_ids[i * ctx : (i + 1) * ctx] for i in range(count)]


def fit_scorers(
    captures: list[LayerCapture],
    config: SparseKConfig,
    num_windows: int,
    num_keys: int,
    *,
    heldout_windows: int = 1,
    options: FitOptions | None = None,
    accelerator=None,
    progress: bool = False,
) -> CalibrationReport:
    """Fit every layer's scorer from ``capture_attention``'s output; the tensors are in ``report.scorers``."""
    from tqdm.auto import tqdm

    train, heldout = split_windows(num_windows, heldout_windows)
    report = CalibrationReport(config, train, heldout, [])
    bar = tqdm(captures, desc=f"calibrate K={config.budget}", disable=not progress, leave=False)
    for layer, cap in enumerate(bar):
        tensors, layer_report = fit_layer(
            cap, config, train, heldout, num_keys, options, layer=layer, accelerator=accelerator
        )
        report.layers.append(layer_report)
        if tensors is not None:
            report.scorers[layer] = tensors
        bar.set_postfix(loss=f"{layer_report.heldout_init:.3g}->{layer_report.heldout_after:.3g}")
    return report


def apply_scorers(model: nn.Module, config: SparseKConfig, scorers: dict[int, dict[str, torch.Tensor]]) -> nn.Module:
    """Switch the model to SparseK with ``config`` and load ``scorers`` (layers missing from it get
    the recency initialisation)."""
    if model.config._attn_implementation != ATTN_IMPLEMENTATION or any(
        SCORER_ATTR not in m._modules for m in attention_layers(model)
    ):
        patch(model, config)
    else:
        configure(model, config)
    for index, module in enumerate(attention_layers(model)):
        scorer = module._modules[SCORER_ATTR]
        tensors = scorers.get(index)
        with torch.no_grad():
            if tensors is None:
                scorer.weight.zero_()
                scorer.bias.zero_()
                scorer.slope.fill_(config.init_slope)
            else:
                for name in ("weight", "bias", "slope"):
                    getattr(scorer, name).copy_(tensors[name])
    return model


def calibrate(
    model: nn.Module,
    input_ids: torch.Tensor,
    config: SparseKConfig | None = None,
    *,
    ctx: int = 2048,
    max_windows: int | None = None,
    heldout_windows: int = 1,
    options: FitOptions | None = None,
    save_path=None,
    accelerator=None,
    storage_device=None,
    progress: bool = False,
) -> CalibrationReport:
    """Train a model's SparseK scorers by layer-local distillation from its dense attention.

    Args:
        model: a Transformers model of a family routed through the AttentionInterface (dense or
            already in sparsek mode).
        input_ids: calibration token ids, 1-D: cut into non-overlapping windows of ``ctx`` tokens
            (at most ``max_windows``); the last ``heldout_windows`` are held out for early stopping
            and for the reported losses. Keep them disjoint from the text you evaluate on.
        config: the SparseK settings to calibrate for (default: the model's, else ``SparseKConfig()``).
        options: a ``FitOptions`` (steps, learning rates, chunk sizes, seed).
        save_path: if given, the scorers (and ``config``) are written there with ``save_scorers``.
        accelerator: an ``accelerate.Accelerator`` for data parallelism over windows.

    Returns a ``CalibrationReport``; the model is left in sparsek mode with the trained scorers.
    """
    from .scorer import save_scorers
    from .transformers_integration import settings_of

    if config is None:
        config = settings_of(model.config)
    if not isinstance(config, SparseKConfig):
        raise TypeError(f"config must be a sparsek_hf.SparseKConfig, got {type(config).__name__}")
    if options is not None and not isinstance(options, FitOptions):
        raise TypeError(f"options must be a sparsek_hf.calibration.FitOptions, got {type(options).__name__}")
    _check_capturable(model)
    windows = calibration_windows(input_ids, ctx, max_windows)
    split_windows(len(windows), heldout_windows)  # fail before the expensive part
    rank, world = (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)
    mine = {i: w for i, w in enumerate(windows) if i % world == rank}
    was_training = model.training
    model.eval()
    try:
        captures = capture_attention(model, mine, storage_device=storage_device, progress=progress)
        report = fit_scorers(
            captures, config, len(windows), ctx, heldout_windows=heldout_windows, options=options,
            accelerator=accelerator, progress=progress,
        )
    finally:
        model.train(was_training)
    apply_scorers(model, config, report.scorers)
    if save_path is not None and rank == 0:
        save_scorers(model, save_path)
    return report


# -- command line --------------------------------------------------------------------------------------


def build_parser():
    import argparse

    from .evaluation import CALIB_FRACTION, SCORER_FILE_PATTERN, _DTYPES, _int_list, add_model_and_text_arguments

    p = argparse.ArgumentParser(
        prog="python -m eval.calibrate",
        description="Train SparseK scorers by layer-local distillation from dense attention, on the calibration "
        "part of a text (default: SmolLM2-135M, offline, on the shipped text), optionally fine-tune them end to end "
        "on the model's next-token distribution, and save them as safetensors.",
    )
    add_model_and_text_arguments(p)
    p.add_argument("--calib-fraction", type=float, default=CALIB_FRACTION,
                   help="calibrate on the first fraction of the tokens, as eval.perplexity does (default: 0.3)")
    p.add_argument("--ctx", type=int, default=2048, help="tokens per calibration window (default: 2048)")
    p.add_argument("--windows", type=int, default=0,
                   help="use at most this many windows (0: all that fit; default: 0)")
    p.add_argument("--heldout", type=int, default=1, help="held-out windows, the last ones (default: 1)")
    p.add_argument("--budgets", type=_int_list, default=[512], help="budget(s) to calibrate for (default: 512)")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--block-q", type=int, default=64)
    defaults = FitOptions()
    p.add_argument("--steps", type=int, default=defaults.steps, help=f"Adam steps per layer (default: {defaults.steps})")
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--lr-slope", type=float, default=defaults.lr_slope)
    p.add_argument("--chunk-queries", type=int, default=defaults.chunk_queries)
    p.add_argument("--chunks-per-step", type=int, default=defaults.chunks_per_step)
    p.add_argument("--seed", type=int, default=0)
    e2e = p.add_argument_group("end-to-end distillation (sparsek_hf.distillation)")
    e2e.add_argument("--end-to-end-steps", type=int, default=0,
                     help="then fine-tune all scorers together on the model's next-token distribution for at most "
                     "this many steps (default: 0, off; one process only)")
    e2e.add_argument("--end-to-end-lr", type=float, default=None, help="its step size, in gate units (default: 0.05)")
    e2e.add_argument("--from-scorers", metavar="PATH",
                     help="skip the layer-local fit: start from these scorers (a file, or a directory with "
                     f"{SCORER_FILE_PATTERN.format(budget='K')})")
    p.add_argument("--out", default=".", metavar="PATH",
                   help=f"a directory (files {SCORER_FILE_PATTERN.format(budget='K')}) or, for one budget, a "
                   ".safetensors file (default: .)")
    p.add_argument("--report", metavar="FILE", help="write the held-out losses per budget and layer as JSON")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    p.add_argument("--device", help="default: the accelerator's device")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> dict[int, CalibrationReport]:
    """``python -m eval.calibrate`` / ``sparsek-calibrate``."""
    import json
    import os
    import time
    from types import SimpleNamespace

    from accelerate import Accelerator

    from .distillation import EndToEndOptions, distill_end_to_end
    from .evaluation import SCORER_FILE_PATTERN, _load, _read_scorers, end_processes, load_text, split_tokens
    from .scorer import save_scorers

    parser = build_parser()
    a = parser.parse_args(argv)
    if a.ctx < 2:
        parser.error(f"--ctx must be >= 2, got {a.ctx}")
    if a.heldout < 1:
        parser.error(f"--heldout must be >= 1, got {a.heldout}")
    if a.windows < 0 or (a.windows and a.windows < a.heldout + 1):
        parser.error(f"--windows must be 0 (all) or >= heldout + 1 = {a.heldout + 1}, got {a.windows}")
    if not 0 < a.calib_fraction <= 1:
        parser.error(f"--calib-fraction must be in (0, 1], got {a.calib_fraction}")
    if a.text and a.dataset:
        parser.error("give either --text or --dataset, not both")
    if a.text and any(not os.path.isfile(f) for f in a.text):
        parser.error(f"--text: file(s) not found: {', '.join(f for f in a.text if not os.path.isfile(f))}")
    if len(a.budgets) > 1 and a.out.endswith(".safetensors"):
        parser.error("--out: give a directory when calibrating several budgets")
    if a.from_scorers and not os.path.exists(a.from_scorers):
        parser.error(f"--from-scorers: {a.from_scorers} not found")
    try:
        configs = [SparseKConfig(budget=b, window=a.window, sinks=a.sinks, block_q=a.block_q) for b in a.budgets]
        options = FitOptions(steps=a.steps, lr=a.lr, lr_slope=a.lr_slope, chunk_queries=a.chunk_queries,
                             chunks_per_step=a.chunks_per_step, seed=a.seed)
        e2e_options = EndToEndOptions(steps=a.end_to_end_steps, seed=a.seed,
                                      **({"lr": a.end_to_end_lr} if a.end_to_end_lr is not None else {}))
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))

    accelerator = Accelerator(cpu=a.device == "cpu")
    if a.end_to_end_steps and accelerator.num_processes > 1:
        parser.error("--end-to-end-steps runs in one process (drop accelerate launch for it)")
    device = torch.device(a.device) if a.device else accelerator.device
    say = print if accelerator.is_main_process else (lambda *args, **kwargs: None)
    progress = not a.no_progress and accelerator.is_main_process
    text = load_text(a.text, a.dataset, a.dataset_config, a.split, a.column)
    model, tokenizer, name = _load(SimpleNamespace(model=a.model, dtype=a.dtype, device_map=None), device)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    calib_ids, _ = split_tokens(ids, a.calib_fraction) if a.calib_fraction < 1 else (ids, None)
    windows = calibration_windows(calib_ids, a.ctx, a.windows or None)
    try:
        split_windows(len(windows), a.heldout)
    except ValueError as exc:
        parser.error(f"{exc} (the calibration part has {calib_ids.numel()} tokens)")
    say(f"model: {name}; {len(windows)} calibration windows of {a.ctx} tokens ({a.heldout} held out) from the "
        f"first {calib_ids.numel()} tokens")

    start = time.perf_counter()
    rank, world = accelerator.process_index, accelerator.num_processes
    captures = None
    if not a.from_scorers:
        mine = {i: w for i, w in enumerate(windows) if i % world == rank}
        captures = capture_attention(model, mine, progress=progress)
    reports, summary = {}, {}
    for config in configs:
        if a.from_scorers:
            try:
                tensors = _read_scorers([a.from_scorers], [config.budget], len(attention_layers(model)),
                                        option="--from-scorers")[config.budget]
            except ValueError as exc:
                parser.error(str(exc))
            summary[config.budget] = {"from_scorers": a.from_scorers}
        else:
            report = fit_scorers(captures, config, len(windows), a.ctx, heldout_windows=a.heldout, options=options,
                                 accelerator=accelerator, progress=progress)
            reports[config.budget], tensors = report, report.scorers
            summary[config.budget] = report.to_dict()
            say(f"K={config.budget}: held-out distillation loss {report.heldout_init:.4f} (initial scorer) -> "
                f"{report.heldout_after:.4f}")
        apply_scorers(model, config, tensors)
        if a.end_to_end_steps:
            e2e = distill_end_to_end(model, windows, config, heldout_windows=a.heldout, options=e2e_options,
                                     progress=progress)
            summary[config.budget]["end_to_end"] = dataclasses.asdict(e2e)
            say(f"K={config.budget}: end to end, held-out KL per selective token {e2e.heldout_kl_start:.5f} -> "
                f"{e2e.heldout_kl_after:.5f} ({e2e.steps} steps)")
        path = a.out if a.out.endswith(".safetensors") else os.path.join(
            a.out, SCORER_FILE_PATTERN.format(budget=config.budget))
        if accelerator.is_main_process:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            save_scorers(model, path)
        say(f"K={config.budget}: saved {path}")
    say(f"calibration took {time.perf_counter() - start:.0f} s")
    if a.report and accelerator.is_main_process:
        with open(a.report, "w") as f:
            json.dump({"model": name, "ctx": a.ctx, "budgets": {str(k): v for k, v in summary.items()}}, f, indent=1)
    end_processes(accelerator)
    return reports


if __name__ == "__main__":
    main()
