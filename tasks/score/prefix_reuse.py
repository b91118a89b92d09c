"""The prefix-reuse scorer: perplexity of the model without each candidate, the current model run once.

Removing a block changes nothing before it, so a step runs the current model once, keeps the hidden
state entering every remaining unit, and evaluates each candidate from its own entry point. Entry
states whose prefix did not change since the previous step are reused, so after removing block b only
the states after b are recomputed.

With `exact=False` only the winner needs an exact total. The current model's predictions pick the
vocabulary rows that carry most of the probability mass (one head per window and step). Each candidate,
most promising first by the previous step's scores, first gets a lower bound per window from those rows
alone (a tenth of the output head's cost, tasks.score.vocab_bound); it stops as soon as its bounds
exceed the best exact total, since it can no longer win, and its value is stored as that lower bound.
A candidate that might still win gets the exact head window by window. NLL terms are non-negative and
bounds are below them, so the chosen block is the one exact sums pick; every exact sum runs the same
unit functions on the same fixed micro-batches as a full forward, so the chosen blocks are identical to
a naive search's.

Memory: the kept states are units x tokens x hidden values. When that exceeds the budget only every
k-th state is kept, and a candidate rebuilds its entry state from the nearest kept one (at most k-1
extra units), which changes the cost, never the numbers.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterator, TypeVar

import torch
from torch import nn

from tasks.residual import ResidualRunner, Unit, predictions
from tasks.score.base import CandidateScore, OnScore, split_known
from tasks.score.vocab_bound import VocabBound, subset_rows
from tasks.stream.residency import streamed
from tasks.surgery import units_of

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class WorkCounter:
    """Unit and head applications, each counted per window: the scorer's compute in model pieces.
    Candidates evaluated side by side count through `add`, which holds a lock."""

    unit_windows: int = 0
    head_windows: int = 0
    # Windows whose NLL was bounded from a vocabulary subset (tasks.score.vocab_bound) instead.
    bound_windows: int = 0
    bound_rows: int = 0
    # The current model's pass that finds where its predictions lie (bounds only): its head windows and
    # its unit applications, per window, kept apart from the candidates' own work.
    mass_windows: int = 0
    mass_unit_windows: int = 0
    # Wall seconds spent bringing the entry states up to date (the step's shared prefix).
    prefix_seconds: float = 0.0
    stored_bytes: int = 0
    extra: dict = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, count in counts.items():
                setattr(self, name, getattr(self, name) + count)


@dataclass
class Outcome:
    """One candidate's evaluation: exact per-batch sums when complete, else a lower bound."""

    parts: list[float]
    lower: float
    done: int
    complete: bool
    seconds: float


