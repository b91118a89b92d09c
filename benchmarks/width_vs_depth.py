"""Width against depth on SmolLM2-135M at ~10%, ~20% and ~33% of the parameters removed.

Width: uniform shapes (every layer the same widths) planned by each registered width metric
(activation: Minitron; taylor: LLM-Pruner's first-order score, here on uniform shapes; magnitude).
Depth: the layer-level recipes Shortened Taylor+ and Shortened PPL searched at the same ratio on the same
calibration windows, and BlockPruner's recorded sub-block choices from compare_methods.json (its search
takes ~30 min at 10%). Depth-then-width: Shortened Taylor+'s first layers, then channels to the ratio.
Every model is evaluated on the same held-out tokens; at ~20% the best width plan and the best depth plan
are healed with the same budget by LoRA and by distillation, and their prefill/decode speed is timed
against dense in one process.

    .venv/bin/python -m benchmarks.width_vs_depth                 # everything (~1 h on 2 cores)
    .venv/bin/python -m benchmarks.width_vs_depth --no-heal --no-speed

Writes benchmarks/results/width_vs_depth.md, .json and .png.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer

from pipelines import load_spec
from pipelines.spec import LoraRecovery, ParamsRatioTarget
from tasks.recover import RecoveryContext, get_recovery
from tasks.recover.distill import DistillRecovery
from tasks.residual import perplexity
from tasks.search import MemoryRecorder, SearchContext, SearchLog, run_search
from tasks.sources import load_texts, resolve_model
from tasks.surgery import load_model, remove_blocks, total_params
from tasks.surgery.width import apply_width
from tasks.width import WIDTH_METRICS, WidthShape, uniform_plan
from tasks.windows import leading_stream, leading_windows, sample_windows, tokenize_stream

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"

# Uniform shapes of SmolLM2-135M (9 query heads over 3 KV heads, 1536 MLP channels) near each ratio.
SHAPES = {
    0.1: WidthShape(intermediate_size=1280),  # 9.9% removed (depth recipes: 10.5%)
    0.2: WidthShape(intermediate_size=1024),  # 19.7% (depth: 21.1%)
    0.33: WidthShape(intermediate_size=832, num_key_value_heads=2),  # 33.7% (depth: 34.2%)
}
# Depth then width: this many of Shortened Taylor+'s layers first, then the channels that bring the total
# to about the depth recipes' share (9.8%, 21.4%, 34.5%).
COMBINED = {0.1: (1, 1344), 0.2: (2, 1088), 0.33: (3, 768)}
DEPTH_RECIPES = (("Shortened Taylor+", "smollm2-shortened-taylor.yaml"), ("Shortened PPL", "smollm2-shortened-ppl.yaml"))


@dataclass
class Row:
    method: str
    kind: str  # width | depth | depth+width
    budget: float
    params_removed: float = 0.0
    eval_ppl: float = 0.0
    detail: str = ""
    healed: dict[str, float] = field(default_factory=dict)
    speed: dict[str, float] = field(default_factory=dict)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=sorted(SHAPES), help="increasing")
    parser.add_argument("--calibration-samples", type=int, default=16, help="256-token calibration windows")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--heal-steps", type=int, default=40, help="LoRA / distill steps of 2 x 256 tokens")
    parser.add_argument("--no-heal", action="store_true")
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(RESULTS / "width_vs_depth"))
    parser.add_argument("--replot", action="store_true", help="only rewrite the table and plot from the .json")
    args = parser.parse_args()
    if args.replot:
        saved = json.loads(Path(args.out).with_suffix(".json").read_text())
        write(Path(args.out), [Row(**r) for r in saved["rows"]], saved["dense_ppl"],
              torch.zeros(saved["calibration"]), torch.zeros(saved["evaluation"]), saved["seconds"])
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    base = load_spec(ROOT / "pipelines" / "smollm2-blockpruner.yaml")
    model_path = str(resolve_model(base.model.source).path)
    dense = load_model(model_path, dtype="float32").eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    windows = sample_windows(tokenize_stream(load_texts(base.calibration.dataset, "calibration"), tokenizer),
                             base.calibration.seq_len, args.calibration_samples, base.calibration.seed)
    held_out = leading_windows(leading_stream(load_texts(base.evaluate.datasets[0], "evaluation"), tokenizer,
                                              args.eval_tokens), 512, args.eval_tokens)
    with torch.inference_mode():
        dense_ppl = perplexity(dense, held_out, 1)
    dense_params = total_params(dense)
    print(f"dense {dense_ppl:.3f} on {held_out.numel()} tokens; calibration {tuple(windows.shape)}", flush=True)
    scores = {name: metric.scores(dense, windows, 1) for name, metric in WIDTH_METRICS.items()}
    taylor_layers = _depth_order(dense, windows, "smollm2-shortened-taylor.yaml", 0.4, key="combined")
    recorded = _blockpruner_blocks()
    rows: list[Row] = []
    models: dict[tuple[str, float], torch.nn.Module] = {}

    def measure(row: Row, model) -> None:
        row.params_removed = 1 - total_params(model) / dense_params
        with torch.inference_mode():
            row.eval_ppl = perplexity(model, held_out, 1)
        rows.append(row)
        models[(row.method, row.budget)] = model
        print(f"{row.method:28s} {row.budget:.0%}: removed {100 * row.params_removed:5.1f}%  ppl {row.eval_ppl:8.2f}  "
              f"{row.detail}", flush=True)
        write(Path(args.out), rows, dense_ppl, windows, held_out, time.perf_counter() - started)

    for budget in sorted(args.budgets):
        shape = SHAPES[budget]
        for name in WIDTH_METRICS:
            plan = uniform_plan(dense, scores[name], shape)
            measure(Row(f"width: {name}", "width", budget, detail=_shape_text(shape)),
                    apply_width(copy.deepcopy(dense), plan))
        for label, pipeline in DEPTH_RECIPES:
            blocks = _depth_order(dense, windows, pipeline, budget)
            measure(Row(f"depth: {label}", "depth", budget, detail=", ".join(b[7:] for b in blocks)),
                    remove_blocks(copy.deepcopy(dense), blocks))
        if budget in recorded:
            measure(Row("depth: BlockPruner (recorded)", "depth", budget, detail=f"{len(recorded[budget])} sub-blocks"),
                    remove_blocks(copy.deepcopy(dense), recorded[budget]))
        layers, channels = COMBINED[budget]
        pruned = remove_blocks(copy.deepcopy(dense), taylor_layers[:layers])
        combined_shape = WidthShape(intermediate_size=channels)
        plan = uniform_plan(pruned, WIDTH_METRICS["activation"].scores(pruned, windows, 1), combined_shape)
        measure(Row("depth then width: Taylor+ layers, activation", "depth+width", budget,
                    detail=f"layers {', '.join(b[7:] for b in taylor_layers[:layers])}; {_shape_text(combined_shape)}"),
                apply_width(pruned, plan))

    if not args.no_heal:
        heal(rows, models, model_path, windows, held_out, args.heal_steps)
        write(Path(args.out), rows, dense_ppl, windows, held_out, time.perf_counter() - started)
    if not args.no_speed:
        time_models(rows, models, dense)
    write(Path(args.out), rows, dense_ppl, windows, held_out, time.perf_counter() - started)
    print(f"wrote {Path(args.out).with_suffix('.md')}")


def _shape_text(shape: WidthShape) -> str:
    return ", ".join(f"{k} {v}" for k, v in shape.model_dump(exclude_none=True).items())


# One recorder per recipe: its one-shot ranking is scored once and every budget resumes from it.
_RECORDERS: dict[str, MemoryRecorder] = {}


def _depth_order(dense, windows, pipeline: str, budget: float, key: str = "") -> list[str]:
    """The recipe's blocks at this budget; calls with one `key` must come in increasing budgets (a larger
    budget resumes the smaller one's committed steps)."""
    spec = load_spec(ROOT / "pipelines" / pipeline)
    search = spec.search.model_copy(update={"target": ParamsRatioTarget(params_ratio=budget)})
    recorder = _RECORDERS.setdefault(key or pipeline, MemoryRecorder())
    ctx = SearchContext.of(dense, windows, spec.score, search, log=SearchLog(recorder))
    return [r.block for r in run_search(ctx, spec.search.strategy)]


