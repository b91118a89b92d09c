"""Published block-pruning recipes side by side on SmolLM2-135M at the same parameter budgets.

Each method is a ready pipeline in `pipelines/` (its metric, strategy, granularity, settings and
protections are read from the YAML; only the target changes), run through the library API
(SearchContext + run_search, then tasks.surgery.remove_blocks and tasks.residual.perplexity) on the
same calibration windows, and evaluated on the same held-out tokens of builtin:wiki-vital-en.
No recovery: these are the pruned models as the search leaves them.

    .venv/bin/python -m benchmarks.compare_methods                     # every recipe, 10% and 20%
    .venv/bin/python -m benchmarks.compare_methods --only shortgpt gromov --budgets 0.1
    # more calibration (32 x 256), racing BlockPruner with both objectives, a second evaluation domain:
    .venv/bin/python -m benchmarks.compare_methods --samples 32 --with-racing \
        --eval-tokens 16384 --second-domain builtin:cmake-docs --out benchmarks/results/compare_methods_32x256

Writes benchmarks/results/compare_methods.md, .json and .png.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer

from pipelines import load_spec
from pipelines.spec import PipelineSpec
from tasks.residual import perplexity
from pipelines.spec import ParamsRatioTarget
from tasks.search import MemoryRecorder, SearchContext, SearchError, SearchLog, run_search
from tasks.sources import load_texts, resolve_model
from tasks.surgery import load_model, remove_blocks, total_params, units_of
from tasks.windows import leading_stream, leading_windows, sample_windows, tokenize_stream

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
# The search's catalog fields a benchmark has no use for (no pipeline run writes an output folder here).
UNUSED = "-"


@dataclass(frozen=True)
class Method:
    label: str
    pipeline: str
    overrides: tuple[str, ...] = ()


METHODS = (
    Method("ShortGPT", "smollm2-shortgpt.yaml"),
    Method("LLM-Drop attn", "smollm2-llmdrop-attn.yaml"),
    Method("LLM-Drop joint", "smollm2-llmdrop-joint.yaml"),
    Method("Gromov (last token)", "smollm2-gromov.yaml"),
    Method("Gromov (all tokens)", "smollm2-gromov.yaml", ("score.angular_distance.tokens=all",)),
    Method("Shortened Taylor+", "smollm2-shortened-taylor.yaml"),
    Method("Shortened PPL", "smollm2-shortened-ppl.yaml"),
    Method("Siddiqui Shapley", "smollm2-shapley.yaml"),
    Method("Quark depth-wise", "smollm2-quark-depthwise.yaml"),
    # Last: by far the most expensive search. Early abort picks the same blocks, faster.
    Method("BlockPruner", "smollm2-blockpruner.yaml", ("search.exact_scores=false",)),
)
# BlockPruner raced over its calibration windows (search.mode: racing), with either objective: the
# search whose cost grows slower than its calibration set, for runs with more calibration data.
RACING_METHODS = (
    Method("BlockPruner racing", "smollm2-blockpruner.yaml", ("search.mode=racing", "search.exact_scores=false")),
    Method("BlockPruner racing ppl/param", "smollm2-blockpruner.yaml",
           ("search.mode=racing", "search.exact_scores=false", "search.objective=ppl_per_param")),
)

# Strategies whose removal order at a larger budget starts with the order at a smaller one: a run at
# the larger budget resumes from the smaller one's recorder instead of scoring again. Not with the
# ppl_per_param objective, whose last step chooses by perplexity (SearchContext.objective_for).
PREFIX_STRATEGIES = {"one_shot", "iterative"}


def resumes_across_budgets(spec: PipelineSpec) -> bool:
    return spec.search.strategy in PREFIX_STRATEGIES and spec.search.objective != "ppl_per_param"


@dataclass
class Row:
    method: str
    pipeline: str
    metric: str
    strategy: str
    granularity: str
    budget: float
    params_removed: float | None = None
    blocks: list[str] = field(default_factory=list)
    search_seconds: float | None = None
    evaluated: int | None = None
    reused: int | None = None
    eval_ppl: float | None = None
    second_ppl: float | None = None  # on --second-domain, a corpus the calibration never saw
    note: str = ""


def data(spec: PipelineSpec, model_path: str, eval_tokens: int, eval_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    calib = spec.calibration
    stream = tokenize_stream(load_texts(calib.dataset, "calibration"), tokenizer)
    windows = sample_windows(stream, calib.seq_len, calib.samples, calib.seed)
    return windows, held_out_windows(spec.evaluate.datasets[0], tokenizer, eval_tokens, eval_seq_len)


def selects(name: str, method: Method, methods: tuple[Method, ...]) -> bool:
    """A method's exact label picks that method alone (one label may be part of another); any other name
    picks every method whose label or pipeline file contains it."""
    if any(name == m.label for m in methods):
        return name == method.label
    return name in method.pipeline or name in method.label


def recorder_for(catalog, spec: PipelineSpec, label: str, budget: float | None):
    """Where a method's search records its scores: memory, or with `--catalog` a run of a DuckDB catalog
    named by the method, its settings (model, calibration, score, search) and, for a strategy that does
    not resume across budgets, the budget. An interrupted benchmark then resumes its searches."""
    if catalog is None:
        return MemoryRecorder()
    from flows.recorder import CatalogRecorder

    settings = spec.section_json("model", "calibration", "score", "search")
    digest = hashlib.sha256(f"{label}|{settings}|{budget}".encode()).hexdigest()
    run_id = f"compare-{digest[:16]}"
    catalog.start_run(run_id=run_id, pipeline=spec.name, spec_hash=digest, spec_json=settings,
                      model_fingerprint=UNUSED, data_fingerprint=UNUSED, model_source=spec.model.source,
                      output_dir=UNUSED)
    return CatalogRecorder(catalog, run_id, spec.score.metric)


def held_out_windows(dataset: str, tokenizer, eval_tokens: int, eval_seq_len: int) -> torch.Tensor:
    """The first `eval_tokens` tokens of the dataset's evaluation split, in windows of `eval_seq_len`."""
    return leading_windows(leading_stream(load_texts(dataset, "evaluation"), tokenizer, eval_tokens),
                           eval_seq_len, eval_tokens)


