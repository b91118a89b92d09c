"""Dense against pruned SmolLM2-135M where models are served: llama.cpp (llama-cpp-python) from the `gguf`
exports, side by side in one process, rounds alternating dense/pruned so that load from other jobs falls on
both. Prefill is one prompt of 512 tokens; decode is 128 greedy tokens after a 32-token prompt; batch 1
(llama-cpp-python's high-level API runs one sequence). The pruned model is the demo's eight attention
removals of `benchmarks/pruned_speed.py`, written in llama.cpp's `deci` layout; *ideal* is the ratio of
matmul FLOPs per token that the removed blocks imply (the same count as pruned_speed.py).

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.serving --threads 1

Needs llama-cpp-python (README: Serving engines). Writes benchmarks/results/serving.md and .json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from transformers import AutoTokenizer

from benchmarks.pruned_speed import DEMO_BLOCKS, TARGET_GAIN, decode_flops, prefill_flops
from benchmarks.search_speed import machine
from tasks.export import export_model
from tasks.export.common import kept_layers
from tasks.export.gguf_format import GGUF_FILE
from tasks.sources import resolve_model
from tasks.surgery import load_model, remove_blocks

RESULTS = Path(__file__).resolve().parent / "results"
PREFILL, PROMPT, DECODE = 512, 32, 128


def export_pair(root: Path) -> tuple[dict[str, Path], dict[str, float]]:
    """The dense and the pruned demo model as gguf files, and the ideal speed-ups their kept blocks imply."""
    source = resolve_model("builtin:smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    models = {"dense": load_model(source.path), "pruned": remove_blocks(load_model(source.path), list(DEMO_BLOCKS))}
    paths = {}
    for name, model in models.items():
        (root / name).mkdir()
        tokenizer.save_pretrained(root / name)
        export_model(model, root / name, "gguf")
        paths[name] = root / name / GGUF_FILE
    config = models["dense"].config
    layers = {name: kept_layers(model) for name, model in models.items()}
    ideal = {
        "prefill": prefill_flops(config, layers["dense"], 1, PREFILL) / prefill_flops(config, layers["pruned"], 1, PREFILL),
        "decode": decode_flops(config, layers["dense"], PROMPT + DECODE / 2)
        / decode_flops(config, layers["pruned"], PROMPT + DECODE / 2),
    }
    return paths, ideal


def llama_cpp_rates(paths: dict[str, Path], threads: int, rounds: int) -> dict:
    from llama_cpp import Llama

    engines = {name: Llama(model_path=str(path), n_ctx=1024, n_batch=512, n_threads=threads, verbose=False)
               for name, path in paths.items()}
    prompt = [(i * 7919) % 40000 + 100 for i in range(PREFILL)]

    def prefill(llm) -> float:
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        return PREFILL / (time.perf_counter() - start)

    def decode(llm) -> float:
        llm.reset()
        llm.eval(prompt[:PROMPT])
        start = time.perf_counter()
        for _ in range(DECODE):
            llm.eval([int(llm.sample(top_k=1, temp=0.0))])
        return DECODE / (time.perf_counter() - start)

    rates = {workload: {name: [] for name in engines} for workload in ("prefill", "decode")}
    for workload, run in (("prefill", prefill), ("decode", decode)):
        for llm in engines.values():
            run(llm)  # warm-up, discarded
        for r in range(rounds):
            for name in list(engines) if r % 2 == 0 else list(engines)[::-1]:
                rates[workload][name].append(run(engines[name]))
    return rates


def summary(rates: dict, ideal: dict) -> list[dict]:
    rows = []
    for workload, by_model in rates.items():
        best = {name: max(v) for name, v in by_model.items()}
        ratios = [p / d for p, d in zip(by_model["pruned"], by_model["dense"])]
        speedup = best["pruned"] / best["dense"]
        rows.append({"engine": "llama.cpp", "workload": workload, "dense": best["dense"], "pruned": best["pruned"],
                     "speedup_best": speedup, "speedup_median": statistics.median(ratios),
                     "ideal": ideal[workload], "gain": (speedup - 1) / (ideal[workload] - 1)})
    return rows


def markdown(report: dict) -> str:
    lines = ["# Dense against pruned where models are served", "",
             f"Produced by `python -m benchmarks.serving --threads {report['threads']}` (module docstring), "
             f"{report['rounds']} rounds. SmolLM2-135M, fp32 gguf files; pruned: {', '.join(DEMO_BLOCKS)} "
             "removed (llama.cpp `deci` layout).", "",
             f"Machine: {report['machine']['cpu_model']}, {report['machine']['cores_usable_by_process']} usable cores, "
             f"llama.cpp threads {report['threads']}, load average at start {report['machine']['load_average_1_5_15']}.",
             "",
             "| engine | workload | dense tok/s | pruned tok/s | speed-up (best) | speed-up (median) | ideal | gain realised |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in report["rows"]:
        lines.append(f"| {row['engine']} | {row['workload']} | {row['dense']:.1f} | {row['pruned']:.1f} | "
                     f"{row['speedup_best']:.3f}x | {row['speedup_median']:.3f}x | {row['ideal']:.3f}x | "
                     f"{row['gain']:.0%} |")
    decode = next(r for r in report["rows"] if r["workload"] == "decode")
    lines += ["", f"Decode target (gain realised >= {TARGET_GAIN:.0%} of ideal): "
              f"**{'met' if decode['gain'] >= TARGET_GAIN else 'not met'}**.", "",
              "*Gain realised* = (speed-up - 1) / (ideal - 1). Batch 8 and vLLM are not measured here yet.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        paths, ideal = export_pair(Path(tmp))
        rates = llama_cpp_rates(paths, args.threads, args.rounds)
    report = {"threads": args.threads, "rounds": args.rounds, "machine": machine(), "rates": rates,
              "rows": summary(rates, ideal)}
    (RESULTS / "serving.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "serving.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
