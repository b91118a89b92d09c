"""Shard layout and the exact combination of shard results.

A shard is a contiguous run of the step's fixed micro-batches (`score.batch_windows` windows each). A
worker returns, per candidate, the NLL sum of every micro-batch it evaluated, not one total: the flow
adds the per-batch sums in global batch order, starting from 0.0, exactly as the local scorer adds
them, so a candidate's total is the same float however many shards the windows were split into.
"""

from __future__ import annotations

from dataclasses import dataclass

# Metrics whose scorer can be sharded by windows (per-window sums that add up to the score).
DISTRIBUTED_METRICS: tuple[str, ...] = ("perplexity",)


@dataclass(frozen=True)
class Shard:
    index: int
    first_batch: int
    stop_batch: int  # one past the last


def shard_layout(batches: int, shards: int) -> list[Shard]:
    """`batches` micro-batches in at most `shards` contiguous runs whose sizes differ by at most one."""
    if batches < 1 or shards < 1:
        raise ValueError(f"need at least one batch and one shard (got {batches} batches, {shards} shards)")
    count = min(batches, shards)
    base, extra = divmod(batches, count)
    out, start = [], 0
    for index in range(count):
        size = base + (1 if index < extra else 0)
        out.append(Shard(index, start, start + size))
        start += size
    return out


@dataclass(frozen=True)
class CandidateSums:
    """One candidate on one shard: NLL sum per micro-batch evaluated, in order (fewer than the shard's
    batches when it stopped early), the predictions they cover, and the seconds it took."""

    sums: tuple[float, ...]
    tokens: int
    complete: bool
    seconds: float
    # A race's round (search.mode: racing): the global micro-batches evaluated, and each one's per-window NLL.
    batches: tuple[int, ...] = ()
    windows: tuple[tuple[float, ...], ...] = ()


@dataclass(frozen=True)
class ShardResult:
    shard: int
    candidates: dict[str, CandidateSums]
    unit_windows: int
    head_windows: int
    stored_bytes: int
    worker: str = ""  # host:pid of the process that computed it (reports and fault tests)
    seconds: float = 0.0  # the whole job on the worker: model load, entry states, candidates


@dataclass(frozen=True)
class Combined:
    total: float
    tokens: int
    complete: bool
    seconds: float


def combine(block: str, results: list[ShardResult]) -> Combined:
    """A candidate's NLL total over all shards (given in shard order), summed batch by batch."""
    total, tokens, complete, seconds = 0.0, 0, True, 0.0
    for result in sorted(results, key=lambda r: r.shard):
        part = result.candidates[block]
        for value in part.sums:
            total += value
        tokens += part.tokens
        complete = complete and part.complete
        seconds += part.seconds
    return Combined(total, tokens, complete, seconds)
