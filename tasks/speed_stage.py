"""Stage `speed`: the dense model and each compared checkpoint (pruned, recovered) timed as they are served,
side by side in one process, round by round (`tasks.speed.alternate`), so that each stage's speed against
dense is the median of per-round ratios with its lowest and highest round (`catalog.speed`).

Checkpoints in a format no runtime serves outside pruneflow (`pruneflow`, `gguf`) are left out. Models that
do not fit in memory together are timed one after the other, each with all its rounds; their ratios then
compare different moments of the machine's load, and the rows say so (`side_by_side` 0).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Mapping

from torch import nn

from catalog.speed import SIDE_BY_SIDE, SpeedRatio
from tasks.evaluation import Evaluation
from tasks.export.registry import format_of
from tasks.speed import Timing, alternate, kv_bytes_per_token, load_for_serving, time_decode, time_prefill
from tasks.stream.budget import budget_bytes
from tasks.stream.open import residency

DENSE = "dense"


@dataclass(frozen=True)
class Workload:
    """One timed task: the rows' `dataset` (batch x tokens), metric, and the tokens one run processes."""

    name: str
    metric: str
    tokens: int
    seq_len: int
    run: Callable[[nn.Module], Timing]

    @property
    def label(self) -> str:
        return f"{self.metric.split('_')[0]} {self.name.removeprefix('batch')}"


@dataclass(frozen=True)
class SpeedSettings:
    prefill_tokens: int = 512
    prefill_batches: tuple[int, ...] = (1, 8)
    decode_prompt: int = 32
    decode_tokens: int = 128
    rounds: int = 3

    @classmethod
    def quick(cls) -> "SpeedSettings":
        """Small enough to run inside a pipeline; enough rounds for a median and a range of ratios."""
        return cls(prefill_tokens=128, prefill_batches=(1,), decode_prompt=16, decode_tokens=32, rounds=5)

    def workloads(self) -> list[Workload]:
        prefill = [Workload(f"batch{b}x{self.prefill_tokens}", "prefill_tokens_per_s", b * self.prefill_tokens,
                            self.prefill_tokens, partial(time_prefill, batch=b, tokens=self.prefill_tokens))
                   for b in self.prefill_batches]
        decode = Workload(f"batch1x{self.decode_tokens}", "decode_tokens_per_s", self.decode_tokens,
                          self.decode_prompt + self.decode_tokens,
                          partial(time_decode, prompt=self.decode_prompt, new_tokens=self.decode_tokens))
        return [*prefill, decode]

    def runs(self, models: int) -> int:
        """Timed runs in all, warm-ups included: what the stage's progress counts."""
        return len(self.workloads()) * models * (self.rounds + 1)


def streamed_stages(paths: Mapping[str, str], dtype: str, device: str, memory_budget: float | str) -> dict[str, str]:
    """Stages whose model is larger than `memory_budget` alone, with why: serving speed needs a model whole on
    its device, so these are not timed (the speed task says so in the run's log)."""
    out = {}
    for stage, path in paths.items():
        plan = residency(path, dtype, device, memory_budget)
        if plan.streams:
            out[stage] = f"not timed: the model streams ({plan.describe()}), and serving needs it whole"
    return out


def fit_together(paths: list[str], dtype: str, device: str, memory_budget: float | str = "auto") -> bool:
    """Whether the models' weights, in `dtype`, fit in `model.memory_budget_gb` together."""
    weights = sum(residency(path, dtype, device, memory_budget).weight_bytes for path in paths)
    return weights <= budget_bytes(memory_budget, device)


class _Counter:
    """Turns `alternate`'s per-run calls into the stage's progress: (done, total, what ran)."""

    def __init__(self, report: Callable[[int, int, str], None] | None, total: int, rounds: int):
        self.report, self.total, self.rounds, self.done = report, total, rounds, 0

    def after(self, workload: Workload) -> Callable[[str, int], None]:
        def tick(stage: str, round_: int) -> None:
            self.done += 1
            if self.report is not None:
                when = "warm-up" if round_ == 0 else f"round {round_}/{self.rounds}"
                self.report(self.done, self.total, f"{workload.label} {when} ({stage})")
        return tick


def speed_stage(paths: Mapping[str, str], dtype: str, device: str, trust_remote_code: bool = False,
                settings: SpeedSettings | None = None, together: bool | None = None,
                on_run: Callable[[int, int, str], None] | None = None,
                memory_budget: float | str = "auto") -> list[Evaluation]:
    """Rows of kind `speed` for every stage in `paths` (stage -> checkpoint) a runtime serves. `together`:
    whether all models are loaded at once and alternate (default: when their weights fit in `memory_budget`,
    `model.memory_budget_gb`, together). `on_run(done, total, detail)` follows every timed run (progress)."""
    served = {stage: str(path) for stage, path in paths.items() if format_of(Path(path)).servable
              and stage not in streamed_stages(paths, dtype, device, memory_budget)}
    if not served:
        return []
    settings = settings or SpeedSettings.quick()
    if together is None:
        together = len(served) == 1 or fit_together(list(served.values()), dtype, device, memory_budget)
    counter = _Counter(on_run, settings.runs(len(served)), settings.rounds)
    load = partial(load_for_serving, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    workloads = settings.workloads()
    timings: list[dict[str, list[Timing]]] = [{} for _ in workloads]  # per workload, per stage: its rounds
    kv: dict[str, float] = {}
    if together:
        models = {stage: load(path) for stage, path in served.items()}
        for w, timed in zip(workloads, timings):
            timed |= alternate({stage: partial(w.run, model) for stage, model in models.items()}, settings.rounds,
                               after=counter.after(w))
        kv = {stage: kv_bytes_per_token(model) for stage, model in models.items()}
    else:
        for stage, path in served.items():
            model = load(path)
            for w, timed in zip(workloads, timings):
                timed |= alternate({stage: partial(w.run, model)}, settings.rounds, after=counter.after(w))
            kv[stage] = kv_bytes_per_token(model)
            del model
    rows = [row for w, timed in zip(workloads, timings) for row in workload_rows(w, timed)]
    for stage in served:
        rows.append(Evaluation(stage, "speed", "-", "kv_bytes_per_token", kv[stage]))
        if stage != DENSE and DENSE in served:
            rows.append(Evaluation(stage, "speed", "-", SIDE_BY_SIDE, float(together)))
    return rows


def workload_rows(workload: Workload, timings: Mapping[str, list[Timing]]) -> list[Evaluation]:
    """Per stage: tokens/s, the median of its rounds, and `<metric>_spread` ((max - min) / median); per
    compared stage, the median, lowest and highest of its per-round ratios to dense (round i of each)."""
    rates = {stage: [workload.tokens / t.wall for t in runs] for stage, runs in timings.items()}
    rows = []
    for stage, values in rates.items():
        median = statistics.median(values)
        row = partial(Evaluation, stage, "speed", workload.name, n_tokens=workload.tokens, seq_len=workload.seq_len,
                      n_samples=len(values))
        rows += [row(workload.metric, median), row(f"{workload.metric}_spread", (max(values) - min(values)) / median)]
        if stage != DENSE and DENSE in rates:
            ratio = SpeedRatio.of([a / b for a, b in zip(values, rates[DENSE], strict=True)])
            rows += [row(metric, value) for metric, value in ratio.metrics(workload.metric).items()]
    return rows
