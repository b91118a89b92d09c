"""Pruned vs dense inference speed, same machine, one run: prefill and decode tokens/s, KV cache, size.

The dense model is the source checkpoint loaded with plain `from_pretrained`; the pruned one is
pruneflow's `remote_code` export loaded the way users load it (`trust_remote_code=True`), so it runs
the code it ships. Its `nemotron_nas` export runs the same modeling code; it is checked (format rules,
logits) but not timed separately.

    .venv/bin/python -m benchmarks.pruned_speed --threads 1

Writes benchmarks/results/pruned_speed.md and .json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from transformers import AutoTokenizer

from benchmarks.search_speed import machine
from tasks.export import export_model, load_checkpoint
from tasks.export.common import KeptLayer, kept_layers
from tasks.export.nemotron_nas import check_nemotron_nas
from tasks.sources import resolve_model
from tasks.speed import Timing, alternate, kv_bytes_per_token, load_for_serving, time_prefill
from tasks.surgery import remove_blocks, total_params
from tasks.surgery.kv_cache import cache_kwargs, output_cache

RESULTS = Path(__file__).resolve().parent / "results"
# The demo pipeline's first six picks on SmolLM2-135M, plus two more attention blocks.
DEMO_BLOCKS = ("layers.8.attn", "layers.7.attn", "layers.17.attn", "layers.5.attn", "layers.20.attn",
               "layers.26.attn", "layers.9.attn", "layers.22.attn")
TARGET_GAIN = 0.9  # decode must realise at least this fraction of the speed-up the removed compute implies
# Wall seconds, and this process's CPU seconds: on a CPU shared with other jobs the second leaves out time
# spent waiting for a core, which is noise for a comparison between two models.
CLOCKS = ("wall", "cpu")


# --- compute the removed blocks imply -------------------------------------------------------------
def _shapes(config) -> dict:
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    hidden = config.hidden_size
    return {
        "attn_params": hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2,  # q, o; k, v
        "mlp_params": 3 * hidden * config.intermediate_size,
        "head_params": hidden * config.vocab_size,
        "score_width": heads * head_dim,
    }


def decode_flops(config, layers: list[KeptLayer], context: float) -> float:
    """Matmul FLOPs of one decoded token attending to `context` cached positions."""
    s = _shapes(config)
    attn = sum(layer.attention for layer in layers) * (2 * s["attn_params"] + 4 * s["score_width"] * context)
    mlp = sum(layer.mlp for layer in layers) * 2 * s["mlp_params"]
    return attn + mlp + 2 * s["head_params"]


def prefill_flops(config, layers: list[KeptLayer], batch: int, tokens: int) -> float:
    """Matmul FLOPs of a causal prefill (scores and values over the lower triangle), logits of the last token."""
    s = _shapes(config)
    per_attn = 2 * s["attn_params"] * tokens + 2 * s["score_width"] * tokens * (tokens + 1)
    attn = sum(layer.attention for layer in layers) * per_attn
    mlp = sum(layer.mlp for layer in layers) * 2 * s["mlp_params"] * tokens
    return batch * (attn + mlp + 2 * s["head_params"])


# --- measuring ------------------------------------------------------------------------------------
def _rates(timings: dict[str, list[Timing]], tokens: int) -> dict:
    out = {}
    for name, runs in timings.items():
        per_clock = {clock: [tokens / getattr(t, clock) for t in runs] for clock in CLOCKS}
        out[name] = {clock: {"best": max(v), "median": statistics.median(v), "runs": v} for clock, v in per_clock.items()}
    return out


def interleaved(run: Callable[[nn.Module], Timing], tokens: int, models: dict[str, nn.Module], rounds: int) -> dict:
    """Tokens/s of each model by wall and by CPU clock, rounds alternating A B / B A so drifting load hits both
    (the pipeline's speed stage times its models the same way)."""
    return _rates(alternate({name: partial(run, model) for name, model in models.items()}, rounds), tokens)


@torch.inference_mode()
def lockstep_decode(models: dict[str, nn.Module], prompt: int, new_tokens: int) -> dict[str, Timing]:
    """Each model decodes its own greedy sequence on its KV cache, one step of each in turn (order flipped
    every step), so load from other jobs, which changes within a run, falls on both models alike."""
    ids = torch.randint(0, 1000, (1, prompt), generator=torch.Generator().manual_seed(0))
    state = {}
    for name, model in models.items():
        out = model(ids, use_cache=True, logits_to_keep=1)
        state[name] = (output_cache(out), out.logits[:, -1:].argmax(-1))
    wall, cpu = dict.fromkeys(models, 0.0), dict.fromkeys(models, 0.0)
    names = list(models)
    for step in range(new_tokens):
        for name in names if step % 2 == 0 else names[::-1]:
            cache, token = state[name]
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            out = models[name](token, use_cache=True, **cache_kwargs(cache))
            token = out.logits[:, -1:].argmax(-1)
            wall[name] += time.perf_counter() - start_wall
            cpu[name] += time.process_time() - start_cpu
            state[name] = (output_cache(out), token)
    return {name: Timing(wall[name], cpu[name]) for name in models}


def decode_rounds(models: dict[str, nn.Module], prompt: int, new_tokens: int, rounds: int) -> dict:
    lockstep_decode(models, prompt, new_tokens)  # warm-up, discarded
    timings: dict[str, list[Timing]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, timing in lockstep_decode(models, prompt, new_tokens).items():
            timings[name].append(timing)
    return _rates(timings, new_tokens)


def checkpoint_bytes(path: Path) -> dict:
    weights = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    return {"weights": weights, "folder": sum(p.stat().st_size for p in path.rglob("*") if p.is_file())}


@torch.inference_mode()
def max_logit_diff(a: nn.Module, b: nn.Module, tokens: int = 64) -> float:
    ids = torch.randint(0, a.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1))
    return (a(ids).logits - b(ids).logits).abs().max().item()


def _summary(entry: dict) -> dict:
    return {f"{name} {clock}": round(entry[name][clock]["best"], 1) for name in ("dense", "pruned") for clock in CLOCKS}


def run(args) -> dict:
    source = resolve_model(args.model).path
    blocks = list(args.blocks)
    report: dict = {"machine": machine(), "args": {**vars(args), "blocks": blocks}, "model": args.model}
    with tempfile.TemporaryDirectory(prefix="pruned-speed-") as tmp:
        pruned_in_memory = load_checkpoint(source)
        dense_config = pruned_in_memory.config
        dense_layers = kept_layers(pruned_in_memory)
        remove_blocks(pruned_in_memory, blocks)
        layers = kept_layers(pruned_in_memory)
        exports = {fmt: Path(tmp) / fmt for fmt in ("remote_code", "nemotron_nas")}
        tokenizer = AutoTokenizer.from_pretrained(source)
        for fmt, path in exports.items():
            export_model(pruned_in_memory, path, fmt)
            tokenizer.save_pretrained(path)  # as the prune stage does, so folder sizes compare like for like
        checks = {
            "nemotron_nas_rule_problems": check_nemotron_nas(exports["nemotron_nas"]),
            **{f"{fmt}_max_logit_diff": max_logit_diff(pruned_in_memory, load_for_serving(path))
               for fmt, path in exports.items()},
        }
        print("checks:", checks, flush=True)
        del pruned_in_memory
        gc.collect()

        models = {"dense": load_for_serving(source), "pruned": load_for_serving(exports["remote_code"])}
        sizes = {
            "dense": {"params": total_params(models["dense"]), **checkpoint_bytes(Path(source))},
            "pruned": {"params": total_params(models["pruned"]), **checkpoint_bytes(exports["remote_code"])},
        }
        kv = {name: kv_bytes_per_token(m) for name, m in models.items()}
        speed = {}
        for batch in args.prefill_batches:
            key = f"prefill_batch{batch}x{args.prefill_tokens}"
            speed[key] = interleaved(lambda m, b=batch: time_prefill(m, b, args.prefill_tokens),
                                     batch * args.prefill_tokens, models, args.prefill_rounds)
            speed[key]["ideal"] = (prefill_flops(dense_config, dense_layers, batch, args.prefill_tokens)
                                   / prefill_flops(dense_config, layers, batch, args.prefill_tokens))
            print(key, _summary(speed[key]), flush=True)
        key = f"decode_batch1x{args.decode_tokens}"
        speed[key] = decode_rounds(models, args.decode_prompt, args.decode_tokens, args.decode_rounds)
        context = args.decode_prompt + (args.decode_tokens + 1) / 2  # mean cache length over the steps
        speed[key]["ideal"] = decode_flops(dense_config, dense_layers, context) / decode_flops(dense_config, layers, context)
        print(key, _summary(speed[key]), flush=True)

    for entry in speed.values():
        for clock in CLOCKS:
            dense, pruned = entry["dense"][clock], entry["pruned"][clock]
            ratio = pruned["best"] / dense["best"]
            entry[clock] = {"speedup": ratio, "speedup_median": pruned["median"] / dense["median"],
                            "gain_realised": (ratio - 1) / (entry["ideal"] - 1)}
    kept_attention = sum(layer.attention for layer in layers)
    report.update(
        checks=checks, speed=speed, sizes=sizes,
        kv_bytes_per_token={**kv, "ratio": kv["pruned"] / kv["dense"],
                            "kept_attention_ratio": kept_attention / len(dense_layers)},
        layers={"dense": len(dense_layers), "pruned": len(layers), "kept_attention": kept_attention,
                "kept_mlp": sum(layer.mlp for layer in layers)},
        load_average_at_end=list(os.getloadavg()),
    )
    return report


# --- report ---------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    m, a, speed = report["machine"], report["args"], report["speed"]
    decode = speed[f"decode_batch1x{a['decode_tokens']}"]
    kv, sizes, layers = report["kv_bytes_per_token"], report["sizes"], report["layers"]
    verdicts = {clock: "met" if decode[clock]["gain_realised"] >= TARGET_GAIN else "NOT met" for clock in CLOCKS}
    out = [
        "# Pruned vs dense inference speed",
        "",
        f"Produced by `python -m benchmarks.pruned_speed` (module docstring) on {report['model']} with "
        f"{len(a['blocks'])} sub-blocks removed: {', '.join(f'`{b}`' for b in a['blocks'])}. Dense: the source "
        "checkpoint with plain `from_pretrained`; pruned: pruneflow's `remote_code` export with "
        "`trust_remote_code=True` (its `nemotron_nas` export runs the same modeling code). Both in one process; "
        "prefill runs alternate A B, B A, ...; decode runs both models in lockstep, one greedy step of each in "
        "turn on its own KV cache, timing every step. Tokens/s is the best round (other jobs only add time), "
        "the median ratio is shown beside it.",
        "",
        f"Machine: {m['cpu_model']}, {m['logical_cores']} logical cores ({m['cores_usable_by_process']} usable), "
        f"torch {m['torch']} ({a['threads']} threads), transformers {m['transformers']}, Python {m['python']}, "
        f"fp32, sdpa attention. Load average (1/5/15 min) at start "
        f"{'/'.join(f'{x:.1f}' for x in m['load_average_1_5_15'])}, at end "
        f"{'/'.join(f'{x:.1f}' for x in report['load_average_at_end'])}.",
        "",
        "*Ideal* is the ratio of matmul FLOPs per token, dense over pruned (projections, MLP, causal attention "
        "scores and values, the LM head; prefill keeps the last token's logits only, decode attends to the "
        "mean cache length). *Gain realised* = (speed-up - 1) / (ideal - 1). *wall*: elapsed seconds; *cpu*: "
        "this process's CPU seconds, which leave out time spent waiting for a core while other jobs ran "
        "(the machine was shared, see the load average), so they are the steadier comparison here.",
        "",
        "| workload | clock | dense tok/s | pruned tok/s | speed-up (best) | speed-up (median) | ideal | gain realised |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, entry in speed.items():
        for clock in CLOCKS:
            ratio = entry[clock]
            out.append(
                f"| {key.replace('_', ' ')} | {clock} | {entry['dense'][clock]['best']:.1f} | "
                f"{entry['pruned'][clock]['best']:.1f} | {ratio['speedup']:.3f}x | {ratio['speedup_median']:.3f}x | "
                f"{entry['ideal']:.3f}x | {100 * ratio['gain_realised']:.0f}% |"
            )
    out += [
        "",
        f"Decode target (gain realised >= {100 * TARGET_GAIN:.0f}% of ideal): CPU clock **{verdicts['cpu']}**, "
        f"wall clock **{verdicts['wall']}**.",
        "",
        "| | dense | pruned | pruned / dense |",
        "|---|---:|---:|---:|",
        f"| layers (kept attention / MLP) | {layers['dense']} ({layers['dense']} / {layers['dense']}) | "
        f"{layers['pruned']} ({layers['kept_attention']} / {layers['kept_mlp']}) | |",
        f"| KV-cache bytes per token | {kv['dense']:.0f} | {kv['pruned']:.0f} | {kv['ratio']:.4f} "
        f"(kept attention {layers['kept_attention']}/{layers['dense']} = {kv['kept_attention_ratio']:.4f}) |",
        f"| parameters | {sizes['dense']['params']:,} | {sizes['pruned']['params']:,} | "
        f"{sizes['pruned']['params'] / sizes['dense']['params']:.4f} |",
        f"| checkpoint weights (bytes) | {sizes['dense']['weights']:,} | {sizes['pruned']['weights']:,} | "
        f"{sizes['pruned']['weights'] / sizes['dense']['weights']:.4f} |",
        f"| checkpoint folder (bytes) | {sizes['dense']['folder']:,} | {sizes['pruned']['folder']:,} | "
        f"{sizes['pruned']['folder'] / sizes['dense']['folder']:.4f} |",
        "",
        "Checks: " + ", ".join(f"{k} = {v}" for k, v in report["checks"].items()) + ".",
        "",
        "All runs (tokens/s):",
        "",
    ]
    for key, entry in speed.items():
        for clock in CLOCKS:
            out.append(f"- {key}, {clock}: dense {', '.join(f'{x:.1f}' for x in entry['dense'][clock]['runs'])}; "
                       f"pruned {', '.join(f'{x:.1f}' for x in entry['pruned'][clock]['runs'])}")
    out.append("")
    return "\n".join(out)


def write(report: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pruned_speed.json").write_text(json.dumps(report, indent=1))
    (RESULTS / "pruned_speed.md").write_text(markdown(report))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--blocks", type=lambda s: tuple(s.split(",")), default=DEMO_BLOCKS,
                        help="comma-separated block ids to remove")
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--prefill-batches", type=lambda s: tuple(int(x) for x in s.split(",")), default=(1, 8))
    parser.add_argument("--prefill-rounds", type=int, default=3)
    parser.add_argument("--decode-prompt", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--decode-rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads; on a shared machine keep below the free cores")
    parser.add_argument("--report-only", action="store_true", help="re-render the markdown from the saved JSON")
    args = parser.parse_args(argv)
    if args.report_only:
        write(json.loads((RESULTS / "pruned_speed.json").read_text()))
        return 0
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    report = run(args)
    report["wall_seconds"] = time.perf_counter() - started
    write(report)
    decode = report["speed"][f"decode_batch1x{args.decode_tokens}"]
    for clock in CLOCKS:
        print(f"decode ({clock} clock) speed-up {decode[clock]['speedup']:.3f}x, ideal {decode['ideal']:.3f}x, "
              f"gain realised {100 * decode[clock]['gain_realised']:.0f}%")
    print(f"wrote {RESULTS.name}/pruned_speed.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
