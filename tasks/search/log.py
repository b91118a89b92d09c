"""What a search has done: every score and step goes to a recorder as soon as it exists (the catalog, in
the flow) and to the progress callbacks; an interrupted run's steps and scores come back from it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from tasks.score import CandidateScore
from tasks.search.goal import SearchError
from tasks.surgery import parse_block


@dataclass(frozen=True)
class StepRecord:
    step: int
    block: str
    value: float
    params_remaining: int


class Recorder(Protocol):
    def known_steps(self) -> list[StepRecord]: ...
    def known_scores(self, step: int) -> dict[str, CandidateScore]: ...
    def record_score(self, step: int, score: CandidateScore) -> None: ...
    def record_step(self, record: StepRecord) -> None: ...


class MemoryRecorder:
    """Keeps everything in memory (tests, benchmarks, library use without a catalog)."""

    def __init__(self) -> None:
        self.steps: list[StepRecord] = []
        self.scores: dict[int, dict[str, CandidateScore]] = {}

    def known_steps(self) -> list[StepRecord]:
        return list(self.steps)

    def known_scores(self, step: int) -> dict[str, CandidateScore]:
        return dict(self.scores.get(step, {}))

    def record_score(self, step: int, score: CandidateScore) -> None:
        self.scores.setdefault(step, {})[score.block] = score

    def record_step(self, record: StepRecord) -> None:
        self.steps.append(record)


OnStep = Callable[[int, dict[str, CandidateScore], StepRecord], None]
OnScore = Callable[[int, CandidateScore], None]


class SearchLog:
    """The recorder and the progress callbacks of one search, with the counts of its work."""

    def __init__(self, recorder: Recorder | None = None, on_step: OnStep | None = None,
                 on_score: OnScore | None = None):
        self.recorder = recorder or MemoryRecorder()
        self.on_step = on_step
        self.on_score = on_score
        self.evaluated = 0  # candidates scored by this invocation
        self.reused = 0  # candidates whose recorded score was reused (resume)

    def known_scores(self, step: int, wanted) -> dict[str, CandidateScore]:
        """The recorded scores at `step` of the names in `wanted` (counted as reused)."""
        known = {b: s for b, s in self.recorder.known_scores(step).items() if b in wanted}
        self.reused += len(known)
        return known

    def recording(self, step: int) -> Callable[[CandidateScore], None]:
        def record(score: CandidateScore) -> None:
            self.evaluated += 1
            self.recorder.record_score(step, score)
            if self.on_score:
                self.on_score(step, score)

        return record

    def record_step(self, record: StepRecord, scores: dict[str, CandidateScore]) -> StepRecord:
        self.recorder.record_step(record)
        if self.on_step:
            self.on_step(record.step, scores, record)
        return record

    def steps(self) -> list[StepRecord]:
        """Steps an earlier, interrupted run already committed, in order; they must run from 0 without gaps."""
        steps = sorted(self.recorder.known_steps(), key=lambda r: r.step)
        if [r.step for r in steps] != list(range(len(steps))):
            raise SearchError(f"catalog steps are not contiguous from 0: {[r.step for r in steps]}")
        for record in steps:
            parse_block(record.block)
        return steps
