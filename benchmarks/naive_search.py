"""A plain BlockPruner iterative search, the reference the benchmarks time pruneflow against.

Deliberately naive so that it is obviously correct: every candidate of every step costs one ordinary
Hugging Face forward per calibration window. It shares no code with pruneflow's scorer (only the
block-id spelling), so agreement between the two is evidence, not a tautology.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


class ZeroAttention(nn.Module):
    """Stands in for a skipped attention half: the decoder layer then adds exactly zero to the residual."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return torch.zeros_like(hidden_states), None


class ZeroMLP(nn.Module):
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def sublayer_candidates(model: nn.Module, removed: list[str]) -> list[str]:
    """Every attention and MLP half not yet removed, in model order."""
    out = []
    for index in range(len(decoder_layers(model))):
        for part in ("attn", "mlp"):
            block = f"layers.{index}.{part}"
            if block not in removed:
                out.append(block)
    return out


@contextmanager
def skipping(model: nn.Module, blocks: list[str]):
    """Swap the named halves for zero stand-ins; the originals are put back even if the forward fails."""
    layers = decoder_layers(model)
    saved = []
    try:
        for block in blocks:
            _, index, part = block.split(".")
            layer = layers[int(index)]
            name = "self_attn" if part == "attn" else "mlp"
            saved.append((layer, name, getattr(layer, name)))
            setattr(layer, name, ZeroAttention() if part == "attn" else ZeroMLP())
        yield
    finally:
        for layer, name, module in reversed(saved):
            setattr(layer, name, module)


@dataclass
class NaiveStep:
    step: int
    block: str
    value: float
    scores: dict[str, float]
    seconds: dict[str, float]


@dataclass
class NaiveResult:
    steps: list[NaiveStep] = field(default_factory=list)
    forwards: int = 0  # full HF forwards of one window each

    @property
    def blocks(self) -> list[str]:
        return [s.block for s in self.steps]


def window_nll(model: nn.Module, window: torch.Tensor) -> float:
    """Summed next-token NLL of one window through the model's own forward (float64 accumulation)."""
    logits = model(input_ids=window.unsqueeze(0), use_cache=False).logits[0, :-1].float()
    return float(F.cross_entropy(logits, window[1:], reduction="sum").double())


def perplexity(model: nn.Module, windows: torch.Tensor) -> tuple[float, int]:
    """exp(mean next-token NLL over all windows), and the number of forwards it took."""
    total = 0.0
    for window in windows:
        total += window_nll(model, window)
    predictions = windows.shape[0] * (windows.shape[1] - 1)
    return math.exp(total / predictions), windows.shape[0]


@torch.inference_mode()
def naive_search(model: nn.Module, windows: torch.Tensor, steps: int, on_score=None) -> NaiveResult:
    result = NaiveResult()
    removed: list[str] = []
    for step in range(steps):
        scores: dict[str, float] = {}
        seconds: dict[str, float] = {}
        candidates = sublayer_candidates(model, removed)
        for block in candidates:
            start = time.perf_counter()
            with skipping(model, [*removed, block]):
                value, forwards = perplexity(model, windows)
            seconds[block] = time.perf_counter() - start
            scores[block] = value
            result.forwards += forwards
            if on_score:
                on_score(step, block, value)
        # min() keeps the first of equal values, and candidates are in model order.
        chosen = min(candidates, key=lambda b: scores[b])
        result.steps.append(NaiveStep(step, chosen, scores[chosen], scores, seconds))
        removed.append(chosen)
    return result
