"""Sheared LLaMA on SmolLM2-135M: learned masks against Minitron activation and OSSCAR at one uniform shape,
then the same continued-pretraining budget for Minitron and for the masks (fixed domain weights, and dynamic
batch loading for the masks).

The masks are learned from each `--inits` start (uniform: all open, the paper; activation: Minitron's plan)
with the strategy's default settings but `--mask-steps`; the continued pretraining starts from the last one.

The shape is the one the width benchmark reports at ~33% removed (MLP 1536 -> 832 channels, 3 -> 2 KV
groups, benchmarks/results/width_vs_depth.md). Every model is evaluated on the held-out split of three
domains: the encyclopedia (builtin:wiki-vital-en), manuals (builtin:cmake-docs) and code
(builtin:sympy-code). The mask training reads the encyclopedia; continued pretraining reads all three.

    .venv/bin/python -m benchmarks.sheared                       # ~50 min on 2 idle cores
    .venv/bin/python -m benchmarks.sheared --mask-steps 40 --cpt-steps 20 --no-osscar --inits activation:0,activation

Writes benchmarks/results/sheared.md, .json, sheared_domains.png and sheared_masks_<init>_lr<lr>.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from flows.plots import domain_weights, mask_training
from pipelines import load_spec
from tasks.recover.continued_pretraining import ContinuedPretrainingMethod, ContinuedPretrainingRecovery
from tasks.recover.dynamic_loading import DynamicLoading
from tasks.recover.registry import RecoveryContext
from tasks.residual import perplexity
from tasks.sources import load_texts, resolve_model
from tasks.surgery import load_model, remove_blocks, total_params
from tasks.surgery.width import apply_width, set_output_weights
from tasks.width import WIDTH_METRICS, WidthShape, uniform_plan
from tasks.width.osscar import osscar_plan
from tasks.width.plan import Calibration
from tasks.width.sheared import ShearedSettings, sheared_plan
from tasks.windows import leading_stream, leading_windows, sample_windows, tokenize_stream

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
SHAPE = WidthShape(intermediate_size=832, num_key_value_heads=2)
DOMAINS = ("builtin:wiki-vital-en", "builtin:cmake-docs", "builtin:sympy-code")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mask-steps", type=int, default=100, help="Sheared mask-training steps of 2 x 256 tokens")
    parser.add_argument("--cpt-steps", type=int, default=60, help="continued-pretraining steps of 2 x 256 tokens")
    parser.add_argument("--calibration-samples", type=int, default=32, help="512-token windows (activation, osscar)")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens per domain")
    parser.add_argument("--inits", default="uniform,activation:0,activation",
                        help="mask starts (width.sheared.init), in order, each with an optional :lr of the weights "
                        "(0: frozen); the continued pretraining starts from the last")
    parser.add_argument("--no-osscar", dest="osscar", action="store_false", help="leave the OSSCAR row out")
    parser.add_argument("--no-dynamic", dest="dynamic", action="store_false",
                        help="leave out the masks' continued pretraining with dynamic batch loading")
    parser.add_argument("--out", default=str(RESULTS / "sheared"))
    args = parser.parse_args()
    args.load = [os.getloadavg()[0]]
    started = time.perf_counter()
    base = load_spec(ROOT / "pipelines" / "smollm2-minitron-width.yaml")
    model_path = str(resolve_model(base.model.source).path)
    dense = load_model(model_path, dtype="float32").eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    windows = sample_windows(tokenize_stream(load_texts(DOMAINS[0], "calibration"), tokenizer), 512,
                             args.calibration_samples, 0)
    held_out = {d: leading_windows(leading_stream(load_texts(d, "evaluation"), tokenizer, args.eval_tokens), 512,
                                   args.eval_tokens) for d in DOMAINS}
    dense_params = total_params(dense)
    rows: list[dict] = []
    traces: dict[str, list[dict]] = {}

    def measure(name: str, model, seconds: float, note: str = "") -> None:
        with torch.inference_mode():
            ppl = {d.removeprefix("builtin:"): perplexity(model, w, 1) for d, w in held_out.items()}
        rows.append({"method": name, "params_removed": 1 - total_params(model) / dense_params, "ppl": ppl,
                     "seconds": seconds, "note": note})
        print(f"{name:44s} {ppl} ({seconds:.0f} s)", flush=True)
        write(Path(args.out), rows, traces, args, time.perf_counter() - started)

    measure("dense", dense, 0.0)
    t0 = time.perf_counter()
    scores = WIDTH_METRICS["activation"].scores(dense, windows, 4)
    minitron = apply_width(copy.deepcopy(dense), uniform_plan(dense, scores, SHAPE))
    measure("Minitron activation", minitron, time.perf_counter() - t0)
    if args.osscar:
        t0 = time.perf_counter()
        outcome = osscar_plan(dense, None, SHAPE, Calibration(windows, 4), round_to=64)
        measure("OSSCAR (heads and channels)",
                set_output_weights(apply_width(copy.deepcopy(dense), outcome.plan), outcome.weights),
                time.perf_counter() - t0)
    defaults = ShearedSettings(steps=args.mask_steps)
    for variant in args.inits.split(","):
        init, _, lr = variant.partition(":")
        lr = float(lr) if lr else defaults.lr
        with tempfile.TemporaryDirectory() as state:
            t0 = time.perf_counter()
            outcome = sheared_plan(dense, None, SHAPE, Calibration(windows, 4, None, model_path, Path(state)),
                                   **{**defaults.model_dump(), "init": init, "lr": lr})
            sheared = set_output_weights(apply_width(remove_blocks(copy.deepcopy(dense), list(outcome.blocks)),
                                                     outcome.plan), outcome.weights)
            name = f"{init}_lr{lr:g}"
            traces[f"masks.{name}"] = outcome.trace
            mask_training(outcome.trace, Path(args.out).with_name(f"{Path(args.out).name}_masks_{name}.png"))
            first, last = outcome.trace[0], outcome.trace[-1]
            same = "; the plan is Minitron's" if outcome.plan == uniform_plan(dense, scores, SHAPE) else ""
            masks = f"Sheared masks, init {init}, weights " + (f"lr {lr:g}" if lr else "frozen")
            measure(masks, sheared, time.perf_counter() - t0,
                    f"{args.mask_steps} steps; LM loss {first['loss']:.3f} at step 1, {last['loss']:.3f} at the "
                    f"last; expected params {last['expected.params']:.3f} (gap {last['gap.params']:+.3f}){same}")

    def heal(model, name: str, dynamic: DynamicLoading | None) -> None:
        recover = ContinuedPretrainingRecovery(
            method="continued_pretraining", tokens=args.cpt_steps * 2 * 256, seq_len=256, batch_size=2, lr=5e-5,
            datasets=[{"source": d} for d in DOMAINS], dynamic=dynamic)
        with tempfile.TemporaryDirectory() as state:
            ctx = RecoveryContext(dense_path=model_path, calibration=windows, tokenizer_path=model_path,
                                  state_dir=Path(state), batch_windows=1, log=lambda _m: None)
            t0 = time.perf_counter()
            run = ContinuedPretrainingMethod().run(copy.deepcopy(model), recover, ctx, name)
        if run.domains:
            traces["domains"] = run.domains
        measure(name, run.model, time.perf_counter() - t0,
                f"{args.cpt_steps} steps of 2 x 256 tokens over {len(DOMAINS)} domains")

    heal(minitron, "Minitron activation + continued pretraining, fixed weights", None)
    heal(sheared, f"{masks} + continued pretraining, fixed weights", None)
    if args.dynamic:
        heal(sheared, f"{masks} + continued pretraining, dynamic batch loading", DynamicLoading(every=10, eta=1.0))
    args.load.append(os.getloadavg()[0])
    write(Path(args.out), rows, traces, args, time.perf_counter() - started)


def write(out: Path, rows: list[dict], traces: dict, args, seconds: float) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "traces": traces, "args": vars(args),
                                                    "shape": SHAPE.model_dump(exclude_none=True),
                                                    "seconds": seconds}, indent=2))
    domains = [d.removeprefix("builtin:") for d in DOMAINS]
    lines = [
        "# Sheared LLaMA masks, Minitron and OSSCAR at one shape; continued pretraining by domain (SmolLM2-135M)",
        "",
        f"Shape: every layer keeps {SHAPE.intermediate_size} of 1536 MLP channels and {SHAPE.num_key_value_heads} "
        "of 3 KV groups (all their query heads), ~33% of the parameters removed. Held-out perplexity on "
        f"{args.eval_tokens} tokens of each domain's evaluation split (512-token windows); worst: the highest ratio "
        "to dense over the domains. Activation and OSSCAR read "
        f"{args.calibration_samples} x 512 encyclopedia tokens; the masks train on the encyclopedia "
        f"({args.mask_steps} steps of 2 x 256 tokens); continued pretraining mixes the three domains, uniformly "
        "or by dynamic batch loading (every 10 steps, eta 1.0, reference: the dense model's loss). Written by "
        f"`.venv/bin/python -m benchmarks.sheared` in {seconds / 60:.0f} min (2 cores, fp32; load average "
        + " -> ".join(f"{v:.1f}" for v in args.load) + ", shared with other processes when above 2).", "",
        f"Masks: width.sheared's defaults ({_settings(args.mask_steps)}) but the init and the weights' lr each row "
        f"names; the training curves are "
        f"`{out.name}_masks_<init>_lr<lr>.png`.", "",
        "| method | params removed | " + " | ".join(domains) + " | worst x dense | s | note |",
        "| --- | --- | " + " | ".join("---" for _ in domains) + " | --- | --- | --- |",
    ]
    dense = rows[0]["ppl"]
    for r in rows:
        worst = max(r["ppl"][d] / dense[d] for d in domains)
        lines.append(f"| {r['method']} | {100 * r['params_removed']:.1f}% | "
                     + " | ".join(f"{r['ppl'][d]:.2f}" for d in domains)
                     + f" | {worst:.2f} | {r['seconds']:.0f} | {r['note']} |")
    if "domains" in traces:
        lines += ["", "Domain weights of dynamic batch loading (step: weights; losses seen):", ""]
        for t in traces["domains"]:
            weights = ", ".join(f"{k.removeprefix('builtin:')} {v:.3f}" for k, v in t["weights"].items())
            losses = ", ".join(f"{k.removeprefix('builtin:')} {v:.3f}" for k, v in t["losses"].items())
            lines.append(f"- step {t['step']}: {weights}" + (f" (losses {losses})" if losses else ""))
        domain_weights(traces["domains"], out.with_name(out.name + "_domains.png"))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def _settings(steps: int) -> str:
    used = ShearedSettings(steps=steps).model_dump()
    return ", ".join(f"{k} {used[k]}" for k in ("steps", "warmup", "lr", "mask_lr", "lambda_lr"))


if __name__ == "__main__":
    main()
