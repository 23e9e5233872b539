"""SparseKConfig: the settings of SparseK attention for one model."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ._validation import check_selection


@dataclass
class SparseKConfig:
    """Settings of SparseK attention (SPEC.md).

    Each query block of ``block_q`` queries attends ``sinks`` first keys, a local ``window`` and the
    ``budget`` highest-scoring earlier keys. The defaults attend at most 4 + 512 + 256 + 64 keys per
    query, whatever the context length.
    """

    budget: int = 512
    window: int = 256
    sinks: int = 4
    block_q: int = 64
    soft: bool = True
    # Scorer initialisation (SPEC.md "The scorer"): u_j = v_j . w + b + slope * j, with w = 0, so
    # SparseK starts as a sliding window of window + budget plus sinks.
    init_slope: float = 1.0

    def __post_init__(self) -> None:
        check_selection(self.budget, self.window, self.sinks, self.block_q)
        if not isinstance(self.soft, bool):
            raise TypeError(f"soft must be a bool, got {type(self.soft).__name__}")
        if isinstance(self.init_slope, bool) or not isinstance(self.init_slope, (int, float)) or self.init_slope <= 0:
            raise ValueError(f"init_slope must be a positive float, got {self.init_slope!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SparseKConfig":
        return cls(**data)
