"""End-to-end scorer distillation: fine-tune the scorers on the model's own output distribution.

Layer-local calibration (``calibration.py``) makes each layer's SparseK attention output close to
the dense one, layer by layer. What perplexity measures is the model's next-token distribution, and
errors of early layers compound. This stage starts from calibrated (or any) scorers and trains all
of them together, the model frozen, on

    KL( p_dense(. | x_<t) || p_sparsek(. | x_<t) )

averaged over the tokens where SparseK selects (earlier rows are exact), with the dense model's
log-probabilities computed once per window. Gradients reach each scorer through the soft SparseK
gates (SPEC.md), so a layer whose scores leave no key in the fractional band (|u - tau| < 1), such
as the integer recency initialisation, gets none: start from layer-local calibration.

Step sizes are set in the unit of the gates: one Adam step moves a key's score u by about ``lr``
(the content weights' rate is ``lr`` over the typical value-vector norm of the layer, the slope's is
``lr`` over the context length). The best held-out state is kept (early stopping).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from .calibration import _first_selective_row, capture_attention, check_options, split_windows
from .config import SparseKConfig
from .patching import attention_layers
from .scorer import SCORER_ATTR
from .transformers_integration import ATTN_IMPLEMENTATION, configure


@dataclass
class EndToEndOptions:
    steps: int = 200  # Adam steps, one training window each (at most; early stopping may end sooner)
    lr: float = 0.05  # about how far one step moves a key's score, in gate units
    eval_every: int = 10
    patience: int = 4  # held-out evaluations without improvement before stopping
    seed: int = 0

    def __post_init__(self) -> None:
        check_options(self, ("steps", "eval_every", "patience"), ("lr",))


@dataclass
class EndToEndReport:
    heldout_kl_start: float  # mean KL per selective token on the held-out windows, before
    heldout_kl_after: float  # ... and with the kept (best) scorers
    steps: int


def _log_probs(model: nn.Module, ids: torch.Tensor, first: int, device: torch.device) -> torch.Tensor:
    """The model's next-token log-probabilities at the selective rows of one window ([N - first, vocab], float32)."""
    logits = model(input_ids=ids[None].to(device), use_cache=False).logits[0, first - 1 : -1]
    return torch.log_softmax(logits.float(), dim=-1)


def _dense_log_probs(model: nn.Module, windows: list[torch.Tensor], first: int) -> list[torch.Tensor]:
    """Dense log-probabilities of the selective rows of each window."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            return [_log_probs(model, ids, first, device) for ids in windows]
    finally:
        model.set_attn_implementation(previous)


def _kl(model: nn.Module, ids: torch.Tensor, teacher: torch.Tensor, first: int) -> torch.Tensor:
    """Mean KL(teacher || SparseK model) over the selective rows of one window."""
    student = _log_probs(model, ids, first, teacher.device)
    return (teacher.exp() * (teacher - student)).sum(-1).mean()


def distill_end_to_end(
    model: nn.Module,
    windows: list[torch.Tensor],
    config: SparseKConfig,
    *,
    heldout_windows: int = 1,
    options: EndToEndOptions | None = None,
    progress: bool = False,
) -> EndToEndReport:
    """Fine-tune the scorers of a model in sparsek mode (``config``) end to end; in place.

    ``windows``: 1-D token ids of one length, the last ``heldout_windows`` held out. Only the
    scorers' content weights and slopes change (their bias cannot move a gate); the model's own
    parameters are frozen for the run and their ``requires_grad`` restored afterwards. The scorers
    are left in float32 (they compute in float32 whatever the model's dtype).
    """
    from tqdm.auto import tqdm

    opts = options or EndToEndOptions()
    if not isinstance(opts, EndToEndOptions):
        raise TypeError(f"options must be a sparsek_hf.distillation.EndToEndOptions, got {type(opts).__name__}")
    layers = attention_layers(model)
    if model.config._attn_implementation != ATTN_IMPLEMENTATION or any(SCORER_ATTR not in m._modules for m in layers):
        raise ValueError("the model must be in sparsek mode with its scorers (sparsek_hf.patch or calibrate) first")
    if len({w.numel() for w in windows}) != 1:
        raise ValueError("all windows must have the same number of tokens")
    train, heldout = split_windows(len(windows), heldout_windows)
    ctx = windows[0].numel()
    first = max(1, _first_selective_row(config))
    if first >= ctx:
        raise ValueError(f"windows of {ctx} tokens never select with {config}: nothing to train")
    configure(model, config)

    scorers = [m._modules[SCORER_ATTR] for m in layers]
    for scorer in scorers:  # Adam needs float32 steps; scorers compute in float32 anyway, and stay so
        scorer.float()
    # The unit of a content step: the typical norm of a layer's value vectors (one dense capture).
    captures = capture_attention(model, {0: windows[train[0]]})
    value_norm = [float(c.v[0].float().norm(dim=-1).mean().clamp_min(1e-6)) for c in captures]
    del captures
    teacher = _dense_log_probs(model, windows, first)

    frozen = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    groups = []
    for scorer, norm in zip(scorers, value_norm):
        scorer.weight.requires_grad_(True)
        scorer.slope.requires_grad_(True)
        groups.append({"params": [scorer.weight], "lr": opts.lr / norm})
        groups.append({"params": [scorer.slope], "lr": opts.lr / ctx})
    optimizer = torch.optim.Adam(groups)
    was_training = model.training
    model.eval()

    def heldout_kl() -> float:
        with torch.no_grad():
            return sum(float(_kl(model, windows[i], teacher[i], first)) for i in heldout) / len(heldout)

    def state() -> list[dict]:
        return [copy.deepcopy(s.state_dict()) for s in scorers]

    try:
        start = best = heldout_kl()
        best_state, bad, steps = state(), 0, 0
        gen = torch.Generator().manual_seed(opts.seed)
        bar = tqdm(range(1, opts.steps + 1), desc=f"end-to-end K={config.budget}", disable=not progress, leave=False)
        for step in bar:
            i = train[int(torch.randint(len(train), (1,), generator=gen))]
            optimizer.zero_grad(set_to_none=True)
            loss = _kl(model, windows[i], teacher[i], first)
            if not math.isfinite(float(loss.detach())):
                raise RuntimeError(f"end-to-end distillation: the loss is not finite at step {step}")
            loss.backward()
            optimizer.step()
            steps = step
            if step % opts.eval_every == 0 or step == opts.steps:
                current = heldout_kl()
                bar.set_postfix(heldout_kl=f"{current:.4f}")
                if current < best:
                    best, best_state, bad = current, state(), 0
                else:
                    bad += 1
                    if bad >= opts.patience:
                        break
        for scorer, saved in zip(scorers, best_state):
            scorer.load_state_dict(saved)
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return EndToEndReport(start, best, steps)
