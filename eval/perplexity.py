"""``python -m eval.perplexity``: perplexity parity of SparseK vs dense attention (``--help``).

The logic lives in ``sparsek_hf.evaluation`` (also installed as the ``sparsek-perplexity`` command).
"""

from sparsek_hf.evaluation import main

if __name__ == "__main__":
    main()