def _blockpruner_blocks() -> dict[float, list[str]]:
    saved = json.loads((RESULTS / "compare_methods.json").read_text())
    return {r["budget"]: r["blocks"] for r in saved["rows"] if r["method"] == "BlockPruner" and r["blocks"]}


def _best(rows: list[Row], kinds: tuple[str, ...], budget: float) -> Row:
    return min((r for r in rows if r.kind in kinds and r.budget == budget and not r.healed), key=lambda r: r.eval_ppl)


def heal(rows: list[Row], models, model_path: str, windows, held_out, steps: int) -> None:
    """The best width-side and the best depth plan at ~20%, each healed by LoRA and by distillation on the
    same 2 x 256-token batches of the calibration split."""
    methods = {
        "lora": LoraRecovery(method="lora", steps=steps, batch_size=2, seq_len=256, rank=8, lr=2e-4),
        "distill": DistillRecovery(method="distill", steps=steps, batch_size=2, seq_len=256, lr=1e-4),
    }
    for row in (_best(rows, ("width", "depth+width"), 0.2), _best(rows, ("depth",), 0.2)):
        for name, settings in methods.items():
            with tempfile.TemporaryDirectory() as state:
                ctx = RecoveryContext(dense_path=model_path, calibration=windows, tokenizer_path=model_path,
                                      state_dir=Path(state), batch_windows=1, log=lambda _m: None)
                run = get_recovery(name).run(copy.deepcopy(models[(row.method, row.budget)]), settings, ctx,
                                             fingerprint=f"{row.method}-{name}")
            with torch.inference_mode():
                row.healed[name] = perplexity(run.model, held_out, 1)
            print(f"{row.method} {row.budget:.0%} healed by {name}: {row.healed[name]:.2f}", flush=True)


