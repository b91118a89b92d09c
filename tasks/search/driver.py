"""The search driver: what every strategy calls. It is made of small parts, each its own module:

- the goal (`tasks.search.goal`): candidates less protections, the target, parameter counts;
- the scoring (`tasks.search.scoring`): the configured metric, its step scorer, its ranking order;
- the log (`tasks.search.log`): the recorder that persists every score and step as soon as it exists
  (the catalog, in the flow), hands back what an interrupted run had computed, and the progress callbacks.

Strategies decide which block goes next; the driver joins the parts. What a score row names: a candidate
block at a step (iterative, one_shot); the first layer of a segment of consecutive layers, all scored at
step 0 (consecutive); or, for beam search, the whole removal set reached at that depth, its block ids
joined by '+' in model order (`set_key`), since the same block scores differently under different sets.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import torch
from torch import nn

from tasks.score import CandidateScore, ScoringOptions, StepScorer
from tasks.score.racing import Race
from tasks.search.auto_mode import choose_mode
from tasks.search.goal import SearchError, SearchGoal, SearchRules, Target, check_reachable, edge_layers, rules_for
from tasks.search.log import MemoryRecorder, OnScore, OnStep, Recorder, SearchLog, StepRecord
from tasks.search.scoring import MetricChoice, Scoring
from tasks.search.settings import ScoreSection, SearchSection
from tasks.surgery import layer_ids, parse_block, units_of

__all__ = [
    "MemoryRecorder", "MetricChoice", "Recorder", "ScoringOptions", "SearchContext", "SearchError", "SearchGoal",
    "SearchLog", "SearchRules", "Scoring", "StepRecord", "Target", "check_reachable", "edge_layers", "rules_for",
    "set_key",
]


def set_key(blocks: list[str] | tuple[str, ...]) -> str:
    """One removal set as text: its block ids in model order, joined by '+'."""
    return "+".join(sorted(blocks, key=parse_block))


class SearchContext:
    """One search on one model: its goal, its scoring, its log, and the chosen strategy's settings."""

    def __init__(self, model: nn.Module, goal: SearchGoal, scoring: Scoring, log: SearchLog | None = None,
                 strategy_settings: Mapping[str, Any] | None = None, objective: str = "ppl"):
        """`objective` ppl_per_param makes `pick` choose the least rise in log-perplexity per parameter
        removed (a perplexity metric in exact mode: the scores are then true perplexities)."""
        self.model = model
        self.goal = goal
        self.scoring = scoring
        self.log = log or SearchLog()
        self.strategy_settings = dict(strategy_settings or {})
        self.objective = objective

    @classmethod
    def of(cls, model: nn.Module, windows: torch.Tensor, score: ScoreSection, search: SearchSection, *,
           log: SearchLog | None = None, parallel: int = 1, scorer: StepScorer | None = None) -> "SearchContext":
        """The search that the `score` and `search` sections of a pipeline describe, on `model`."""
        goal = SearchGoal.of(model, search.rules(layer_ids(model), score.granularity), search.goal_target())
        mode = choose_mode(score, search, windows.shape[0])
        choice = dataclasses.replace(score.metric_choice(mode.exact, parallel, mode.racing), mode_reason=mode.reason)
        scoring = Scoring(model, windows, choice, score.granularity, scorer)
        return cls(model, goal, scoring, log, search.strategy_settings(), search.objective or "ppl")

    # --- what strategies ask of the parts ------------------------------------------------------
    @property
    def target(self) -> Target:
        return self.goal.target

    @property
    def granularity(self) -> str:
        return self.goal.granularity

    @property
    def layer_ids(self) -> tuple[int, ...]:
        return self.goal.rules.layer_ids

    @property
    def dense_params(self) -> int:
        return self.goal.dense_params

    @property
    def sign(self) -> float:
        return self.scoring.sign

    @property
    def scorer(self) -> StepScorer:
        return self.scoring.scorer

    @property
    def recorder(self) -> Recorder:
        return self.log.recorder

    @property
    def evaluated(self) -> int:
        return self.log.evaluated

    @property
    def reused(self) -> int:
        return self.log.reused

    def candidates(self, removed: list[str]) -> list[str]:
        return self.goal.candidates(removed)

    def target_met(self, removed: list[str]) -> bool:
        return self.goal.target_met(removed)

    def ranked(self, scores: dict[str, CandidateScore], candidates: list[str]) -> list[str]:
        return self.scoring.ranked(scores, candidates)

    def pick(self, scores: dict[str, CandidateScore], candidates: list[str],
             removed: list[str] | None = None) -> CandidateScore:
        """The block to remove once `removed` are gone: best exact score (or, with the ppl_per_param
        objective, least log-perplexity rise per parameter removed), ties broken by model order."""
        if self.objective_for(removed or [], candidates) == "ppl":
            return scores[self.ranked(scores, candidates)[0]]
        base = math.log(self._current_perplexity(removed or []))

        def cost(c: str) -> tuple[float, int]:
            return (math.log(scores[c].value) - base) / self.goal.params_of([c]), candidates.index(c)

        return scores[min((c for c in candidates if scores[c].exact), key=cost)]

    def objective_for(self, removed: list[str], candidates: list[str]) -> str:
        """The objective the step after `removed` chooses by. With ppl_per_param, a step where every candidate
        meets the target is the search's last whichever it removes: no later step trades against it, so it
        takes the lowest perplexity (ppl), landing on the target instead of overshooting it for the best
        rate (measured: an MLP half past a 10% budget, 11.8% removed, where an attention half gave 10.5%)."""
        if self.objective == "ppl" or not all(self.target_met([*removed, c]) for c in candidates):
            return self.objective
        return "ppl"

    def _current_perplexity(self, removed: list[str]) -> float:
        """The calibration perplexity of the model without `removed`: the last committed step's score, or
        for the model as loaded, one pass of the scorer."""
        steps = self.log.steps()
        if removed:
            if [r.block for r in steps[: len(removed)]] != list(removed):
                raise SearchError("the ppl_per_param objective needs the steps that removed the current blocks")
            return steps[len(removed) - 1].value
        current = getattr(self.scorer, "current_perplexity", None)
        if current is None:
            raise SearchError(f"search.objective ppl_per_param needs score.metric 'perplexity', "
                              f"not '{self.scoring.metric_name}'")
        return current(set())

    # --- scoring, with what the log already holds ----------------------------------------------
    def _race(self, step: int, candidates: list[str], keep: int, reference: str | None = None,
              objective: str | None = None) -> dict[str, Race]:
        """The race a racing scorer runs for a call that keeps `keep` candidates (nothing otherwise), in the
        terms of `objective` (default: the search's)."""
        if self.scoring.mode != "racing":
            return {}
        per_param = ({c: self.goal.params_of([c]) for c in candidates}
                     if (objective or self.objective) == "ppl_per_param" else None)
        return {"race": Race(keep, per_param, step, reference)}

    def _reusable(self, known: dict[str, CandidateScore], keep: int) -> dict[str, CandidateScore]:
        """Recorded scores a call may reuse. A race for the best `keep` > 1 re-races candidates that left an
        earlier race: they left a race that may have kept fewer (one_shot at a smaller budget, sharing a
        recorder), so they may belong to this one's best `keep`."""
        if keep == 1 or self.scoring.mode != "racing":
            return known
        return {c: s for c, s in known.items() if s.exact}

    def _previous_best(self, step: int, candidates: list[str], objective: str) -> str | None:
        """The candidate with the best exact score at the step before (a race's fixed reference): chosen
        from what earlier steps computed, so independent of this step's window order. Any such candidate
        is sound as a reference (one behind it is not the best); the previous step's best is a close one."""
        if step == 0 or objective != "ppl":
            return None
        earlier = self.recorder.known_scores(step - 1)
        exact = [c for c in candidates if c in earlier and earlier[c].exact]
        return min(exact, key=lambda c: (self.sign * earlier[c].value, candidates.index(c)), default=None)

    def score_step(self, step: int, removed: list[str], candidates: list[str], keep: int = 1
                   ) -> dict[str, CandidateScore]:
        """Scores of the candidates once `removed` are gone. `keep`: how many of the best the strategy may
        use (a race may drop the others; every other mode scores all alike)."""
        known = self._reusable(self.log.known_scores(step, candidates), keep)
        objective = self.objective_for(removed, candidates)
        reference = self._previous_best(step, candidates, objective) if keep == 1 else None
        race = self._race(step, candidates, keep, reference, objective)
        return self.scorer.score(units_of(removed), candidates, known, self.log.recording(step), **race)

    def score_sets(self, step: int, parent: list[str], candidates: list[str], keep: int = 1
                   ) -> dict[str, CandidateScore]:
        """Scores of the removal sets parent + [c] (a "removal" metric), recorded under their `set_key`.

        Keyed by candidate; each score's `block` is the set key. A set reached earlier from another parent
        at the same step is reused, not evaluated again.
        """
        keys = {c: set_key([*parent, c]) for c in candidates}
        recorded = self.log.known_scores(step, set(keys.values()))
        known = self._reusable({c: dataclasses.replace(recorded[k], block=c) for c, k in keys.items() if k in recorded},
                               keep)
        record: OnScore = self.log.recording(step)  # type: ignore[assignment]
        scores = self.scorer.score(
            units_of(parent), candidates, known, lambda s: record(dataclasses.replace(s, block=keys[s.block])),
            **self._race(step, candidates, keep),
        )
        return {c: dataclasses.replace(scores[c], block=keys[c]) for c in candidates}

    def score_segments(self, step: int, removed: list[str],
                       segments: list[tuple[str, ...]]) -> dict[str, CandidateScore]:
        """Scores of segments (runs of consecutive layers), keyed and recorded by their first layer."""
        by_first = {s[0]: s for s in segments}
        known = self.log.known_scores(step, by_first)
        record = self.log.recording(step)
        if self.scoring.measures == "segment":
            return self.scorer.score_segments(units_of(removed), by_first, known, record)  # type: ignore[attr-defined]
        if self.scoring.mode == "racing":  # the segments race as groups of blocks, for the best one
            return self.scorer.score_groups(units_of(removed), by_first, known, record,  # type: ignore[attr-defined]
                                            **self._race(step, list(by_first), 1))
        # A "removal" metric scores the model without the segment: the rest of it joins `removed`.
        scores: dict[str, CandidateScore] = {}
        for first, segment in by_first.items():
            gone = units_of([*removed, *segment[1:]])
            scores.update(self.scorer.score(gone, [first], {first: known[first]} if first in known else {}, record))
        return scores

    # --- committing steps ----------------------------------------------------------------------
    def commit(self, step: int, removed: list[str], chosen: CandidateScore,
               scores: dict[str, CandidateScore]) -> StepRecord:
        return self.record_step(step, removed, chosen.block, chosen.value, scores)

    def record_step(self, step: int, removed: list[str], block: str, value: float,
                    scores: dict[str, CandidateScore]) -> StepRecord:
        remaining = self.goal.params_remaining([*removed, block])
        return self.log.record_step(StepRecord(step, block, value, remaining), scores)

    def commit_plan(self, plan: list[tuple[str, float]], scores: list[dict[str, CandidateScore]]) -> list[StepRecord]:
        """Record a removal order chosen all at once (one_shot, consecutive, beam), resuming after the
        steps an interrupted run already committed, which must agree with the plan. `plan` holds each
        step's block and value; `scores[i]` is what step i chose among (the last entry serves later steps)."""
        records = self.log.steps()
        done = [r.block for r in records]
        planned = [block for block, _ in plan]
        if done != planned[: len(done)]:
            raise SearchError(
                f"the catalog's committed steps {done} disagree with the removal order its recorded scores "
                f"give {planned}; run again with --fresh"
            )
        for step in range(len(done), len(plan)):
            block, value = plan[step]
            records.append(self.record_step(step, planned[:step], block, value, scores[min(step, len(scores) - 1)]))
        return records

    def resumed(self) -> list[StepRecord]:
        """Steps an earlier, interrupted run already committed, in order."""
        return self.log.steps()
