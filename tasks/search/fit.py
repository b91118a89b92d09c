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


# Older specs say exact_scores, newer ones mode: the advice names both.
USE_EXACT = "use search.mode 'exact' (or set exact_scores: true)"

MODE_TEXT = {
    "bounded": "search.mode 'bounded' (search.exact_scores: false) stops hopeless candidates early",
    "racing": "search.mode 'racing' drops candidates once they are behind with confidence",
}


def combination_problems(metric: str, granularity: str, strategy: str, mode: str) -> list[str]:
    """search.strategy with score.metric, score.granularity and search.mode (all known names)."""
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
    if mode != "exact":
        fits = needs.lower_bounds if mode == "bounded" else needs.races
        if not fits:
            fitting = [s for s, n in NEEDS.items() if (n.lower_bounds if mode == "bounded" else n.races)]
            kind = "keeps only the best candidate of a step" if mode == "bounded" else "says how many candidates it keeps"
            problems.append(
                f"{MODE_TEXT[mode]}, so it needs a strategy that {kind} ({_names(fitting)}); "
                f"search.strategy '{strategy}' ranks candidates, so their scores must be exact: {USE_EXACT}"
            )
        elif measure != "removal" or (mode == "racing" and metric != "perplexity"):
            problems.append(
                f"{MODE_TEXT[mode]}, which needs score.metric 'perplexity', but score.metric '{metric}' "
                f"{MEASURE_TEXT[measure]}; {USE_EXACT}"
            )
    return problems
