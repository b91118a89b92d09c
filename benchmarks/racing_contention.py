"""Racing against exact and bounded modes on shared cores: idle, and beside one competing busy process.

The iterative sublayer search of the first `--steps` blocks, in each mode, with the product's candidate
threads (`execution.parallel_candidates: auto`), on a small trained model (a 12-layer Llama, hidden 128,
briefly trained on a learnable token recurrence, so that blocks differ as in a real model) or the demo's
SmolLM2-135M. Conditions: `idle` (whatever else the machine runs: the load average is recorded) and
`busy`, with one `yes > /dev/null` started and stopped by this script. Within a condition the modes run
round by round in a rotating order, all in this process, and each round's ratios are taken between runs
of that round, so that load changing between rounds cancels out.

The check (issue 36): racing is never slower than exact mode in either condition, beyond `--noise`
(the median of the per-round ratios racing / exact must stay at or below 1 + noise); every ratio is
printed. Writes `benchmarks/results/racing_contention.{md,json}`.

    .venv/bin/python -m benchmarks.racing_contention --model small --sizes 4 32 --steps 4
    .venv/bin/python -m benchmarks.racing_contention --model demo --sizes 4 32 --seq-len 256 --steps 1
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from tasks.score.racing import RacingOptions
from tasks.search import Target, run_search
from tasks.search_stage import parallel_candidates
from tests.searchkit import search_context
from tests.tiny import recurrence_windows

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("exact", "bounded", "racing")
SMALL_VOCAB = 256


@dataclass
class Run:
    model: str
    windows: int
    seq_len: int
    condition: str
    round: int
    mode: str
    seconds: float
    cpu_seconds: float  # this process's CPU time over the run (all its threads)
    load: float  # 1-minute load average at the run's end
    units_per_window: float
    blocks: list[str] = field(default_factory=list)


def small_model(train_steps: int = 60) -> nn.Module:
    """The 12-layer Llama of issue 36 (hidden 128), trained for `train_steps` Adam steps of 16 x 64 tokens of
    a learnable recurrence (tests.tiny.recurrence_windows), so that blocks differ as in a real model."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=SMALL_VOCAB, hidden_size=128, intermediate_size=344, num_hidden_layers=12,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(train_steps):
        batch = recurrence_windows(16, 64, generator, SMALL_VOCAB)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@contextmanager
def condition(name: str) -> Iterator[None]:
    """`busy`: one competing process spinning on a core for the block's duration."""
    if name != "busy":
        yield
        return
    busy = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL)
    try:
        yield
    finally:
        busy.kill()
        busy.wait()


def run_mode(model: nn.Module, windows: torch.Tensor, mode: str, steps: int, parallel: int) -> tuple[float, float, float, list[str]]:
    ctx = search_context(model, windows, target=Target(blocks=steps), exact=mode == "exact",
                         parallel_candidates=parallel, racing=RacingOptions() if mode == "racing" else None)
    start, cpu = time.perf_counter(), time.process_time()
    records = run_search(ctx, "iterative")
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    work = ctx.scorer.work
    return seconds, cpu, (work.unit_windows + work.mass_unit_windows) / windows.shape[0], [r.block for r in records]


def ratios(runs: list[Run], model: str, windows: int, cond: str, mode: str, base: str) -> list[float]:
    """Per round, mode's seconds over base's (the two ran in the same round, back to back)."""
    by = {(r.round, r.mode): r.seconds for r in runs if (r.model, r.windows, r.condition) == (model, windows, cond)}
    return [by[k, mode] / by[k, base] for k, m in by if m == mode and (k, base) in by]


def summary(runs: list[Run]) -> list[dict]:
    rows = []
    for key in dict.fromkeys((r.model, r.windows, r.seq_len, r.condition) for r in runs):
        model, windows, seq_len, cond = key
        mine = [r for r in runs if (r.model, r.windows, r.seq_len, r.condition) == key]
        seconds = {m: statistics.median(r.seconds for r in mine if r.mode == m) for m in MODES
                   if any(r.mode == m for r in mine)}
        picks = {m: next(r.blocks for r in mine if r.mode == m) for m in seconds}
        row = {"model": model, "windows": windows, "seq_len": seq_len, "condition": cond, "seconds": seconds,
               "load": [round(min(r.load for r in mine), 1), round(max(r.load for r in mine), 1)],
               "same_blocks": all(p == picks.get("exact", p) for p in picks.values())}
        for base in ("exact", "bounded"):
            values = ratios(runs, model, windows, cond, "racing", base)
            if values:
                row[f"racing/{base}"] = {"median": statistics.median(values), "rounds": values}
        rows.append(row)
    return rows


