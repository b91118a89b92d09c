"""How well each recipe's cut fits the calibration windows it was chosen on, beside how it does on held-out text.

A search that ranks blocks by calibration perplexity should leave the lowest calibration perplexity at
a budget; if it does and still loses on held-out tokens, the loss is a generalisation gap of the
calibration set, not a weak search. This re-scores the cuts stored in compare_methods results (.json)
on the same calibration windows (rebuilt from the pipelines' calibration settings and `--samples`):

    .venv/bin/python -m benchmarks.calibration_fit --samples 32 \
        benchmarks/results/compare_methods_32x256_layers.json benchmarks/results/compare_methods_32x256_quark.json

Writes benchmarks/results/calibration_fit.md and .json.
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.demo_search import load_demo_search
from tasks.residual import perplexity
from tasks.surgery import remove_blocks

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Fit:
    method: str
    budget: float
    params_removed: float
    blocks: list[str]
    calibration_ppl: float
    eval_ppl: float
    second_ppl: float | None


def stored_cuts(paths: list[str], calibration: list[int]) -> list[dict]:
    """Every row with a cut, once per (method, budget), from results taken with these calibration windows."""
    cuts: dict[tuple[str, float], dict] = {}
    for path in paths:
        saved = json.loads(Path(path).read_text())
        if saved["calibration"] != calibration:
            raise SystemExit(f"{path} was calibrated on {saved['calibration']} windows x tokens, not {calibration}")
        for row in saved["rows"]:
            if row["blocks"] and row["eval_ppl"] is not None:
                cuts[(row["method"], row["budget"])] = row
    return list(cuts.values())


def earlier_fits(path: str | None, calibration: list[int]) -> dict[tuple[str, ...], float]:
    """Calibration perplexity per cut from an earlier run of this benchmark on the same windows."""
    if path is None:
        return {}
    saved = json.loads(Path(path).read_text())
    if saved["calibration"] != calibration:
        raise SystemExit(f"--reuse {path} measured {saved['calibration']} windows x tokens, not {calibration}")
    return {tuple(row["blocks"]): row["calibration_ppl"] for row in saved["rows"]}


def table(fits: list[Fit], dense: float) -> str:
    lines = [f"Dense calibration perplexity: {dense:.2f}.", "",
             "| budget | method | params removed | calibration ppl | held-out ppl | held-out / calibration | second domain ppl |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for fit in sorted(fits, key=lambda f: (f.budget, f.calibration_ppl)):
        second = "-" if fit.second_ppl is None else f"{fit.second_ppl:.2f}"
        lines.append(f"| {fit.budget:.0%} | {fit.method} | {100 * fit.params_removed:.1f}% | "
                     f"{fit.calibration_ppl:.2f} | {fit.eval_ppl:.2f} | {fit.eval_ppl / fit.calibration_ppl:.2f} | "
                     f"{second} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="compare_methods .json files")
    parser.add_argument("--samples", type=int, required=True, help="calibration windows the results used")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(RESULTS / "calibration_fit"))
    parser.add_argument("--reuse", default=None, metavar="JSON",
                        help="an earlier calibration_fit .json: cuts it measured on the same windows are not run again")
    args = parser.parse_args()
    demo = load_demo_search(args.threads)  # every recipe shares the BlockPruner demo's model and calibration
    seq_len = demo.spec.calibration.seq_len
    cuts = stored_cuts(args.results, [args.samples, seq_len])
    model, windows = demo.model, demo.windows(args.samples, seq_len)
    measured = earlier_fits(args.reuse, [args.samples, seq_len])
    fits = []
    with torch.inference_mode():
        dense = perplexity(model, windows, batch_windows=1)
        for row in cuts:
            key = tuple(row["blocks"])
            if key not in measured:
                measured[key] = perplexity(remove_blocks(copy.deepcopy(model), row["blocks"]), windows,
                                           batch_windows=1)
            fits.append(Fit(row["method"], row["budget"], row["params_removed"], row["blocks"], measured[key],
                            row["eval_ppl"], row.get("second_ppl")))
            print(f"{row['method']:30s} {row['budget']:.0%}: calibration ppl {measured[key]:.3f}", flush=True)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(
        {"calibration": [args.samples, seq_len], "dense_calibration_ppl": dense, "sources": args.results,
         "rows": [asdict(f) for f in fits]}, indent=1))
    out.with_suffix(".md").write_text(f"# Calibration fit of each recipe's cut\n\n{table(fits, dense)}\n")
    print(table(fits, dense))


if __name__ == "__main__":
    main()
