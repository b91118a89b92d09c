"""Searches built from their parts (goal, scoring, log) as a library user composes them, with the defaults
the tests share: no memory limit, exact scores, one candidate at a time."""

from __future__ import annotations

import math

from tasks.score import ScoringOptions
from tasks.search import MetricChoice, Scoring, SearchContext, SearchGoal, SearchLog, SearchRules, Target
from tasks.surgery import layer_ids


def search_context(model, windows, *, metric: str = "perplexity", granularity: str = "sublayer",
                   target: Target = Target(blocks=1), exact: bool = True, protect: tuple[str, ...] = (),
                   protect_first: int = 0, protect_last: int = 0, batch_windows: int = 1,
                   memory_budget_gb: float | None = None, parallel_candidates: int = 1, metric_settings=None,
                   strategy_settings=None, recorder=None, on_step=None, on_score=None, scorer=None,
                   objective: str = "ppl", racing=None) -> SearchContext:
    rules = SearchRules.of(layer_ids(model), granularity, protect, protect_first, protect_last)
    budget = math.inf if memory_budget_gb is None else memory_budget_gb * 2**30
    choice = MetricChoice(metric, metric_settings or {}, ScoringOptions(batch_windows, exact, budget, racing),
                          parallel_candidates)
    return SearchContext(model, SearchGoal.of(model, rules, target), Scoring(model, windows, choice, granularity, scorer),
                         SearchLog(recorder, on_step, on_score), strategy_settings, objective)
