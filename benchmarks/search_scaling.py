"""How a BlockPruner search step's cost grows with its calibration set: exact, bounded and racing modes.

SmolLM2-135M, sublayer candidates, the iterative strategy, calibration windows of the builtin corpus
(`pipelines/smollm2-blockpruner.yaml`, with `--sizes` windows of `--seq-len` tokens), the first `--steps`
steps of each mode, all in one process so that times compare side by side. The cost that does not depend
on the machine's load is the work counted in model pieces: sub-block applications, exact output heads
and vocabulary-subset bounds, each per calibration window (a forward of SmolLM2 is 60 sub-blocks and
one head). Writes `benchmarks/results/search_scaling.{json,md,png}`.

Bounded mode picks exact mode's blocks by construction (its stored bounds only stop candidates that cannot
win; tests/test_search.py), so where exact mode is too slow to run (`--exact-sizes` leaves it out) the
bounded run is the reference for "same blocks" and for the exact score of the best block.

    .venv/bin/python -m benchmarks.search_scaling --sizes 8 16 32 --seq-len 128 --steps 2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from benchmarks.demo_search import PIPELINE, load_demo_search
from pipelines import load_spec
from tasks.search import SearchContext, SearchLog, run_search

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("exact", "bounded", "racing")


@dataclass
class Row:
    mode: str
    windows: int
    seq_len: int
    seconds: float
    units_per_window: float  # sub-block applications, per calibration window
    heads_per_window: float  # exact output heads, per calibration window
    bounds_per_window: float  # vocabulary-subset bounds (about a tenth of a head each), per window
    blocks: list[str] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    left: int = 0  # candidates that left a race or stopped at a bound


def run_mode(model, windows: torch.Tensor, mode: str, steps: int, racing: tuple[str, ...] = ()) -> Row:
    """`racing`: search.racing settings (key=value) for racing mode, named in the row's mode."""
    # The pipeline names exact_scores: true, which a mode must agree with.
    overrides = [f"search.mode={mode}", f"search.exact_scores={str(mode == 'exact').lower()}",
                 f"search.target.blocks={steps}"]
    if mode == "racing" and racing:
        overrides += [f"search.racing.{setting}" for setting in racing]
        mode = f"racing ({', '.join(racing)})"
    spec = load_spec(PIPELINE, overrides)
    ctx = SearchContext.of(model, windows, spec.score, spec.search, log=SearchLog())
    start = time.perf_counter()
    records = run_search(ctx, "iterative")
    seconds = time.perf_counter() - start
    work = ctx.scorer.work
    n = windows.shape[0]
    left = sum(1 for step in ctx.recorder.scores.values() for s in step.values() if not s.exact)
    return Row(mode, n, windows.shape[1], seconds, (work.unit_windows + work.mass_unit_windows) / n,
               (work.head_windows + work.mass_windows) / n, work.bound_windows / n,
               [r.block for r in records], [r.value for r in records], left)


def exponent(rows: list[Row], mode: str) -> float | None:
    """The slope of log(seconds) against log(calibration windows): 1 is proportional growth."""
    points = [(math.log(r.windows), math.log(r.seconds)) for r in rows if r.mode == mode]
    if len(points) < 2:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


def reference(rows: list[Row], windows: int) -> Row | None:
    """The run whose picks are exact mode's: exact mode's own, else bounded mode's (the same by design)."""
    by_mode = {r.mode: r for r in rows if r.windows == windows}
    return by_mode.get("exact") or by_mode.get("bounded")


def score_gap(row: Row, base: Row) -> str:
    """The largest relative excess of a step's chosen score over the reference's, over the steps whose
    earlier picks agree (a later step's candidates differ once a pick differs)."""
    gaps = []
    for a, b, va, vb in zip(row.blocks, base.blocks, row.values, base.values):
        gaps.append(va / vb - 1)
        if a != b:
            break
    return f"{100 * max(gaps):+.3f}%" if gaps else "-"