class PrefixReuseScorer:
    def __init__(self, model: nn.Module, windows: torch.Tensor, batch_windows: int, exact: bool,
                 memory_budget_bytes: float = math.inf, parallel: int = 1):
        self.runner = ResidualRunner(model)
        # Candidates evaluated side by side, each on one torch thread (see `score`).
        self.parallel = max(1, parallel)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0
        self.batches = [b.contiguous() for b in windows.split(batch_windows)]
        self.stride = _checkpoint_stride(self.runner, windows, memory_budget_bytes)
        self.memory_budget_bytes = memory_budget_bytes
        self.n_predictions = predictions(windows)
        self.exact = exact
        self.work = WorkCounter()
        self._contexts = {}
        self._entries: dict[str, tuple[tuple[str, ...], list[torch.Tensor]]] = {}
        self._previous: dict[str, float] = {}

    def _context(self, index: int, hidden: torch.Tensor):
        if index not in self._contexts:
            self._contexts[index] = self.runner.context(hidden)
        return self._contexts[index]

    def _apply(self, unit: Unit, states: list[torch.Tensor]) -> list[torch.Tensor]:
        self.work.add(unit_windows=sum(s.shape[0] for s in states))
        return [self.runner.apply(unit, h, self._context(i, h)) for i, h in enumerate(states)]

    def entry_states(self, active: list[Unit]) -> list[list[torch.Tensor] | None]:
        """Per active unit, the per-batch hidden states entering it (None where the budget keeps none);
        states whose prefix is unchanged since the previous step are reused."""
        entries: list[list[torch.Tensor] | None] = []
        for _ in self._walk_entries(active, entries):
            pass
        return entries

    def _walk_entries(self, active: list[Unit], entries: list) -> Iterator[list[torch.Tensor]]:
        """`entry_states` unit by unit: yields the states entering each active unit in turn (appending to
        `entries` what the budget keeps), so a caller can run other states through the same unit before
        the walk computes the next one; the kept set is settled once the walk is exhausted."""
        current: list[torch.Tensor] | None = None
        for i, unit in enumerate(active):
            signature = tuple(u.id for u in active[:i])
            cached = self._entries.get(unit.id)
            if cached is not None and cached[0] == signature:
                current = cached[1]
            elif i == 0:
                current = [self.runner.embed(batch) for batch in self.batches]
            else:
                current = self._apply(active[i - 1], current)
            keep = i % self.stride == 0
            if keep:
                self._entries[unit.id] = (signature, current)
            entries.append(current if keep else None)
            yield current
        active_ids = {u.id for u, e in zip(active, entries) if e is not None}
        for stale in [k for k in self._entries if k not in active_ids]:
            del self._entries[stale]
        self.work.stored_bytes = max(
            self.work.stored_bytes,
            sum(t.numel() * t.element_size() for _, states in self._entries.values() for t in states),
        )

    def _finals(self, active: list[Unit], entries: list[list[torch.Tensor]], drop: set[str],
                counter: str = "unit_windows"):
        """Per micro-batch, in order: (index, input ids, last layer's output) without the units in `drop`
        (none: the current model); the units applied are counted in `counter`, per window."""
        kept, chain = self._chain(active, drop)
        for index, batch in enumerate(self.batches):
            yield index, batch, self._run_chain(entries[kept][index], index, chain, counter)

    def _chain(self, active: list[Unit], drop: set[str]) -> tuple[int, list[Unit]]:
        """The kept entry state a model without `drop` starts from, and the units it then runs."""
        first = next((i for i, u in enumerate(active) if u.id in drop), len(active) - 1)
        kept = first - first % self.stride
        return kept, active[kept:first] + [u for u in active[first:] if u.id not in drop]

    def _run_chain(self, hidden: torch.Tensor, index: int, chain: list[Unit], counter: str) -> torch.Tensor:
        ctx = self._context(index, hidden)
        for unit in chain:
            hidden = self.runner.apply(unit, hidden, ctx)
        self.work.add(**{counter: len(chain) * self.batches[index].shape[0]})
        return hidden

    def _final(self, active: list[Unit], entries: list[list[torch.Tensor]], drop: set[str], index: int) -> torch.Tensor:
        """Micro-batch `index`'s last layer output without the units in `drop`."""
        kept, chain = self._chain(active, drop)
        return self._run_chain(entries[kept][index], index, chain, "unit_windows")

    def _batch_nll(self, active: list[Unit], entries, drop: set[str], index: int) -> torch.Tensor:
        """Micro-batch `index`'s per-window NLL without the units in `drop`."""
        hidden = self._final(active, entries, drop, index)
        self.work.add(head_windows=self.batches[index].shape[0])
        return self.runner.window_nll(hidden, self.batches[index])

    def _exact_nll(self, hidden: torch.Tensor, batch: torch.Tensor) -> float:
        self.work.add(head_windows=batch.shape[0])
        return float(self.runner.window_nll(hidden, batch).sum())

    def _evaluate(
        self, active: list[Unit], entries: list[list[torch.Tensor]], drop: set[str], bound: float
    ) -> tuple[list[float], int, bool]:
        """NLL sum of every micro-batch, in order; stops after a batch whose running total exceeds `bound`
        (math.inf: never), which is sound because every later term is non-negative."""
        parts: list[float] = []
        total, done = 0.0, 0
        for index, batch, hidden in self._finals(active, entries, drop):
            parts.append(self._exact_nll(hidden, batch))
            total += parts[-1]
            done += predictions(batch)
            if total > bound and index < len(self.batches) - 1:
                return parts, done, False
        return parts, done, True

    def _bounded(
        self, active: list[Unit], entries: list[list[torch.Tensor]], drop: set[str], best: float,
        vocab: VocabBound,
    ) -> tuple[list[float], float, int, bool]:
        """A candidate that must beat `best` (an exact total): vocabulary-subset bounds first, window by
        window, and the exact head only while the candidate can still win.

        Returns exact per-batch sums (when complete), a lower bound (when not), predictions covered and
        whether it is complete. Every lower bound used to stop is a sum of exact sums and bounds."""
        finals, bounds, done = [], [], 0
        last = len(self.batches) - 1
        for index, batch, hidden in self._finals(active, entries, drop):
            self.work.add(bound_windows=batch.shape[0])
            bounds.append(float(vocab.window_bounds(hidden, batch).sum()))
            finals.append((batch, hidden))
            done += predictions(batch)
            if sum(bounds) > best:
                return [], sum(bounds), done, False
        parts: list[float] = []
        for index, (batch, hidden) in enumerate(finals):
            parts.append(self._exact_nll(hidden, batch))
            lower = sum(parts) + sum(bounds[index + 1 :])
            if lower > best and index < last:
                return [], lower, done, False
        return parts, math.nan, done, True

    @torch.inference_mode()
    def current_perplexity(self, removed: set[str]) -> float:
        """Calibration perplexity of the current model (without `removed`), summed as candidates are."""
        active = self.runner.active(removed)
        parts, _, _ = self._evaluate(active, self.entry_states(active), set(), math.inf)
        total = 0.0
        for value in parts:
            total += value
        return math.exp(total / self.n_predictions)

    @torch.inference_mode()
    def batch_sums(
        self, removed: set[str], candidates: list[str], bound: float = math.inf
    ) -> dict[str, tuple[list[float], int, bool, float]]:
        """Per candidate, in the order given: its NLL sum per micro-batch, predictions covered, whether it
        ran to the end, and seconds. A candidate stops once its running total exceeds `bound`. A candidate
        is a block, blocks joined by '+', or '' for the current model.

        This is a shard's work under distributed execution (tasks.distributed): the caller owns the
        bound and adds the sums up, so this scorer's own `exact` setting and ordering do not apply."""
        active = self.runner.active(removed)
        entries = self.entry_states(active)
        out: dict[str, tuple[list[float], int, bool, float]] = {}
        for block in candidates:
            start = time.perf_counter()
            drop = units_of(block.split("+")) if block else set()  # '' is the current model
            parts, done, complete = self._evaluate(active, entries, drop, bound)
            out[block] = (parts, done, complete, time.perf_counter() - start)
        return out

    @torch.inference_mode()
    def window_nlls(self, removed: set[str], names: list[str], indices: list[int]
                    ) -> dict[str, tuple[dict[int, torch.Tensor], float]]:
        """Per name, the per-window NLL of each micro-batch in `indices` and the seconds they took: a race's
        work on a shard (tasks.distributed). A name is a block, blocks joined by '+' (a segment), or ''
        for the current model."""
        active = self.runner.active(removed)
        entries = self.entry_states(active)
        out: dict[str, tuple[dict[int, torch.Tensor], float]] = {}
        for name in names:
            start = time.perf_counter()
            drop = units_of(name.split("+")) if name else set()
            per_batch = {index: self._batch_nll(active, entries, drop, index) for index in indices}
            out[name] = (per_batch, time.perf_counter() - start)
        return out

    @torch.inference_mode()
    def score(
        self,
        removed: set[str],
        candidates: list[str],
        known: dict[str, CandidateScore],
        on_score: OnScore,
    ) -> dict[str, CandidateScore]:
        active = self.runner.active(removed)
        results, todo = split_known(candidates, known)
        if todo and self.exact and streamed(self.runner.model) is not None:
            todo.sort(key=lambda c: (self._previous.get(c, math.inf), candidates.index(c)))
            self._record(todo, self._breadth_first(active, todo), math.inf, results, on_score)
        elif todo:
            start = time.perf_counter()
            entries = self.entry_states(active)
            self.work.add(prefix_seconds=time.perf_counter() - start)
            for index, hidden in enumerate(entries[0]):
                self._context(index, hidden)  # built here, so candidate threads only read them
            # Most promising first, so the best total is tight from the start. Side by side, only the
            # first wave goes by promise: the rest go in model order, so that a wave's candidates have
            # about as many layers to run and no thread waits long for the other.
            todo.sort(key=lambda c: (self._previous.get(c, math.inf), candidates.index(c)))
            if self.parallel > 1:
                todo = todo[: self.parallel] + sorted(todo[self.parallel :], key=candidates.index)
            best = min((math.log(s.value) * self.n_predictions for s in results.values() if s.exact), default=math.inf)
            vocab = self._vocab_bound(active, entries) if not self.exact and len(todo) > 1 else None
            # Candidates go in waves of `parallel`, each against the best total known when its wave
            # began, so the stored bounds do not depend on thread timing.
            with self._side_by_side():
                for first in range(0, len(todo), self.parallel):
                    wave = todo[first : first + self.parallel]
                    run = partial(self._candidate, active=active, entries=entries, best=best, vocab=vocab)
                    outcomes = self._run_wave(run, wave)
                    best = self._record(wave, outcomes, best, results, on_score)
        self._previous = {c: s.value for c, s in results.items()}
        return results

    def _record(self, wave: list[str], outcomes: list[Outcome], best: float,
                results: dict[str, CandidateScore], on_score: OnScore) -> float:
        """Scores of a wave, in its order; returns the best exact total after it."""
        for block, outcome in zip(wave, outcomes):
            total = 0.0
            for value in outcome.parts:  # in batch order from 0.0, as distributed shards are added up
                total += value
            if not outcome.complete:
                total = outcome.lower
            score = CandidateScore(
                block=block,
                value=math.exp(total / self.n_predictions),
                n_tokens=outcome.done,
                seconds=outcome.seconds,
                exact=outcome.complete,
            )
            if outcome.complete:
                best = min(best, total)
            results[block] = score
            on_score(score)
        return best

    def _breadth_first(self, active: list[Unit], todo: list[str]) -> list[Outcome]:
        """Exact outcomes of `todo` from one walk over the model's units: the current model's states and
        every candidate whose chain has reached a unit pass it together, so a step reads each layer's
        weights once (a streamed model, tasks.stream) instead of once per candidate. A candidate's chain,
        entry state and micro-batches are `_final`'s, so its sums are the same floats. Candidates go in
        groups as large as the memory budget allows (each keeps one state per micro-batch); groups after
        the first start from the kept entry states."""
        start = time.perf_counter()
        chains = {c: self._chain(active, units_of([c])) for c in todo}
        per_candidate = _state_bytes(self.runner, sum(b.numel() for b in self.batches))
        size = len(todo) if math.isinf(self.memory_budget_bytes) else int(self.memory_budget_bytes // per_candidate)
        size = max(1, size)
        entries: list[list[torch.Tensor] | None] = []
        outcomes: dict[str, Outcome] = {}
        for first in range(0, len(todo), size):
            group = todo[first : first + size]
            walk = self._walk_entries(active, entries) if first == 0 else iter(entries)
            finals = self._advance_together(active, walk, {c: chains[c] for c in group})
            for _ in walk:  # settles the kept entry states
                pass
            for block in group:
                parts = [self._exact_nll(hidden, batch) for hidden, batch in zip(finals[block], self.batches)]
                outcomes[block] = Outcome(parts, sum(parts), self.n_predictions, True, 0.0)
        seconds = (time.perf_counter() - start) / len(todo)
        return [Outcome(o.parts, o.lower, o.done, o.complete, seconds) for o in (outcomes[c] for c in todo)]

    def _advance_together(self, active: list[Unit], walk: Iterator, chains: dict[str, tuple[int, list[Unit]]]
                          ) -> dict[str, list[torch.Tensor]]:
        """Every chain run to its end, unit by unit in model order; a chain joins at its kept entry state."""
        states: dict[str, list[torch.Tensor]] = {}
        runs = {c: {u.id for u in chain} for c, (_, chain) in chains.items()}
        for position, (unit, entry) in enumerate(zip(active, walk)):
            states.update({c: list(entry) for c, (kept, _) in chains.items() if kept == position})
            for block, hidden in states.items():
                if unit.id in runs[block]:
                    states[block] = [self.runner.apply(unit, h, self._context(i, h)) for i, h in enumerate(hidden)]
                    self.work.add(unit_windows=sum(h.shape[0] for h in hidden))
        return states

    def _candidate(self, block: str, *, active: list[Unit], entries: list[list[torch.Tensor]], best: float,
                   vocab: VocabBound | None) -> Outcome:
        start = time.perf_counter()
        drop = units_of([block])
        with torch.inference_mode():  # per thread: a candidate thread does not inherit the caller's mode
            if vocab is not None:
                parts, lower, done, complete = self._bounded(active, entries, drop, best, vocab)
            else:
                # Exact mode, or predictions too flat for a bound: every candidate runs whole, or until
                # its exact partial sum exceeds the best total.
                parts, done, complete = self._evaluate(active, entries, drop, math.inf if self.exact else best)
                lower = sum(parts)
        return Outcome(parts, lower, done, complete, time.perf_counter() - start)

    @contextmanager
    def _side_by_side(self):
        """One torch thread per candidate thread for a step's candidates, on threads kept for the scorer's
        life: their kept head buffers then stay allocated, and the thread pool is resized once a step."""
        if self.parallel == 1:
            yield
            return
        if self._pool is None or self._pool_size != self.parallel:
            # Each worker sets its own torch thread count once: a thread's OpenMP team size is its own, so
            # the caller's setting does not reach threads that ran torch before it was made.
            self._pool = ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix="pruneflow-candidate",
                                            initializer=torch.set_num_threads, initargs=(1,))
            self._pool_size = self.parallel
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    def _run_wave(self, run: Callable[[T], R], wave: list[T]) -> list[R]:
        """Results in wave order. Side by side, the pool's threads take the items one by one as each
        becomes free, each with one torch thread; the numbers are the same as one at a time
        (tests/test_search.py)."""
        if self.parallel == 1:
            return [run(item) for item in wave]
        return list(self._pool.map(run, wave))

    def _vocab_bound(self, active: list[Unit], entries: list[list[torch.Tensor]]) -> VocabBound | None:
        """Bounds from the rows that hold most of the current model's predicted mass: every candidate
        of the step is that model less one block, whatever order the candidates come in."""
        weight = self.runner.adapter.lm_head(self.runner.model).weight
        mass = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
        for _, batch, hidden in self._finals(active, entries, set(), counter="mass_unit_windows"):
            self.work.add(mass_windows=batch.shape[0])
            self.runner.window_nll(hidden, batch, mass)
        rows = subset_rows(mass)
        self.work.bound_rows = 0 if rows is None else len(rows)
        return None if rows is None else VocabBound(self.runner.adapter, self.runner.model, rows)


def _state_bytes(runner: ResidualRunner, tokens: int) -> int:
    """Bytes of one hidden state over `tokens` tokens, in the model's dtype."""
    return tokens * runner.model.config.hidden_size * next(runner.model.parameters()).element_size()


def _checkpoint_stride(runner: ResidualRunner, windows: torch.Tensor, budget_bytes: float) -> int:
    """Keep every k-th entry state so that all kept states fit the budget."""
    per_state = _state_bytes(runner, windows.numel())
    states = max(1, len(runner.units))
    return max(1, math.ceil(states * per_state / max(budget_bytes, 1.0)))
