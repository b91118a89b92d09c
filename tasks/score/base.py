"""The metric interface: a metric scores candidate blocks of the current model at one search step."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Iterator, Literal, Protocol

import torch
from torch import nn

from tasks.registry import Plugin, Registry
from tasks.settings import Settings


@dataclass(frozen=True)
class CandidateScore:
    block: str
    value: float
    n_tokens: int
    seconds: float
    # False: stopped early: `value` is a lower bound (bounded mode) or, with gap_low, the perplexity of the
    # windows a candidate saw before it left a race.
    exact: bool = True
    std_error: float | None = None  # sampling estimates (Shapley): the standard error of `value`
    # Racing: the confidence interval of the gap to the leader (or, when a strategy keeps several, to the
    # reference it was least surely behind) in log-perplexity when the candidate left.
    gap_low: float | None = None
    gap_high: float | None = None


OnScore = Callable[[CandidateScore], None]


def split_known(candidates, known: dict[str, CandidateScore]) -> tuple[dict[str, CandidateScore], list[str]]:
    """The candidates' known scores (reused, never recomputed) and, in order, the candidates still to score."""
    results = {c: known[c] for c in candidates if c in known}
    return results, [c for c in candidates if c not in results]


def score_streamed(
    names: list[str], known: dict[str, CandidateScore], on_score: OnScore,
    produce: Callable[[list[str]], Iterable[CandidateScore]],
) -> dict[str, CandidateScore]:
    """The opening scorers share: known scores are reused, never recomputed; `produce(todo)` makes the
    others (nothing runs when there are none), and each is reported as soon as it is made."""
    results, todo = split_known(names, known)
    if not todo:
        return results
    for score in produce(todo):
        results[score.block] = score
        on_score(score)
    return results


def score_all_at_once(
    names: list[str], known: dict[str, CandidateScore], on_score: OnScore, n_tokens: int,
    values: Callable[[list[str]], dict[str, float]],
) -> dict[str, CandidateScore]:
    """Scorers that value every candidate in one pass: each new score gets an equal share of its time."""

    def produce(todo: list[str]) -> Iterator[CandidateScore]:
        start = time.perf_counter()
        computed = values(todo)
        seconds = (time.perf_counter() - start) / len(todo)
        for name in todo:
            yield CandidateScore(block=name, value=computed[name], n_tokens=n_tokens, seconds=seconds)

    return score_streamed(names, known, on_score, produce)


class StepScorer(Protocol):
    def score(
        self,
        removed: set[str],
        candidates: list[str],
        known: dict[str, CandidateScore],
        on_score: OnScore,
    ) -> dict[str, CandidateScore]:
        """Scores of every candidate (known ones reused, never recomputed), each reported to on_score."""


class SegmentScorer(Protocol):
    def score_segments(
        self,
        removed: set[str],
        segments: dict[str, tuple[str, ...]],
        known: dict[str, CandidateScore],
        on_score: OnScore,
    ) -> dict[str, CandidateScore]:
        """Scores of segments (runs of consecutive layers), keyed (and named in each score) by their first layer."""


# What one score describes, which decides the strategies that can use it:
# - "removal": the model without `removed` and the candidate (comparable across removal sets, so beam
#   search and segments of layers can use it; perplexity);
# - "block": the candidate's own importance inside the current model (comparable only within a step);
# - "segment": a run of consecutive layers, scored by `score_segments` (angular distance).
Measure = Literal["removal", "block", "segment"]


@dataclass(frozen=True)
class ScoringOptions:
    """How a scorer may spend work and memory. Every scorer gets all of them and uses those that concern it."""

    batch_windows: int = 1  # calibration windows per forward micro-batch
    exact: bool = True  # False: candidates that cannot win may stop early, scored by a lower bound
    memory_budget_bytes: float = math.inf  # the hidden states kept between candidates, at most
    racing: Any = None  # tasks.score.racing.RacingOptions: race candidates over the windows (perplexity)


class Metric(Plugin):
    name: ClassVar[str]
    # Which end of the scale marks the block to remove first.
    remove: ClassVar[Literal["lowest", "highest"]]
    granularities: ClassVar[frozenset[str]] = frozenset({"layer", "attn", "mlp", "sublayer"})
    needs_grad: ClassVar[bool] = False
    measures: ClassVar[Measure] = "removal"
    # The metric's own section of the spec (`score.<name>`), for metrics that take settings.
    settings: ClassVar[type[Settings] | None] = None

    def configure(self, **settings: Any) -> "Metric":
        """This metric with its `score.<name>` settings applied; metrics without settings take none."""
        if settings:
            raise ValueError(f"metric '{self.name}' takes no settings; got {', '.join(sorted(settings))}")
        return self

    def scorer(self, model: nn.Module, windows: torch.Tensor, options: ScoringOptions) -> StepScorer:
        """A scorer of `windows` (calibration token windows) on `model`, working as `options` allow."""
        raise NotImplementedError


METRICS: Registry[Metric] = Registry("metric")


def register_metric(cls: type[Metric]) -> type[Metric]:
    METRICS.add(cls.name, cls())
    return cls

