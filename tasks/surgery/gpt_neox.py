"""GPT-NeoX (Pythia): rotary attention on a fraction of head dims, and usually a parallel residual.

Attention half: input_layernorm + attention. MLP half: post_attention_layernorm + mlp. With
`use_parallel_residual` (the default) a layer is h -> h + attn(ln1(h)) + mlp(ln2(h)): both halves read
the layer input and are two independent terms of one sum. Removing a half drops its term (and its norm):
without attention the layer is h + mlp(ln2(h)), without MLP it is h + attn(ln1(h)); removing both
deletes the layer. The residual runner applies the MLP of a parallel layer to the input of the layer
when its attention is present, so skipping a half equals deleting it. Without the parallel residual
the layer is sequential like Llama's.
"""

from __future__ import annotations

import torch
from torch import nn

from tasks.surgery.architecture import ArchitectureAdapter, ForwardContext, HalfLayout, register_architecture
from tasks.surgery.decoder import build_masks, first_tensor, positions


@register_architecture
class GPTNeoXAdapter(ArchitectureAdapter):
    model_types = ("gpt_neox",)
    attn = HalfLayout("attention", norms=("input_layernorm",))
    mlp = HalfLayout("mlp", norms=("post_attention_layernorm",))

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.gpt_neox.layers

    def embed(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        return model.gpt_neox.embed_in(input_ids)

    def context(self, model: nn.Module, hidden: torch.Tensor) -> ForwardContext:
        position_ids = positions(hidden)
        types = ("full_attention",) * len(self.decoder_layers(model))
        table = model.gpt_neox.rotary_emb(hidden, position_ids=position_ids)
        masks = build_masks(model.config, hidden, position_ids, types)
        return ForwardContext(position_ids, types, masks, {"full_attention": table})

    def attn_delta(self, layer: nn.Module, hidden: torch.Tensor, ctx: ForwardContext, position: int) -> torch.Tensor:
        return first_tensor(
            layer.attention(
                layer.input_layernorm(hidden),
                attention_mask=ctx.mask(position),
                position_embeddings=ctx.rotary_for(position),
            )
        )

    def mlp_delta(self, layer: nn.Module, hidden: torch.Tensor, ctx: ForwardContext, position: int) -> torch.Tensor:
        return layer.mlp(layer.post_attention_layernorm(hidden))

    def is_parallel(self, model: nn.Module) -> bool:
        return bool(model.config.use_parallel_residual)

    def final_norm(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return model.gpt_neox.final_layer_norm(hidden)
