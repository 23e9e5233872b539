"""sparsek-hf: SparseK attention (learned top-k key selection, arXiv:2406.16747) as compiled kernels."""

from ._ops import compiled_backends
from .api import sparsek_attention
from .config import SparseKConfig
from .reference import sparsek_attention_reference
# Registers attn_implementation="sparsek" with Transformers' attention and mask interfaces.
from .transformers_integration import configure
from .cache import SparseKCache
from .patching import patch, supported_families, unpatch
from .scorer import SparseKScorer, load_scorers, save_scorers
# Scorer training by distillation from dense attention (also registers the "sparsek_capture" attention).
from .calibration import calibrate
from .distillation import distill_end_to_end

__all__ = ["SparseKBias", "SparseKCache", "SparseKConfig", "SparseKScorer", "calibrate", "configure", "distill_end_to_end", "load_scorers", "patch",
           "save_scorers", "supported_families", "unpatch", "compiled_backends", "sparsek_attention", "sparsek_attention_reference"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # SparseKBias lives in sparsek_hf.xformers, which imports xFormers (seconds, and a warning on
    # machines without its C++ build) and hooks its dispatch: done on first use, not at import.
    if name == "SparseKBias":
        from .xformers import SparseKBias

        return SparseKBias
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