def seed_steps(ctx: SearchContext, blocks: list[str]) -> None:
    """Commit `blocks` as the search's first steps, after those it has and until its target is met: an
    earlier run's picks with the same settings (`--seed-steps`), each with the exact calibration perplexity
    of the model without it and the blocks before it (what the search itself stores), so a larger budget
    goes on from them."""
    done = [r.block for r in ctx.log.steps()]
    shared = min(len(done), len(blocks))
    if done[:shared] != blocks[:shared]:  # either may be the longer: a catalog that went past its seed is fine
        raise SystemExit(f"--seed-steps: the catalog's steps {done} and the seed {blocks} differ")
    for step in range(len(done), len(blocks)):
        if ctx.target_met(blocks[:step]):  # a smaller budget than the seed's takes only what it needs
            break
        if ctx.objective_for(blocks[:step], ctx.candidates(blocks[:step])) != ctx.objective:
            break  # this budget's last step chooses otherwise than the seed's run did: the search takes it
        removed = blocks[: step + 1]
        value = ctx.scorer.current_perplexity(units_of(removed))
        ctx.record_step(step, removed[:-1], blocks[step], value, {})
        print(f"seeded step {step}: {blocks[step]} (calibration ppl {value:.4f})", flush=True)


def within_budget(ctx: SearchContext, blocks: list[str]) -> list[str]:
    """The removal order up to the first step that meets this budget: a search resumed from a catalog where
    a larger budget went further returns every recorded step."""
    for count in range(len(blocks) + 1):
        if ctx.target_met(blocks[:count]):
            return blocks[:count]
    return blocks


def seeds_from(path: str) -> dict[str, list[str]]:
    """Per method label, the longest removal order of an iterative search in a results JSON."""
    seeds: dict[str, list[str]] = {}
    for row in json.loads(Path(path).read_text())["rows"]:
        if row["strategy"] == "iterative" and len(row["blocks"]) > len(seeds.get(row["method"], [])):
            seeds[row["method"]] = row["blocks"]
    return seeds


def run_one(model, windows, held_out, spec: PipelineSpec, budget: float, row: Row, recorder: MemoryRecorder,
            second: torch.Tensor | None = None, seed: list[str] | None = None) -> Row:
    try:
        search = spec.search.model_copy(update={"target": ParamsRatioTarget(params_ratio=budget)})
        ctx = SearchContext.of(model, windows, spec.score, search, log=SearchLog(recorder))
    except SearchError as exc:
        row.note = f"not reachable: {exc}"
        return row
    if seed:
        with torch.inference_mode():
            seed_steps(ctx, seed)
    start = time.perf_counter()
    records = run_search(ctx, spec.search.strategy)
    row.search_seconds = time.perf_counter() - start
    row.evaluated, row.reused = ctx.evaluated, ctx.reused
    row.blocks = within_budget(ctx, [r.block for r in records])
    pruned = remove_blocks(copy.deepcopy(model), row.blocks)
    row.params_removed = 1 - total_params(pruned) / ctx.dense_params
    with torch.inference_mode():
        row.eval_ppl = perplexity(pruned, held_out, batch_windows=1)
        if second is not None:
            row.second_ppl = perplexity(pruned, second, batch_windows=1)
    del pruned
    return row


