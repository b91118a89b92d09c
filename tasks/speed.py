"""Inference speed and memory of a model as it is served: prefill and decode tokens/s, KV-cache bytes per token.

Models are loaded the way a user loads the checkpoint (`from_pretrained`, with trust_remote_code for the
self-contained formats), so a pruned model is timed with the code it ships, not pruneflow's stand-ins.
Each timed run records wall and process CPU seconds. The benchmarks' tokens/s take the best of `repeats`
runs (other jobs only ever add time); a pipeline's speed rows store the median and the spread of its
repeats, so a report can tell a real difference from noise. Compare models measured in the same process, not seconds across machines.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from tasks.evaluation import Evaluation
from tasks.export.registry import format_of
from tasks.export.common import DTYPES
from tasks.export.trust import (TRUST_SETTING, TrustError, check_trusted, is_own_format, model_config,
                                package_config, ships_own_code)
from tasks.surgery.architecture import architecture_for
from tasks.surgery.kv_cache import cache_kwargs, output_cache

@dataclass(frozen=True)
class SpeedSettings:
    prefill_tokens: int = 512
    prefill_batches: tuple[int, ...] = (1, 8)
    decode_prompt: int = 32
    decode_tokens: int = 128
    repeats: int = 3

    @classmethod
    def quick(cls) -> "SpeedSettings":
        """Small enough to run inside a pipeline's evaluate stage; enough repeats for a median and a spread."""
        return cls(prefill_tokens=128, prefill_batches=(1,), decode_prompt=16, decode_tokens=32, repeats=5)


def load_for_serving(path: str | Path, dtype: str = "float32", device: str = "cpu",
                     trust_remote_code: bool = False) -> nn.Module:
    """`trust_remote_code` (the spec's) covers code a folder brings; a checkpoint whose code is exactly what
    this release writes runs it without that, since that code is the package's own."""
    path = Path(path)
    own = format_of(path).carries_code and ships_own_code(path)
    if format_of(path).carries_code and not own and not trust_remote_code:
        raise TrustError(
            f"{path}: its modeling code is not this pruneflow release's, so timing it would run code from the "
            f"folder; rewrite it with `pruneflow refresh-code {path}`, or set {TRUST_SETTING}: true"
        )
    if not own:
        check_trusted(path, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=DTYPES[dtype], trust_remote_code=own or trust_remote_code, attn_implementation=family_kernel(path, trust_remote_code)
    )
    return model.to(device).eval()


def family_kernel(path: Path, trusted: bool = False) -> str:
    """The attention kernel of the checkpoint's family as pruneflow runs it (SDPA, or eager where transformers
    refuses SDPA, as for Gemma 2's soft-capped attention), so dense and pruned models are timed alike."""
    config = package_config(path) if is_own_format(path) else model_config(path, trusted)
    return architecture_for(config.model_type).attn_implementation


def _tokens(model: nn.Module, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)
    return ids.to(next(model.parameters()).device)


def _sync(model: nn.Module) -> None:
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Timing:
    """One timed run. `cpu` is this process's CPU time: on a CPU shared with other jobs it leaves out the
    time the process waited for a core, which wall time counts."""

    wall: float
    cpu: float


class _Stopwatch:
    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self) -> "_Stopwatch":
        _sync(self.model)
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        _sync(self.model)
        self.timing = Timing(time.perf_counter() - self._wall, time.process_time() - self._cpu)


@torch.inference_mode()
def time_prefill(model: nn.Module, batch: int, tokens: int) -> Timing:
    """One forward over the prompt that fills the KV cache; only the last position's logits, as generation does."""
    ids = _tokens(model, batch, tokens)
    with _Stopwatch(model) as watch:
        model(ids, use_cache=True, logits_to_keep=1)
    return watch.timing


