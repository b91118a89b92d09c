"""Block-importance metrics: one module each, registered by name (`score.metric`)."""

from tasks.score import perplexity  # noqa: F401  (registers)
from tasks.score.base import METRICS, CandidateScore, Metric, OnScore, StepScorer, register_metric

__all__ = ["METRICS", "CandidateScore", "Metric", "OnScore", "StepScorer", "register_metric"]