def table(rows: list[Row], dense_ppl: float, dense_second: float | None = None, second: str = "") -> str:
    two = dense_second is not None
    lines = [
        f"Dense SmolLM2-135M: evaluation perplexity {dense_ppl:.2f}"
        + (f"; on {second} {dense_second:.2f}." if two else "."),
        "",
        "| method | metric / strategy / granularity | budget | params removed | eval ppl | "
        + (f"{second} ppl | " if two else "") + "search s | blocks removed |",
        "| --- | --- | --- | --- | --- | " + ("--- | " if two else "") + "--- | --- |",
    ]
    for r in rows:
        how = f"{r.metric} / {r.strategy} / {r.granularity}"
        if r.eval_ppl is None:
            lines.append(f"| {r.method} | {how} | {r.budget:.0%} | - | - | " + ("- | " if two else "")
                         + f"- | {r.note} |")
            continue
        blocks = ", ".join(b.removeprefix("layers.") for b in r.blocks)
        extra = f"{r.second_ppl:.2f} | " if two else ""
        lines.append(f"| {r.method} | {how} | {r.budget:.0%} | {100 * r.params_removed:.1f}% | {r.eval_ppl:.2f} | "
                     f"{extra}{r.search_seconds:.0f} | {blocks} |")
    return "\n".join(lines)


