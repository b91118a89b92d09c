"""Frozen rows read back from the catalog, and the vocabularies their columns accept.

Field order matches the SELECT lists the store builds from these classes, so a row is
`Cls.from_db(tuple)`. Timestamps are stored as naive UTC TIMESTAMPs; rows carry them
timezone-aware so nobody mistakes them for local time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from typing import Any, Literal, Protocol, Sequence, TypeVar


class _Scored(Protocol):
    exact: bool
    gap_low: float | None


def left_race(score: _Scored) -> bool:
    """A candidate that left a race (search.mode: racing), a ScoreRow or a search's CandidateScore: not
    exact, with the interval of its gap to the reference. Its value is the perplexity of the windows it
    saw, not a bound (bounded mode's early stops carry no gap)."""
    return not score.exact and score.gap_low is not None


RunStatus = Literal["running", "completed", "failed"]
FinalStatus = Literal["completed", "failed"]
EvalStage = Literal["dense", "pruned", "recovered"]
EvalKind = Literal["perplexity", "task", "speed", "size"]

RUN_STATUSES: tuple[str, ...] = ("running", "completed", "failed")
FINAL_STATUSES: tuple[str, ...] = ("completed", "failed")
EVAL_STAGES: tuple[str, ...] = ("dense", "pruned", "recovered")
EVAL_KINDS: tuple[str, ...] = ("perplexity", "task", "speed", "size")

_Row = TypeVar("_Row")


def _as_utc(value: Any) -> Any:
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


class _FromDb:
    @classmethod
    def columns(cls) -> str:
        """The SELECT list that `from_db` expects, in field order."""
        return ", ".join(f.name for f in fields(cls))  # type: ignore[arg-type]

    @classmethod
    def from_db(cls: type[_Row], row: Sequence[Any]) -> _Row:
        return cls(*(_as_utc(value) for value in row))


@dataclass(frozen=True)
class RunRow(_FromDb):
    run_id: str
    pipeline: str
    spec_hash: str
    spec_json: str
    model_fingerprint: str
    data_fingerprint: str
    model_source: str
    output_dir: str
    status: str
    created_at: datetime
    finished_at: datetime | None
    wall_seconds: float | None
    summary_json: str | None

    @property
    def spec(self) -> Any:
        return json.loads(self.spec_json)

    @property
    def summary(self) -> dict[str, Any] | None:
        return None if self.summary_json is None else json.loads(self.summary_json)


@dataclass(frozen=True)
class ScoreRow(_FromDb):
    """One candidate block evaluated at one search step."""

    run_id: str
    step: int
    block: str
    metric: str
    value: float
    n_tokens: int
    seconds: float
    # False: evaluation stopped early. Bounded mode: `value` is a lower bound. Racing (gap_low set): `value`
    # is the perplexity of the windows the candidate saw before it left the race.
    exact: bool
    created_at: datetime
    # Standard error of `value` when the metric is a sampling estimate (Shapley); for a candidate that
    # left a race, the standard error of its gap to the leader, or to the reference it was least surely
    # behind when a strategy keeps several (log-perplexity per token). None otherwise.
    std_error: float | None = None
    # Racing: the confidence interval of that gap when the candidate left (gap_low > 0); None otherwise.
    gap_low: float | None = None
    gap_high: float | None = None


@dataclass(frozen=True)
class StepRow(_FromDb):
    """The block actually removed at one search step."""

    run_id: str
    step: int
    block: str
    value: float
    params_remaining: int
    created_at: datetime


@dataclass(frozen=True)
class EvaluationRow(_FromDb):
    run_id: str
    stage: str
    kind: str
    dataset: str
    metric: str
    value: float
    n_tokens: int | None
    seq_len: int | None
    stride: int | None
    created_at: datetime
    n_samples: int | None = None


@dataclass(frozen=True)
class ArtifactRow(_FromDb):
    run_id: str
    stage: str
    kind: str
    path: str
    sha256: str
    bytes: int
    created_at: datetime


@dataclass(frozen=True)
class RunSummary(_FromDb):
    """One line of `pruneflow runs`; the same data as the `run_overview` view."""

    run_id: str
    pipeline: str
    status: str
    model_source: str
    blocks_removed: int
    # Ratio in [0, 1] from the run's summary ('params_removed_ratio'); None until recorded.
    params_removed: float | None
    dense_ppl: float | None
    # Perplexity of the 'recovered' stage if there is one, else of the 'pruned' stage.
    final_ppl: float | None
    wall_seconds: float | None
    created_at: datetime
    params_remaining: int | None = None
    final_stage: str | None = None
