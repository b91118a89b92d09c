"""Racing (`search.mode: racing`): a perplexity step whose cost grows slower than its calibration set.

Windows go in rounds, in a seeded order. After each round every candidate still in the race is compared
with the references (the `keep` lowest totals so far; one, the leader, for a search that takes the best
candidate) on the same windows: the per-window NLL difference has a far smaller spread than the windows'
own NLLs, so a few windows tell most candidates apart. A candidate leaves once the lower end of a
one-sided Student-t confidence bound on its mean difference to each reference is above zero; the rest
run over every window, so their scores are exact and the same floats as in exact mode.

The guarantee: a candidate among the exact best `keep` (over the whole calibration set) leaves only if,
at some look, it is found behind `keep` references, and at most `keep - 1` candidates are truly ahead of
it, so at least one of those findings is wrong: a bound above zero although the true mean difference over
the whole set is not. Each look and partner is one such event of probability at most alpha' (a t bound,
sound as the windows' mean becomes normal, hence the minimum number of windows), and there are at most
keep x (candidates - 1) x looks of them for the best `keep`: alpha' is set so that they add up to
1 - confidence. With probability at least `confidence` the exact best `keep` all stay in the race, and
then the strategy's choice is exactly exact mode's.

The leaders are chosen by the same windows that test against them, hence the correction over every
candidate. A reference chosen before the windows were drawn needs none: the iterative search passes the
previous step's best exact score as a fixed reference, every step draws its own window order (so what
earlier steps decided is independent of it), and the error is split in two halves: 1/2 over
(candidates - 1) x looks for the leader test, 1/2 over looks alone for the fixed one. The exact best
can be wrongly found behind the fixed reference only at one of the looks, so the guarantee stands, and
the fixed test's level is about (candidates - 1) / 2 times looser: most candidates leave sooner.

With the ppl_per_param objective the race compares each window's NLL rise over the current model divided
by the parameters the candidate removes, the objective's own terms, with the same bound.

A candidate that left is stored with `exact = False`, the perplexity of the windows it saw (not a bound),
the windows' predictions as `n_tokens`, and the gap to the reference it is least surely behind, per token
(in log-perplexity; per parameter with ppl_per_param): its mean's standard error and its confidence
interval, whose lower end is above zero.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Callable, Iterator

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


def _gap(values: torch.Tensor, reference: torch.Tensor, factor: float) -> Gap:
    diff = (values - reference).double()
    return Gap(float(diff.mean()), float(diff.std()) / math.sqrt(diff.numel()), factor)


def leavers(nll: dict[str, torch.Tensor], alpha: float, keep: int = 1, fixed: str | None = None,
            fixed_alpha: float | None = None) -> dict[str, Gap]:
    """The candidates that leave at one look, given each one's per-window values on the same windows (in
    the same order; lower is better): those behind each of the `keep` best totals so far (the leaders) at
    level `alpha`, or, with `fixed` (a reference chosen before this race's windows were drawn), behind it
    at level `fixed_alpha`. Ties go to the earlier candidate; a leader never leaves, so `keep` always stay.

    Each leaver's Gap is the one that decided: to the fixed reference, or to the leader it is least surely
    behind (the smallest lower end)."""
    names = list(nll)
    ranked = sorted(names, key=lambda name: (float(nll[name].sum()), names.index(name)))
    leaders = ranked[:keep]
    n = nll[leaders[0]].numel()
    factor = t_quantile(1 - alpha, n - 1)
    fixed_factor = None if fixed not in nll or fixed_alpha is None else t_quantile(1 - fixed_alpha, n - 1)
    out = {}
    for name in ranked[keep:]:
        if fixed_factor is not None and name != fixed:
            gap = _gap(nll[name], nll[fixed], fixed_factor)
            if gap.low > 0:
                out[name] = gap
                continue
        weakest = min((_gap(nll[name], nll[ref], factor) for ref in leaders), key=lambda g: g.low)
        if weakest.low > 0:
            out[name] = weakest
    return out


CURRENT = ""  # the name a race gives the current model (no block dropped): ppl_per_param's baseline


@dataclass(frozen=True)
class Race:
    """What one scoring call races for: the `keep` best candidates stay (1: the winner alone; one_shot
    needs as many as its plan may take, beam its width), ranked by perplexity or, with `per_param`
    (parameters each candidate removes), by the rise in NLL over the current model's per parameter.

    `step` draws the window order (each step its own, so that what earlier steps decided is independent
    of this step's order); `reference`, a candidate chosen before this order was drawn (the iterative
    search's best exact score of the previous step), is a second, fixed yardstick (module docs)."""

    keep: int = 1
    per_param: dict[str, int] | None = None
    step: int = 0
    reference: str | None = None


# (names, batch indices) -> per name: the per-window NLL of each batch (float64), and the seconds it took.
# Names may include CURRENT. Where the windows are evaluated is the caller's: this process or Dask shards.
Evaluate = Callable[[list[str], list[int]], dict[str, tuple[dict[int, torch.Tensor], float]]]


@dataclass
class Runner:
    """One candidate's windows so far: per micro-batch, the NLL of each of its windows."""

    block: str
    per_batch: dict[int, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0

    def seen(self, order: list[int]) -> torch.Tensor:
        return torch.cat([self.per_batch[i] for i in order])


class Racer:
    """One race's rounds, looks and scores, given per-batch window NLLs from wherever they are computed:
    the local scorer and the Dask scorer (tasks.distributed) run the same race and get the same floats."""

    def __init__(self, options: RacingOptions, batch_windows: list[int], batch_predictions: list[int]):
        self.options = options
        self.batch_windows = batch_windows
        self.batch_predictions = batch_predictions
        self.n_predictions = sum(batch_predictions)
        self.tokens_per_window = self.n_predictions / sum(batch_windows)

    def rounds(self, step: int) -> list[list[int]]:
        """Step `step`'s seeded batch order, cut into rounds (step 0 keeps the order of `seed` alone)."""
        order = list(range(len(self.batch_windows)))
        random.Random(self.options.seed if step == 0 else f"{self.options.seed}:{step}").shuffle(order)
        return self._cut(order)

    def _cut(self, order: list[int]) -> list[list[int]]:
        """The seeded batch order cut where looks happen: the first round reaches `min_windows`, each
        later one adds `round_windows`."""
        rounds: list[list[int]] = [[]]
        windows, next_look = 0, self.options.min_windows
        for index in order:
            rounds[-1].append(index)
            windows += self.batch_windows[index]
            if windows >= next_look:
                rounds.append([])
                next_look = windows + self.options.round_windows
        return [r for r in rounds if r]

    def alphas(self, candidates: int, keep: int, fixed: bool) -> tuple[float, float | None] | None:
        """The error each look may make for one pair against the leaders, and against the fixed reference
        (None without one); None when no look can happen. With a fixed reference each test gets half."""
        count = looks(sum(self.batch_windows), self.options)
        if count == 0 or candidates <= keep:
            return None
        error = 1 - self.options.confidence
        if not fixed:
            return error / (keep * (candidates - 1) * count), None
        return error / 2 / (keep * (candidates - 1) * count), error / 2 / (keep * keep * count)

    def run(self, names: list[str], race: Race, evaluate: Evaluate) -> Iterator[CandidateScore]:
        """Scores of `names` as the race settles them: those that leave at each look, then the rest."""
        racing = [Runner(name) for name in names]
        fixed = race.reference if race.reference in names and race.keep == 1 else None
        alphas = self.alphas(len(racing), race.keep, fixed is not None)
        base = Runner(CURRENT)
        seen: list[int] = []
        rounds = self.rounds(race.step)
        for number, indices in enumerate(rounds):
            by_name = {r.block: r for r in racing} | ({CURRENT: base} if race.per_param is not None else {})
            for name, (per_batch, seconds) in evaluate(list(by_name), indices).items():
                runner = by_name[name]
                runner.per_batch.update(per_batch)
                runner.seconds += seconds
            seen += indices
            if alphas is not None and number < len(rounds) - 1 and len(racing) > race.keep:
                racing, left = self._look(racing, seen, alphas, race, base, fixed)
                yield from left
        for runner in racing:
            yield self._exact(runner)

    def _look(self, racing: list[Runner], seen: list[int], alphas: tuple[float, float | None], race: Race,
              base: Runner, fixed: str | None) -> tuple[list[Runner], list[CandidateScore]]:
        """The candidates still in the race after this look, and the scores of those that left."""
        if race.per_param is None:
            values = {r.block: r.seen(seen) for r in racing}
        else:
            current = base.seen(seen)
            values = {r.block: (r.seen(seen) - current) / race.per_param[r.block] for r in racing}
        gaps = leavers(values, alphas[0], race.keep, fixed, alphas[1])
        left = [self._partial(r, seen, gaps[r.block]) for r in racing if r.block in gaps]
        return [r for r in racing if r.block not in gaps], left

    def _partial(self, runner: Runner, seen: list[int], gap: Gap) -> CandidateScore:
        tokens = self.tokens_per_window
        covered = sum(self.batch_predictions[i] for i in seen)
        per_token = float(runner.seen(seen).sum()) / covered
        return CandidateScore(
            block=runner.block, value=math.exp(per_token), n_tokens=covered, seconds=runner.seconds, exact=False,
            std_error=gap.error / tokens, gap_low=gap.low / tokens, gap_high=gap.high / tokens,
        )

    def _exact(self, runner: Runner) -> CandidateScore:
        total = 0.0
        for index in range(len(self.batch_windows)):  # batch order from 0.0, as exact mode adds them
            total += float(runner.per_batch[index].sum())
        return CandidateScore(block=runner.block, value=math.exp(total / self.n_predictions),
                              n_tokens=self.n_predictions, seconds=runner.seconds)


class RacingScorer(PrefixReuseScorer):
    """A perplexity scorer that races candidates over the calibration windows (see the module docs).

    With `parallel` > 1 (execution.parallel_candidates) each round's (candidate, window) pairs are one
    queue for the candidate threads, one torch thread each, as exact mode's candidates are: the per-window
    NLLs, and so the race, are the same floats whichever thread computes them.

    When every entry state of the calibration set does not fit the memory budget, a step computes them
    per round, for that round's windows only, and drops them after it: memory then grows with a round,
    not with the calibration set, at the cost of one pass of the current model per step (the states are
    not reused across steps)."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, batch_windows: int, options: RacingOptions,
                 memory_budget_bytes: float = math.inf):
        super().__init__(model, windows, batch_windows, True, memory_budget_bytes)
        self.options = options
        self.racer = Racer(options, [b.shape[0] for b in self.batches], [predictions(b) for b in self.batches])
        self.per_round = self.stride > 1
        if self.per_round:
            self.stride = 1

    @torch.inference_mode()
    def score(self, removed: set[str], candidates: list[str], known: dict[str, CandidateScore],
              on_score: OnScore, race: Race = Race()) -> dict[str, CandidateScore]:
        return self.score_groups(removed, {c: (c,) for c in candidates}, known, on_score, race)

    @torch.inference_mode()
    def score_groups(self, removed: set[str], groups: dict[str, tuple[str, ...]], known: dict[str, CandidateScore],
                     on_score: OnScore, race: Race = Race()) -> dict[str, CandidateScore]:
        """Like `score`, for candidates that each drop a group of blocks (a segment of layers), named by
        the keys of `groups`."""
        drops = {name: units_of(list(group)) for name, group in groups.items()}
        drops[CURRENT] = set()
        active = self.runner.active(removed)
        whole: list = []  # every batch's entry states, computed at the first round (none when all are known)

        def evaluate(names: list[str], indices: list[int]) -> dict[str, tuple[dict[int, torch.Tensor], float]]:
            if self.per_round:
                states = self._round_entries(active, indices)
            else:
                whole[:] = whole or self._timed_entries(active)
                states = whole
            for index in indices:
                self._context(index, states[0][index])  # built here, so the round's threads only read them
            work = [(name, index) for index in indices for name in names]

            def one(item: tuple[str, int]) -> tuple[torch.Tensor, float]:
                began = time.perf_counter()
                with torch.inference_mode():  # per thread: a pool thread does not inherit the caller's mode
                    nll = self._batch_nll(active, states, drops[item[0]], item[1])
                return nll, time.perf_counter() - began

            # The round's (candidate, batch) pairs go to the candidate threads as one queue, each pair to the
            # next free thread, each thread with one torch thread: no team of torch threads waits at every
            # operation for a member that a busy core has descheduled, and a slowed thread holds up the
            # look by one pair at most.
            with self._side_by_side():
                done = self._run_wave(one, work)
            per_batch: dict[str, dict[int, torch.Tensor]] = {name: {} for name in names}
            seconds = dict.fromkeys(names, 0.0)
            for (name, index), (nll, spent) in zip(work, done):
                per_batch[name][index] = nll
                seconds[name] += spent
            return {name: (per_batch[name], seconds[name]) for name in names}

        return score_streamed(list(groups), known, on_score, lambda todo: self.racer.run(todo, race, evaluate))

    @torch.inference_mode()
    def current_perplexity(self, removed: set[str]) -> float:
        if not self.per_round:
            return super().current_perplexity(removed)
        active = self.runner.active(removed)
        total = 0.0
        for index in range(len(self.batches)):  # batch by batch, summed in the same order as exact mode
            entries = self._round_entries(active, [index])
            total += float(self._batch_nll(active, entries, set(), index).sum())
        return math.exp(total / self.n_predictions)

    def _timed_entries(self, active: list[Unit]):
        start = time.perf_counter()
        entries = self.entry_states(active)
        self.work.add(prefix_seconds=time.perf_counter() - start)
        return entries

    def _round_entries(self, active: list[Unit], indices: list[int]) -> list[dict[int, torch.Tensor]]:
        """Per active unit, the states entering it for this round's batches only (same floats as the
        whole set's: each batch runs the same units alone)."""
        start = time.perf_counter()
        current = {i: self.runner.embed(self.batches[i]) for i in indices}
        entries = [current]
        for unit in active[:-1]:
            self.work.add(unit_windows=sum(h.shape[0] for h in current.values()))
            current = {i: self.runner.apply(unit, h, self._context(i, h)) for i, h in current.items()}
            entries.append(current)
        self.work.stored_bytes = max(self.work.stored_bytes, sum(
            t.numel() * t.element_size() for states in entries for t in states.values()))
        self.work.add(prefix_seconds=time.perf_counter() - start)
        return entries
