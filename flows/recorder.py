"""The catalog as the search's recorder: every score committed before the next candidate starts."""

from __future__ import annotations

from typing import Callable

from catalog import Catalog
from tasks.score import CandidateScore
from tasks.search import StepRecord


class CatalogRecorder:
    def __init__(self, catalog: Catalog, run_id: str, metric: str):
        self.catalog = catalog
        self.run_id = run_id
        self.metric = metric

    def known_steps(self) -> list[StepRecord]:
        return [
            StepRecord(row.step, row.block, row.value, row.params_remaining) for row in self.catalog.steps(self.run_id)
        ]

    def known_scores(self, step: int) -> dict[str, CandidateScore]:
        return {
            row.block: CandidateScore(row.block, row.value, row.n_tokens, row.seconds, row.exact, row.std_error,
                                      row.gap_low, row.gap_high)
            for row in self.catalog.scores(self.run_id, step)
            if row.metric == self.metric
        }

    def record_score(self, step: int, score: CandidateScore) -> None:
        self.catalog.add_score(
            self.run_id, step, score.block, self.metric, score.value, score.n_tokens, score.seconds, score.exact,
            std_error=score.std_error,
            gap=None if score.gap_low is None else (score.gap_low, score.gap_high),
        )

    def record_step(self, record: StepRecord) -> None:
        self.catalog.add_step(self.run_id, record.step, record.block, record.value, record.params_remaining)


class WallClock:
    """Writes a running run's wall time so far after every search step and stage, so a killed invocation
    loses only the time since the last write; a search listener like the progress bars."""

    def __init__(self, catalog: Catalog, run_id: str, wall: Callable[[], float]):
        self.catalog = catalog
        self.run_id = run_id
        self.wall = wall

    def tick(self) -> None:
        self.catalog.record_wall(self.run_id, self.wall())

    def on_score(self, step: int, score: CandidateScore) -> None:
        pass

    def on_step(self, step: int, scores: dict[str, CandidateScore], record: StepRecord) -> None:
        self.tick()
