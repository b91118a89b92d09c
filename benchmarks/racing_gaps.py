"""How far apart a search step's best candidates are, against the noise a race must see through.

For one step of the BlockPruner search on SmolLM2-135M (nothing removed yet), the exact per-window NLL of
each given candidate over the calibration windows, paired with the best of them: the gap per token, the
spread of the per-window gap, and how many windows a race needs before that candidate can leave (the
smallest n at which gap > t(1 - alpha, n - 1) x sd / sqrt(n), at the leader test's level and at the
fixed reference's, for a step of `--step-candidates` candidates with racing's defaults). A candidate
that cannot leave within the calibration set runs to its end: these survivors and `min_windows` set a
lower bound on a race's work, which the report states as a share of exact mode's.

    .venv/bin/python -m benchmarks.racing_gaps --samples 32 --seq-len 256 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from benchmarks.demo_search import load_demo_search
from tasks.score.prefix_reuse import PrefixReuseScorer
from tasks.score.racing import RacingOptions, looks, t_quantile

RESULTS = Path(__file__).resolve().parent / "results"
# The attention halves that BlockPruner's first steps choose between (benchmarks/results/compare_methods.md),
# and two MLP halves for contrast.
CANDIDATES = [f"layers.{i}.attn" for i in (5, 6, 7, 8, 9, 12, 17, 20)] + ["layers.17.mlp", "layers.2.mlp"]


def windows_to_leave(gap: float, sd: float, error: float, pairs: int, most: int) -> int | None:
    """The fewest windows n (at least 2) after which a gap of this mean and per-window spread clears the
    one-sided t bound of a race over n windows, whose level is error / (pairs x its looks); None if not
    within `most` windows."""
    def clears(n: int) -> bool:
        alpha = error / (pairs * max(1, looks(n, RacingOptions())))
        return gap > t_quantile(1 - alpha, n - 1) * sd / math.sqrt(n)

    if gap <= 0 or not clears(most):
        return None
    low, high = 2, most  # clears(n) only grows with n: the bound shrinks, the gap stays
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if clears(mid) else (mid + 1, high)
    return low


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--candidates", nargs="+", default=CANDIDATES)
    parser.add_argument("--step-candidates", type=int, default=59, help="candidates in the race of a step")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(RESULTS / "racing_gaps"))
    args = parser.parse_args()
    demo = load_demo_search(args.threads)
    scorer = PrefixReuseScorer(demo.model, demo.windows(args.samples, args.seq_len), 1, True)
    start = time.perf_counter()
    with torch.inference_mode():
        nlls = scorer.window_nlls(set(), args.candidates, list(range(args.samples)))
    seconds = time.perf_counter() - start
    tokens = args.seq_len - 1
    per_token = {name: torch.cat([per_batch[i] for i in range(args.samples)]).double() / tokens
                 for name, (per_batch, _) in nlls.items()}
    rows = table_rows(per_token, args.step_candidates)
    write(Path(args.out), rows, args, seconds)


def table_rows(per_token: dict[str, torch.Tensor], candidates: int) -> list[dict]:
    # Racing's levels (tasks/score/racing.py), with the fixed reference: half the error to each test.
    half = (1 - RacingOptions().confidence) / 2
    best = min(per_token, key=lambda name: float(per_token[name].mean()))
    rows = []
    for name, values in sorted(per_token.items(), key=lambda item: float(item[1].mean())):
        gap = values - per_token[best]
        mean, sd = float(gap.mean()), float(gap.std())
        rows.append({
            "block": name, "ppl": math.exp(float(values.mean())), "gap": mean, "sd": sd,
            "window_sd": float(values.std()),
            "leader_n": None if name == best else windows_to_leave(mean, sd, half, candidates - 1, 100_000),
            "fixed_n": None if name == best else windows_to_leave(mean, sd, half, 1, 100_000),
        })
    return rows


def write(out: Path, rows: list[dict], args, seconds: float) -> None:
    options, w = RacingOptions(), args.samples
    survivors = 1 + sum(1 for r in rows[1:] if r["fixed_n"] is None or r["fixed_n"] > w)
    first = min(options.min_windows, w)  # every candidate's windows before a first look
    floor = (args.step_candidates * first + survivors * (w - first)) / (args.step_candidates * w)
    lines = [
        "# How far apart a step's best candidates are, against the noise a race sees through\n",
        f"SmolLM2-135M, step 1 of the BlockPruner search (nothing removed), {w} x {args.seq_len} calibration "
        f"tokens, exact per-window NLLs of {len(rows)} candidates ({seconds:.0f} s, "
        f"{args.threads or torch.get_num_threads()} thread(s)). Gap: the candidate's log-perplexity minus the "
        f"best's, per token; sd: the spread of that gap across windows (per token), against the spread of the "
        f"windows' own NLL. Windows to leave: the fewest windows after which the gap clears racing's t bound, "
        f"in a race over that many windows of a step of {args.step_candidates} candidates with the defaults "
        f"(confidence {options.confidence}, min_windows {options.min_windows}, round_windows "
        f"{options.round_windows}), by the leader test and by the fixed "
        f"reference's test (if the reference is the best), at racing's levels for a step with a fixed reference "
        f"(every step after the first).\n",
        "```\n.venv/bin/python -m benchmarks.racing_gaps "
        f"--samples {w} --seq-len {args.seq_len} --threads {args.threads or torch.get_num_threads()}\n```\n",
        "| candidate | ppl | gap / token | sd of the gap / window | sd of the NLL / window | windows to leave "
        "(leader test) | windows to leave (fixed test) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        def n(value):
            return "-" if r["gap"] == 0 else (f"{value:,}" if value is not None else "> 100,000")
        lines.append(f"| {r['block']} | {r['ppl']:.3f} | {r['gap']:+.4f} | {r['sd']:.4f} | {r['window_sd']:.3f} | "
                     f"{n(r['leader_n'])} | {n(r['fixed_n'])} |")
    lines.append(
        f"\nWith {w} windows, {survivors} of these cannot leave before the end (the best included); every "
        f"candidate runs at least {first} windows. So a step's race does at least "
        f"{100 * floor:.0f}% of exact mode's candidate-windows ({args.step_candidates} x {first} + "
        f"{survivors} x {w - first}, of {args.step_candidates} x {w}).")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"windows": w, "seq_len": args.seq_len, "seconds": seconds,
                                                    "floor": floor, "survivors": survivors, "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