@torch.inference_mode()
def time_decode(model: nn.Module, prompt: int, new_tokens: int, batch: int = 1) -> Timing:
    """Greedy steps of one token each on the KV cache, after a prefill that is not timed."""
    out = model(_tokens(model, batch, prompt), use_cache=True, logits_to_keep=1)
    cache, token = output_cache(out), out.logits[:, -1:].argmax(-1)
    with _Stopwatch(model) as watch:
        for _ in range(new_tokens):
            out = model(token, use_cache=True, **cache_kwargs(cache))
            cache, token = output_cache(out), out.logits[:, -1:].argmax(-1)
    return watch.timing


def _best_wall(run, repeats: int, warmup: bool) -> float:
    if warmup:  # first calls allocate and pick kernels
        run()
    return min(run().wall for _ in range(repeats))


def prefill_tokens_per_s(model: nn.Module, batch: int, tokens: int, repeats: int = 3, warmup: bool = True) -> float:
    return batch * tokens / _best_wall(lambda: time_prefill(model, batch, tokens), repeats, warmup)


def decode_tokens_per_s(model: nn.Module, prompt: int, new_tokens: int, repeats: int = 3, batch: int = 1,
                        warmup: bool = True) -> float:
    return batch * new_tokens / _best_wall(lambda: time_decode(model, prompt, new_tokens, batch), repeats, warmup)


@dataclass(frozen=True)
class Rate:
    """Tokens/s over repeated runs: the median, and the spread (max - min) / median that says how far to
    trust a difference between two models."""

    median: float
    spread: float
    repeats: int

    @classmethod
    def of(cls, tokens: int, run, repeats: int) -> "Rate":
        run()  # warm-up: first calls allocate and pick kernels
        rates = sorted(tokens / run().wall for _ in range(repeats))
        median = statistics.median(rates)
        return cls(median, (rates[-1] - rates[0]) / median, repeats)


def cache_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def cache_layers_filled(cache) -> int:
    return sum(1 for layer in cache.layers if isinstance(getattr(layer, "keys", None), torch.Tensor))


@torch.inference_mode()
def kv_bytes_per_token(model: nn.Module, tokens: int = 16) -> float:
    ids = _tokens(model, 1, tokens)
    return cache_bytes(output_cache(model(ids, use_cache=True, logits_to_keep=1))) / tokens


def speed_evaluations(model_path: str | Path, stage: str, dtype: str = "float32", device: str = "cpu",
                      settings: SpeedSettings | None = None, trust_remote_code: bool = False) -> list[Evaluation]:
    """Rows of kind `speed` for the catalog: prefill and decode tokens/s, KV-cache bytes per token.

    `dataset` names the workload (batch x tokens), so rows of other settings never collide."""
    settings = settings or SpeedSettings.quick()
    model = load_for_serving(model_path, dtype, device, trust_remote_code)
    rows = []
    for batch in settings.prefill_batches:
        rate = Rate.of(batch * settings.prefill_tokens, lambda: time_prefill(model, batch, settings.prefill_tokens),
                       settings.repeats)
        rows += _rate_rows(stage, f"batch{batch}x{settings.prefill_tokens}", "prefill_tokens_per_s", rate,
                           batch * settings.prefill_tokens, settings.prefill_tokens)
    rate = Rate.of(settings.decode_tokens, lambda: time_decode(model, settings.decode_prompt, settings.decode_tokens),
                   settings.repeats)
    rows += _rate_rows(stage, f"batch1x{settings.decode_tokens}", "decode_tokens_per_s", rate, settings.decode_tokens,
                       settings.decode_prompt + settings.decode_tokens)
    rows.append(Evaluation(stage, "speed", "-", "kv_bytes_per_token", kv_bytes_per_token(model)))
    return rows


def _rate_rows(stage: str, workload: str, metric: str, rate: Rate, tokens: int, seq_len: int) -> list[Evaluation]:
    """The median (n_samples: the repeats behind it) and, as `<metric>_spread`, the relative spread."""
    return [Evaluation(stage, "speed", workload, metric, rate.median, tokens, seq_len, n_samples=rate.repeats),
            Evaluation(stage, "speed", workload, f"{metric}_spread", rate.spread, tokens, seq_len,
                       n_samples=rate.repeats)]
