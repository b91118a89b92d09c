"""OLMo-2: norms after each sub-block instead of before it: h + norm(attn(h)), then h + norm(mlp(h)).

Attention half: self_attn (with its internal q_norm/k_norm) + post_attention_layernorm. MLP half: mlp +
post_feedforward_layernorm. No norm feeds a sub-block, so removing a half removes the norm on its output.
"""

from __future__ import annotations

import torch
from torch import nn

from tasks.surgery.architecture import ForwardContext, HalfLayout, WidthLayout, register_architecture
from tasks.surgery.decoder import RotaryDecoderAdapter


@register_architecture
class Olmo2Adapter(RotaryDecoderAdapter):
    model_types = ("olmo2",)
    attn = HalfLayout("self_attn", norms=("post_attention_layernorm",))
    mlp = HalfLayout("mlp", norms=("post_feedforward_layernorm",))
    width = WidthLayout(heads=False)  # q_norm/k_norm normalise over all heads at once

    def attn_delta(self, layer: nn.Module, hidden: torch.Tensor, ctx: ForwardContext, position: int) -> torch.Tensor:
        return layer.post_attention_layernorm(self.attention(layer.self_attn, hidden, ctx, position))

    def mlp_delta(self, layer: nn.Module, hidden: torch.Tensor, ctx: ForwardContext, position: int) -> torch.Tensor:
        return layer.post_feedforward_layernorm(layer.mlp(hidden))
