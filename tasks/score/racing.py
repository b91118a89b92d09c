"""Racing (`search.mode: racing`): a perplexity step whose cost grows slower than its calibration set.

Windows go in rounds, in a seeded order. After each round every candidate still in the race is compared
with the current leader (the lowest NLL so far) on the same windows: the per-window NLL difference has a
far smaller spread than the windows' own NLLs, so a few windows tell most candidates apart. A candidate
leaves once the lower end of a one-sided Student-t confidence bound on its mean difference is above zero;
the rest run over every window, so the winner's score is exact and the same float as in exact mode.

The guarantee: the exact best candidate b leaves only if, at some look, the bound on (b - leader) lies
above zero although its true mean over the whole calibration set is not. Each look and leader is one such
event of probability at most alpha' (a t bound, sound as the windows' mean becomes normal, hence the
minimum number of windows), and there are at most (candidates - 1) x looks of them: alpha' is set so
that they add up to 1 - confidence. With probability at least `confidence` the exact best stays in the
race, and then it wins, exactly as in exact mode.

A candidate that left is stored with `exact = False`, the perplexity of the windows it saw (not a bound),
the windows' predictions as `n_tokens`, and the gap to the leader on those windows in log-perplexity
(per token): its mean's standard error and its confidence interval, whose lower end is above zero.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from statistics import NormalDist
from typing import Iterator

import torch
from torch import nn

from tasks.residual import Unit, predictions
from tasks.score.base import CandidateScore, OnScore, score_streamed
from tasks.score.prefix_reuse import PrefixReuseScorer
from tasks.surgery import units_of


@dataclass(frozen=True)
class RacingOptions:
    confidence: float = 0.99  # probability that the exact best candidate stays in the race
    min_windows: int = 8  # windows every candidate sees before its first look
    round_windows: int = 4  # windows added between looks
    seed: int = 0  # the order windows go in


def t_quantile(p: float, dof: int) -> float:
    """The p-quantile of Student's t with `dof` degrees of freedom (p > 0.5), by bisection on its CDF,
    itself the density integrated with Simpson's rule: no dependency beyond the standard library."""
    if dof < 1 or not 0.5 < p < 1.0:
        raise ValueError(f"t_quantile needs dof >= 1 and 0.5 < p < 1, got {dof}, {p}")
    norm = math.exp(math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2)) / math.sqrt(dof * math.pi)

    def upper_tail(x: float) -> float:
        # P(T > x) = 1/2 - integral of the density over [0, x]; the substitution u = atan(x / sqrt(dof))
        # makes the integrand smooth and the range finite.
        steps = 400
        top = math.atan(x / math.sqrt(dof))
        h = top / steps

        def f(u: float) -> float:
            return norm * math.sqrt(dof) * math.cos(u) ** (dof - 1)

        area = f(0.0) + f(top) + sum((4 if i % 2 else 2) * f(i * h) for i in range(1, steps))
        return 0.5 - area * h / 3

    low, high = 0.0, max(1.0, NormalDist().inv_cdf(p))
    while upper_tail(high) > 1 - p:
        high *= 2
    for _ in range(80):
        mid = (low + high) / 2
        low, high = (mid, high) if upper_tail(mid) > 1 - p else (low, mid)
    return high


def looks(windows: int, options: RacingOptions) -> int:
    """How many times a race may drop candidates over `windows` windows (none once all are seen)."""
    if windows <= options.min_windows:
        return 0
    return 1 + (windows - 1 - options.min_windows) // options.round_windows


@dataclass(frozen=True)
class Gap:
    """A candidate's per-window NLL minus the leader's on the same windows: mean, its standard error and
    the two-sided interval whose lower end decides (mean -/+ factor x error)."""

    mean: float
    error: float
    factor: float

    @property
    def low(self) -> float:
        return self.mean - self.factor * self.error

    @property
    def high(self) -> float:
        return self.mean + self.factor * self.error


def leavers(nll: dict[str, torch.Tensor], alpha: float) -> dict[str, Gap]:
    """The candidates that leave at one look, given each one's NLL on the same windows (in the same
    order): those whose gap to the leader is above zero at level `alpha`. The lowest total leads; ties
    go to the earlier candidate, and the leader never leaves."""
    names = list(nll)
    leader = min(names, key=lambda name: (float(nll[name].sum()), names.index(name)))
    n = nll[leader].numel()
    factor = t_quantile(1 - alpha, n - 1)
    out = {}
    for name in names:
        if name == leader:
            continue
        diff = (nll[name] - nll[leader]).double()
        gap = Gap(float(diff.mean()), float(diff.std()) / math.sqrt(n), factor)
        if gap.low > 0:
            out[name] = gap
    return out