def slowdown(rows: list[dict]) -> dict[tuple, float]:
    """Per model, windows and mode: busy seconds over idle seconds (medians; from different rounds)."""
    out = {}
    for row in rows:
        if row["condition"] != "busy":
            continue
        idle = next((r for r in rows if r["condition"] == "idle" and (r["model"], r["windows"]) ==
                     (row["model"], row["windows"])), None)
        for mode, seconds in row["seconds"].items():
            if idle and mode in idle["seconds"]:
                out[row["model"], row["windows"], mode] = seconds / idle["seconds"][mode]
    return out


def table(rows: list[dict]) -> str:
    lines = ["| model | windows x tokens | condition | load (1 min) | exact s | bounded s | racing s | "
             "racing / exact (per round) | racing / bounded (per round) | same blocks |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        def ratio(name: str) -> str:
            if name not in r:
                return "-"
            return f"**{r[name]['median']:.2f}** ({', '.join(f'{v:.2f}' for v in r[name]['rounds'])})"
        s = {m: f"{r['seconds'][m]:.1f}" if m in r["seconds"] else "-" for m in MODES}
        lines.append(f"| {r['model']} | {r['windows']} x {r['seq_len']} | {r['condition']} | "
                     f"{r['load'][0]}-{r['load'][1]} | {s['exact']} | {s['bounded']} | {s['racing']} | "
                     f"{ratio('racing/exact')} | {ratio('racing/bounded')} | {'yes' if r['same_blocks'] else 'NO'} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("small", "demo"), default="small")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 32, 128], help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4, help="blocks the search removes")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--conditions", nargs="+", default=["idle", "busy"], choices=("idle", "busy"))
    parser.add_argument("--noise", type=float, default=0.10, help="racing / exact may exceed 1 by this much")
    parser.add_argument("--out", default=str(RESULTS / "racing_contention"))
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so that the busy process is stopped too

    if args.model == "small":
        model = small_model()
        windows_of = lambda n: recurrence_windows(n, args.seq_len, torch.Generator().manual_seed(1), SMALL_VOCAB)  # noqa: E731
    else:
        from benchmarks.demo_search import load_demo_search

        demo = load_demo_search()
        model = demo.model
        windows_of = lambda n: demo.windows(n, args.seq_len)  # noqa: E731
    parallel = parallel_candidates("auto", "cpu")
    print(f"{args.model}: {parallel} candidate threads, {torch.get_num_threads()} torch threads, "
          f"usable cores {len(os.sched_getaffinity(0))}", flush=True)
    runs: list[Run] = []
    out = Path(args.out)
    for size in args.sizes:
        windows = windows_of(size)
        for cond in args.conditions:
            with condition(cond):
                for number in range(args.rounds):
                    order = args.modes[number % len(args.modes):] + args.modes[:number % len(args.modes)]
                    for mode in order:
                        seconds, cpu, units, blocks = run_mode(model, windows, mode, args.steps, parallel)
                        runs.append(Run(args.model, size, args.seq_len, cond, number, mode, seconds, cpu,
                                        os.getloadavg()[0], units, blocks))
                        print(f"{size:4d} x {args.seq_len} {cond:5s} round {number} {mode:8s} {seconds:7.1f}s "
                              f"cpu {cpu:7.1f}s load {runs[-1].load:5.1f} units/window {units:6.0f} "
                              f"{' '.join(blocks)}", flush=True)
            out.with_suffix(".json").write_text(json.dumps([asdict(r) for r in runs], indent=1))
    rows = summary(runs)
    out.with_suffix(".json").write_text(json.dumps({"runs": [asdict(r) for r in runs], "summary": rows}, indent=1))
    lines = [table(rows), ""]
    lines += [f"- {model} {size} windows, {mode}: busy / idle {value:.2f} (medians of different rounds)"
              for (model, size, mode), value in slowdown(rows).items()]
    failed = []
    for row in rows:
        value = row.get("racing/exact", {}).get("median")
        if value is not None:
            verdict = "ok" if value <= 1 + args.noise else "SLOWER"
            lines.append(f"- racing / exact, {row['model']} {row['windows']} x {row['seq_len']} {row['condition']}: "
                         f"{value:.2f} ({verdict}; bound 1 + {args.noise})")
            failed += [row] if verdict != "ok" else []
    command = (f".venv/bin/python -m benchmarks.racing_contention --model {args.model} --sizes "
               f"{' '.join(map(str, args.sizes))} --seq-len {args.seq_len} --steps {args.steps} --rounds {args.rounds}")
    out.with_suffix(".md").write_text(
        f"# Racing on shared cores\n\n{args.model} model, iterative sublayer search of {args.steps} block(s), "
        f"{parallel} candidate threads; per condition the modes ran round by round in one process "
        f"({args.rounds} round(s)).\n\n```\n{command}\n```\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
