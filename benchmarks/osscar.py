"""OSSCAR against Minitron activation and magnitude pruning of MLP channels on SmolLM2-135M, unhealed.

At each kept width (every layer the same), the same calibration windows and the same held-out tokens:
- activation (Minitron) and magnitude ranking, the kept columns as they were;
- osscar with Quark's settings (greedy elimination, swaps, refit, sequential);
- osscar with the local search off and with the refit off; at one width (--ablate-at) also not sequential
  and on few calibration tokens.
Per row: held-out perplexity, the mean over layers of the down_proj output error after the refit (or the
cut, where the refit is off), and the seconds the strategy took.

    .venv/bin/python -m benchmarks.osscar                  # ~40 min on 2 cores
    .venv/bin/python -m benchmarks.osscar --widths 1024 --samples 16

Writes benchmarks/results/osscar.md and .json.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from pipelines import load_spec
from tasks.residual import perplexity
from tasks.sources import load_texts, resolve_model
from tasks.surgery import load_model, total_params
from tasks.surgery.width import apply_width, set_output_weights
from tasks.width import WIDTH_METRICS, WidthShape, uniform_plan
from tasks.width.osscar import osscar_plan
from tasks.width.plan import Calibration
from tasks.windows import leading_stream, leading_windows, sample_windows, tokenize_stream

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
QUARK = {"damp_percent": 0.01, "update_iter": 4, "swap_rounds": 8, "swap_size": 16, "refit": True,
         "sequential": True, "round_to": 128}
ABLATIONS = ("osscar, not sequential", "osscar, 4 x 256 calibration tokens")  # only at --ablate-at
VARIANTS = {  # name -> (settings changed from Quark's, calibration: "full" | "small")
    "osscar": ({}, "full"),
    "osscar, no swaps": ({"swap_rounds": 0}, "full"),
    "osscar, no refit": ({"refit": False}, "full"),
    "osscar, not sequential": ({"sequential": False}, "full"),
    "osscar, 4 x 256 calibration tokens": ({}, "small"),
}


@dataclass
class Row:
    width: int
    method: str
    params_removed: float
    eval_ppl: float
    mean_error: float | None = None  # mean over layers of the written weights' output error
    seconds: float = 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[1408, 1024], help="MLP channels kept (of 1536)")
    parser.add_argument("--samples", type=int, default=32, help="calibration windows of --seq-len tokens")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--ablate-at", type=int, default=1024, help="the width that also runs the ablations")
    parser.add_argument("--out", default=str(RESULTS / "osscar"))
    args = parser.parse_args()
    started = time.perf_counter()
    base = load_spec(ROOT / "pipelines" / "smollm2-quark-osscar.yaml")
    model_path = str(resolve_model(base.model.source).path)
    dense = load_model(model_path, dtype="float32").eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    stream = tokenize_stream(load_texts(base.calibration.dataset, "calibration"), tokenizer)
    windows = {"full": sample_windows(stream, args.seq_len, args.samples, base.calibration.seed),
               "small": sample_windows(stream, 256, 4, base.calibration.seed)}
    held_out = leading_windows(leading_stream(load_texts(base.evaluate.datasets[0], "evaluation"), tokenizer,
                                              args.eval_tokens), 512, args.eval_tokens)
    with torch.inference_mode():
        dense_ppl = perplexity(dense, held_out, 1)
    dense_params = total_params(dense)
    print(f"dense {dense_ppl:.3f} on {held_out.numel()} tokens; calibration {tuple(windows['full'].shape)}",
          flush=True)
    scores = {name: WIDTH_METRICS[name].scores(dense, windows["full"], 4) for name in ("activation", "magnitude")}
    rows: list[Row] = []

    def measure(width: int, method: str, model, seconds: float, errors: dict | None = None) -> None:
        with torch.inference_mode():
            ppl = perplexity(model, held_out, 1)
        written = None
        if errors:
            written = sum(e.get("refit", e["cut"]) for e in errors.values()) / len(errors)
        rows.append(Row(width, method, 1 - total_params(model) / dense_params, ppl, written, seconds))
        print(f"{width:5d} {method:38s} ppl {ppl:8.3f} error {written} ({seconds:.0f} s)", flush=True)
        write(Path(args.out), rows, dense_ppl, args, time.perf_counter() - started)

    for width in args.widths:
        shape = WidthShape(intermediate_size=width)
        for name, ranking in scores.items():
            measure(width, name, apply_width(copy.deepcopy(dense), uniform_plan(dense, ranking, shape)), 0.0)
        for variant in args.variants:
            if variant in ABLATIONS and width != args.ablate_at:
                continue
            changes, calibration = VARIANTS[variant]
            t0 = time.perf_counter()
            outcome = osscar_plan(dense, None, shape, Calibration(windows[calibration], 4), **{**QUARK, **changes})
            seconds = time.perf_counter() - t0
            model = set_output_weights(apply_width(copy.deepcopy(dense), outcome.plan), outcome.weights)
            measure(width, variant, model, seconds, outcome.errors)
    write(Path(args.out), rows, dense_ppl, args, time.perf_counter() - started)


def write(out: Path, rows: list[Row], dense_ppl: float, args, seconds: float) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"dense_ppl": dense_ppl, "rows": [asdict(r) for r in rows],
                                                    "args": vars(args), "seconds": seconds}, indent=2))
    lines = [
        "# OSSCAR against activation and magnitude pruning of MLP channels (SmolLM2-135M, unhealed)", "",
        f"Dense held-out perplexity {dense_ppl:.2f} on {args.eval_tokens} tokens of the builtin corpus's evaluation "
        f"split (512-token windows); calibration {args.samples} x {args.seq_len} tokens of its calibration split "
        "(the small variant: 4 x 256). Every layer keeps the same MLP width; heads untouched. osscar: Quark's "
        f"settings {QUARK}; error: mean over layers of the down_proj output error against the dense model's "
        "(% of the output's energy) for the weights written. "
        f"Written by `.venv/bin/python -m benchmarks.osscar` in {seconds / 60:.0f} min on this machine "
        "(2 cores, fp32).", "",
        "| kept / 1536 | params removed | method | held-out ppl | x dense | mean layer error % | strategy s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        error = "-" if r.mean_error is None else f"{100 * r.mean_error:.2f}"
        lines.append(f"| {r.width} | {100 * r.params_removed:.1f}% | {r.method} | {r.eval_ppl:.2f} | "
                     f"{r.eval_ppl / dense_ppl:.2f} | {error} | {r.seconds:.0f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
