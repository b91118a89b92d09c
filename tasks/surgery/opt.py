"""OPT: learned positions (offset 2), MLP as fc1/fc2 directly on the layer, pre- or post-norm.

Attention half: self_attn_layer_norm + self_attn. MLP half: final_layer_norm + fc1 + fc2 (the layer's
`final_layer_norm`, not the decoder's); deleting it turns fc1 into the identity and fc2 into the zero
stand-in. With `do_layer_norm_before` (all OPT sizes but 350m) a half is h + f(norm(h)); without it
(post-norm) the half is h -> norm(h + f(h)), i.e. its delta is norm(h + f(h)) - h, and deleting it
removes the norm too (h passes unchanged). OPT-350m's project_in/project_out (word_embed_proj_dim !=
hidden_size) belong to the embedding and the head.
"""

from __future__ import annotations

import torch
from torch import nn

from tasks.surgery.architecture import ArchitectureAdapter, ForwardContext, HalfLayout, register_architecture
from tasks.surgery.decoder import build_masks, first_tensor, positions


@register_architecture
class OPTAdapter(ArchitectureAdapter):
    model_types = ("opt",)
    attn = HalfLayout("self_attn", norms=("self_attn_layer_norm",))
    mlp = HalfLayout("fc2", norms=("final_layer_norm",), inner=("fc1",))

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.decoder.layers

    def embed(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        decoder = model.model.decoder
        tokens = decoder.embed_tokens(input_ids)
        if decoder.project_in is not None:
            tokens = decoder.project_in(tokens)
        position_ids = positions(tokens)
        return tokens + decoder.embed_positions(None, 0, position_ids=position_ids)

    def context(self, model: nn.Module, hidden: torch.Tensor) -> ForwardContext:
        position_ids = positions(hidden)
        types = ("full_attention",) * len(self.decoder_layers(model))
        return ForwardContext(position_ids, types, build_masks(model.config, hidden, position_ids, types))

    def attn_delta(self, layer: nn.Module, hidden: torch.Tensor, ctx: ForwardContext, position: int) -> torch.Tensor:
        if layer.do_layer_norm_before:
            return self._attend(layer, layer.self_attn_layer_norm(hidden), ctx, position)
        return layer.self_attn_layer_norm(hidden + self._attend(layer, hidden, ctx, position)) - hidden

    def mlp_delta(self, layer: nn.Module, hidden: torch.Tensor, ctx: ForwardContext, position: int) -> torch.Tensor:
        if layer.do_layer_norm_before:
            return self._feed(layer, layer.final_layer_norm(hidden))
        return layer.final_layer_norm(hidden + self._feed(layer, hidden)) - hidden

    def _attend(self, layer: nn.Module, hidden: torch.Tensor, ctx: ForwardContext, position: int) -> torch.Tensor:
        return first_tensor(layer.self_attn(hidden_states=hidden, attention_mask=ctx.mask(position)))

    def _feed(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return layer.fc2(layer.activation_fn(layer.fc1(hidden)))

    def final_norm(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        norm = model.model.decoder.final_layer_norm
        return norm(hidden) if norm is not None else hidden

    def head_input(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.final_norm(model, hidden)
        if model.model.decoder.project_out is not None:
            hidden = model.model.decoder.project_out(hidden)
        return hidden
