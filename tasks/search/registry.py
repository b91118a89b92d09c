"""Search strategies by name (`search.strategy`): one module each, one registration line.

A registration also says what the strategy needs from the metric, so a pipeline pairing a strategy
with a metric it cannot use is refused when it is validated, before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from tasks.registry import Registry

ALL_GRANULARITIES = frozenset({"layer", "attn", "mlp", "sublayer"})


@dataclass(frozen=True)
class StrategyNeeds:
    # Which metric measures it can rank (see tasks.score.base.Measure).
    measures: frozenset[str] = frozenset({"removal", "block"})
    granularities: frozenset[str] = field(default=ALL_GRANULARITIES)
    # True when only the best candidate of each scoring call matters, so candidates stopped early
    # (lower bounds, `search.exact_scores: false`) cannot change the result.
    lower_bounds: bool = False


STRATEGIES: Registry[Callable] = Registry("strategy")
NEEDS: Registry[StrategyNeeds] = Registry("strategy")


def register_strategy(name: str, needs: StrategyNeeds = StrategyNeeds()) -> Callable[[Callable], Callable]:
    def register(fn: Callable) -> Callable:
        STRATEGIES.add(name, fn)
        NEEDS.add(name, needs)
        return fn

    return register
