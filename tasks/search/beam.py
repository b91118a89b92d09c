"""Beam search over removal sets: like the iterative search, but every step keeps the `width` best
partial sets instead of one, so an early choice that looked best can still lose to a better pair.

Needs a metric whose score is the model without the whole set (perplexity). At each depth every kept
set is extended by each of its candidates; children reached from two parents are scored once. Sets
that meet the target stop growing; the best finished set wins, and its path (the order its blocks were
added in) is committed step by step once the search ends. Width 1 is the iterative search.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field

from tasks.score import CandidateScore
from tasks.search.driver import SearchContext, set_key
from tasks.search.goal import SearchError
from tasks.search.log import StepRecord
from tasks.search.registry import StrategyNeeds, register_strategy
from tasks.settings import Settings
from tasks.surgery import parse_block


class BeamSettings(Settings):
    width: int = Field(4, ge=1, le=1024, description="Partial removal sets kept at every depth (1 = iterative).")


@dataclass(frozen=True)
class Path:
    blocks: tuple[str, ...]  # in the order they were added
    values: tuple[float, ...]  # the score of each prefix

    @property
    def key(self) -> str:
        return set_key(self.blocks)


def expected_candidates(first: int, steps: int, settings: BeamSettings) -> int:
    # Each kept partial set's extensions; duplicates are scored once, so this is an upper bound.
    return first + sum(settings.width * max(first - t, 0) for t in range(1, steps))


@register_strategy("beam", StrategyNeeds(measures=frozenset({"removal"}), races=True), settings=BeamSettings,
                   expected=expected_candidates)
def beam(ctx: SearchContext) -> list[StepRecord]:
    width = BeamSettings(**ctx.strategy_settings).width
    frontier = [Path((), ())]
    finished: list[Path] = []
    by_depth: list[dict[str, CandidateScore]] = []
    depth = 0
    while frontier:
        children: dict[str, Path] = {}
        step_scores: dict[str, CandidateScore] = {}
        for parent in frontier:
            candidates = ctx.candidates(list(parent.blocks))
            # A child outside its parent's best `width` is outside the depth's best `width` too, so a
            # race per parent may drop it.
            scores = ctx.score_sets(depth, list(parent.blocks), candidates, keep=width)
            for block in ctx.ranked(scores, candidates):
                child = Path((*parent.blocks, block), (*parent.values, scores[block].value))
                children.setdefault(child.key, child)
                step_scores[child.key] = scores[block]
        kept = sorted(children.values(), key=lambda p: _order(ctx, p))[:width]
        finished += [p for p in kept if ctx.target_met(list(p.blocks))]
        frontier = [p for p in kept if not ctx.target_met(list(p.blocks))]
        by_depth.append(step_scores)
        depth += 1
    if not finished:
        raise SearchError(f"beam search ended without a removal set that meets the target {ctx.target}")
    best = min(finished, key=lambda p: _order(ctx, p))
    return ctx.commit_plan(list(zip(best.blocks, best.values)), by_depth)


def _order(ctx: SearchContext, path: Path) -> tuple:
    """Best score first; ties go to the set whose blocks come first in the model."""
    return ctx.sign * path.values[-1], [parse_block(b) for b in sorted(path.blocks, key=parse_block)]