def table(rows: list[Row]) -> str:
    lines = ["| windows x tokens | mode | seconds | x faster than exact | x faster than bounded | sub-blocks / window | "
             "heads / window | bounds / window | same blocks as exact | pick's score vs best | left early | blocks |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        by_mode = {x.mode: x for x in rows if x.windows == r.windows}
        base = reference(rows, r.windows)
        speed = {m: f"{by_mode[m].seconds / r.seconds:.2f}" if m in by_mode else "-" for m in ("exact", "bounded")}
        same = "-" if base is None else f"{sum(a == b for a, b in zip(r.blocks, base.blocks))}/{len(base.blocks)}"
        gap = "-" if base is None else score_gap(r, base)
        lines.append(f"| {r.windows} x {r.seq_len} | {r.mode} | {r.seconds:.0f} | {speed['exact']} | {speed['bounded']} | "
                     f"{r.units_per_window:.0f} | {r.heads_per_window:.1f} | {r.bounds_per_window:.1f} | {same} | {gap} | "
                     f"{r.left} | {', '.join(r.blocks)} |")
    lines.append("")
    for mode in dict.fromkeys(r.mode for r in rows):
        slope, work = exponent(rows, mode), work_exponent(rows, mode)
        if slope is not None:
            lines.append(f"- {mode}: time grows as windows^{slope:.2f}, sub-block work as windows^{work:.2f}")
    return "\n".join(lines)


def work_exponent(rows: list[Row], mode: str) -> float | None:
    """Like `exponent`, for the step's sub-block applications (units per window x windows): no load in it."""
    as_time = [Row(r.mode, r.windows, r.seq_len, r.units_per_window * r.windows, 0, 0, 0) for r in rows if r.mode == mode]
    return exponent(as_time, mode)


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode in dict.fromkeys(r.mode for r in rows):
        points = sorted((r.windows * r.seq_len, r.seconds) for r in rows if r.mode == mode)
        if points:
            ax.plot(*zip(*points), marker="o", label=mode)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("calibration tokens")
    ax.set_ylabel("search seconds")
    ax.set_title("BlockPruner search on SmolLM2-135M: time against calibration size")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32], help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--exact-sizes", type=int, nargs="*", default=None,
                        help="sizes at which exact mode runs (default: all of --sizes)")
    parser.add_argument("--racing", nargs="+", default=(), metavar="KEY=VALUE",
                        help="search.racing settings for racing mode, e.g. min_windows=4")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(RESULTS / "search_scaling"))
    parser.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                        help="only write the table and plot of rows measured by earlier runs (one per size)")
    args = parser.parse_args()
    if args.combine:
        rows = [Row(**row) for path in args.combine for row in json.loads(Path(path).read_text())]
        out = Path(args.out)
        out.with_suffix(".json").write_text(json.dumps([asdict(x) for x in rows], indent=1))
        out.with_suffix(".md").write_text("# Search cost against calibration size\n\n" + table(rows) + "\n")
        plot(rows, out.with_suffix(".png"))
        print(table(rows))
        return
    demo = load_demo_search(args.threads)
    rows: list[Row] = []
    out = Path(args.out)
    for size in args.sizes:
        windows = demo.windows(size, args.seq_len)
        for mode in args.modes:
            if mode == "exact" and args.exact_sizes is not None and size not in args.exact_sizes:
                continue
            rows.append(run_mode(demo.model, windows, mode, args.steps, tuple(args.racing)))
            r = rows[-1]
            print(f"{size:4d} x {args.seq_len} {mode:8s} {r.seconds:8.1f}s  {r.units_per_window:7.0f} units/window  "
                  f"left {r.left:3d}  {' '.join(r.blocks)}", flush=True)
            out.with_suffix(".json").write_text(json.dumps([asdict(x) for x in rows], indent=1))
    out.with_suffix(".md").write_text(
        "# Search cost against calibration size\n\n"
        f"SmolLM2-135M, sublayer, iterative, first {args.steps} steps, windows of {args.seq_len} tokens, "
        f"{args.threads or torch.get_num_threads()} torch thread(s), all modes in one process.\n\n"
        f"```\n.venv/bin/python -m benchmarks.search_scaling --sizes {' '.join(map(str, args.sizes))} "
        f"--seq-len {args.seq_len} --steps {args.steps} --threads {args.threads}"
        + (f" --exact-sizes {' '.join(map(str, args.exact_sizes))}" if args.exact_sizes is not None else "")
        + "\n```\n\n" + table(rows) + "\n")
    plot(rows, out.with_suffix(".png"))
    print(table(rows))


if __name__ == "__main__":
    main()
