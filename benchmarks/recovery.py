"""Recovery methods side by side on SmolLM2-135M after the demo pipeline's cut.

The demo (pipelines/smollm2-blockpruner.yaml) removes eight attention blocks; this benchmark removes
the same blocks from the dense model, then heals copies of the pruned model with each recovery method
through the library API (tasks.recover's registry, exactly what the recover stage runs) and measures
every model on the same held-out tokens of builtin:wiki-vital-en (the demo's evaluation settings).

    .venv/bin/python -m benchmarks.recovery                  # dense, pruned, bias, low_rank, lora
    .venv/bin/python -m benchmarks.recovery --lora-steps 20 --threads 2

Writes benchmarks/results/recovery.md and .json.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from pipelines import load_spec
from pipelines.spec import BiasRecovery, LoraRecovery, LowRankRecovery
from tasks.recover import RecoveryContext, get_recovery
from tasks.residual import perplexity
from tasks.sources import load_texts, resolve_model
from tasks.surgery import load_model, remove_blocks, total_params
from tasks.windows import leading_stream, leading_windows, sample_windows, tokenize_stream

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
# What the demo pipeline removed, in search order (its closing note and report).
DEMO_BLOCKS = ("layers.8.attn", "layers.7.attn", "layers.17.attn", "layers.5.attn", "layers.20.attn",
               "layers.26.attn", "layers.29.attn", "layers.12.attn")


@dataclass
class Row:
    model: str
    eval_ppl: float
    params: int
    recover_seconds: float | None = None
    eval_seconds: float | None = None
    trainable_params: int | None = None
    detail: str = ""


def _evaluate(label: str, model, held_out: torch.Tensor, batch: int, row: Row) -> Row:
    started = time.perf_counter()
    row.eval_ppl = perplexity(model, held_out, batch)
    row.eval_seconds = time.perf_counter() - started
    print(f"{label}: eval ppl {row.eval_ppl:.3f} ({row.eval_seconds:.0f} s)", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibration-samples", type=int, default=16, help="256-token windows the adapters are fitted on")
    parser.add_argument("--rank", type=int, default=8, help="rank of the low_rank adapters")
    parser.add_argument("--lora-steps", type=int, default=40)
    parser.add_argument("--lora-batch", type=int, default=2)
    parser.add_argument("--lora-seq-len", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = load_spec(ROOT / "pipelines" / "smollm2-blockpruner.yaml")
    model_path = str(resolve_model(spec.model.source).path)
    dense = load_model(model_path, dtype="float32").eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    calib = spec.calibration
    windows = sample_windows(tokenize_stream(load_texts(calib.dataset, "calibration"), tokenizer), calib.seq_len,
                             args.calibration_samples, calib.seed)
    held_out = leading_windows(leading_stream(load_texts(spec.evaluate.datasets[0], "evaluation"), tokenizer,
                                              args.eval_tokens), spec.evaluate.seq_len, args.eval_tokens)
    batch = spec.score.batch_windows
    rows = [_evaluate("dense", dense, held_out, batch, Row("dense", 0.0, total_params(dense)))]
    pruned = remove_blocks(copy.deepcopy(dense), list(DEMO_BLOCKS))
    rows.append(_evaluate("pruned", pruned, held_out, batch, Row("pruned (demo blocks)", 0.0, total_params(pruned))))
    methods = [
        ("bias", BiasRecovery(method="bias"), "mean of each block's output (fit: dense)"),
        ("bias, fit: pruned", BiasRecovery(method="bias", fit="pruned"), "sequential on the pruned stream"),
        (f"low_rank r={args.rank}", LowRankRecovery(method="low_rank", rank=args.rank), "ridge 1e-4 (fit: dense)"),
        (f"low_rank r={args.rank}, fit: pruned", LowRankRecovery(method="low_rank", rank=args.rank, fit="pruned"),
         "ridge 1e-4, sequential on the pruned stream"),
        ("lora", LoraRecovery(method="lora", steps=args.lora_steps, batch_size=args.lora_batch,
                              seq_len=args.lora_seq_len, rank=8, lr=2e-4),
         f"{args.lora_steps} steps x {args.lora_batch} x {args.lora_seq_len} tokens, rank 8, lr 2e-4"),
    ]
    with tempfile.TemporaryDirectory() as state:
        for label, settings, detail in methods:
            ctx = RecoveryContext(dense_path=model_path, calibration=windows, tokenizer_path=model_path,
                                  state_dir=Path(state) / label, batch_windows=batch, log=print)
            started = time.perf_counter()
            run = get_recovery(settings.method).run(copy.deepcopy(pruned), settings, ctx, fingerprint=label)
            seconds = time.perf_counter() - started
            if run.losses:
                detail += f"; loss {run.losses[0]:.3f} -> {run.losses[-1]:.3f}"
            row = Row(label, 0.0, total_params(run.model), seconds, trainable_params=run.trainable_params, detail=detail)
            rows.append(_evaluate(label, run.model, held_out, batch, row))
    write(rows, args, windows, held_out)


def write(rows: list[Row], args, windows: torch.Tensor, held_out: torch.Tensor) -> None:
    RESULTS.mkdir(exist_ok=True)
    setup = {
        "blocks": list(DEMO_BLOCKS), "calibration_windows": list(windows.shape), "eval_windows": list(held_out.shape),
        "threads": torch.get_num_threads(), "args": vars(args),
    }
    (RESULTS / "recovery.json").write_text(json.dumps({"setup": setup, "rows": [asdict(r) for r in rows]}, indent=2))
    dense = rows[0].eval_ppl
    lines = [
        "# Recovery on SmolLM2-135M after the demo's cut",
        "",
        f"Blocks removed (the demo's): {', '.join(DEMO_BLOCKS)}. Adapters fitted on {windows.shape[0]} x "
        f"{windows.shape[1]} calibration tokens; LoRA trains on the calibration part of builtin:wiki-vital-en. "
        f"Evaluation: {held_out.shape[0]} x {held_out.shape[1]} held-out tokens of the evaluation split. "
        f"fp32, {torch.get_num_threads()} torch threads, 2-core CPU. `python -m benchmarks.recovery`.",
        "",
        "| model | eval ppl | vs dense | params | trainable | recover s | eval s | detail |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.eval_ppl:.3f} | {r.eval_ppl / dense:.3f}x | {r.params:,} | "
            f"{'' if r.trainable_params is None else f'{r.trainable_params:,}'} | "
            f"{'' if r.recover_seconds is None else f'{r.recover_seconds:.0f}'} | {r.eval_seconds:.0f} | {r.detail} |"
        )
    (RESULTS / "recovery.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
