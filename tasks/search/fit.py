"""Which metric, granularity and strategy go together: the one rule set that the spec validator and
`run_search` both apply, so a pipeline is refused before any model loads and a library call gets the
same message."""

from __future__ import annotations

from typing import Iterable

from tasks.score import METRICS
from tasks.search.registry import NEEDS

MEASURE_TEXT = {
    "removal": "scores the whole model without a set of blocks",
    "block": "scores each block inside one model",
    "segment": "scores segments of consecutive layers",
}


def _names(items: Iterable[str]) -> str:
    return ", ".join(sorted(items)) or "none"


def metric_problems(metric: str, granularity: str) -> list[str]:
    """score.metric with score.granularity (both already known names)."""
    supported = METRICS[metric].granularities
    if granularity in supported:
        return []
    return [
        f"score.metric '{metric}' does not support score.granularity '{granularity}' "
        f"(it supports: {_names(supported)})"
    ]


def combination_problems(metric: str, granularity: str, strategy: str, exact: bool) -> list[str]:
    """search.strategy with score.metric, score.granularity and search.exact_scores (all known names)."""
    needs = NEEDS[strategy]
    measure = METRICS[metric].measures
    problems = []
    if measure not in needs.measures:
        fitting_metrics = [m for m, impl in METRICS.items() if impl.measures in needs.measures]
        fitting_strategies = [s for s, n in NEEDS.items() if measure in n.measures]
        problems.append(
            f"search.strategy '{strategy}' cannot use score.metric '{metric}', which {MEASURE_TEXT[measure]}; "
            f"'{strategy}' works with metrics: {_names(fitting_metrics)}; "
            f"'{metric}' works with strategies: {_names(fitting_strategies)}"
        )
    if granularity not in needs.granularities:
        problems.append(
            f"search.strategy '{strategy}' needs score.granularity {_names(needs.granularities)}, not '{granularity}'"
        )
    if not exact:
        lower_bound_strategies = [s for s, n in NEEDS.items() if n.lower_bounds]
        if not needs.lower_bounds:
            problems.append(
                f"search.exact_scores: false needs a strategy that keeps only the best candidate of a step "
                f"({_names(lower_bound_strategies)}); search.strategy '{strategy}' ranks candidates, "
                "so their scores must be exact"
            )
        elif measure != "removal":
            problems.append(
                f"search.exact_scores: false stops evaluating a pruned model early, but score.metric '{metric}' "
                f"{MEASURE_TEXT[measure]}; set exact_scores: true"
            )
    return problems
