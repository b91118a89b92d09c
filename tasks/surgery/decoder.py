"""What the rotary decoder families share: the `model.model.{embed_tokens, layers, norm, rotary_emb}` layout.

Llama, Mistral, Qwen, Phi-3, OLMo-2, Gemma and the MoE families all build masks the same way (one per
attention type) and feed rotary tables to every attention; they differ in norms and config details, which
their adapters override.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from tasks.surgery.architecture import ArchitectureAdapter, ForwardContext, UnsupportedArchitecture
from tasks.surgery.kv_cache import cache_kwargs

# Attention type (the values of `config.layer_types`) -> the mask builder the families' own forwards use.
MASK_BUILDERS: dict[str, Callable[..., Any]] = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
}


def first_tensor(output: Any) -> torch.Tensor:
    """Attention returns (output, weights); some MoE blocks return (output, router_logits)."""
    return output[0] if isinstance(output, tuple) else output


def layer_types_of(config) -> tuple[str, ...]:
    """Attention type of every layer: `config.layer_types`, else one type for all from `sliding_window`."""
    declared = getattr(config, "layer_types", None)
    if declared:
        return tuple(declared)
    uniform = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
    return (uniform,) * config.num_hidden_layers


def build_masks(config, hidden: torch.Tensor, position_ids: torch.Tensor, types: tuple[str, ...]) -> dict:
    """One mask per attention type, built as the families' own forwards build them (unpadded windows)."""
    unknown = sorted(set(types) - set(MASK_BUILDERS))
    if unknown:
        raise UnsupportedArchitecture(
            f"{config.model_type}: attention types {unknown} in config.layer_types have no mask builder; "
            f"pruneflow knows {sorted(MASK_BUILDERS)} (tasks/surgery/decoder.py)"
        )
    kwargs = dict(config=config, inputs_embeds=hidden, attention_mask=None, position_ids=position_ids,
                  **cache_kwargs(None))
    return {t: MASK_BUILDERS[t](**kwargs) for t in sorted(set(types))}


def positions(hidden: torch.Tensor) -> torch.Tensor:
    # Calibration and evaluation windows are unpadded, so positions are 0..T-1 for every row.
    return torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)


class RotaryDecoderAdapter(ArchitectureAdapter):
    """Pre-norm layers: h + self_attn(input_layernorm(h)), then h + mlp(post_attention_layernorm(h))."""

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def embed(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        # Gemma's embedding module applies its sqrt(hidden) scale itself.
        return model.model.embed_tokens(input_ids)

    def rotary(self, model: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor, types: set[str]) -> dict:
        table = model.model.rotary_emb(hidden, position_ids=position_ids)
        return {t: table for t in types}

    def context(self, model: nn.Module, hidden: torch.Tensor) -> ForwardContext:
        position_ids = positions(hidden)
        types = layer_types_of(model.config)
        return ForwardContext(
            position_ids=position_ids,
            layer_types=types,
            masks=build_masks(model.config, hidden, position_ids, types),
            rotary=self.rotary(model, hidden, position_ids, set(types)),
        )

    def attention(self, module: nn.Module, hidden: torch.Tensor, ctx: ForwardContext, position: int) -> torch.Tensor:
        return first_tensor(
            module(
                hidden_states=hidden,
                position_embeddings=ctx.rotary_for(position),
                attention_mask=ctx.mask(position),
                position_ids=ctx.position_ids,
            )
        )

    def attn_delta(self, layer: nn.Module, hidden: torch.Tensor, ctx: ForwardContext, position: int) -> torch.Tensor:
        return self.attention(layer.self_attn, layer.input_layernorm(hidden), ctx, position)

    def mlp_delta(self, layer: nn.Module, hidden: torch.Tensor, ctx: ForwardContext, position: int) -> torch.Tensor:
        return first_tensor(layer.mlp(layer.post_attention_layernorm(hidden)))

    def final_norm(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return model.model.norm(hidden)

    def on_layers_deleted(self, model: nn.Module, kept_positions: list[int]) -> None:
        super().on_layers_deleted(model, kept_positions)
        config = model.config
        # Qwen: layers below max_window_layers use full attention; kept layers keep their order, so the
        # full-attention prefix keeps exactly the kept layers that were in it.
        window_layers = getattr(config, "max_window_layers", None)
        if isinstance(window_layers, int):
            config.max_window_layers = sum(1 for p in kept_positions if p < window_layers)
