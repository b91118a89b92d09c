"""Models larger than memory: peak memory, time and bytes read, resident against streamed.

Random-init Llama-shaped models of real shapes (written once to `$PRUNEFLOW_CACHE/scale/NAME`, layer by
layer, so a model larger than this machine's memory is written without holding it) go through the
calibration perplexity pass, one BlockPruner step (exact perplexity, sublayer candidates) and an `hf`
export of a depth cut, each in a process of its own, so that its peak RSS (VmHWM) is its own. Streamed
runs get a budget of two layers (or the embedding with the head, when larger); resident runs, where the
weights fit, load the model whole. Resident and streamed runs of one size go back to back; compare their
ratio, not seconds across sizes (other jobs share the machine). Writes `benchmarks/results/scale.{json,md,png}`.

    .venv/bin/python -m benchmarks.scale --sizes 0.1b 1b --windows 2 --seq-len 128
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
GB = 1e9

# Real shapes: SmolLM2-135M, Llama-3.2-1B, Llama-3.2-3B-like at 4B, and a 16B whose bf16 weights exceed
# this machine's 24 GiB.
SHAPES = {
    "0.1b": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "4b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=36, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "16b": dict(hidden_size=5120, intermediate_size=17408, num_hidden_layers=48, num_attention_heads=40,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
TASKS = ("perplexity", "step", "export")


def cache_dir() -> Path:
    return Path(os.environ.get("PRUNEFLOW_CACHE", Path.home() / ".cache" / "pruneflow")) / "scale"


def config_of(name: str):
    from transformers import LlamaConfig

    return LlamaConfig(max_position_embeddings=4096, **SHAPES[name])


def write_model(name: str, dtype: torch.dtype = torch.bfloat16) -> Path:
    """The random model's folder, written once: shards of whole layers, never the whole model in memory."""
    folder = cache_dir() / name
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = config_of(name)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    skeleton.tie_weights()  # a tied head is written once, under the embedding's name, as save_pretrained does
    tmp = folder.with_suffix(".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    groups: dict[str, dict[str, torch.Size]] = {}
    for tensor_name, param in skeleton.named_parameters():
        parts = tensor_name.split(".")
        group = f"layer{int(parts[2]):03d}" if parts[1] == "layers" else "outer"
        groups.setdefault(group, {})[tensor_name] = param.shape
    weight_map = {}
    for number, (group, shapes) in enumerate(sorted(groups.items()), start=1):
        file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: _random(n, shape, generator, dtype) for n, shape in shapes.items()}
        save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def _random(name: str, shape: torch.Size, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    return (torch.randn(shape, generator=generator) * 0.02).to(dtype)


def streaming_budget_gb(name: str) -> float:
    """Two decoder layers, or the embedding with the head where that is larger, in float32, plus 1%."""
    c = config_of(name)
    head_dim = c.hidden_size // c.num_attention_heads
    attn = c.hidden_size * head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    layer = attn + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size
    embed = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    return max(2 * layer, embed + layer) * 4 * 1.01 / GB


def weights_gb(name: str) -> float:
    """The model's weights in float32 (tied ones once)."""
    return sum(p.numel() for p in _skeleton(name).parameters()) * 4 / GB


def _skeleton(name: str):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config_of(name))
    model.tie_weights()
    return model


# --- one measurement, in a process of its own ------------------------------------------------------------

