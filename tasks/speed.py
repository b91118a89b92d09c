"""Inference speed and memory of a model as it is served: prefill and decode timings, KV-cache bytes per token.

Models are loaded the way a user loads the checkpoint (`from_pretrained`, with trust_remote_code for the
self-contained formats), so a pruned model is timed with the code it ships, not pruneflow's stand-ins.
Each timed run records wall and process CPU seconds. Models compared with each other are timed by
`alternate`, round by round in one process, so that load from other jobs, which changes while they run,
falls on all of them alike; compare models measured that way, not seconds across runs or machines.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, TypeVar

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from tasks.export.registry import format_of
from tasks.export.common import DTYPES
from tasks.export.trust import (TRUST_SETTING, TrustError, check_trusted, is_own_format, model_config,
                                package_config, ships_own_code)
from tasks.surgery.architecture import architecture_for
from tasks.surgery.kv_cache import cache_kwargs, output_cache

T = TypeVar("T")


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


def alternate(runs: Mapping[str, Callable[[], T]], rounds: int, warmup: bool = True,
              after: Callable[[str, int], None] | None = None) -> dict[str, list[T]]:
    """Each run `rounds` times, the runs taking turns within a round and the order reversed every other
    round (A B, B A, A B, ...), so that a drift in the machine's load falls on every run alike and no run
    always goes first. With `warmup`, each runs once before, discarded (first calls allocate and pick
    kernels). `after(name, round)` follows every run: round 0 is the warm-up, then 1..rounds."""
    names = list(runs)
    if warmup:
        for name in names:
            runs[name]()
            if after is not None:
                after(name, 0)
    results: dict[str, list[T]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            results[name].append(runs[name]())
            if after is not None:
                after(name, r + 1)
    return results
