"""One-shot pruning (ShortGPT, LLM-Drop, Shortened LLaMA): score every candidate once on the model as
loaded, then remove blocks from the least important up until the target is met."""

from __future__ import annotations

from tasks.search.driver import SearchContext
from tasks.search.log import StepRecord
from tasks.search.registry import StrategyNeeds, register_strategy


@register_strategy("one_shot", StrategyNeeds(races=True), expected=lambda first, steps, settings: first)  # scores once
def one_shot(ctx: SearchContext) -> list[StepRecord]:
    candidates = ctx.candidates([])
    # A race keeps as many candidates as the plan may take: then the plan's blocks all have exact scores.
    scores = ctx.score_step(0, [], candidates, keep=ctx.goal.most_blocks(candidates))
    plan: list[tuple[str, float]] = []
    for block in ctx.ranked(scores, candidates):
        if ctx.target_met([b for b, _ in plan]):
            break
        plan.append((block, scores[block].value))
    return ctx.commit_plan(plan, [scores])
