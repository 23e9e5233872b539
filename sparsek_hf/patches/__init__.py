"""Monkeypatches for model families whose attention does not route through Transformers'
``AttentionInterface`` (so ``attn_implementation="sparsek"`` cannot reach it).

Each module exposes ``apply(module)`` / ``revert(module)`` for one attention layer and
``kv_heads(module)``; ``sparsek_hf.patch`` calls them when the loaded model cannot switch its
attention through the interface. Families here: Falcon (rotary variants) and GPT-J, each in the Transformers
releases whose layer does not use the interface yet.
"""

from . import falcon, gptj

PATCHED_FAMILIES = {"falcon": falcon, "gptj": gptj}

__all__ = ["PATCHED_FAMILIES", "falcon", "gptj"]
