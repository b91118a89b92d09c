"""Search speed: the naive BlockPruner loop against pruneflow's prefix-reuse scorer, exact and early-abort.

All three searches run side by side in one process on the same model and windows, so they share
whatever else the machine is doing at the time; compare ratios, not absolute seconds, across runs.

    .venv/bin/python -m benchmarks.search_speed                # tiny random llama, then SmolLM2-135M
    .venv/bin/python -m benchmarks.search_speed --skip-real    # tiny model only (seconds)

Writes benchmarks/results/search_speed.md and .json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

from benchmarks.naive_search import naive_search
from benchmarks.naive_search import window_nll as hf_window_nll
from tasks.residual import ResidualRunner
from tasks.score.vocab_bound import VocabBound, subset_rows
from tasks.score import ScoringOptions
from tasks.search import (MetricChoice, Scoring, SearchContext, SearchGoal, SearchLog, SearchRules, Target,
                          run_search)
from tasks.surgery import layer_ids
from tasks.search_stage import parallel_candidates

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 1024 * 1024


# --- machine --------------------------------------------------------------------------------------
def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu_model": cpu,
        "logical_cores": os.cpu_count(),
        "cores_usable_by_process": usable,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "dtype": "float32",
        "load_average_1_5_15": list(os.getloadavg()),
    }


def _mm_seconds(m: int, k: int, n: int, repeats: int) -> list[float]:
    a, b, out = torch.randn(m, k), torch.randn(k, n), torch.empty(m, n)
    for _ in range(3):
        torch.mm(a, b, out=out)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - start)
    return times


def _side_by_side_gflops(m: int, k: int, n: int, repeats: int, threads: int) -> float:
    """Aggregate rate of `threads` matmuls at once, one torch thread each (as parallel candidates run)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        workers = [threading.Thread(target=_mm_seconds, args=(m, k, n, repeats)) for _ in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(before)
    return threads * (repeats + 3) * 2.0 * m * k * n / elapsed / 1e9


def matmul_rate(repeats: int = 20) -> dict:
    """The machine's best fp32 matmul rate, the one the floor is computed with: the best repeat over a
    square matmul and the shapes a search runs (a window through the head and through an MLP), at the
    process's thread count and side by side on one thread each."""
    shapes = {"1024x1024x1024": (1024, 1024, 1024), "head 255x576x49152": (255, 576, 49152),
              "mlp 256x576x1536": (256, 576, 1536)}
    rates = {}
    for name, (m, k, n) in shapes.items():
        times = _mm_seconds(m, k, n, repeats)
        flops = 2.0 * m * k * n
        rates[name] = {"best_gflops": flops / min(times) / 1e9, "median_gflops": flops / statistics.median(times) / 1e9}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cores > 1:
        for name in ("head 255x576x49152", "mlp 256x576x1536"):
            m, k, n = shapes[name]
            rates[f"{name}, {cores} side by side"] = {"best_gflops": _side_by_side_gflops(m, k, n, 5, cores)}
    best_name = max(rates, key=lambda name: rates[name]["best_gflops"])
    return {"shapes": rates, "best_shape": best_name, "best_gflops": rates[best_name]["best_gflops"]}


# --- memory ---------------------------------------------------------------------------------------
def rss_now() -> int:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def peak_rss() -> int:
    # ru_maxrss is KiB on Linux; it is the process high-water mark, so later runs inherit earlier peaks.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RssSampler(threading.Thread):
    """Samples the current RSS, so each search gets its own peak despite sharing one process."""

    def __init__(self, interval: float = 0.02):
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = 0
        self._halt = threading.Event()

    def reset(self) -> int:
        start = rss_now()
        self.peak = start
        return start

    def run(self) -> None:
        while not self._halt.is_set():
            self.peak = max(self.peak, rss_now())
            time.sleep(self.interval)

    def stop(self) -> None:
        self._halt.set()


# --- what one model costs, piece by piece ---------------------------------------------------------
def _best_of(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@torch.inference_mode()
def piece_times(model, windows: torch.Tensor, repeats: int) -> dict:
    """Seconds for one window: a full HF forward (+ loss), each unit kind, and the head (+ loss).

    These convert pruneflow's work counters into forward-equivalents; best-of-N because other
    processes share the CPU and only ever make a repeat slower.
    """
    runner = ResidualRunner(model)
    window = windows[:1]
    n_layers = len(runner.layers)

    full = _best_of(lambda: hf_window_nll(model, windows[0]), repeats)

    attn_best, mlp_best = math.inf, math.inf
    last_hidden = None
    for _ in range(repeats):
        hidden = runner.embed(window)
        ctx = runner.context(hidden)
        attn = mlp = 0.0
        for unit in runner.units:
            start = time.perf_counter()
            hidden = runner.apply(unit, hidden, ctx)
            elapsed = time.perf_counter() - start
            if unit.part == "attn":
                attn += elapsed
            else:
                mlp += elapsed
        attn_best, mlp_best = min(attn_best, attn), min(mlp_best, mlp)
        last_hidden = hidden
    head = _best_of(lambda: runner.window_nll(last_hidden, window), repeats)
    # The vocabulary-subset bound, with the rows the dense model's own predictions pick.
    mass = torch.zeros(runner.adapter.lm_head(model).weight.shape[0])
    runner.window_nll(last_hidden, window, mass)
    rows = subset_rows(mass)
    bound = 0.0
    if rows is not None:
        vocab = VocabBound(runner.adapter, model, rows)
        bound = _best_of(lambda: vocab.window_bounds(last_hidden, window), repeats)

    unit = (attn_best + mlp_best) / (2 * n_layers)
    return {
        "full_forward_s": full,
        "attn_unit_s": attn_best / n_layers,
        "mlp_unit_s": mlp_best / n_layers,
        "unit_s": unit,
        "head_s": head,
        "unit_fraction": unit / full,
        "head_fraction": head / full,
        "bound_rows": 0 if rows is None else len(rows),
        "bound_s": bound,
        "bound_fraction": bound / full,
        # How much of a full HF forward the pieces account for; the rest is HF overhead (mask, rope, glue).
        "pieces_over_full": (2 * n_layers * unit + head) / full,
    }


def flops_per_window(config, seq_len: int) -> dict:
    """Matmul FLOPs of one window through each piece (2 per multiply-add).

    Attention scores count the causal half only (mean context (T+1)/2), the cheapest a kernel can do,
    so the floor stays a lower bound. The head covers the T-1 predicted positions that pruneflow
    scores; a plain HF forward projects all T positions.
    """
    d = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    ff = config.intermediate_size
    vocab = config.vocab_size
    t = seq_len
    projections = 2 * d * heads * head_dim * 2 + 2 * d * kv_heads * head_dim * 2
    scores = 2 * 2 * heads * head_dim * (t + 1) / 2
    return {
        "attn_unit": t * (projections + scores),
        "mlp_unit": t * 2 * 3 * d * ff,
        "head_scored": (t - 1) * 2 * d * vocab,
        "head_full": t * 2 * d * vocab,
        "vocab": vocab,
    }


# --- the three searches ---------------------------------------------------------------------------
@dataclass
class Run:
    method: str
    wall_s: float
    blocks: list[str]
    values: list[float]
    scores: dict[int, dict[str, dict]]  # step -> block -> {value, exact, n_tokens, seconds}
    rss_start: int
    rss_peak: int
    process_peak: int
    forwards: int | None = None
    load_before: list[float] = field(default_factory=list)
    load_after: list[float] = field(default_factory=list)
    unit_windows: int = 0
    head_windows: int = 0
    bound_windows: int = 0
    bound_rows: int = 0
    mass_windows: int = 0
    mass_unit_windows: int = 0
    parallel: int = 1
    prefix_s: list[float] = field(default_factory=list)
    attn_windows: int = 0
    mlp_windows: int = 0
    stored_bytes: int = 0
    step_wall_s: list[float] = field(default_factory=list)


def run_naive(model, windows, steps, sampler) -> Run:
    start_rss = sampler.reset()
    start = time.perf_counter()
    result = naive_search(model, windows, steps)
    wall = time.perf_counter() - start
    return Run(
        method="naive",
        wall_s=wall,
        blocks=result.blocks,
        values=[s.value for s in result.steps],
        scores={
            s.step: {b: {"value": v, "exact": True, "seconds": s.seconds[b]} for b, v in s.scores.items()}
            for s in result.steps
        },
        rss_start=start_rss,
        rss_peak=sampler.peak,
        process_peak=peak_rss(),
        forwards=result.forwards,
        step_wall_s=[sum(s.seconds.values()) for s in result.steps],
    )


def count_unit_kinds(runner: ResidualRunner) -> dict:
    """Wraps the runner's apply to split unit applications by kind; the scorer's counter does not.
    Candidates may run on several threads, hence the lock."""
    counts = {"attn": 0, "mlp": 0}
    apply = runner.apply
    lock = threading.Lock()

    def counted(unit, hidden, ctx):
        with lock:
            counts[unit.part] += hidden.shape[0]
        return apply(unit, hidden, ctx)

    runner.apply = counted
    return counts


def run_pruneflow(model, windows, steps, exact, sampler, parallel: int = 1) -> Run:
    scores: dict[int, dict[str, dict]] = {}
    marks: list[float] = []
    prefix: list[float] = []

    def on_score(step, score):
        scores.setdefault(step, {})[score.block] = {
            "value": score.value,
            "exact": score.exact,
            "n_tokens": score.n_tokens,
            "seconds": score.seconds,
        }

    def on_step(step, _scores, _record):
        marks.append(time.perf_counter())
        prefix.append(ctx.scorer.work.prefix_seconds - sum(prefix))

    start_rss = sampler.reset()
    start = time.perf_counter()
    choice = MetricChoice("perplexity", options=ScoringOptions(batch_windows=1, exact=exact), parallel=parallel)
    goal = SearchGoal.of(model, SearchRules.of(layer_ids(model), "sublayer"), Target(blocks=steps))
    ctx = SearchContext(model, goal, Scoring(model, windows, choice, "sublayer"), SearchLog(on_step=on_step, on_score=on_score))
    kinds = count_unit_kinds(ctx.scorer.runner)
    records = run_search(ctx, "iterative")
    wall = time.perf_counter() - start
    work = ctx.scorer.work
    if kinds["attn"] + kinds["mlp"] != work.unit_windows + work.mass_unit_windows:
        raise AssertionError(f"unit counts disagree: {kinds} vs {work}")
    return Run(
        method="pruneflow exact" if exact else "pruneflow early-abort",
        wall_s=wall,
        blocks=[r.block for r in records],
        values=[r.value for r in records],
        scores=scores,
        rss_start=start_rss,
        rss_peak=sampler.peak,
        process_peak=peak_rss(),
        unit_windows=work.unit_windows,
        head_windows=work.head_windows,
        bound_windows=work.bound_windows,
        bound_rows=work.bound_rows,
        mass_windows=work.mass_windows,
        mass_unit_windows=work.mass_unit_windows,
        parallel=parallel,
        prefix_s=prefix,
        attn_windows=kinds["attn"],
        mlp_windows=kinds["mlp"],
        stored_bytes=work.stored_bytes,
        step_wall_s=[b - a for a, b in zip([start, *marks], marks)],
    )


# --- analysis -------------------------------------------------------------------------------------
def forward_equivalents(run: Run, pieces: dict) -> float:
    if run.forwards is not None:
        return float(run.forwards)
    return (
        (run.unit_windows + run.mass_unit_windows) * pieces["unit_fraction"]
        + (run.head_windows + run.mass_windows) * pieces["head_fraction"]
        + run.bound_windows * pieces.get("bound_fraction", 0.0)
    )


def run_flops(run: Run, flops: dict, n_layers: int, n_windows: int) -> float:
    if run.forwards is None:
        return (
            run.attn_windows * flops["attn_unit"]
            + run.mlp_windows * flops["mlp_unit"]
            + (run.head_windows + run.mass_windows) * flops["head_scored"]
            + run.bound_windows * flops["head_scored"] * run.bound_rows / flops["vocab"]
        )
    # Naive: each candidate of step s runs every unit except the s removed ones and itself, all T logits.
    total = 0.0
    removed: list[str] = []
    for step in sorted(run.scores):
        for block in run.scores[step]:
            gone = [*removed, block]
            attn = n_layers - sum(b.endswith(".attn") for b in gone)
            mlp = n_layers - sum(b.endswith(".mlp") for b in gone)
            total += n_windows * (attn * flops["attn_unit"] + mlp * flops["mlp_unit"] + flops["head_full"])
        removed.append(run.blocks[step])
    return total


def compare(runs: list[Run]) -> list[str]:
    """Problems with the picks; each names the step and both candidates' values in every run."""
    problems = []
    reference = runs[0]
    for other in runs[1:]:
        for step, (a, b) in enumerate(zip(reference.blocks, other.blocks)):
            if a == b:
                continue
            lines = [f"step {step}: {reference.method} picked {a}, {other.method} picked {b}"]
            for run in (reference, other):
                for block in (a, b):
                    entry = run.scores.get(step, {}).get(block)
                    if entry:
                        flag = "" if entry["exact"] else " (lower bound)"
                        lines.append(f"    {run.method:22s} {block:16s} {entry['value']:.10g}{flag}")
            problems.append("\n".join(lines))
            break  # later steps search different models, so only the first divergence means anything
        if len(reference.blocks) != len(other.blocks):
            problems.append(f"{other.method} made {len(other.blocks)} steps, {reference.method} {len(reference.blocks)}")
    return problems


def step_table(runs: list[Run], n_windows: int) -> list[dict]:
    naive, exact, early = runs
    rows = []
    for step, block in enumerate(naive.blocks):
        values = sorted(v["value"] for v in naive.scores[step].values())
        aborted = [b for b, s in early.scores.get(step, {}).items() if not s["exact"]]
        rows.append(
            {
                "step": step,
                "block": block,
                "naive_value": naive.values[step],
                "exact_value": exact.values[step] if step < len(exact.values) else None,
                "early_value": early.values[step] if step < len(early.values) else None,
                "runner_up_gap": (values[1] / values[0] - 1.0) if len(values) > 1 else None,
                "candidates": len(naive.scores[step]),
                "naive_step_s": naive.step_wall_s[step],
                "exact_step_s": exact.step_wall_s[step] if step < len(exact.step_wall_s) else None,
                "exact_prefix_s": exact.prefix_s[step] if step < len(exact.prefix_s) else None,
                "early_step_s": early.step_wall_s[step] if step < len(early.step_wall_s) else None,
                "early_aborted": len(aborted),
                # Per aborted candidate, the windows it never ran.
                "early_windows_saved": sum(
                    n_windows - early.scores[step][b]["n_tokens"] // (exact.scores[step][b]["n_tokens"] // n_windows)
                    for b in aborted
                    if b in exact.scores.get(step, {})
                )
                if step in exact.scores
                else None,
            }
        )
    return rows


def max_score_difference(a: Run, b: Run) -> float:
    """Largest relative difference between two runs' exact scores of the same candidate (same prefix)."""
    worst = 0.0
    for step in a.scores:
        if a.blocks[:step] != b.blocks[:step]:
            break
        for block, entry in a.scores[step].items():
            other = b.scores.get(step, {}).get(block)
            if other and entry["exact"] and other["exact"]:
                worst = max(worst, abs(entry["value"] / other["value"] - 1.0))
    return worst


def step_one_distribution(runs: list[Run]) -> list[dict]:
    naive, exact, early = runs
    rows = []
    for block, entry in sorted(naive.scores[0].items(), key=lambda kv: kv[1]["value"]):
        ex = exact.scores[0][block]
        ea = early.scores[0][block]
        rows.append(
            {
                "block": block,
                "naive": entry["value"],
                "exact": ex["value"],
                "rel_diff": ex["value"] / entry["value"] - 1.0,
                "early": ea["value"],
                "early_exact": ea["exact"],
                "early_tokens": ea["n_tokens"],
                "exact_seconds": ex["seconds"],
                "naive_seconds": entry["seconds"],
            }
        )
    return rows


# --- one case -------------------------------------------------------------------------------------
def bench_case(name, model, windows, steps, sampler, piece_repeats, parallel: int = 1) -> dict:
    print(f"\n=== {name}: {windows.shape[0]} windows x {windows.shape[1]} tokens, {steps} steps ===", flush=True)
    n_layers = len(model.model.layers)
    with torch.inference_mode():
        hf_window_nll(model, windows[0])  # first-call warm-up must not be charged to the naive loop
    pieces = piece_times(model, windows, piece_repeats)
    flops = flops_per_window(model.config, windows.shape[1])
    print("pieces (s per window):", {k: round(v, 5) for k, v in pieces.items()}, flush=True)

    runs = []
    for method in ("naive", "exact", "early"):
        load_before = list(os.getloadavg())
        if method == "naive":
            run = run_naive(model, windows, steps, sampler)
        else:
            run = run_pruneflow(model, windows, steps, method == "exact", sampler, parallel)
        run.load_before, run.load_after = load_before, list(os.getloadavg())
        print(f"{run.method:22s} {run.wall_s:9.2f} s  blocks={run.blocks}", flush=True)
        runs.append(run)

    problems = compare(runs)
    # Step 0 scores the same dense model in every run, so its candidates compare even if later picks diverge.
    distribution = step_one_distribution(runs)
    if distribution:
        print("\nstep 0 candidates, sorted by naive perplexity:")
        for row in distribution:
            mark = "" if row["early_exact"] else f"  aborted after {row['early_tokens']} tokens"
            print(f"  {row['block']:16s} naive={row['naive']:.6g} exact={row['exact']:.6g} "
                  f"rel={row['rel_diff']:+.1e} t={row['exact_seconds']:.3f}s{mark}")

    naive_wall = runs[0].wall_s
    naive_fe = forward_equivalents(runs[0], pieces)
    rows = []
    for run in runs:
        run_flop = run_flops(run, flops, n_layers, windows.shape[0])
        fe = forward_equivalents(run, pieces)
        rows.append(
            {
                "method": run.method,
                "wall_s": run.wall_s,
                "time_vs_naive": run.wall_s / naive_wall,
                "speedup": naive_wall / run.wall_s,
                "blocks": run.blocks,
                "values": run.values,
                "forward_equivalents": fe,
                # The ratio equal load would give; wall-clock ratios also carry the load drift between runs.
                "work_vs_naive": fe / naive_fe,
                "seconds_per_forward_equivalent": run.wall_s / fe,
                "load_before": run.load_before,
                "load_after": run.load_after,
                "forwards": run.forwards,
                "unit_windows": run.unit_windows,
                "attn_windows": run.attn_windows,
                "mlp_windows": run.mlp_windows,
                "head_windows": run.head_windows,
                "bound_windows": run.bound_windows,
                "bound_rows": run.bound_rows,
                "mass_windows": run.mass_windows,
                "mass_unit_windows": run.mass_unit_windows,
                "parallel_candidates": run.parallel,
                # Units only: what any search that runs each candidate's layers to choose exactly must do.
                "body_flops": run.attn_windows * flops["attn_unit"] + run.mlp_windows * flops["mlp_unit"],
                "stored_bytes": run.stored_bytes,
                "rss_start_bytes": run.rss_start,
                "rss_peak_bytes": run.rss_peak,
                "process_peak_rss_bytes": run.process_peak,
                "flops": run_flop,
            }
        )
    return {
        "name": name,
        "model": {
            "layers": n_layers,
            "hidden": model.config.hidden_size,
            "intermediate": model.config.intermediate_size,
            "vocab": model.config.vocab_size,
            "params": sum(p.numel() for p in model.parameters()),
        },
        "windows": list(windows.shape),
        "steps": steps,
        "pieces": pieces,
        "flops_per_window": flops,
        "runs": rows,
        "step_table": step_table(runs, windows.shape[0]),
        "step0_distribution": distribution,
        "max_rel_diff_naive_vs_exact": max_score_difference(runs[0], runs[1]),
        "problems": problems,
        "scores": {run.method: run.scores for run in runs},
    }


# --- report ---------------------------------------------------------------------------------------
def floor_rows(case: dict, rate: dict) -> list[dict]:
    gflops = rate["best_gflops"]
    return [
        {
            "method": r["method"],
            "gflop": r["flops"] / 1e9,
            "floor_s": r["flops"] / 1e9 / gflops,
            "wall_s": r["wall_s"],
            "efficiency": (r["flops"] / 1e9 / gflops) / r["wall_s"],
        }
        for r in case["runs"]
    ]


def fmt_load(values) -> str:
    return "/".join(f"{v:.1f}" for v in values) if values else "n/a"


def markdown(report: dict) -> str:
    m = report["machine"]
    rate = report["matmul"]
    out = [
        "# Search speed: naive BlockPruner loop vs pruneflow",
        "",
        ("Produced by `python -m benchmarks.search_speed` (see benchmarks/README.md). All three searches ran "
        "side by side in ONE process, one after the other, on the same model and windows; the load averages "
        "below show what else the machine was doing. Ratios within a case are the point."),
        "",
        (f"Machine: {m['cpu_model']}, {m['logical_cores']} logical cores ({m['cores_usable_by_process']} usable), "
        f"torch {m['torch']} ({m['torch_threads']} threads), transformers {m['transformers']}, "
        f"Python {m['python']}, fp32, `torch.inference_mode()`. fp32 matmul, best GFLOP/s by shape: "
        + ", ".join(f"{name} {r['best_gflops']:.1f}" for name, r in rate.get("shapes", {}).items())
        + f"; the floor uses the best, {rate['best_gflops']:.1f} ({rate.get('best_shape', '1024 square')}). "
        f"Load average (1/5/15 min) at start {fmt_load(m['load_average_1_5_15'])}, at end "
        f"{fmt_load(report.get('load_average_at_end'))}."),
        "",
        *(
            [
                (f"Threads were set with `--threads {report['args']['threads']}`: with another job busy on this "
                "machine's cores, torch's default of one thread per core leaves OpenMP barriers waiting on "
                "descheduled threads, which slows every method several times over and swamps the comparison."),
                "",
            ]
            if report["args"].get("threads")
            else []
        ),
        "Definitions:",
        "",
        ("- *naive*: one Hugging Face forward per window per candidate, skipped halves swapped for zero modules "
        "(benchmarks/naive_search.py). *pruneflow exact*: `SearchContext` with exact scoring, iterative, "
        "sublayer, batch_windows=1, `parallel_candidates` as in the table (candidates side by side, one torch "
        "thread each). *early-abort*: the same with `exact=False` (vocabulary-subset bounds, "
        "then the exact head only for candidates that can still win; tasks/score/vocab_bound.py)."),
        ("- *forward-equivalents* (FE): naive = full forwards of one window. pruneflow = unit_windows x "
        "(t_unit / t_full) + head_windows x (t_head / t_full), with t_full = one HF forward of one window "
        "plus its loss, t_unit = mean time of one residual unit on one window (all 2L units timed once, "
        "divided by 2L), t_head = final norm + lm_head + loss on one window; all best-of-N on this model. "
        "Bounded windows add bound_windows x (t_bound / t_full), t_bound = one window's subset bound."),
        ("- *RSS rise*: peak current RSS sampled every 20 ms during that search minus RSS at its start. "
        "*process peak*: `getrusage` high-water mark after that search (cumulative over the process)."),
        ("- *compute floor*: matmul FLOPs implied by the work (projections, causal half of the attention "
        "scores, MLP, lm_head; attention vs MLP applications counted by wrapping the runner) divided by the "
        "best matmul rate above."),
        "",
    ]
    for case in report["cases"]:
        p = case["pieces"]
        mm = case["model"]
        out += [
            f"## {case['name']}",
            "",
            (f"{mm['layers']} layers, hidden {mm['hidden']}, MLP {mm['intermediate']}, vocab {mm['vocab']}, "
            f"{mm['params'] / 1e6:.2f} M params; {case['windows'][0]} windows x {case['windows'][1]} tokens; "
            f"{case['steps']} steps."),
            "",
            ("| method | side by side | wall s | time / naive | speedup | forward-equiv. | work / naive | s per FE | "
            "unit_windows | head_windows | bound_windows | stored MiB | RSS rise MiB | process peak MiB | load 1 min before/after |"),
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in case["runs"]:
            out.append(
                f"| {r['method']} | {r.get('parallel_candidates', 1) if r['forwards'] is None else '-'} | {r['wall_s']:.2f} | {r['time_vs_naive']:.3f} | {r['speedup']:.2f}x | "
                f"{r['forward_equivalents']:.1f} | {r['forward_equivalents'] / case['runs'][0]['forward_equivalents']:.3f} | "
                f"{r['wall_s'] / r['forward_equivalents']:.3f} | {r['unit_windows']} | {r['head_windows']} | {r.get('bound_windows', 0)} | "
                f"{r['stored_bytes'] / MIB:.1f} | {(r['rss_peak_bytes'] - r['rss_start_bytes']) / MIB:.1f} | "
                f"{r['process_peak_rss_bytes'] / MIB:.0f} | {fmt_load(r.get('load_before', [])[:1])} / "
                f"{fmt_load(r.get('load_after', [])[:1])} |"
            )
        out += [
            "",
            ("*work / naive* is the time ratio equal load would give (forward-equivalents over naive's); "
            "*s per FE* = wall / forward-equivalents, whose rise from run to run is load from other jobs, "
            "not the method."),
        ]
        out += ["", "Chosen blocks (identical in all three runs unless listed under Problems):", ""]
        for row in case["step_table"]:
            out.append(
                f"- step {row['step']}: `{row['block']}` ppl {row['naive_value']:.6g} (naive) / "
                f"{row['exact_value']:.6g} (exact) / {row['early_value']:.6g} (early-abort); runner-up "
                f"{100 * row['runner_up_gap']:.2f}% worse; {row['candidates']} candidates"
            )
        out += [
            "",
            (f"Largest relative difference between a naive and a pruneflow-exact score of the same candidate: "
            f"{case['max_rel_diff_naive_vs_exact']:.2e}."),
            "",
            "Per step (seconds; *prefix* = the exact run's time bringing entry states up to date):",
            "",
            "| step | naive | exact | exact prefix | early-abort | aborted candidates | windows saved |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in case["step_table"]:
            out.append(
                f"| {row['step']} | {row['naive_step_s']:.2f} | {row['exact_step_s']:.2f} | "
                f"{row['exact_prefix_s']:.2f} | {row['early_step_s']:.2f} | {row['early_aborted']} | "
                f"{row['early_windows_saved']} |"
            )
        out += [
            "",
            "Cost of the pieces, one window (best of N):",
            "",
            (f"- full HF forward + loss {p['full_forward_s'] * 1e3:.2f} ms; attention unit "
            f"{p['attn_unit_s'] * 1e3:.3f} ms; MLP unit {p['mlp_unit_s'] * 1e3:.3f} ms; head + loss "
            f"{p['head_s'] * 1e3:.2f} ms"),
            (f"- unit fraction {p['unit_fraction']:.4f}, head fraction {p['head_fraction']:.4f}; "
            f"2L units + head = {p['pieces_over_full']:.2f} of a full forward"),
            *(
                [f"- vocabulary-subset bound: {p['bound_rows']} rows, {p['bound_s'] * 1e3:.2f} ms per window "
                 f"({p['bound_s'] / p['head_s']:.3f} of the head)"]
                if p.get("bound_rows") else ["- vocabulary-subset bound: not used (predictions too flat)"]
            ),
            "",
            "Compute floor (FLOPs / best matmul rate) vs measured:",
            "",
            "| method | GFLOP | floor s | wall s | floor / wall |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in floor_rows(case, report["matmul"]):
            out.append(
                f"| {r['method']} | {r['gflop']:.1f} | {r['floor_s']:.2f} | {r['wall_s']:.2f} | {r['efficiency']:.2f} |"
            )
        exact_run = case["runs"][1]
        if "body_flops" in exact_run:
            share = exact_run["body_flops"] / case["runs"][0]["flops"]
            out += [
                "",
                (f"The layers alone of every candidate, from its entry point on (exact run, no head): "
                f"{exact_run['body_flops'] / 1e9:.1f} GFLOP, {share:.3f} of naive's FLOPs. A search that chooses "
                f"exactly must run each candidate's layers on the windows it needs to rule that candidate out, "
                f"so at naive's FLOP rate no such search is more than {1 / share:.2f}x faster here, however cheap "
                f"its head."),
            ]
        if case["step0_distribution"]:
            out += [
                "",
                "Step 0 candidates sorted by perplexity (early-abort: lower bound when aborted):",
                "",
                "| block | naive | exact | rel diff | early-abort | tokens scored (early) | exact s |",
                "|---|---:|---:|---:|---:|---:|---:|",
            ]
            for row in case["step0_distribution"]:
                early = f"{row['early']:.6g}" + ("" if row["early_exact"] else " (bound)")
                out.append(
                    f"| {row['block']} | {row['naive']:.6g} | {row['exact']:.6g} | {row['rel_diff']:+.1e} | "
                    f"{early} | {row['early_tokens']} | {row['exact_seconds']:.3f} |"
                )
        out += ["", "Problems: " + ("none" if not case["problems"] else ""), ""]
        out += [f"```\n{p}\n```" for p in case["problems"]]
        out.append("")
    return "\n".join(out)


def write(report: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "search_speed.json").write_text(json.dumps(report, indent=1))
    (RESULTS / "search_speed.md").write_text(markdown(report))


# --- main -----------------------------------------------------------------------------------------
def tiny_case(args, sampler) -> dict:
    from tests.tiny import tiny_model, tiny_windows

    model = tiny_model("llama", layers=args.tiny_layers)
    windows = tiny_windows(args.tiny_samples, args.tiny_seq_len)
    return bench_case("tiny random llama", model, windows, args.steps, sampler, piece_repeats=50,
                      parallel=args.parallel_resolved)


def real_case(args, sampler) -> dict:
    from transformers import AutoTokenizer

    from tasks.sources import load_texts, resolve_model
    from tasks.surgery import load_model
    from tasks.windows import sample_windows, tokenize_stream

    path = resolve_model("builtin:smollm2-135m").path
    model = load_model(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    stream = tokenize_stream(load_texts("builtin:wiki-vital-en", "calibration"), tokenizer)
    windows = sample_windows(stream, args.seq_len, args.samples, 0)
    return bench_case("SmolLM2-135M", model, windows, args.steps, sampler, piece_repeats=5,
                      parallel=args.parallel_resolved)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--samples", type=int, default=4, help="calibration windows (real model)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window (real model)")
    parser.add_argument("--skip-real", action="store_true", help="tiny random model only")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch intra-op threads (default: torch's choice); on a shared machine use fewer than the "
        "cores other jobs leave free, or OpenMP barriers wait on descheduled threads",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="re-render the markdown from the saved JSON, run nothing"
    )
    parser.add_argument(
        "--parallel", default="auto",
        help="pruneflow's execution.parallel_candidates: an integer, or auto (one per usable core, at most 4)",
    )
    parser.add_argument("--tiny-layers", type=int, default=6)
    parser.add_argument("--tiny-samples", type=int, default=4)
    parser.add_argument("--tiny-seq-len", type=int, default=64)
    args = parser.parse_args(argv)

    if args.report_only:
        write(json.loads((RESULTS / "search_speed.json").read_text()))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    args.parallel_resolved = parallel_candidates(
        args.parallel if args.parallel == "auto" else int(args.parallel), "cpu"
    )
    torch.set_grad_enabled(False)
    sampler = RssSampler()
    sampler.start()
    report = {"machine": machine(), "matmul": matmul_rate(), "args": vars(args), "cases": []}
    print("machine:", report["machine"], "\nmatmul:", report["matmul"], flush=True)

    report["cases"].append(tiny_case(args, sampler))
    write(report)
    if not args.skip_real:
        report["cases"].append(real_case(args, sampler))
        write(report)
    sampler.stop()
    report["load_average_at_end"] = list(os.getloadavg())
    write(report)

    problems = [p for case in report["cases"] for p in case["problems"]]
    if problems:
        print("\n" + "!" * 78, file=sys.stderr)
        print("CHOSEN BLOCKS DIFFER between naive and pruneflow:", file=sys.stderr)
        for p in problems:
            print(p, file=sys.stderr)
        print("!" * 78, file=sys.stderr)
        return 1
    print(f"\nwrote {RESULTS.name}/search_speed.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
