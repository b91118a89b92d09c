"""The search driver: what every strategy shares (candidates, target, recording, resume).

Strategies decide which block goes next; the driver owns the rules: protected blocks, the stopping
target, and a recorder that persists every score and step as soon as it exists (the catalog, in the
flow) and hands back what an interrupted run had already computed.

What a score row names: a candidate block at a step (iterative, one_shot); the first layer of a segment
of consecutive layers, all scored at step 0 (consecutive); or, for beam search, the whole removal set
reached at that depth, its block ids joined by '+' in model order (`set_key`), since the same block
scores differently under different partial sets.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

import torch
from torch import nn

from tasks.score import METRICS, CandidateScore, ScoringOptions, StepScorer
from tasks.surgery import block_param_counts, candidate_blocks, layer_ids, parse_block, total_params, units_of
from tasks.errors import UserError


class SearchError(UserError):
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


def set_key(blocks: list[str] | tuple[str, ...]) -> str:
    """One removal set as text: its block ids in model order, joined by '+'."""
    return "+".join(sorted(blocks, key=parse_block))


def edge_layers(ids: list[int], first: int, last: int) -> list[str]:
    """The first `first` and last `last` layers of a model with layers `ids` (Shortened LLaMA's "+")."""
    if first < 0 or last < 0:
        raise SearchError(f"protect_first and protect_last count layers, so they cannot be negative ({first}, {last})")
    kept = set(ids[:first]) | set(ids[max(0, len(ids) - last):] if last else [])
    return [f"layers.{lid}" for lid in ids if lid in kept]


@dataclass(frozen=True)
class SearchRules:
    """Which blocks may go: the candidates of a model at a granularity, less the protected units. Needs no
    weights, so the flow asks it for progress totals and preflight for reachability."""

    layer_ids: tuple[int, ...]
    granularity: str
    protected: frozenset[str]  # units (`layers.N.attn` / `layers.N.mlp`) never removed

    @classmethod
    def of(cls, layer_ids: list[int] | tuple[int, ...], granularity: str, protect: tuple[str, ...] = (),
           protect_first: int = 0, protect_last: int = 0) -> "SearchRules":
        ids = tuple(layer_ids)
        protected = units_of([*protect, *edge_layers(list(ids), protect_first, protect_last)])
        return cls(ids, granularity, frozenset(protected))

    def candidates(self, removed: list[str]) -> list[str]:
        """The blocks that may go next, once `removed` are gone, in model order."""
        gone = units_of(removed)
        return [c for c in candidate_blocks(list(self.layer_ids), self.granularity, gone)
                if not (units_of([c]) & self.protected)]


class SearchLog:
    """What a search has done: every score and step goes to the recorder as soon as it exists (the catalog,
    in the flow) and to the progress callbacks; an interrupted run's steps and scores come back from it."""

    def __init__(self, recorder: Recorder | None = None,
                 on_step: Callable[[int, dict[str, CandidateScore], StepRecord], None] | None = None,
                 on_score: Callable[[int, CandidateScore], None] | None = None):
        self.recorder = recorder or MemoryRecorder()
        self.on_step = on_step
        self.on_score = on_score
        self.evaluated = 0  # candidates scored by this invocation
        self.reused = 0  # candidates whose recorded score was reused (resume)

    def known_scores(self, step: int, wanted) -> dict[str, CandidateScore]:
        """The recorded scores at `step` of the names in `wanted` (counted as reused)."""
        known = {b: s for b, s in self.recorder.known_scores(step).items() if b in wanted}
        self.reused += len(known)
        return known

    def recording(self, step: int) -> Callable[[CandidateScore], None]:
        def record(score: CandidateScore) -> None:
            self.evaluated += 1
            self.recorder.record_score(step, score)
            if self.on_score:
                self.on_score(step, score)

        return record

    def record_step(self, record: StepRecord, scores: dict[str, CandidateScore]) -> StepRecord:
        self.recorder.record_step(record)
        if self.on_step:
            self.on_step(record.step, scores, record)
        return record

    def steps(self) -> list[StepRecord]:
        """Steps an earlier, interrupted run already committed, in order; they must run from 0 without gaps."""
        steps = sorted(self.recorder.known_steps(), key=lambda r: r.step)
        if [r.step for r in steps] != list(range(len(steps))):
            raise SearchError(f"catalog steps are not contiguous from 0: {[r.step for r in steps]}")
        for record in steps:
            parse_block(record.block)
        return steps


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
        protect_first: int = 0,
        protect_last: int = 0,
        memory_budget_gb: float | None = None,
        parallel_candidates: int = 1,
        metric_settings: Mapping[str, Any] | None = None,
        strategy_settings: Mapping[str, Any] | None = None,
        recorder: Recorder | None = None,
        on_step: Callable[[int, dict[str, CandidateScore], StepRecord], None] | None = None,
        on_score: Callable[[int, CandidateScore], None] | None = None,
        scorer: StepScorer | None = None,
    ):
        """`scorer` replaces the metric's own step scorer: distributed execution hands every step's
        scoring to one that computes the same numbers elsewhere (tasks.distributed)."""
        self.model = model
        registered = METRICS.lookup(metric)
        try:
            self.metric = registered.configure(**dict(metric_settings or {}))
        except (TypeError, ValueError) as exc:
            raise SearchError(f"bad settings for metric '{metric}': {exc}") from exc
        if granularity not in self.metric.granularities:
            raise SearchError(
                f"metric '{metric}' does not support granularity '{granularity}' "
                f"(it supports: {', '.join(sorted(self.metric.granularities))})"
            )
        self.metric_name = metric
        self.granularity = granularity
        self.target = target
        self.exact = exact
        self.strategy_settings = dict(strategy_settings or {})
        self.log = SearchLog(recorder, on_step, on_score)
        self.recorder = self.log.recorder
        self.layer_ids = layer_ids(model)
        self.rules = SearchRules.of(self.layer_ids, granularity, protect, protect_first, protect_last)
        self.unit_params = block_param_counts(model)
        self.dense_params = total_params(model)
        budget = math.inf if memory_budget_gb is None else memory_budget_gb * 2**30
        self.scorer: StepScorer = (
            scorer if scorer is not None
            else self.metric.scorer(model, windows, ScoringOptions(batch_windows, exact, budget))
        )
        # Scorers that evaluate candidates independently say so with a `parallel` attribute.
        if hasattr(self.scorer, "parallel"):
            self.scorer.parallel = max(1, parallel_candidates)
        self._check_reachable()

    # --- rules -------------------------------------------------------------------------------
    def candidates(self, removed: list[str]) -> list[str]:
        return self.rules.candidates(removed)

    def params_of(self, blocks: list[str]) -> int:
        return sum(self.unit_params[u] for u in units_of(blocks))

    def params_remaining(self, removed: list[str]) -> int:
        return self.dense_params - self.params_of(removed)

    def target_met(self, removed: list[str]) -> bool:
        if self.target.blocks is not None:
            return len(removed) >= self.target.blocks
        return self.params_of(removed) / self.dense_params >= float(self.target.params_ratio)

    def _check_reachable(self) -> None:
        check_reachable(self.model, self.granularity, self.target, tuple(sorted(self.rules.protected)))

    @property
    def sign(self) -> float:
        """+1 when the lowest score goes first, -1 when the highest does: sort keys are sign * value."""
        return 1.0 if self.metric.remove == "lowest" else -1.0

    # --- scoring and recording ---------------------------------------------------------------
    @property
    def evaluated(self) -> int:
        return self.log.evaluated

    @property
    def reused(self) -> int:
        return self.log.reused

    def score_step(self, step: int, removed: list[str], candidates: list[str]) -> dict[str, CandidateScore]:
        known = self.log.known_scores(step, candidates)
        return self.scorer.score(units_of(removed), candidates, known, self.log.recording(step))

    def score_sets(self, step: int, parent: list[str], candidates: list[str]) -> dict[str, CandidateScore]:
        """Scores of the removal sets parent + [c] (a "removal" metric), recorded under their `set_key`.

        Keyed by candidate; each score's `block` is the set key. A set reached earlier from another parent
        at the same step is reused, not evaluated again.
        """
        keys = {c: set_key([*parent, c]) for c in candidates}
        recorded = self.log.known_scores(step, set(keys.values()))
        known = {c: dataclasses.replace(recorded[k], block=c) for c, k in keys.items() if k in recorded}
        record = self.log.recording(step)
        scores = self.scorer.score(
            units_of(parent), candidates, known, lambda s: record(dataclasses.replace(s, block=keys[s.block]))
        )
        return {c: dataclasses.replace(scores[c], block=keys[c]) for c in candidates}

    def score_segments(self, step: int, removed: list[str],
                       segments: list[tuple[str, ...]]) -> dict[str, CandidateScore]:
        """Scores of segments (runs of consecutive layers), keyed and recorded by their first layer."""
        by_first = {s[0]: s for s in segments}
        known = self.log.known_scores(step, by_first)
        record = self.log.recording(step)
        if self.metric.measures == "segment":
            return self.scorer.score_segments(units_of(removed), by_first, known, record)  # type: ignore[attr-defined]
        # A "removal" metric scores the model without the segment: the rest of it joins `removed`.
        scores: dict[str, CandidateScore] = {}
        for first, segment in by_first.items():
            gone = units_of([*removed, *segment[1:]])
            scores.update(self.scorer.score(gone, [first], {first: known[first]} if first in known else {}, record))
        return scores

    def ranked(self, scores: dict[str, CandidateScore], candidates: list[str]) -> list[str]:
        """Candidates with exact scores, the first to remove first; ties broken by model order."""
        exact = [c for c in candidates if scores[c].exact]
        return sorted(exact, key=lambda c: (self.sign * scores[c].value, candidates.index(c)))

    def pick(self, scores: dict[str, CandidateScore], candidates: list[str]) -> CandidateScore:
        """The block to remove: best exact score, ties broken by model order."""
        return scores[self.ranked(scores, candidates)[0]]

    def commit(self, step: int, removed: list[str], chosen: CandidateScore, scores: dict[str, CandidateScore]) -> StepRecord:
        return self.record_step(step, removed, chosen.block, chosen.value, scores)

    def record_step(
        self, step: int, removed: list[str], block: str, value: float, scores: dict[str, CandidateScore]
    ) -> StepRecord:
        return self.log.record_step(StepRecord(step, block, value, self.params_remaining([*removed, block])), scores)

    def commit_plan(
        self, plan: list[tuple[str, float]], scores: list[dict[str, CandidateScore]]
    ) -> list[StepRecord]:
        """Record a removal order chosen all at once (one_shot, consecutive, beam), resuming after the
        steps an interrupted run already committed, which must agree with the plan. `plan` holds each
        step's block and value; `scores[i]` is what step i chose among (the last entry serves later steps)."""
        done = self.resumed()
        planned = [block for block, _ in plan]
        if done != planned[: len(done)]:
            raise SearchError(
                f"the catalog's committed steps {done} disagree with the removal order its recorded scores "
                f"give {planned}; run again with --fresh"
            )
        records = self.log.steps()
        for step in range(len(done), len(plan)):
            block, value = plan[step]
            records.append(self.record_step(step, planned[:step], block, value, scores[min(step, len(scores) - 1)]))
        return records

    def resumed(self) -> list[str]:
        """Blocks removed by steps an earlier, interrupted run already committed."""
        return [r.block for r in self.log.steps()]


def check_reachable(
    model: nn.Module,
    granularity: str,
    target: Target,
    protect: tuple[str, ...] = (),
    protect_first: int = 0,
    protect_last: int = 0,
) -> None:
    """Refuse a target this model cannot meet; works on a model on the meta device (no weights needed)."""
    every = SearchRules.of(layer_ids(model), granularity, protect, protect_first, protect_last).candidates([])
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
