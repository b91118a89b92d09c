"""Dense against pruned SmolLM2-135M where models are served, each engine's two models side by side in one
process, rounds alternating dense/pruned so that load from other jobs falls on both.

- llama.cpp (llama-cpp-python) from the `gguf` exports (the pruned one in llama.cpp's `deci` layout), one
  sequence (its high-level API runs one): prefill of 512 tokens, 128 greedy decode steps after 32.
- vLLM's CPU build (its own environment, as tests/test_vllm.py) with the offline `LLM` API: the dense source
  checkpoint and the pruned `nemotron_nas` export, batches of 1 and 8: prefill of 512-token prompts (one
  token generated), decode rate from 129 against 1 generated tokens after 32-token prompts.

The pruned model is the demo's eight attention removals of `benchmarks/pruned_speed.py`; *ideal* is the ratio
of matmul FLOPs per token that the removed blocks imply (the same count as pruned_speed.py).

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.serving --threads 1

Needs llama-cpp-python and the vLLM environment (README: Serving engines; `--no-vllm` leaves vLLM out).
Writes benchmarks/results/serving.md and .json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

from transformers import AutoTokenizer

from benchmarks.pruned_speed import DEMO_BLOCKS, TARGET_GAIN, decode_flops, prefill_flops
from benchmarks.search_speed import machine
from tasks.export import export_model
from tasks.export.common import kept_layers
from tasks.export.gguf_format import GGUF_FILE
from tasks.sources import resolve_model
from tasks.speed import alternate
from tasks.surgery import load_model, remove_blocks

RESULTS = Path(__file__).resolve().parent / "results"
PREFILL, PROMPT, DECODE = 512, 32, 128


def export_pair(root: Path) -> tuple[dict[str, dict[str, Path]], dict[str, float]]:
    """Per engine, the dense and the pruned demo model as it serves them, and the ideal speed-ups."""
    source = resolve_model("builtin:smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    models = {"dense": load_model(source.path), "pruned": remove_blocks(load_model(source.path), list(DEMO_BLOCKS))}
    paths = {"llama.cpp": {}, "vLLM": {"dense": Path(source.path), "pruned": root / "nemotron_nas"}}
    for name, model in models.items():
        (root / name).mkdir()
        tokenizer.save_pretrained(root / name)
        export_model(model, root / name, "gguf")
        paths["llama.cpp"][name] = root / name / GGUF_FILE
    export_model(models["pruned"], root / "nemotron_nas", "nemotron_nas")
    tokenizer.save_pretrained(root / "nemotron_nas")
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

    return {workload: alternate({name: partial(run, llm) for name, llm in engines.items()}, rounds)
            for workload, run in (("prefill batch1", prefill), ("decode batch1", decode))}


VLLM_SPEED = r"""
import json, sys, time

def main():
    import numpy as np
    from vllm import LLM, SamplingParams
    case = json.load(open(sys.argv[1]))
    engines = {name: LLM(model=path, dtype="float32", trust_remote_code=True, max_model_len=1024,
                         enforce_eager=True, seed=0, enable_prefix_caching=False)
               for name, path in case["paths"].items()}
    rng = np.random.default_rng(0)

    def timed(llm, batch, length, new):
        prompts = [{"prompt_token_ids": rng.integers(100, 40000, length).tolist()} for _ in range(batch)]
        params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start

    def prefill(llm, batch):
        return batch * case["prefill"] / timed(llm, batch, case["prefill"], 1)

    def decode(llm, batch):
        steps = case["decode"]
        return batch * steps / (timed(llm, batch, case["prompt"], steps + 1) - timed(llm, batch, case["prompt"], 1))

    rates = {}
    for workload, run in (("prefill", prefill), ("decode", decode)):
        for batch in (1, 8):
            key = f"{workload} batch{batch}"
            for llm in engines.values():
                run(llm, batch)  # warm-up, discarded
            rates[key] = {name: [] for name in engines}
            for r in range(case["rounds"]):
                for name in list(engines) if r % 2 == 0 else list(engines)[::-1]:
                    rates[key][name].append(run(engines[name], batch))
    json.dump(rates, open(sys.argv[2], "w"))

