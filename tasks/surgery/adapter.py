"""The architecture adapter interface and its registry (one adapter per family, keyed by model_type)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn


class UnsupportedArchitecture(ValueError):
    pass


@dataclass
class ForwardContext:
    """What every layer of one batch shares: rotary embeddings and attention masks per layer type."""

    position_embeddings: Any
    masks: dict[str, Any] = field(default_factory=dict)


class ArchitectureAdapter:
    """Says, for one family, what a block is, how to run it piece by piece, and how to delete it.

    The residual view: a decoder layer is h -> h + attn(norm1(h)) -> h + mlp(norm2(h)); each half is a
    unit that can be skipped (its delta is zero) or deleted with the norm that feeds it.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    attn_names: ClassVar[tuple[str, str]] = ("input_layernorm", "self_attn")
    mlp_names: ClassVar[tuple[str, str]] = ("post_attention_layernorm", "mlp")

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def embed(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def context(self, model: nn.Module, hidden: torch.Tensor) -> ForwardContext:
        raise NotImplementedError

    def attn_delta(self, layer: nn.Module, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        raise NotImplementedError

    def mlp_delta(self, layer: nn.Module, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        raise NotImplementedError

    def final_norm(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def lm_head(self, model: nn.Module) -> nn.Linear:
        return model.get_output_embeddings()

    def on_layers_deleted(self, model: nn.Module, kept_positions: list[int]) -> None:
        """Fix per-layer config and layer indices after whole layers were deleted."""


_ADAPTERS: dict[str, ArchitectureAdapter] = {}


def register_adapter(cls: type[ArchitectureAdapter]) -> type[ArchitectureAdapter]:
    instance = cls()
    for model_type in cls.model_types:
        _ADAPTERS[model_type] = instance
    return cls


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def adapter_for(model_type: str) -> ArchitectureAdapter:
    if model_type not in _ADAPTERS:
        known = supported_model_types()
        close = difflib.get_close_matches(model_type, known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UnsupportedArchitecture(
            f"model_type '{model_type}' has no pruneflow adapter{hint}; supported: {', '.join(known)}. "
            "To add one, write one module under tasks/surgery/ registered with @register_adapter (README)."
        )
    return _ADAPTERS[model_type]


def adapter_of(model: nn.Module) -> ArchitectureAdapter:
    return adapter_for(model.config.model_type)


AttnCall = Callable[..., Any]