def time_models(rows: list[Row], models, dense) -> None:
    """Prefill (1 x 256 tokens) and greedy decode (32 tokens) medians of 5, dense timed alongside each."""
    for row in rows:
        if row.budget != 0.2 or (row.method, row.budget) not in models:
            continue
        dense_t, pruned_t = _timings(dense), _timings(models[(row.method, row.budget)])
        row.speed = {k: dense_t[k] / pruned_t[k] for k in dense_t}
        print(f"{row.method} speed-up {row.speed}", flush=True)


def _timings(model) -> dict[str, float]:
    ids = torch.randint(0, model.config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(0))
    out: dict[str, list[float]] = {"prefill": [], "decode": []}
    with torch.inference_mode():
        model(ids)  # warm-up
        for _ in range(5):
            start = time.perf_counter()
            model(ids)
            out["prefill"].append(time.perf_counter() - start)
            start = time.perf_counter()
            model.generate(ids[:, :16], max_new_tokens=32, min_new_tokens=32, do_sample=False)
            out["decode"].append(time.perf_counter() - start)
    return {k: sorted(v)[len(v) // 2] for k, v in out.items()}


def write(out: Path, rows: list[Row], dense_ppl: float, windows, held_out, seconds: float) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Width against depth on SmolLM2-135M",
        "",
        f"Calibration (width scores and depth searches alike): {windows.shape[0]} x {windows.shape[1]} tokens of "
        f"builtin:wiki-vital-en's calibration split; evaluation: the first {held_out.numel()} tokens of its "
        f"evaluation split in {held_out.shape[1]}-token windows. Dense perplexity {dense_ppl:.2f}. "
        f"No healing unless a healed column says so. Wall time {seconds:.0f} s, "
        f"{torch.get_num_threads()} torch thread(s). Reproduce: `.venv/bin/python -m benchmarks.width_vs_depth`.",
        "",
        "| target | method | params removed | eval ppl | healed: LoRA | healed: distill | prefill / decode speed-up | detail |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        speed = f"{r.speed['prefill']:.2f}x / {r.speed['decode']:.2f}x" if r.speed else "-"
        healed = " | ".join(f"{r.healed[k]:.2f}" if k in r.healed else "-" for k in ("lora", "distill"))
        lines.append(f"| ~{r.budget:.0%} | {r.method} | {100 * r.params_removed:.1f}% | {r.eval_ppl:.2f} | {healed} | "
                     f"{speed} | {r.detail} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"dense_ppl": dense_ppl, "seconds": seconds,
                                                    "calibration": list(windows.shape),
                                                    "evaluation": list(held_out.shape),
                                                    "rows": [asdict(r) for r in rows]}, indent=2))
    plot(rows, dense_ppl, out.with_suffix(".png"))


def plot(rows: list[Row], dense_ppl: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    for method in dict.fromkeys(r.method for r in rows):
        points = sorted((100 * r.params_removed, r.eval_ppl) for r in rows if r.method == method)
        style = "-" if method.startswith("width") else "--" if method.startswith("depth:") else "-."
        ax.plot([0.0] + [x for x, _ in points], [dense_ppl] + [y for _, y in points], style, marker="o",
                markerfacecolor="none", label=method)
    ax.set_yscale("log")
    ax.set_xlabel("parameters removed (%)")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title("SmolLM2-135M, unhealed: width (solid), depth (dashed), depth then width (dash-dot)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
