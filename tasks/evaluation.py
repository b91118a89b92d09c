"""One measured value of a model at a stage: the row every evaluator returns and the catalog stores."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Evaluation:
    stage: str
    kind: str
    dataset: str
    metric: str
    value: float
    n_tokens: int | None = None
    seq_len: int | None = None
    stride: int | None = None
    n_samples: int | None = None  # downstream tasks: examples evaluated
