"""Search: the driver shared by all strategies, and the strategy registry."""

from tasks.search import iterative  # noqa: F401  (registers)
from tasks.search.driver import MemoryRecorder, Recorder, SearchContext, SearchError, StepRecord, Target
from tasks.search.registry import STRATEGIES, register_strategy


def run_search(ctx: SearchContext, strategy: str) -> list[StepRecord]:
    return STRATEGIES[strategy](ctx)


__all__ = [
    "STRATEGIES",
    "MemoryRecorder",
    "Recorder",
    "SearchContext",
    "SearchError",
    "StepRecord",
    "Target",
    "register_strategy",
    "run_search",
]
