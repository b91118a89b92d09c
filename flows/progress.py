"""Terminal progress of the search: a bar over candidates per step, the current best block and score."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

from tasks.score import CandidateScore
from tasks.search import StepRecord


class SearchProgress:
    def __init__(self, total_steps: int | None, logger=None):
        self.total_steps = total_steps
        self.logger = logger
        self.bar: tqdm | None = None
        self.step = -1
        self.best: CandidateScore | None = None

    def on_score(self, step: int, score: CandidateScore) -> None:
        if step != self.step:
            self._close()
            self.step, self.best = step, None
            of = f"/{self.total_steps}" if self.total_steps else ""
            self.bar = tqdm(desc=f"search step {step + 1}{of}", unit="cand", file=sys.stderr, leave=False)
        if score.exact and (self.best is None or score.value < self.best.value):
            self.best = score
        assert self.bar is not None
        self.bar.update(1)
        if self.best is not None:
            self.bar.set_postfix_str(f"best {self.best.block} {self.best.value:.3f}")

    def on_step(self, step: int, scores: dict[str, CandidateScore], record: StepRecord) -> None:
        self._close()
        bounds = sum(1 for s in scores.values() if not s.exact)
        message = (
            f"step {step}: removed {record.block} (score {record.value:.4f}; {len(scores)} candidates"
            + (f", {bounds} stopped early" if bounds else "")
            + f"; {record.params_remaining:,} params remain)"
        )
        if self.logger is not None:
            self.logger.info(message)
        else:
            print(message, file=sys.stderr)

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Fanout:
    """Sends search events to several listeners (terminal bar, Prefect artifacts)."""

    def __init__(self, *listeners):
        self.listeners = listeners

    def on_score(self, step: int, score: CandidateScore) -> None:
        for listener in self.listeners:
            listener.on_score(step, score)

    def on_step(self, step: int, scores: dict[str, CandidateScore], record: StepRecord) -> None:
        for listener in self.listeners:
            listener.on_step(step, scores, record)
