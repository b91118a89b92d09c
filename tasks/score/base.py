"""The metric interface: a metric scores candidate blocks of the current model at one search step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Literal, Protocol

import torch
from torch import nn


@dataclass(frozen=True)
class CandidateScore:
    block: str
    value: float
    n_tokens: int
    seconds: float
    exact: bool = True  # False: evaluation stopped early, `value` is a lower bound


OnScore = Callable[[CandidateScore], None]


class StepScorer(Protocol):
    def score(
        self,
        removed: set[str],
        candidates: list[str],
        known: dict[str, CandidateScore],
        on_score: OnScore,
    ) -> dict[str, CandidateScore]:
        """Scores of every candidate (known ones reused, never recomputed), each reported to on_score."""


class Metric:
    name: ClassVar[str]
    # Which end of the scale marks the block to remove first.
    remove: ClassVar[Literal["lowest", "highest"]]
    granularities: ClassVar[frozenset[str]] = frozenset({"layer", "attn", "mlp", "sublayer"})
    needs_grad: ClassVar[bool] = False

    def scorer(self, model: nn.Module, windows: torch.Tensor, batch_windows: int, exact: bool) -> StepScorer:
        raise NotImplementedError


METRICS: dict[str, Metric] = {}


def register_metric(cls: type[Metric]) -> type[Metric]:
    METRICS[cls.name] = cls()
    return cls
