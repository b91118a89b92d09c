"""Is one stored cut's held-out perplexity really below another's? A paired comparison over evaluation windows.

Two cuts from compare_methods results (.json), named `LABEL@BUDGET`, are run on the same held-out windows;
each window's mean NLL per token is paired, and the mean gap in log-perplexity gets a 95% Student-t
interval over windows (windows, not tokens, are the independent draws):

    .venv/bin/python -m benchmarks.paired_gap "BlockPruner racing ppl/param@0.1" "Quark depth-wise@0.1" \
        --results benchmarks/results/compare_methods_32x256_*.json --eval-tokens 16384 --second-domain builtin:cmake-docs

Prints, and appends to benchmarks/results/paired_gap.md, one line per evaluation corpus.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from benchmarks.compare_methods import held_out_windows
from benchmarks.demo_search import load_demo_search
from tasks.residual import ResidualRunner
from tasks.score.racing import t_quantile
from tasks.surgery import units_of

RESULTS = Path(__file__).resolve().parent / "results"


def cut_of(name: str, paths: list[str]) -> list[str]:
    """The blocks of the row `LABEL@BUDGET` in the results files (the last file that has it wins)."""
    label, _, budget = name.rpartition("@")
    found = [row["blocks"] for path in paths for row in json.loads(Path(path).read_text())["rows"]
             if row["method"] == label and math.isclose(row["budget"], float(budget)) and row["blocks"]]
    if not found:
        raise SystemExit(f"no row '{label}' at budget {budget} with blocks in {paths}")
    return found[-1]


def per_token_nll(model, windows: torch.Tensor, blocks: list[str]) -> torch.Tensor:
    """Each window's mean NLL per predicted token with `blocks` left out."""
    runner = ResidualRunner(model)
    sums = torch.cat([runner.nll(w, units_of(blocks)) for w in windows.split(1)])
    return sums.double() / (windows.shape[1] - 1)


def paired(first: torch.Tensor, second: torch.Tensor) -> tuple[float, float, float]:
    """Mean gap (first - second) in log-perplexity and its 95% t interval over windows."""
    gaps = first - second
    half = t_quantile(0.975, gaps.numel() - 1) * float(gaps.std()) / math.sqrt(gaps.numel())
    mean = float(gaps.mean())
    return mean, mean - half, mean + half


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first")
    parser.add_argument("second")
    parser.add_argument("--results", nargs="+", required=True, help="compare_methods .json files")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--second-domain", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(RESULTS / "paired_gap.md"))
    args = parser.parse_args()
    cuts = [cut_of(args.first, args.results), cut_of(args.second, args.results)]
    demo = load_demo_search(args.threads)
    lines = []
    for corpus in [demo.spec.evaluate.datasets[0], *([args.second_domain] if args.second_domain else [])]:
        windows = held_out_windows(corpus, demo.tokenizer, args.eval_tokens, args.eval_seq_len)
        first, second = (per_token_nll(demo.model, windows, cut) for cut in cuts)
        mean, low, high = paired(first, second)
        lines.append(f"| {args.first} | {args.second} | {corpus} | {windows.shape[0]} x {windows.shape[1]} | "
                     f"{math.exp(float(first.mean())):.2f} | {math.exp(float(second.mean())):.2f} | "
                     f"{100 * math.expm1(mean):+.2f}% | [{100 * math.expm1(low):+.2f}%, {100 * math.expm1(high):+.2f}%] |")
        print(lines[-1], flush=True)
    out = Path(args.out)
    if not out.exists():
        out.write_text("# Paired gaps between stored cuts on held-out windows\n\n"
                       "Per window: mean NLL per token; gap = first - second, as a perplexity ratio with its 95% "
                       "t interval over windows.\n\n| first | second | corpus | windows | first ppl | "
                       "second ppl | gap | 95% interval |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n")
    with out.open("a") as handle:
        handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
