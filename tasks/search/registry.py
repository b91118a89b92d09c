"""Search strategies by name (`search.strategy`): one module each, one registration line.

A registration also says what the strategy needs from the metric, so a pipeline pairing a strategy
with a metric it cannot use is refused when it is validated, before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from tasks.registry import Registry
from tasks.settings import Settings

ALL_GRANULARITIES = frozenset({"layer", "attn", "mlp", "sublayer"})


@dataclass(frozen=True)
class StrategyNeeds:
    # Which metric measures it can rank (see tasks.score.base.Measure).
    measures: frozenset[str] = frozenset({"removal", "block"})
    granularities: frozenset[str] = field(default=ALL_GRANULARITIES)
    # True when only the best candidate of each scoring call matters, so candidates stopped early
    # (lower bounds, `search.exact_scores: false`) cannot change the result.
    lower_bounds: bool = False
    # True when the strategy tells the driver how many candidates of each scoring call it may keep
    # (`keep`: the best one, a beam's width, the most blocks a plan takes), so `search.mode: racing` may
    # drop the others once they are behind that many with confidence.
    races: bool = False


STRATEGIES: Registry[Callable] = Registry("strategy")
NEEDS: Registry[StrategyNeeds] = Registry("strategy")
# The strategies that take settings: their section of the spec (`search.<name>`).
STRATEGY_SETTINGS: Registry[type[Settings]] = Registry("strategy")
# (candidates at the first step, steps, settings or None) -> candidates the search scores in all.
Expected = Callable[[int, int, Any], int]
EXPECTED: Registry[Expected] = Registry("strategy")


def every_step(first: int, steps: int, settings: Any) -> int:
    """Every remaining candidate, every step (the iterative search's count, and the default)."""
    return first + sum(max(first - t, 0) for t in range(1, steps))


def register_strategy(name: str, needs: StrategyNeeds = StrategyNeeds(), settings: type[Settings] | None = None,
                      expected: Expected = every_step) -> Callable[[Callable], Callable]:
    """One registration: the search function, what it needs of the metric, its settings section and how
    many candidates it scores (for progress bars)."""

    def register(fn: Callable) -> Callable:
        STRATEGIES.add(name, fn)
        NEEDS.add(name, needs, origin=fn)
        EXPECTED.add(name, expected, origin=fn)
        if settings is not None:
            STRATEGY_SETTINGS.add(name, settings)
        return fn

    return register


def expected_candidates(strategy: str, first: int, steps: int | None, settings: Any = None) -> int | None:
    """Candidates the search will score, for the progress bar (None when the target is a parameter ratio)."""
    if steps is None:
        return None
    return EXPECTED[strategy](first, steps, settings)
