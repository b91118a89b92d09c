"""Shapley-style contribution of each block to the calibration loss (Siddiqui et al., "A deeper look at
depth pruning of LLMs", 2024). The value is how much the mean NLL (nats per token) rises without the
block, so the smallest contribution goes first; its standard error is stored with it.

- `leave_one_out`: L(model without the block) - L(model), one forward per candidate; the standard
  error is over calibration windows.
- `sampled`: the paper's sampled-subnetwork estimate, E[L | block absent] - E[L | block present], over
  random subnetworks that keep half of the candidate blocks. Each drawn subnetwork is evaluated with
  its complement, so every block is absent in exactly one of each pair: the estimate is the mean of
  `samples` paired differences and its standard error their spread. Blocks that are not candidates
  (protected ones, or MLPs when only attention is searched) are always kept.

A sampled estimate needs every subnetwork, so all candidates of a step are recorded together once
the subnetworks are evaluated (seeded: an interrupted step draws the same ones again).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterator, Literal

from pydantic import Field, model_validator
import torch
from torch import nn

from tasks.residual import ResidualRunner, Unit
from tasks.score.base import CandidateScore, Metric, OnScore, ScoringOptions, register_metric, score_streamed
from tasks.score.prefix_reuse import WorkCounter
from tasks.settings import Settings
from tasks.surgery import units_of

Estimator = Literal["leave_one_out", "sampled"]


def draw_halves(players: int, samples: int, seed: int) -> list[list[int]]:
    """`samples` random subsets of half the players (sorted indices), reproducible from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return [sorted(torch.randperm(players, generator=generator)[: players // 2].tolist()) for _ in range(samples)]


def _std_error(differences: torch.Tensor) -> float | None:
    if differences.numel() < 2:
        return None
    return float(differences.std(unbiased=True) / math.sqrt(differences.numel()))


class ShapleyScorer:
    def __init__(self, model: nn.Module, windows: torch.Tensor, batch_windows: int, metric: "Shapley"):
        self.runner = ResidualRunner(model)
        self.batches = [b.contiguous() for b in windows.split(batch_windows)]
        self.n_predictions = windows.shape[0] * (windows.shape[1] - 1)
        self.metric = metric
        self.work = WorkCounter()

    def window_losses(self, active: list[Unit], drop: set[str]) -> torch.Tensor:
        """Mean NLL of every window (float64) for the model without the units in `drop`."""
        kept = [u for u in active if u.id not in drop]
        losses = []
        for batch in self.batches:
            hidden = self.runner.embed(batch)
            ctx = self.runner.context(hidden)
            hidden = self.runner.run(hidden, ctx, kept)
            losses.append(self.runner.window_nll(hidden, batch) / (batch.shape[1] - 1))
            self.work.unit_windows += len(kept) * batch.shape[0]
            self.work.head_windows += batch.shape[0]
        return torch.cat(losses)

    @torch.inference_mode()
    def score(
        self, removed: set[str], candidates: list[str], known: dict[str, CandidateScore], on_score: OnScore
    ) -> dict[str, CandidateScore]:
        estimate = self._leave_one_out if self.metric.estimator == "leave_one_out" else self._sampled
        return score_streamed(candidates, known, on_score,
                              lambda todo: estimate(self.runner.active(removed), candidates, todo))

    def _leave_one_out(self, active: list[Unit], candidates: list[str], todo: list[str]) -> Iterator[CandidateScore]:
        dense = self.window_losses(active, set())
        for block in todo:
            start = time.perf_counter()
            differences = self.window_losses(active, units_of([block])) - dense
            yield CandidateScore(
                block=block, value=float(differences.mean()), n_tokens=self.n_predictions,
                seconds=time.perf_counter() - start, std_error=_std_error(differences),
            )

    def _sampled(self, active: list[Unit], candidates: list[str], todo: list[str]) -> Iterator[CandidateScore]:
        # Every candidate is a player, known or not, so an estimate never depends on what was resumed.
        start = time.perf_counter()
        halves = draw_halves(len(candidates), self.metric.samples, self.metric.seed)
        differences = torch.zeros(len(halves), len(candidates), dtype=torch.float64)
        for s, half in enumerate(halves):
            first = set(half)
            # Mean loss over windows: one number per subnetwork, as the paper's estimator uses.
            loss_without_first = float(self.window_losses(active, units_of([candidates[i] for i in half])).mean())
            loss_without_rest = float(self.window_losses(
                active, units_of([c for i, c in enumerate(candidates) if i not in first])).mean())
            for i in range(len(candidates)):
                absent, present = (loss_without_first, loss_without_rest) if i in first else (
                    loss_without_rest, loss_without_first)
                differences[s, i] = absent - present
        seconds = (time.perf_counter() - start) / len(todo)
        for block in todo:
            column = differences[:, candidates.index(block)]
            yield CandidateScore(
                block=block, value=float(column.mean()), n_tokens=self.n_predictions * 2 * len(halves),
                seconds=seconds, std_error=_std_error(column),
            )


class ShapleySettings(Settings):
    estimator: Literal["leave_one_out", "sampled"] = Field(
        "sampled",
        description=(
            "leave_one_out: loss rise without each block; sampled: random half-subnetworks and their complements."
        ),
    )
    samples: int = Field(
        16, ge=1, le=100_000, description="sampled: subnetworks drawn (each also evaluated with its complement)."
    )
    seed: int = Field(0, ge=0, description="sampled: seed that draws the subnetworks.")

    @model_validator(mode="after")
    def _sampling_keys_need_sampling(self) -> "ShapleySettings":
        given = sorted(self.model_fields_set & {"samples", "seed"})
        if self.estimator == "leave_one_out" and given:
            raise ValueError(f"{', '.join(given)} apply only to estimator 'sampled', not 'leave_one_out'")
        return self


@register_metric
@dataclass(frozen=True)
class Shapley(Metric):
    name = "shapley"
    settings = ShapleySettings
    remove = "lowest"
    measures = "block"
    estimator: Estimator = "sampled"
    samples: int = 16
    seed: int = 0

    def configure(self, **settings: object) -> "Shapley":
        configured = Shapley(**settings)  # type: ignore[arg-type]
        if configured.estimator not in ("leave_one_out", "sampled"):
            raise ValueError(f"shapley estimator must be leave_one_out or sampled, got {configured.estimator!r}")
        if configured.samples < 1:
            raise ValueError(f"shapley samples must be at least 1, got {configured.samples}")
        return configured

    def scorer(self, model: nn.Module, windows: torch.Tensor, options: ScoringOptions) -> ShapleyScorer:
        return ShapleyScorer(model, windows, options.batch_windows, self)
