"""``python -m eval.calibrate``: train SparseK scorers by distillation from dense attention (``--help``).

The logic lives in ``sparsek_hf.calibration`` (also ``sparsek_hf.calibrate`` and the ``sparsek-calibrate``
command).
"""

from sparsek_hf.calibration import main

if __name__ == "__main__":
    main()
