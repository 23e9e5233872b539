"""sparsek-hf: SparseK attention (learned top-k key selection, arXiv:2406.16747) as compiled kernels."""

from ._ops import compiled_backends
from .api import sparsek_attention
from .config import SparseKConfig
from .reference import sparsek_attention_reference

__all__ = ["SparseKBias", "SparseKConfig", "compiled_backends", "sparsek_attention", "sparsek_attention_reference"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # SparseKBias lives in sparsek_hf.xformers, which imports xFormers (seconds, and a warning on
    # machines without its C++ build) and hooks its dispatch: done on first use, not at import.
    if name == "SparseKBias":
        from .xformers import SparseKBias

        return SparseKBias
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
