"""The scoring part of a search: the configured metric, its step scorer and the order it ranks in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from tasks.score import METRICS, CandidateScore, ScoringOptions, StepScorer
from tasks.search.goal import SearchError


@dataclass(frozen=True)
class MetricChoice:
    """Which metric scores, with its settings, and how its scorer may spend work and memory."""

    name: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    options: ScoringOptions = ScoringOptions()
    parallel: int = 1  # candidates scored side by side, for scorers that evaluate them independently
    mode_reason: str = ""  # why the scorer is exact, bounded or racing (the spec's word, or search.mode auto's)


class Scoring:
    def __init__(self, model: nn.Module, windows: torch.Tensor, choice: MetricChoice, granularity: str,
                 scorer: StepScorer | None = None):
        """`scorer` replaces the metric's own step scorer: distributed execution hands every step's
        scoring to one that computes the same numbers elsewhere (tasks.distributed)."""
        registered = METRICS.lookup(choice.name)
        try:
            self.metric = registered.configure(**dict(choice.settings))
        except (TypeError, ValueError) as exc:
            raise SearchError(f"bad settings for metric '{choice.name}': {exc}") from exc
        if granularity not in self.metric.granularities:
            raise SearchError(
                f"metric '{choice.name}' does not support granularity '{granularity}' "
                f"(it supports: {', '.join(sorted(self.metric.granularities))})"
            )
        self.metric_name = choice.name
        self.exact = choice.options.exact
        self.mode = "racing" if choice.options.racing is not None else ("exact" if self.exact else "bounded")
        self.mode_reason = choice.mode_reason
        self.scorer: StepScorer = scorer if scorer is not None else self.metric.scorer(model, windows, choice.options)
        # Scorers that evaluate candidates independently say so with a `parallel` attribute.
        if hasattr(self.scorer, "parallel"):
            self.scorer.parallel = max(1, choice.parallel)

    @property
    def measures(self) -> str:
        return self.metric.measures

    @property
    def sign(self) -> float:
        """+1 when the lowest score goes first, -1 when the highest does: sort keys are sign * value."""
        return 1.0 if self.metric.remove == "lowest" else -1.0

    def ranked(self, scores: dict[str, CandidateScore], candidates: list[str]) -> list[str]:
        """Candidates with exact scores, the first to remove first; ties broken by model order."""
        exact = [c for c in candidates if scores[c].exact]
        return sorted(exact, key=lambda c: (self.sign * scores[c].value, candidates.index(c)))
