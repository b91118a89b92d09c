"""The flow-side scorer of a distributed search step: same interface and same numbers as the local one.

Every shard evaluates every candidate on its windows; the flow adds the per-batch sums up
(tasks.distributed.shards.combine), reports each score, and the search driver picks and records as
in a local run. Nothing is reported before every shard of a call has returned, so a worker lost
mid-step leaves nothing partial behind: its shard is recomputed, the others' results are kept.

Early abort across shards (`search.exact_scores: false`). No shard knows the global best total, but
every NLL term is non-negative, so a candidate whose sum on ONE shard already exceeds the best
complete global total B can no longer win. A step therefore runs in two rounds: the most promising
candidate (by the previous step's scores) is evaluated exactly on all shards, which gives B; then
the other candidates go out with B as their bound, and each shard stops a candidate once its own
running sum passes B. The winner's total is at most B, so no shard ever stops it: the chosen block
is the local one. A candidate stopped on any shard is stored as a lower bound (the sum of what every
shard evaluated); which candidates stop, and their bounds, depend on the shard layout, as the local
ones depend on the order candidates are tried. With a known exact score (resume) B needs no first round.

Racing (`search.mode: racing`): the race (tasks.score.racing.Racer) runs here, in the flow. Each round is
one call: the shards holding that round's micro-batches evaluate the candidates still racing on them
and return per-window NLLs; the flow looks, drops, and sends the next round. The windows, order and
looks are the local race's, so the choices, scores and left candidates are the same floats.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from tasks.distributed.shards import ShardResult, combine
from tasks.score.base import CandidateScore, OnScore, score_streamed
from tasks.score.prefix_reuse import WorkCounter
from tasks.score.racing import Race, Racer


class ShardBackend(Protocol):
    def run(self, removed: tuple[str, ...], candidates: tuple[str, ...], bound: float,
            batches: tuple[int, ...] = ()) -> list[ShardResult]:
        """Every shard's result for these candidates, one per shard, once all have finished; with
        `batches` (a race's round) only the shards holding those micro-batches, per window."""


class DistributedScorer:
    def __init__(self, backend: ShardBackend, n_predictions: int, exact: bool, racer: Racer | None = None):
        self.backend = backend
        self.n_predictions = n_predictions
        self.exact = exact
        self.racer = racer
        self.work = WorkCounter()
        self.rounds = 0  # calls to the backend: one per step when exact, two with early abort
        self._previous: dict[str, float] = {}

    def _round(
        self, removed: set[str], blocks: list[str], bound: float
    ) -> tuple[dict[str, CandidateScore], dict[str, float]]:
        """Scores of `blocks` and their NLL totals (the bound is taken from a total, not from exp/log)."""
        results = self.backend.run(tuple(sorted(removed)), tuple(blocks), bound)
        self.rounds += 1
        self.work.unit_windows += sum(r.unit_windows for r in results)
        self.work.head_windows += sum(r.head_windows for r in results)
        self.work.stored_bytes = max(self.work.stored_bytes, sum(r.stored_bytes for r in results))
        scores, totals = {}, {}
        for block in blocks:
            combined = combine(block, results)
            scores[block] = CandidateScore(
                block=block,
                value=math.exp(combined.total / self.n_predictions),
                n_tokens=combined.tokens,
                seconds=combined.seconds,
                exact=combined.complete,
            )
            totals[block] = combined.total
        return scores, totals

    def score(
        self, removed: set[str], candidates: list[str], known: dict[str, CandidateScore], on_score: OnScore,
        race: Race | None = None,
    ) -> dict[str, CandidateScore]:
        if race is not None:
            return self.score_groups(removed, {c: (c,) for c in candidates}, known, on_score, race)
        results = {c: known[c] for c in candidates if c in known}
        todo = [c for c in candidates if c not in results]
        if todo:
            # Most promising first, as the local scorer: the first round's bound is then tight.
            todo.sort(key=lambda c: (self._previous.get(c, math.inf), candidates.index(c)))
            fresh: dict[str, CandidateScore] = {}
            if self.exact:
                fresh, _ = self._round(removed, todo, math.inf)
            else:
                best = min(
                    (math.log(s.value) * self.n_predictions for s in results.values() if s.exact), default=math.inf
                )
                rest = todo
                if best == math.inf:
                    fresh, totals = self._round(removed, todo[:1], math.inf)
                    best = totals[todo[0]]
                    rest = todo[1:]
                if rest:
                    fresh.update(self._round(removed, rest, best)[0])
            for block in todo:
                results[block] = fresh[block]
                on_score(fresh[block])
        self._previous = {c: s.value for c, s in results.items()}
        return results

    def current_perplexity(self, removed: set[str]) -> float:
        """Calibration perplexity of the current model, summed over the shards as candidates are."""
        return math.exp(combine("", self.backend.run(tuple(sorted(removed)), ("",), math.inf)).total
                        / self.n_predictions)

    def score_groups(self, removed: set[str], groups: dict[str, tuple[str, ...]], known: dict[str, CandidateScore],
                     on_score: OnScore, race: Race = Race()) -> dict[str, CandidateScore]:
        """A race (search.mode: racing) over candidates that each drop a group of blocks, round by round."""
        if self.racer is None:
            raise ValueError("this distributed scorer was made without racing options: it cannot race")
        wire = {name: "+".join(group) for name, group in groups.items()}
        wire[""] = ""  # the current model (ppl_per_param's baseline)
        back = {v: k for k, v in wire.items()}

        def evaluate(names: list[str], indices: list[int]) -> dict[str, tuple[dict[int, torch.Tensor], float]]:
            results = self.backend.run(tuple(sorted(removed)), tuple(wire[n] for n in names), math.inf,
                                       tuple(sorted(indices)))
            self.rounds += 1
            self.work.unit_windows += sum(r.unit_windows for r in results)
            self.work.head_windows += sum(r.head_windows for r in results)
            self.work.stored_bytes = max(self.work.stored_bytes, sum(r.stored_bytes for r in results))
            out: dict[str, tuple[dict[int, torch.Tensor], float]] = {name: ({}, 0.0) for name in names}
            for result in results:
                for sent, part in result.candidates.items():
                    per_batch, seconds = out[back[sent]]
                    for index, values in zip(part.batches, part.windows):
                        per_batch[index] = torch.tensor(values, dtype=torch.float64)
                    out[back[sent]] = (per_batch, seconds + part.seconds)
            return out

        return score_streamed(list(groups), known, on_score, lambda todo: self.racer.run(todo, race, evaluate))
