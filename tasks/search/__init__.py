"""Search: the driver shared by all strategies, and the strategy registry."""

from tasks.search import beam  # noqa: F401  (registers)
from tasks.search import consecutive  # noqa: F401  (registers)
from tasks.search import iterative  # noqa: F401  (registers)
from tasks.search import one_shot  # noqa: F401  (registers)
from tasks.search.driver import SearchContext, set_key
from tasks.search.goal import SearchError, SearchGoal, SearchRules, Target, edge_layers
from tasks.search.log import MemoryRecorder, Recorder, SearchLog, StepRecord
from tasks.search.scoring import MetricChoice, Scoring
from tasks.search.fit import combination_problems
from tasks.search.registry import NEEDS, STRATEGIES, StrategyNeeds, register_strategy


def run_search(ctx: SearchContext, strategy: str) -> list[StepRecord]:
    run = STRATEGIES.lookup(strategy)
    problems = combination_problems(ctx.scoring.metric_name, ctx.granularity, strategy, ctx.scoring.mode)
    if problems:
        raise SearchError("; ".join(problems))
    return run(ctx)


__all__ = [
    "NEEDS",
    "STRATEGIES",
    "MemoryRecorder",
    "MetricChoice",
    "Recorder",
    "Scoring",
    "SearchContext",
    "SearchError",
    "SearchGoal",
    "SearchLog",
    "SearchRules",
    "StepRecord",
    "StrategyNeeds",
    "Target",
    "edge_layers",
    "register_strategy",
    "run_search",
    "set_key",
]
