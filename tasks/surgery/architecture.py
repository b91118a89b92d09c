"""The architecture adapter interface and its registry (one adapter per family, keyed by model_type)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from tasks.errors import UserError
from tasks.registry import Plugin, Registry


class UnsupportedArchitecture(UserError):
    pass


@dataclass(frozen=True)
class HalfLayout:
    """Where one half (attention or MLP) of a decoder layer lives, as attribute names on the layer module.

    Deleting the half replaces `slot` by a parameter-free stand-in that outputs zeros, and every module in
    `norms` and `inner` by the identity, so the family's own forward still runs and adds nothing to the
    residual stream. Parameters of all of them are the half's parameters.
    """

    slot: str
    norms: tuple[str, ...] = ()
    # Weighted modules of the half that run before `slot` (OPT's fc1 sits on the layer itself, next to fc2).
    inner: tuple[str, ...] = ()

    @property
    def attributes(self) -> tuple[str, ...]:
        return (*self.norms, *self.inner, self.slot)


@dataclass(frozen=True)
class WidthLayout:
    """Where a layer's width lives: the attention projections (query/key/value rows per head, output
    columns per head) and the gated MLP's projections (gate/up rows and down columns per channel), as
    attribute names on the attention and MLP modules. `heads` is False where a norm spans every head
    (OLMo-2's q_norm/k_norm): slicing heads would change what the norm divides by."""

    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    heads: bool = True
    final_norm: str = "model.norm"
    # Hidden (embedding) channels: False where the config derives a constant from hidden_size that the
    # model multiplies by (Gemma's embedding scale sqrt(hidden_size)), which a smaller config would change.
    hidden: bool = True

    def stream_io(self, part: str) -> tuple[tuple[str, ...], str]:
        """A half's projections that read the residual stream (through its norm), and the one that writes it."""
        if part == "attn":
            return (self.q, self.k, self.v), self.o
        return (self.gate, self.up), self.down


@dataclass
class ForwardContext:
    """What every layer of one batch shares: masks and rotary tables, each keyed by the layer's attention type."""

    position_ids: torch.Tensor
    layer_types: tuple[str, ...]  # per layer position: the key of its mask and rotary table
    masks: dict[str, Any] = field(default_factory=dict)
    rotary: dict[str, Any] = field(default_factory=dict)

    def mask(self, position: int) -> Any:
        return self.masks[self.layer_types[position]]

    def rotary_for(self, position: int) -> Any:
        return self.rotary.get(self.layer_types[position])


class ArchitectureAdapter(Plugin):
    """Says, for one family, what a block is, how to run it piece by piece, and how to delete it.

    The residual view: a decoder layer is h -> h + attn_delta(h) -> h + mlp_delta(h); each half is a unit
    that can be skipped (its delta is zero) or deleted with the norms that belong to it. A post-norm layer
    (h -> norm(h + f(h))) fits the same view with delta = norm(h + f(h)) - h. In a parallel layer
    (`is_parallel`), both halves read the layer input: h -> h + attn_delta(h) + mlp_delta(h).
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    # Checkpoint formats the prune stage may write for this family: "hf" (only whole layers removed: the
    # original architecture with fewer layers), "remote_code" (any cut, with modeling code built on the
    # family's transformers classes) and "pruneflow" (removed halves recorded in config.pruneflow).
    export_formats: ClassVar[tuple[str, ...]] = ("hf", "pruneflow", "remote_code")
    attn: ClassVar[HalfLayout] = HalfLayout("self_attn", norms=("input_layernorm",))
    mlp: ClassVar[HalfLayout] = HalfLayout("mlp", norms=("post_attention_layernorm",))
    # Attention heads and MLP channels this family can lose (tasks/surgery/width.py); None: whole blocks only.
    width: ClassVar[WidthLayout | None] = None
    # The attention kernel pruneflow loads checkpoints with (one kernel everywhere keeps numbers comparable).
    attn_implementation: ClassVar[str] = "sdpa"

    @property
    def attn_names(self) -> tuple[str, ...]:
        """Every attribute of the attention half, norms first, the stand-in's slot last."""
        return self.attn.attributes

    @property
    def mlp_names(self) -> tuple[str, ...]:
        return self.mlp.attributes

    def half(self, part: str) -> HalfLayout:
        return self.attn if part == "attn" else self.mlp

    # --- running the model piece by piece --------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def embed(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden state entering the first layer (token embeddings, scaled or with learned positions)."""
        raise NotImplementedError

    def context(self, model: nn.Module, hidden: torch.Tensor) -> ForwardContext:
        raise NotImplementedError

    def attn_delta(self, layer: nn.Module, hidden: torch.Tensor, ctx: ForwardContext, position: int) -> torch.Tensor:
        raise NotImplementedError

    def mlp_delta(self, layer: nn.Module, hidden: torch.Tensor, ctx: ForwardContext, position: int) -> torch.Tensor:
        raise NotImplementedError

    def is_parallel(self, model: nn.Module) -> bool:
        """True when both halves of every layer read the layer input (GPT-NeoX's parallel residual)."""
        return False

    def final_norm(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def lm_head(self, model: nn.Module) -> nn.Module:
        return model.get_output_embeddings()

    def head_input(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """What the output embedding multiplies: the last layer's output after the final norm."""
        return self.final_norm(model, hidden)

    def shape_logits(self, model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
        """The family's elementwise map from raw output-embedding products to logits (Gemma 2's soft cap).

        Elementwise, so a bound that computes only some vocabulary rows can apply it too."""
        return logits

    def logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits from the last layer's output, exactly as the family's own forward makes them."""
        return self.shape_logits(model, self.lm_head(model)(self.head_input(model, hidden)))

    # --- deleting ----------------------------------------------------------------------------------
    def check_layer_deletion(self, model: nn.Module, kept_positions: list[int]) -> None:
        """Raise before anything changes when this model cannot lose the other layers faithfully."""

    def on_layers_deleted(self, model: nn.Module, kept_positions: list[int]) -> None:
        """Fix per-layer config and layer indices after whole layers were deleted.

        `kept_positions` are positions in the layer list before the deletion; the layer list already holds
        only the kept layers. Families with per-layer config lists extend this.
        """
        config = model.config
        layer_types = getattr(config, "layer_types", None)
        if layer_types:
            config.layer_types = [layer_types[p] for p in kept_positions]
        for new_idx, layer in enumerate(self.decoder_layers(model)):
            # The KV cache is indexed by layer position; attention modules (and stand-ins) carry it.
            for module in layer.modules():
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = new_idx


# Architecture adapters by the `model_type` they serve (one adapter may serve several).
_ARCHITECTURES: Registry[ArchitectureAdapter] = Registry("model_type", unknown=UnsupportedArchitecture)


def register_architecture(cls: type[ArchitectureAdapter]) -> type[ArchitectureAdapter]:
    instance = cls()
    for model_type in cls.model_types:
        _ARCHITECTURES.add(model_type, instance)
    return cls


def supported_model_types() -> list[str]:
    return _ARCHITECTURES.names()


def model_types_where(test) -> list[str]:
    """The model types whose adapter passes `test` (e.g. those that can lose heads and channels)."""
    return [t for t in supported_model_types() if test(_ARCHITECTURES[t])]


def architecture_for(model_type: str) -> ArchitectureAdapter:
    if model_type not in _ARCHITECTURES:
        close = difflib.get_close_matches(model_type, supported_model_types(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UnsupportedArchitecture(
            f"model_type '{model_type}' has no pruneflow adapter{hint}; supported: "
            f"{', '.join(supported_model_types())}. "
            "To add one, write one module under tasks/surgery/ registered with @register_architecture (README)."
        )
    return _ARCHITECTURES[model_type]


def architecture_of(model: nn.Module) -> ArchitectureAdapter:
    return architecture_for(model.config.model_type)