def child(name: str, mode: str, task: str, windows: int, seq_len: int) -> dict:
    from tasks.load import ModelSpec, open_model
    from tasks.residual import perplexity
    from tasks.stream.residency import streamed

    torch.manual_seed(1)
    folder = write_model(name)
    budget = streaming_budget_gb(name) if mode == "streamed" else 1e6
    spec = ModelSpec(source=str(folder), device="cpu", memory_budget_gb=budget)
    tokens = torch.randint(0, config_of(name).vocab_size, (windows, seq_len))
    start = time.perf_counter()
    model = open_model(str(folder), spec, "benchmark", streams=True)
    opened = time.perf_counter() - start
    detail: dict = {}
    if task == "perplexity":
        detail["value"] = perplexity(model, tokens, batch_windows=1)
    elif task == "step":
        from tasks.search import SearchContext, SearchLog, run_search
        from tasks.search.settings import ScoreSection, SearchSection

        ctx = SearchContext.of(model, tokens, ScoreSection(granularity="sublayer"),
                               SearchSection(target={"blocks": 1}), log=SearchLog())
        record = run_search(ctx, "iterative")[0]
        detail.update(block=record.block, value=record.value)
    else:
        from tasks.export import export_model
        from tasks.surgery import remove_blocks

        remove_blocks(model, ["layers.1"])
        with tempfile.TemporaryDirectory(dir=cache_dir()) as out:
            export_model(model if streamed(model) else model.to("cpu"), Path(out), "hf")
            detail["written_gb"] = sum(f.stat().st_size for f in Path(out).iterdir()) / GB
    weights = streamed(model)
    return {"size": name, "mode": mode, "task": task, "seconds": time.perf_counter() - start, "open_seconds": opened,
            "peak_rss_gb": _peak_rss() / GB, "budget_gb": budget if mode == "streamed" else None,
            "read_gb": weights.index.bytes_read / GB if weights else None, **detail}


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(name: str, mode: str, task: str, args) -> dict:
    command = [sys.executable, "-m", "benchmarks.scale", "--child", name, mode, task,
               "--windows", str(args.windows), "--seq-len", str(args.seq_len)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{name} {mode} {task} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["0.1b", "1b"], choices=sorted(SHAPES))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--skip", nargs="*", default=[], metavar="SIZE:TASK",
                        help="leave a task out at a size (e.g. 1b:step, 16b:export)")
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--resident-limit-gb", type=float, default=16.0,
                        help="resident runs only for float32 weights below this")
    parser.add_argument("--child", nargs=3, metavar=("SIZE", "MODE", "TASK"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    if args.child:
        print(json.dumps(child(*args.child, args.windows, args.seq_len)))
        return
    rows = []
    for name in args.sizes:
        write_model(name)
        size_gb = weights_gb(name)
        for task in args.tasks:
            if f"{name}:{task}" in args.skip:
                continue
            modes = ["resident", "streamed"] if size_gb < args.resident_limit_gb else ["streamed"]
            for mode in modes:
                row = measure(name, mode, task, args)
                row["weights_gb"] = size_gb
                rows.append(row)
                print(json.dumps(row), flush=True)
    write_results(rows, args)


def write_results(rows: list[dict], args) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps({"windows": args.windows, "seq_len": args.seq_len,
                                                    "rows": rows}, indent=2) + "\n")
    lines = [
        "# Models larger than memory: resident against streamed",
        "",
        f"Random-init Llama shapes, fp32 compute on 2 CPU cores, {args.windows} windows x {args.seq_len} tokens; "
        "each row a process of its own (peak RSS = its VmHWM, imports included). Streamed budget: two layers "
        "(or embedding + one layer, when larger) in fp32. Written by `python -m benchmarks.scale "
        f"--sizes {' '.join(args.sizes)} --windows {args.windows} --seq-len {args.seq_len}`.",
        "",
        "| size | fp32 weights GB | task | mode | budget GB | peak RSS GB | read GB | s | streamed / resident time | value |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    resident = {(r["size"], r["task"]): r for r in rows if r["mode"] == "resident"}
    for r in rows:
        base = resident.get((r["size"], r["task"]))
        ratio = f"{r['seconds'] / base['seconds']:.2f}" if r["mode"] == "streamed" and base else ""
        value = r.get("block", "") + (f" {r['value']:.4f}" if "value" in r else f"{r.get('written_gb', 0):.2f} GB written")
        budget = "" if r["budget_gb"] is None else f"{r['budget_gb']:.3f}"
        read = "" if r["read_gb"] is None else f"{r['read_gb']:.2f}"
        lines.append(f"| {r['size']} | {r['weights_gb']:.2f} | {r['task']} | {r['mode']} | {budget} | "
                     f"{r['peak_rss_gb']:.2f} | {read} | {r['seconds']:.1f} | {ratio} | {value} |")
    (RESULTS / "scale.md").write_text("\n".join(lines) + "\n")
    _plot(rows)


def _plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, marker in (("resident", "o"), ("streamed", "s")):
        points = sorted((r["weights_gb"], r["peak_rss_gb"]) for r in rows if r["mode"] == mode)
        if points:
            ax.plot(*zip(*points), marker=marker, linestyle="", label=mode)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("fp32 weights (GB)")
    ax.set_ylabel("peak RSS (GB)")
    ax.set_title("Peak memory per run, every task")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "scale.png", dpi=120)


if __name__ == "__main__":
    main()
