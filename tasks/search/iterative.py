"""BlockPruner / SLEB iterative search: re-score every remaining candidate after each removal."""

from __future__ import annotations

from tasks.search.driver import SearchContext
from tasks.search.log import StepRecord
from tasks.search.registry import StrategyNeeds, register_strategy


@register_strategy("iterative", StrategyNeeds(lower_bounds=True, races=True))
def iterative(ctx: SearchContext) -> list[StepRecord]:
    records = ctx.resumed()
    removed = [r.block for r in records]
    while not ctx.target_met(removed):
        step = len(removed)
        candidates = ctx.candidates(removed)
        scores = ctx.score_step(step, removed, candidates)
        chosen = ctx.pick(scores, candidates, removed)
        records.append(ctx.commit(step, removed, chosen, scores))
        removed.append(chosen.block)
    return records
