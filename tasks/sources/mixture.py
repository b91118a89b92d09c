"""Several text sources mixed by weight (calibration sets, continued-pretraining data)."""

from __future__ import annotations

import math

from pydantic import Field

from tasks.settings import Settings
from tasks.sources.errors import SourceError


class WeightedSource(Settings):
    source: str = Field(min_length=1, description="Text: builtin corpus, local file or hub dataset.")
    weight: float = Field(1.0, gt=0.0, description="Mixing weight (relative to the other sources').")


def apportion(total: int, weights: list[float]) -> list[int]:
    """`total` items shared in proportion to `weights` by largest remainders (ties to the earlier source):
    deterministic, summing to `total`, each share within one of its exact proportion."""
    if total < 0 or not weights or any(w <= 0 for w in weights):
        raise SourceError(f"cannot share {total} windows by weights {weights}: weights must be positive")
    exact = [total * w / sum(weights) for w in weights]
    shares = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    return shares
