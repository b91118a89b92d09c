"""The search driver: what every strategy shares (candidates, target, recording, resume).

Strategies decide which block goes next; the driver owns the rules: protected blocks, the stopping
target, and a recorder that persists every score and step as soon as it exists (the catalog, in the
flow) and hands back what an interrupted run had already computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from tasks.score import METRICS, CandidateScore, StepScorer
from tasks.surgery import block_param_counts, candidate_blocks, layer_ids, parse_block, total_params, units_of


class SearchError(ValueError):
    """A search that cannot run as specified (target out of reach, bad protected block...)."""


@dataclass(frozen=True)
class StepRecord:
    step: int
    block: str
    value: float
    params_remaining: int


class Recorder(Protocol):
    def known_steps(self) -> list[StepRecord]: ...
    def known_scores(self, step: int) -> dict[str, CandidateScore]: ...
    def record_score(self, step: int, score: CandidateScore) -> None: ...
    def record_step(self, record: StepRecord) -> None: ...


class MemoryRecorder:
    """Keeps everything in memory (tests, benchmarks, library use without a catalog)."""

    def __init__(self) -> None:
        self.steps: list[StepRecord] = []
        self.scores: dict[int, dict[str, CandidateScore]] = {}

    def known_steps(self) -> list[StepRecord]:
        return list(self.steps)

    def known_scores(self, step: int) -> dict[str, CandidateScore]:
        return dict(self.scores.get(step, {}))

    def record_score(self, step: int, score: CandidateScore) -> None:
        self.scores.setdefault(step, {})[score.block] = score

    def record_step(self, record: StepRecord) -> None:
        self.steps.append(record)


@dataclass(frozen=True)
class Target:
    blocks: int | None = None
    params_ratio: float | None = None


class SearchContext:
    def __init__(
        self,
        model: nn.Module,
        windows: torch.Tensor,
        *,
        metric: str,
        granularity: str,
        target: Target,
        batch_windows: int = 1,
        exact: bool = True,
        protect: tuple[str, ...] = (),
        recorder: Recorder | None = None,
        on_step: Callable[[int, dict[str, CandidateScore], StepRecord], None] | None = None,
        on_score: Callable[[int, CandidateScore], None] | None = None,
    ):
        self.model = model
        self.metric = METRICS[metric]
        if granularity not in self.metric.granularities:
            raise SearchError(f"metric '{metric}' does not support granularity '{granularity}'")
        self.granularity = granularity
        self.target = target
        self.recorder = recorder or MemoryRecorder()
        self.on_step = on_step
        self.on_score = on_score
        self.protected = units_of(protect)
        self.layer_ids = layer_ids(model)
        self.unit_params = block_param_counts(model)
        self.dense_params = total_params(model)
        self.scorer: StepScorer = self.metric.scorer(model, windows, batch_windows, exact)
        self.evaluated = 0  # candidates scored by this invocation
        self.reused = 0  # candidates whose recorded score was reused (resume)
        self._check_reachable()

    # --- rules -------------------------------------------------------------------------------
    def candidates(self, removed: list[str]) -> list[str]:
        gone = units_of(removed)
        return [
            c for c in candidate_blocks(self.layer_ids, self.granularity, gone)
            if not (units_of([c]) & self.protected)
        ]

    def params_of(self, blocks: list[str]) -> int:
        return sum(self.unit_params[u] for u in units_of(blocks))

    def params_remaining(self, removed: list[str]) -> int:
        return self.dense_params - self.params_of(removed)

    def target_met(self, removed: list[str]) -> bool:
        if self.target.blocks is not None:
            return len(removed) >= self.target.blocks
        return self.params_of(removed) / self.dense_params >= float(self.target.params_ratio)

    def _check_reachable(self) -> None:
        check_reachable(self.model, self.granularity, self.target, tuple(sorted(self.protected)))

    # --- scoring and recording ---------------------------------------------------------------
    def score_step(self, step: int, removed: list[str], candidates: list[str]) -> dict[str, CandidateScore]:
        known = {b: s for b, s in self.recorder.known_scores(step).items() if b in candidates}
        self.reused += len(known)

        def record(score: CandidateScore) -> None:
            self.evaluated += 1
            self.recorder.record_score(step, score)
            if self.on_score:
                self.on_score(step, score)

        return self.scorer.score(units_of(removed), candidates, known, record)

    def pick(self, scores: dict[str, CandidateScore], candidates: list[str]) -> CandidateScore:
        """The block to remove: best exact score, ties broken by model order."""
        sign = 1.0 if self.metric.remove == "lowest" else -1.0
        exact = [scores[c] for c in candidates if scores[c].exact]
        return min(exact, key=lambda s: (sign * s.value, candidates.index(s.block)))

    def commit(self, step: int, removed: list[str], chosen: CandidateScore, scores: dict[str, CandidateScore]) -> StepRecord:
        record = StepRecord(step, chosen.block, chosen.value, self.params_remaining([*removed, chosen.block]))
        self.recorder.record_step(record)
        if self.on_step:
            self.on_step(step, scores, record)
        return record

    def resumed(self) -> list[str]:
        """Blocks removed by steps an earlier, interrupted run already committed."""
        steps = sorted(self.recorder.known_steps(), key=lambda r: r.step)
        if [r.step for r in steps] != list(range(len(steps))):
            raise SearchError(f"catalog steps are not contiguous from 0: {[r.step for r in steps]}")
        for record in steps:
            parse_block(record.block)
        return [r.block for r in steps]


def check_reachable(model: nn.Module, granularity: str, target: Target, protect: tuple[str, ...] = ()) -> None:
    """Refuse a target this model cannot meet; works on a model on the meta device (no weights needed)."""
    protected = units_of(protect)
    every = [
        c for c in candidate_blocks(layer_ids(model), granularity, set()) if not (units_of([c]) & protected)
    ]
    if target.blocks is not None and target.blocks > len(every):
        raise SearchError(
            f"search.target.blocks={target.blocks} cannot be met: this model has {len(every)} "
            f"candidate blocks at granularity '{granularity}' (after protections); use at most {len(every)}"
        )
    if target.params_ratio is not None:
        counts = block_param_counts(model)
        most = sum(counts[u] for u in units_of(every)) / total_params(model)
        if target.params_ratio > most:
            raise SearchError(
                f"search.target.params_ratio={target.params_ratio} cannot be met: removing every "
                f"candidate at granularity '{granularity}' removes only {most:.3f} of the parameters"
            )
