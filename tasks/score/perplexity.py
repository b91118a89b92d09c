"""Metric `perplexity`: calibration perplexity of the model without each candidate (BlockPruner, SLEB,
Shortened LLaMA's PPL criterion). Exact and bounded modes score with the prefix-reuse scorer
(tasks/score/prefix_reuse.py), racing with the racing scorer built on it (tasks/score/racing.py)."""

from __future__ import annotations

import torch
from torch import nn

from tasks.score.base import Metric, ScoringOptions, register_metric
from tasks.score.prefix_reuse import Outcome, PrefixReuseScorer, WorkCounter
from tasks.score.racing import RacingScorer

__all__ = ["Outcome", "PerplexityMetric", "PrefixReuseScorer", "RacingScorer", "WorkCounter"]


@register_metric
class PerplexityMetric(Metric):
    name = "perplexity"
    remove = "lowest"

    def scorer(self, model: nn.Module, windows: torch.Tensor, options: ScoringOptions) -> PrefixReuseScorer:
        if options.racing is not None:
            return RacingScorer(model, windows, options.batch_windows, options.racing, options.memory_budget_bytes)
        return PrefixReuseScorer(model, windows, options.batch_windows, options.exact, options.memory_budget_bytes)