@dataclass
class Runner:
    """One candidate's windows so far: per micro-batch, the NLL of each of its windows."""

    block: str
    per_batch: dict[int, torch.Tensor]
    seconds: float = 0.0

    def seen(self, order: list[int]) -> torch.Tensor:
        return torch.cat([self.per_batch[i] for i in order])


class RacingScorer(PrefixReuseScorer):
    """A perplexity scorer that races candidates over the calibration windows (see the module docs)."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, batch_windows: int, options: RacingOptions,
                 memory_budget_bytes: float = math.inf):
        super().__init__(model, windows, batch_windows, True, memory_budget_bytes)
        self.options = options
        self.order = list(range(len(self.batches)))
        random.Random(options.seed).shuffle(self.order)
        self.tokens_per_window = predictions(windows) / windows.shape[0]

    @torch.inference_mode()
    def score(self, removed: set[str], candidates: list[str], known: dict[str, CandidateScore],
              on_score: OnScore) -> dict[str, CandidateScore]:
        return score_streamed(candidates, known, on_score, lambda todo: self._race(removed, todo))

    def _race(self, removed: set[str], todo: list[str]) -> Iterator[CandidateScore]:
        start = time.perf_counter()
        active = self.runner.active(removed)
        entries = self.entry_states(active)
        self.work.add(prefix_seconds=time.perf_counter() - start)
        racing = [Runner(block, {}) for block in todo]
        alpha = self._alpha(len(todo))
        total = sum(b.shape[0] for b in self.batches)
        seen: list[int] = []
        windows, next_look = 0, self.options.min_windows
        for index in self.order:
            for runner in racing:
                self._run_batch(runner, active, entries, index)
            seen.append(index)
            windows += self.batches[index].shape[0]
            if alpha is not None and next_look <= windows < total and len(racing) > 1:
                racing, left = self._look(racing, seen, alpha)
                yield from left
                next_look = windows + self.options.round_windows
        for runner in racing:
            yield self._exact(runner)

    def _alpha(self, candidates: int) -> float | None:
        """The error each look may make for one leader, or None when no look can happen."""
        count = looks(sum(b.shape[0] for b in self.batches), self.options)
        if count == 0 or candidates < 2:
            return None
        return (1 - self.options.confidence) / ((candidates - 1) * count)

    def _run_batch(self, runner: Runner, active: list[Unit], entries, index: int) -> None:
        began = time.perf_counter()
        hidden = self._final(active, entries, units_of([runner.block]), index)
        batch = self.batches[index]
        self.work.add(head_windows=batch.shape[0])
        runner.per_batch[index] = self.runner.window_nll(hidden, batch)
        runner.seconds += time.perf_counter() - began

    def _look(self, racing: list[Runner], seen: list[int], alpha: float) -> tuple[list[Runner], list[CandidateScore]]:
        """The candidates still in the race after this look, and the scores of those that left."""
        gaps = leavers({r.block: r.seen(seen) for r in racing}, alpha)
        left = [self._partial(r, seen, gaps[r.block]) for r in racing if r.block in gaps]
        return [r for r in racing if r.block not in gaps], left

    def _partial(self, runner: Runner, seen: list[int], gap: Gap) -> CandidateScore:
        tokens = self.tokens_per_window
        covered = sum(predictions(self.batches[i]) for i in seen)
        per_token = float(runner.seen(seen).sum()) / covered
        return CandidateScore(
            block=runner.block, value=math.exp(per_token), n_tokens=covered, seconds=runner.seconds, exact=False,
            std_error=gap.error / tokens, gap_low=gap.low / tokens, gap_high=gap.high / tokens,
        )

    def _exact(self, runner: Runner) -> CandidateScore:
        total = 0.0
        for index in range(len(self.batches)):  # batch order from 0.0, as exact mode adds them
            total += float(runner.per_batch[index].sum())
        return CandidateScore(block=runner.block, value=math.exp(total / self.n_predictions),
                              n_tokens=self.n_predictions, seconds=runner.seconds)