if __name__ == "__main__":
    main()
"""


def vllm_rates(paths: dict[str, Path], rounds: int, root: Path) -> dict:
    import os
    import subprocess

    python = Path(os.environ.get("PRUNEFLOW_CACHE", Path.home() / ".cache" / "pruneflow")) / "vllm-venv/bin/python"
    (root / "speed.py").write_text(VLLM_SPEED)
    (root / "case.json").write_text(json.dumps({"paths": {k: str(v) for k, v in paths.items()}, "rounds": rounds,
                                                "prefill": PREFILL, "prompt": PROMPT, "decode": DECODE}))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1"}
    subprocess.run([str(python), "speed.py", "case.json", "rates.json"], cwd=root, env=env, check=True)
    return json.loads((root / "rates.json").read_text())


def summary(engine: str, rates: dict, ideal: dict) -> list[dict]:
    rows = []
    for workload, by_model in rates.items():
        best = {name: max(v) for name, v in by_model.items()}
        ratios = [p / d for p, d in zip(by_model["pruned"], by_model["dense"])]
        speedup = best["pruned"] / best["dense"]
        target = ideal[workload.split()[0]]
        rows.append({"engine": engine, "workload": workload, "dense": best["dense"], "pruned": best["pruned"],
                     "speedup_best": speedup, "speedup_median": statistics.median(ratios),
                     "ideal": target, "gain": (speedup - 1) / (target - 1)})
    return rows


def markdown(report: dict) -> str:
    lines = ["# Dense against pruned where models are served", "",
             f"Produced by `python -m benchmarks.serving --threads {report['threads']}` (module docstring), "
             f"{report['rounds']} rounds. SmolLM2-135M, fp32; pruned: {', '.join(DEMO_BLOCKS)} removed. "
             "llama.cpp: `gguf` exports (the pruned one in the `deci` layout); vLLM: the source checkpoint and the "
             "`nemotron_nas` export.", "",
             f"Machine: {report['machine']['cpu_model']}, {report['machine']['cores_usable_by_process']} usable cores, "
             f"llama.cpp threads {report['threads']}, load average at start {report['machine']['load_average_1_5_15']}.",
             "",
             "| engine | workload | dense tok/s | pruned tok/s | speed-up (best) | speed-up (median) | ideal | gain realised |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in report["rows"]:
        lines.append(f"| {row['engine']} | {row['workload']} | {row['dense']:.1f} | {row['pruned']:.1f} | "
                     f"{row['speedup_best']:.3f}x | {row['speedup_median']:.3f}x | {row['ideal']:.3f}x | "
                     f"{row['gain']:.0%} |")
    lines += ["", f"Decode target (gain realised >= {TARGET_GAIN:.0%} of ideal, best rounds): "]
    for row in report["rows"]:
        if row["workload"].startswith("decode"):
            lines.append(f"- {row['engine']} {row['workload']}: **{'met' if row['gain'] >= TARGET_GAIN else 'not met'}** "
                         f"({row['gain']:.0%}; median ratio {row['speedup_median']:.3f}x)")
    lines += ["", "*Gain realised* = (speed-up - 1) / (ideal - 1); tokens/s are each model's best round.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--no-vllm", action="store_true", help="llama.cpp only")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        paths, ideal = export_pair(Path(tmp))
        rates = {"llama.cpp": llama_cpp_rates(paths["llama.cpp"], args.threads, args.rounds)}
        if not args.no_vllm:
            rates["vLLM"] = vllm_rates(paths["vLLM"], args.rounds, Path(tmp))
    report = {"threads": args.threads, "rounds": args.rounds, "machine": machine(), "rates": rates,
              "rows": [row for engine, r in rates.items() for row in summary(engine, r, ideal)]}
    (RESULTS / "serving.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "serving.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
