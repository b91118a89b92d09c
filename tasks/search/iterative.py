"""BlockPruner / SLEB iterative search: re-score every remaining candidate after each removal."""

from __future__ import annotations

from tasks.search.driver import SearchContext, StepRecord
from tasks.search.registry import StrategyNeeds, register_strategy


@register_strategy("iterative", StrategyNeeds(lower_bounds=True))
def iterative(ctx: SearchContext) -> list[StepRecord]:
    removed = ctx.resumed()
    records = list(sorted(ctx.recorder.known_steps(), key=lambda r: r.step))
    while not ctx.target_met(removed):
        step = len(removed)
        candidates = ctx.candidates(removed)
        scores = ctx.score_step(step, removed, candidates)
        chosen = ctx.pick(scores, candidates)
        records.append(ctx.commit(step, removed, chosen, scores))
        removed.append(chosen.block)
    return records
