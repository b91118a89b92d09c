"""Mixture-of-experts families: Mixtral and Qwen2-MoE. The MoE block (router, experts, shared expert) is
the "mlp" half with post_attention_layernorm; the attention half is input_layernorm + self_attn.

Removing an MoE half removes the router with it, so router-logit outputs (auxiliary loss) cover the
remaining sparse layers only. Qwen2-MoE chooses per layer between a sparse block and a dense MLP from
`mlp_only_layers` and `decoder_sparse_step` by layer index; after deleting layers that rule would pick
other layers, so it is rewritten explicitly: `decoder_sparse_step` 1 and `mlp_only_layers` listing the
new indices of the kept dense layers.
"""

from __future__ import annotations

from torch import nn

from tasks.surgery.architecture import register_architecture
from tasks.surgery.decoder import RotaryDecoderAdapter


@register_architecture
class MixtralAdapter(RotaryDecoderAdapter):
    model_types = ("mixtral",)


def qwen2_moe_sparse(config, index: int) -> bool:
    """The rule Qwen2MoeDecoderLayer applies at construction: is layer `index` a sparse MoE block?"""
    mlp_only = config.mlp_only_layers or []
    return index not in mlp_only and config.num_experts > 0 and (index + 1) % config.decoder_sparse_step == 0


@register_architecture
class Qwen2MoeAdapter(RotaryDecoderAdapter):
    model_types = ("qwen2_moe",)

    def on_layers_deleted(self, model: nn.Module, kept_positions: list[int]) -> None:
        config = model.config
        sparse = [qwen2_moe_sparse(config, p) for p in kept_positions]
        super().on_layers_deleted(model, kept_positions)
        config.decoder_sparse_step = 1
        config.mlp_only_layers = [i for i, is_sparse in enumerate(sparse) if not is_sparse]
