"""Block-importance metrics: one module each, registered by name (`score.metric`)."""

from tasks.score import angular_distance  # noqa: F401  (registers)
from tasks.score import block_influence  # noqa: F401  (registers)
from tasks.score import perplexity  # noqa: F401  (registers)
from tasks.score import shapley  # noqa: F401  (registers)
from tasks.score import similarity  # noqa: F401  (registers)
from tasks.score import taylor  # noqa: F401  (registers)
from tasks.score import update_norms  # noqa: F401  (registers relative_l1, relative_l2, cosine)
from tasks.score.base import (
    METRICS,
    CandidateScore,
    Measure,
    Metric,
    OnScore,
    ScoringOptions,
    StepScorer,
    SegmentScorer,
    register_metric,
)

__all__ = [
    "METRICS",
    "CandidateScore",
    "Measure",
    "Metric",
    "OnScore",
    "ScoringOptions",
    "StepScorer",
    "SegmentScorer",
    "register_metric",
]
