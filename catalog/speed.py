"""A model's speed against the dense model's as the catalog keeps it: per workload, the median of the
per-round ratios and the lowest and highest round (in each round every model ran once, in turn), so a
report can tell a real difference from a change of the machine's load.

Rows of kind `speed` for a compared stage (pruned, recovered): `<metric>_ratio_median`, `<metric>_ratio_low`
and `<metric>_ratio_high` beside the absolute `<metric>` (tokens/s), and `side_by_side` (1: timed alternately
with the dense model in one process; 0: one after the other, when the models did not fit in memory together).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence

RATIO_PARTS = ("median", "low", "high")
SIDE_BY_SIDE = "side_by_side"


class SpeedRow(Protocol):
    stage: str
    kind: str
    dataset: str
    metric: str
    value: float
    n_samples: int | None


@dataclass(frozen=True)
class SpeedRatio:
    """Per-round ratios of a model's tokens/s to the dense model's: median, lowest and highest round. With
    n independent rounds the true median ratio lies outside [low, high] with probability 2^(1-n) (6% at 5)."""

    median: float
    low: float
    high: float
    rounds: int

    @classmethod
    def of(cls, ratios: Sequence[float]) -> "SpeedRatio":
        if not ratios:
            raise ValueError("SpeedRatio.of: no rounds")
        return cls(statistics.median(ratios), min(ratios), max(ratios), len(ratios))

    @property
    def within_noise(self) -> bool:
        """The rounds disagree on which model is faster: the per-round ratios straddle 1."""
        return self.low <= 1.0 <= self.high

    def text(self) -> str:
        """`1.21x [1.10-1.30]`; `within noise (0.98x [0.91-1.04])` when the rounds straddle 1."""
        measured = f"{self.median:.2f}x [{self.low:.2f}-{self.high:.2f}]"
        return f"within noise ({measured})" if self.within_noise else measured

    def metrics(self, metric: str) -> dict[str, float]:
        """The catalog metrics that hold it: `<metric>_ratio_median`, `_ratio_low`, `_ratio_high`."""
        return {ratio_metric(metric, part): getattr(self, part) for part in RATIO_PARTS}

    def summary(self) -> dict:
        return {"median": self.median, "low": self.low, "high": self.high, "rounds": self.rounds,
                "within_noise": self.within_noise}


def ratio_metric(metric: str, part: str) -> str:
    return f"{metric}_ratio_{part}"


def is_ratio_metric(metric: str) -> bool:
    return any(metric.endswith(f"_ratio_{part}") for part in RATIO_PARTS)


def speed_ratios(rows: Iterable[SpeedRow]) -> dict[tuple[str, str], dict[str, SpeedRatio]]:
    """Per (workload, metric), each compared stage's ratio to the dense model, from speed rows."""
    parts: dict[tuple[str, str, str], dict[str, SpeedRow]] = {}
    for row in rows:
        if row.kind != "speed":
            continue
        for part in RATIO_PARTS:
            suffix = f"_ratio_{part}"
            if row.metric.endswith(suffix):
                parts.setdefault((row.dataset, row.metric.removesuffix(suffix), row.stage), {})[part] = row
    out: dict[tuple[str, str], dict[str, SpeedRatio]] = {}
    for (workload, metric, stage), found in parts.items():
        if set(found) == set(RATIO_PARTS):
            out.setdefault((workload, metric), {})[stage] = SpeedRatio(
                found["median"].value, found["low"].value, found["high"].value, found["median"].n_samples or 0)
    return out


def side_by_side(rows: Iterable[SpeedRow]) -> dict[str, bool]:
    """Per compared stage, whether it was timed alternately with the dense model."""
    return {row.stage: row.value == 1.0 for row in rows if row.kind == "speed" and row.metric == SIDE_BY_SIDE}


def speed_summary(rows: Iterable[SpeedRow]) -> dict[str, dict[str, dict]]:
    """A run summary's `speed`: per `<workload> <metric>`, each compared stage's ratio to dense (median, low,
    high, rounds, within_noise, side_by_side)."""
    rows = list(rows)
    together = side_by_side(rows)
    return {f"{workload} {metric}": {stage: {**ratio.summary(), "side_by_side": together.get(stage, True)}
                                     for stage, ratio in by_stage.items()}
            for (workload, metric), by_stage in speed_ratios(rows).items()}


def ratio_text(entry: dict) -> str:
    """One stage's entry of a run summary's `speed` as `SpeedRatio.text` writes it."""
    return SpeedRatio(entry["median"], entry["low"], entry["high"], entry["rounds"]).text()
