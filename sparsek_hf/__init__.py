"""sparsek-hf: SparseK attention (learned top-k key selection, arXiv:2406.16747) as compiled kernels."""

from ._ops import compiled_backends
from .api import sparsek_attention
from .config import SparseKConfig
from .reference import sparsek_attention_reference

__all__ = ["SparseKConfig", "compiled_backends", "sparsek_attention", "sparsek_attention_reference"]
__version__ = "0.1.0"
