"""Remove the best segment of n consecutive layers at once (Gromov et al. by angular distance; AMD Quark's
depth-wise pruner by perplexity without the segment).

n comes from the target: `blocks: n`, or for `params_ratio` the fewest consecutive layers that remove
that share, and then only segments that reach it compete. Segments never cross a protected layer. Every
segment is scored at step 0 under its first layer's id; the chosen segment's layers are then committed
as one step each, in model order, all with the segment's score.
"""

from __future__ import annotations

from tasks.search.driver import SearchContext
from tasks.search.goal import SearchError
from tasks.search.log import StepRecord
from tasks.search.registry import StrategyNeeds, register_strategy


def segments_of(ctx: SearchContext) -> list[tuple[str, ...]]:
    """The segments of the target's size: runs of consecutive removable layers of the current model."""
    removable = set(ctx.candidates([]))
    layers = [f"layers.{lid}" for lid in ctx.layer_ids]
    for size in range(1, len(layers) + 1):
        runs = [tuple(layers[i: i + size]) for i in range(len(layers) - size + 1)]
        runs = [w for w in runs if removable.issuperset(w)]
        if ctx.target.blocks is not None:
            if size == ctx.target.blocks:
                return runs
            continue
        meeting = [w for w in runs if ctx.target_met(list(w))]
        if meeting:
            return meeting
    return []


@register_strategy("consecutive", StrategyNeeds(measures=frozenset({"removal", "segment"}),
                                                granularities=frozenset({"layer"}), races=True),
                   expected=lambda first, steps, settings: max(first - steps + 1, 0))  # every segment, once
def consecutive(ctx: SearchContext) -> list[StepRecord]:
    segments = segments_of(ctx)
    if not segments:
        raise SearchError(
            f"no segment of consecutive removable layers meets the target {ctx.target}: protected layers "
            f"split the model into runs that are too short"
        )
    scores = ctx.score_segments(0, [], segments)
    firsts = [w[0] for w in segments]
    best = next(w for w in segments if w[0] == ctx.ranked(scores, firsts)[0])
    value = scores[best[0]].value
    return ctx.commit_plan([(layer, value) for layer in best], [scores])
