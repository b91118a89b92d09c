"""Llama-layout families: llama, mistral, qwen2, qwen3 (pre-norm attention + gated MLP per layer)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from tasks.surgery.adapter import ArchitectureAdapter, ForwardContext, register_adapter


@register_adapter
class LlamaFamilyAdapter(ArchitectureAdapter):
    model_types = ("llama", "mistral", "qwen2", "qwen3")

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def embed(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        return model.model.embed_tokens(input_ids)

    def context(self, model: nn.Module, hidden: torch.Tensor) -> ForwardContext:
        batch, seq = hidden.shape[:2]
        position_ids = torch.arange(seq, device=hidden.device).unsqueeze(0)
        config = model.config
        mask_kwargs = dict(
            config=config, inputs_embeds=hidden, attention_mask=None, past_key_values=None, position_ids=position_ids
        )
        masks = {"full_attention": create_causal_mask(**mask_kwargs)}
        if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
        return ForwardContext(model.model.rotary_emb(hidden, position_ids=position_ids), masks)

    def attn_delta(self, layer: nn.Module, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        mask = ctx.masks[getattr(layer.self_attn, "layer_type", None) or "full_attention"]
        out, _ = layer.self_attn(
            hidden_states=layer.input_layernorm(hidden),
            position_embeddings=ctx.position_embeddings,
            attention_mask=mask,
        )
        return out

    def mlp_delta(self, layer: nn.Module, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return layer.mlp(layer.post_attention_layernorm(hidden))

    def final_norm(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return model.model.norm(hidden)

    def on_layers_deleted(self, model: nn.Module, kept_positions: list[int]) -> None:
        config = model.config
        layer_types = getattr(config, "layer_types", None)
        if layer_types:
            config.layer_types = [layer_types[p] for p in kept_positions]
        for new_idx, layer in enumerate(self.decoder_layers(model)):
            layer.self_attn.layer_idx = new_idx
