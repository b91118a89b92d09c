"""Metrics read from hidden states: one forward pass of the current model scores every candidate.

A block's input is the residual stream entering its first remaining unit and its output the stream
leaving its last one, so a layer whose attention half was removed earlier is measured on what is left.
Each metric is a per-token statistic of (input, output), averaged over every token of every window
(ShortGPT, LLM-Drop and Siddiqui et al. all average over tokens).
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn

from tasks.residual import ResidualRunner, Unit
from tasks.score.base import CandidateScore, Metric, OnScore, ScoringOptions, score_all_at_once
from tasks.score.prefix_reuse import WorkCounter
from tasks.surgery import units_of


def spans(active: list[Unit], blocks: list[str]) -> dict[str, tuple[int, int]]:
    """Per block, the index in `active` of its first unit and one past its last (its units must be adjacent)."""
    index = {unit.id: i for i, unit in enumerate(active)}
    out: dict[str, tuple[int, int]] = {}
    for block in blocks:
        positions = sorted(index[u] for u in units_of([block]) if u in index)
        if not positions:
            raise ValueError(f"block '{block}' has no unit left in the model: it was already removed")
        if positions != list(range(positions[0], positions[-1] + 1)):
            raise ValueError(f"the units of '{block}' are not adjacent in the model, so it has no single input")
        out[block] = (positions[0], positions[-1] + 1)
    return out


def segment_bounds(active: list[Unit], blocks: tuple[str, ...]) -> tuple[int, int]:
    """The span of a run of blocks that follow each other in the model (a segment of consecutive layers)."""
    parts = list(spans(active, list(blocks)).values())
    if any(a[1] != b[0] for a, b in zip(parts, parts[1:])):
        raise ValueError(f"blocks {', '.join(blocks)} are not consecutive in the model")
    return parts[0][0], parts[-1][1]


def block_io(
    runner: ResidualRunner, batches: list[torch.Tensor], active: list[Unit], where: dict[str, tuple[int, int]],
    work: WorkCounter,
) -> Iterator[tuple[str, int, torch.Tensor, torch.Tensor]]:
    """(block, batch index, the state entering the block, the state leaving it) for every block of `where`
    (spans in `active`) and every micro-batch, as soon as the block's output is known.

    Layer by layer over all micro-batches: each unit runs on every batch before the next unit, so a pass
    reads each layer's weights once (a streamed model, tasks.stream); a block's inputs are kept only
    until its output is known. Every state is the one a batch-by-batch forward computes."""
    starts: dict[int, list[str]] = {}
    ends: dict[int, list[str]] = {}
    for block, (first, end) in where.items():
        starts.setdefault(first, []).append(block)
        ends.setdefault(end, []).append(block)
    hidden = [runner.embed(batch) for batch in batches]
    contexts = [runner.context(h) for h in hidden]
    inputs: dict[str, list[torch.Tensor]] = {}
    for i in range(len(active) + 1):
        inputs.update({block: hidden for block in starts.get(i, [])})
        for block in ends.get(i, []):
            for index, (entering, leaving) in enumerate(zip(inputs.pop(block), hidden)):
                yield block, index, entering, leaving
        if i < len(active):
            hidden = [runner.apply(active[i], h, ctx) for h, ctx in zip(hidden, contexts)]
            work.unit_windows += sum(batch.shape[0] for batch in batches)


def block_sums(
    runner: ResidualRunner, batches: list[torch.Tensor], active: list[Unit], where: dict[str, tuple[int, int]],
    work: WorkCounter, value: Callable[[torch.Tensor, torch.Tensor], float],
) -> dict[str, float]:
    """Per block, `value(input, output)` summed over the micro-batches in batch order (the order fixes the
    floats, whatever order `block_io` yields them in)."""
    per_batch = {block: [0.0] * len(batches) for block in where}
    for block, index, entering, leaving in block_io(runner, batches, active, where, work):
        per_batch[block][index] = value(entering, leaving)
    sums = {}
    for block, values in per_batch.items():
        total = 0.0
        for part in values:
            total += part
        sums[block] = total
    return sums


class BlockStateScorer:
    """Scores every candidate in one pass: mean over tokens of `metric.statistic(input, output)`."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, batch_windows: int, metric: "BlockStateMetric"):
        self.runner = ResidualRunner(model)
        self.batches = [b.contiguous() for b in windows.split(batch_windows)]
        self.metric = metric
        self.work = WorkCounter()

    def score(
        self, removed: set[str], candidates: list[str], known: dict[str, CandidateScore], on_score: OnScore
    ) -> dict[str, CandidateScore]:
        tokens = sum(batch.numel() for batch in self.batches)
        return score_all_at_once(candidates, known, on_score, tokens, lambda todo: self._means(removed, todo, tokens))

    @torch.inference_mode()
    def _means(self, removed: set[str], todo: list[str], tokens: int) -> dict[str, float]:
        active = self.runner.active(removed)
        where = spans(active, todo)
        # float32 at least: the statistics divide by norms that bf16 rounds coarsely.
        sums = block_sums(self.runner, self.batches, active, where, self.work,
                          lambda x, y: float(self.metric.statistic(x.float(), y.float()).double().sum()))
        return {block: sums[block] / tokens for block in todo}


class BlockStateMetric(Metric):
    measures = "block"

    def statistic(self, inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """Per-token value, shape [batch, tokens], of a block that maps `inputs` to `outputs`."""
        raise NotImplementedError

    def scorer(self, model: nn.Module, windows: torch.Tensor, options: ScoringOptions) -> BlockStateScorer:
        return BlockStateScorer(model, windows, options.batch_windows, self)
