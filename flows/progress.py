"""Progress of the long stages (load, calibration, search, width, prune, recovery, evaluation, speed), shown
the same way in two places: a bar in the terminal and a Prefect progress artifact whose description is the
bar's text.

Step numbers are the catalog's (`steps.step`, from 0) everywhere a user reads them; "(3 of 8)" says how
far along that is.
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

from flows.ui import ProgressArtifact
from tasks.score import CandidateScore
from tasks.search import StepRecord


def clock(seconds: float) -> str:
    """`02:22`, `1:02:03`: the form tqdm uses for elapsed and remaining time."""
    total = int(round(max(0.0, seconds)))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class Meter:
    """One bar: a tqdm bar on stderr and, when given, a Prefect progress artifact showing the same text. With
    `delay`, the bar appears only once that many seconds have passed (nothing at all for a quick one)."""

    def __init__(self, label: str, total: int | None, artifact: ProgressArtifact | None = None, delay: float = 0.0):
        self.label = label
        self.bar = tqdm(total=total, desc=label, file=sys.stderr, leave=False, dynamic_ncols=True,
                        bar_format="{bar:16} {desc}", delay=delay)
        self.artifact = artifact
        self.shown_from = time.monotonic() + delay

    def show(self, done: int, total: int | None, text: str, percent: float | None = None) -> None:
        """`percent` is what the artifact shows (default: this bar's); the search shows the whole run's."""
        self.bar.total = total
        self.bar.n = done
        self.bar.set_description_str(f"{self.label}: {text}", refresh=time.monotonic() >= self.shown_from)
        if self.artifact is not None:
            if percent is None:
                percent = 100.0 * done / total if total else 0.0
            self.artifact.update(percent, f"{self.label}: {text}")

    def close(self, final: str | None = None) -> None:
        self.bar.close()
        if self.artifact is not None and final is not None:
            self.artifact.update(100.0, final, force=True)


class Pace:
    """Seconds per item measured in this process, and the time `left` items will take at that pace."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.items = 0

    def tick(self) -> None:
        if self.started is None:
            self.started = time.perf_counter()
        self.items += 1

    def each(self) -> float | None:
        # The first item also paid for warm-up (states, allocation): timing starts at it and counts the rest.
        if self.started is None or self.items < 2:
            return None
        return (time.perf_counter() - self.started) / (self.items - 1)

    def left(self, items: int) -> str:
        each = self.each()
        return "?" if each is None else clock(each * items)


def counted(done: int, total: int | None, unit: str) -> str:
    return f"{done}/{total} {unit}" if total else f"{done} {unit}"


class SearchProgress:
    """Where the search is: step, candidates scored of the step's total, time left for the step and the run,
    and the leading block. `per_step(s)` is the number of candidates step s scores, `run_total` the whole
    search's (None when the target is a parameter ratio); `known` counts candidates an interrupted run
    already scored, per step."""

    def __init__(self, per_step, run_total: int | None, total_steps: int | None, lowest_first: bool,
                 key: str | None = None, known: dict[int, int] | None = None, logger=None):
        self.per_step = per_step
        self.run_total = run_total
        self.total_steps = total_steps
        self.lowest_first = lowest_first
        self.artifact = ProgressArtifact(key, "search") if key else None
        self.known = dict(known or {})
        self.logger = logger
        self.pace = Pace()
        self.meter: Meter | None = None
        self.step = -1
        self.step_done = 0
        self.run_done = sum(self.known.values())
        self.best: CandidateScore | None = None

    def step_label(self, step: int) -> str:
        of = f" ({step + 1} of {self.total_steps})" if self.total_steps else ""
        return f"search step {step}{of}"

    def _step_total(self, step: int) -> int:
        total = self.per_step(step)
        if self.run_total is not None:  # strategies that score everything at step 0 (one_shot, consecutive)
            total = min(total, self.run_total - (self.run_done - self.step_done))
        return max(total, self.step_done)

    def on_score(self, step: int, score: CandidateScore) -> None:
        if step != self.step:
            self._close()
            self.step, self.best = step, None
            self.step_done = self.known.get(step, 0)
            self.meter = Meter(self.step_label(step), None, self.artifact)
        self.pace.tick()
        self.step_done += 1
        self.run_done += 1
        if score.exact and (self.best is None or self._better(score, self.best)):
            self.best = score
        assert self.meter is not None
        total = self._step_total(step)
        percent = 100.0 * self.run_done / self.run_total if self.run_total else None
        self.meter.show(self.step_done, total, self.status(total), percent)

    def _better(self, a: CandidateScore, b: CandidateScore) -> bool:
        return a.value < b.value if self.lowest_first else a.value > b.value

    def status(self, step_total: int) -> str:
        each = self.pace.each()
        parts = [counted(self.step_done, step_total, "candidates")]
        if each is not None:
            parts.append(f"{each:.2f} s each")
        parts.append(f"step left {self.pace.left(step_total - self.step_done)}")
        if self.run_total is not None:
            parts.append(f"run left {self.pace.left(self.run_total - self.run_done)}")
        if self.best is not None:
            parts.append(f"leading {self.best.block} {self.best.value:.4g}")
        return ", ".join(parts)

    def on_step(self, step: int, scores: dict[str, CandidateScore], record: StepRecord) -> None:
        self._close()
        bounds = sum(1 for s in scores.values() if not s.exact)
        message = (
            f"{self.step_label(step).removeprefix('search ')}: removed {record.block} (score {record.value:.4f}; "
            f"{len(scores)} candidates" + (f", {bounds} stopped early" if bounds else "")
            + f"; {record.params_remaining:,} params remain)"
        )
        if self.logger is not None:
            self.logger.info(message)
        else:
            print(message, file=sys.stderr)
        if self.artifact is not None:
            done = self.run_total and 100.0 * self.run_done / self.run_total
            self.artifact.update(done or 100.0, message, force=True)

    def _close(self) -> None:
        if self.meter is not None:
            self.meter.close()
            self.meter = None


class CountProgress:
    """A stage that counts through items (evaluation windows, training steps): done/total, pace, time left."""

    def __init__(self, label: str, unit: str, key: str | None = None, delay: float = 0.0):
        self.label, self.unit, self.delay = label, unit, delay
        self.artifact = ProgressArtifact(key, label) if key else None
        self.meter: Meter | None = None
        self.pace = Pace()

    def update(self, done: int, total: int, detail: str = "") -> None:
        if self.meter is None:
            self.meter = Meter(self.label, total, self.artifact, self.delay)
        self.pace.tick()
        each = self.pace.each()
        parts = [counted(done, total, self.unit), *([detail] if detail else [])]
        if each is not None:
            parts.append(f"{each:.2f} s each")
        parts.append(f"left {self.pace.left(total - done)}")
        self.meter.show(done, total, ", ".join(parts))
        if done >= total:
            self.meter.close(f"{self.label}: {', '.join(parts[:1 + bool(detail)])}, done")
            self.meter = None


class Parts:
    """A stage's long parts (each source it tokenizes, each file it hashes, a conversion), a CountProgress each,
    made when the part first reports, under one Prefect artifact key. `update` is a `tasks.refs.Progress`."""

    def __init__(self, stage: str, key: str | None = None, delay: float = 0.0):
        self.stage, self.key, self.delay = stage, key, delay
        self.bars: dict[str, CountProgress] = {}

    def update(self, part: str, done: int, total: int, unit: str, detail: str = "") -> None:
        if part not in self.bars:
            self.bars[part] = CountProgress(f"{self.stage}: {part}", unit, self.key, self.delay)
        self.bars[part].update(done, total, detail)


class Fanout:
    """Sends search events to several listeners."""

    def __init__(self, *listeners):
        self.listeners = listeners

    def on_score(self, step: int, score: CandidateScore) -> None:
        for listener in self.listeners:
            listener.on_score(step, score)

    def on_step(self, step: int, scores: dict[str, CandidateScore], record: StepRecord) -> None:
        for listener in self.listeners:
            listener.on_step(step, scores, record)
