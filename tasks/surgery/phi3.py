"""Phi-3: the Llama layout with a fused gate_up_proj MLP and residual dropouts (identity in eval).

Attention half: input_layernorm + self_attn. MLP half: post_attention_layernorm + mlp. Every layer uses
the same mask: a sliding window when `config.sliding_window` is set (Phi-3-mini-4k), else causal.
"""

from __future__ import annotations

from tasks.surgery.architecture import register_architecture
from tasks.surgery.decoder import RotaryDecoderAdapter


@register_architecture
class Phi3Adapter(RotaryDecoderAdapter):
    model_types = ("phi3",)
