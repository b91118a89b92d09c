"""Llama-layout families: llama, mistral, qwen2, qwen3 (pre-norm attention + gated MLP per layer).

Attention half: input_layernorm + self_attn. MLP half: post_attention_layernorm + mlp. Mistral attends
through a sliding window when `sliding_window` is set; Qwen2/3 declare `layer_types` (sliding layers from
`max_window_layers` on), both kept consistent when layers are deleted.
"""

from __future__ import annotations

from tasks.surgery.architecture import WidthLayout, register_architecture
from tasks.surgery.decoder import RotaryDecoderAdapter


@register_architecture
class LlamaFamilyAdapter(RotaryDecoderAdapter):
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    export_formats = ("hf", "pruneflow", "remote_code", "nemotron_nas")
    width = WidthLayout()
