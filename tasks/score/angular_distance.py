"""Angular distance between the input of layer l and of layer l + n (Gromov et al., "The Unreasonable
Ineffectiveness of the Deeper Layers", 2024): arccos(cos(x_l, x_{l+n})) / pi, averaged over samples.

It scores segments of n consecutive layers, not single blocks, so only the `consecutive` strategy uses
it; the segment whose input and output are closest goes. The paper measures the last token of each
sequence (`tokens: last`); `tokens: all` averages over every token, steadier with few windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import Field
import torch
import torch.nn.functional as F
from torch import nn

from tasks.residual import ResidualRunner
from tasks.score.base import CandidateScore, Metric, OnScore, ScoringOptions, register_metric, score_all_at_once
from tasks.score.prefix_reuse import WorkCounter
from tasks.settings import Settings
from tasks.score.states import block_sums, segment_bounds

Tokens = Literal["last", "all"]


class AngularDistanceScorer:
    def __init__(self, model: nn.Module, windows: torch.Tensor, batch_windows: int, tokens: Tokens):
        self.runner = ResidualRunner(model)
        self.batches = [b.contiguous() for b in windows.split(batch_windows)]
        self.tokens = tokens
        self.work = WorkCounter()

    def score(
        self, removed: set[str], candidates: list[str], known: dict[str, CandidateScore], on_score: OnScore
    ) -> dict[str, CandidateScore]:
        raise TypeError(
            "metric 'angular_distance' scores segments of consecutive layers, not single blocks: "
            "use it with search.strategy 'consecutive'"
        )

    @torch.inference_mode()
    def score_segments(
        self,
        removed: set[str],
        segments: dict[str, tuple[str, ...]],
        known: dict[str, CandidateScore],
        on_score: OnScore,
    ) -> dict[str, CandidateScore]:
        n_tokens = sum(batch.numel() for batch in self.batches)
        return score_all_at_once(list(segments), known, on_score, n_tokens,
                                 lambda todo: self._distances(removed, {s: segments[s] for s in todo}))

    def _distances(self, removed: set[str], segments: dict[str, tuple[str, ...]]) -> dict[str, float]:
        active = self.runner.active(removed)
        where = {s: segment_bounds(active, blocks) for s, blocks in segments.items()}
        samples = sum(b.shape[0] if self.tokens == "last" else b.numel() for b in self.batches)
        sums = block_sums(self.runner, self.batches, active, where, self.work, self._distance_sum)
        return {segment: sums[segment] / samples for segment in segments}

    def _distance_sum(self, inputs: torch.Tensor, outputs: torch.Tensor) -> float:
        inputs, outputs = inputs.float(), outputs.float()
        if self.tokens == "last":
            inputs, outputs = inputs[:, -1], outputs[:, -1]
        cos = F.cosine_similarity(inputs, outputs, dim=-1).double().clamp(-1.0, 1.0)
        return float((torch.arccos(cos) / math.pi).sum())


class AngularDistanceSettings(Settings):
    tokens: Literal["last", "all"] = Field(
        "last", description="last: the last token of each window (Gromov et al.); all: every token."
    )


@register_metric
@dataclass(frozen=True)
class AngularDistance(Metric):
    name = "angular_distance"
    settings = AngularDistanceSettings
    remove = "lowest"
    granularities = frozenset({"layer"})
    measures = "segment"
    tokens: Tokens = "last"

    def configure(self, **settings: object) -> "AngularDistance":
        configured = AngularDistance(**settings)  # type: ignore[arg-type]
        if configured.tokens not in ("last", "all"):
            raise ValueError(f"angular_distance tokens must be last or all, got {configured.tokens!r}")
        return configured

    def scorer(self, model: nn.Module, windows: torch.Tensor, options: ScoringOptions) -> AngularDistanceScorer:
        return AngularDistanceScorer(model, windows, options.batch_windows, self.tokens)