def plot(rows: list[Row], dense_ppl: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    # Several recipes pick the same blocks; markers and dashes keep overlapping lines visible.
    styles = itertools.cycle(itertools.product(["-", "--", ":"], ["o", "s", "^", "D", "v", "x"]))
    for method in dict.fromkeys(r.method for r in rows):
        points = sorted((100 * r.params_removed, r.eval_ppl) for r in rows if r.method == method and r.eval_ppl)
        if points:
            dash, marker = next(styles)
            ax.plot([0.0] + [x for x, _ in points], [dense_ppl] + [y for _, y in points], linestyle=dash,
                    marker=marker, markerfacecolor="none", label=method)
    ax.set_yscale("log")
    ax.set_xlabel("parameters removed (%)")
    ax.set_ylabel("evaluation perplexity (log scale)")
    ax.set_title("SmolLM2-135M, no recovery: evaluation perplexity against parameters removed", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2], help="params_ratio targets")
    parser.add_argument("--only", nargs="+", default=None,
                        help="methods by exact label, or pipelines / labels containing one of these")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--samples", type=int, default=None, help="calibration windows (default: the pipelines')")
    parser.add_argument("--with-racing", action="store_true", help="add BlockPruner raced, with both objectives")
    parser.add_argument("--second-domain", default=None, help="also evaluate on this corpus's evaluation split")
    parser.add_argument("--race", action="store_true",
                        help="score every perplexity recipe in search.mode racing (the exact choice with 99%% "
                             "confidence, for much less work at large calibration sets)")
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--out", default=str(RESULTS / "compare_methods"), help="results path without extension")
    parser.add_argument("--replot", action="store_true", help="only redraw the table and plot from the .json")
    parser.add_argument("--catalog", default=None,
                        help="a DuckDB catalog that records every search's scores, so an interrupted run resumes")
    parser.add_argument("--seed-steps", default=None, metavar="JSON",
                        help="with --catalog: commit an iterative method's removal order from an earlier results "
                             ".json of the same settings as its first steps, so a larger budget goes on from it")
    args = parser.parse_args()
    if args.replot:
        replot(Path(args.out))
        return
    if args.threads:
        torch.set_num_threads(args.threads)

    candidates = METHODS + (RACING_METHODS if args.with_racing else ())
    methods = [m for m in candidates if not args.only or any(selects(o, m, candidates) for o in args.only)]
    samples = [f"calibration.samples={args.samples}"] if args.samples else []
    specs = {m: load_spec(ROOT / "pipelines" / m.pipeline, [*m.overrides, *samples]) for m in methods}
    if args.race:
        raced = ["search.mode=racing", "search.exact_scores=false"]
        specs = {m: load_spec(ROOT / "pipelines" / m.pipeline, [*m.overrides, *samples, *raced])
                 if spec.score.metric == "perplexity" and spec.search.mode is None else spec
                 for m, spec in specs.items()}
    base = next(iter(specs.values()))
    model_path = str(resolve_model(base.model.source).path)
    model = load_model(model_path, dtype=base.model.dtype).eval()
    windows, held_out = data(base, model_path, args.eval_tokens, args.eval_seq_len)
    second = (held_out_windows(args.second_domain, AutoTokenizer.from_pretrained(model_path), args.eval_tokens,
                               args.eval_seq_len) if args.second_domain else None)
    for spec in specs.values():  # one calibration and evaluation set for every method
        if spec.section_json("model", "calibration") != base.section_json("model", "calibration"):
            raise SystemExit(f"{spec.name} uses other model or calibration settings than {base.name}")
    started = time.perf_counter()
    with torch.inference_mode():
        dense_ppl = perplexity(model, held_out, batch_windows=1)
        dense_second = None if second is None else perplexity(model, second, batch_windows=1)
    print(f"dense evaluation perplexity {dense_ppl:.3f} on {held_out.numel()} tokens "
          f"({held_out.shape[0]} x {held_out.shape[1]}); calibration {windows.shape[0]} x {windows.shape[1]}",
          flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    catalog = None
    if args.seed_steps and not args.catalog:
        raise SystemExit("--seed-steps needs --catalog: the seeded steps are committed there")
    seeds = seeds_from(args.seed_steps) if args.seed_steps else {}
    if args.catalog:
        from catalog import Catalog

        catalog = Catalog(Path(args.catalog))
    for method, spec in specs.items():
        resumes = resumes_across_budgets(spec)  # a larger budget resumes the smaller one's search
        recorder = recorder_for(catalog, spec, method.label, None) if resumes else None
        for budget in sorted(args.budgets):
            if not resumes:
                recorder = recorder_for(catalog, spec, method.label, budget)
            row = Row(method.label, method.pipeline, spec.score.metric, spec.search.strategy,
                      spec.score.granularity, budget)
            seed = seeds.get(method.label)
            rows.append(run_one(model, windows, held_out, spec, budget, row, recorder, second, seed))
            print(f"{row.method:22s} {budget:.0%}: ppl {row.eval_ppl if row.eval_ppl else float('nan'):9.2f}  "
                  f"removed {100 * (row.params_removed or 0):5.1f}%  search {row.search_seconds or 0:6.1f}s  "
                  f"{row.note or ' '.join(row.blocks)}", flush=True)
            # Written after every row, so an interrupted run still leaves what it measured.
            write(out, rows, dense_ppl, windows, held_out, base, time.perf_counter() - started,
                  dense_second=dense_second, second=args.second_domain or "")
    print(f"wrote {out.with_suffix('.md')}, .json and .png")


def replot(out: Path) -> None:
    saved = json.loads(out.with_suffix(".json").read_text())
    rows = [Row(**r) for r in saved["rows"]]
    shapes = saved["calibration"], saved["evaluation"]
    windows, held_out = (torch.zeros(shape, dtype=torch.int64) for shape in shapes)
    base = load_spec(ROOT / "pipelines" / METHODS[0].pipeline)
    write(out, rows, saved["dense_ppl"], windows, held_out, base, saved["seconds"], saved.get("threads", 1),
          dense_second=saved.get("dense_second"), second=saved.get("second", ""))


def write(out: Path, rows: list[Row], dense_ppl: float, windows: torch.Tensor, held_out: torch.Tensor,
          base: PipelineSpec, seconds: float, threads: int | None = None, dense_second: float | None = None,
          second: str = "") -> None:
    threads = threads or torch.get_num_threads()
    header = (
        f"# Block-pruning recipes on SmolLM2-135M\n\n"
        f"Calibration: {windows.shape[0]} x {windows.shape[1]} tokens of builtin:wiki-vital-en (calibration split, "
        f"seed {base.calibration.seed}); evaluation: the first {held_out.numel()} tokens of its evaluation split in "
        f"{held_out.shape[1]}-token windows. Budgets are `search.target.params_ratio` (embeddings included in the "
        f"count); a run stops at the first removal that reaches its budget. No recovery. A one_shot or "
        f"iterative method's larger budget resumes from its smaller budget's recorded scores, hence ~0 s of "
        f"search. Wall time so far {seconds:.0f} s, {threads} torch thread(s).\n\n"
    )
    out.with_suffix(".md").write_text(header + table(rows, dense_ppl, dense_second, second) + "\n")
    out.with_suffix(".json").write_text(json.dumps(
        {"dense_ppl": dense_ppl, "dense_second": dense_second, "second": second,
         "calibration": list(windows.shape), "evaluation": list(held_out.shape),
         "seconds": seconds, "threads": threads, "rows": [asdict(r) for r in rows]}, indent=2))
    plot(rows, dense_ppl, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
