"""Gemma 2 and Gemma 3 (text): sandwich norms, scaled embeddings, alternating local/global attention.

Attention half: input_layernorm + self_attn + post_attention_layernorm (the norm on its output belongs to
it too). MLP half: pre_feedforward_layernorm + mlp + post_feedforward_layernorm. The embedding module
multiplies by sqrt(hidden) itself; logits are soft-capped when `final_logit_softcapping` is set.
`layer_types` (sliding or full per layer) is filtered with the kept layers; Gemma 3 also takes a rotary
table per attention type (local layers use their own base frequency).
"""

from __future__ import annotations

import torch
from torch import nn

from tasks.surgery.architecture import ForwardContext, HalfLayout, UnsupportedArchitecture, WidthLayout, register_architecture
from tasks.surgery.decoder import RotaryDecoderAdapter


class _GemmaAdapter(RotaryDecoderAdapter):
    attn = HalfLayout("self_attn", norms=("input_layernorm", "post_attention_layernorm"))
    mlp = HalfLayout("mlp", norms=("pre_feedforward_layernorm", "post_feedforward_layernorm"))
    width = WidthLayout(hidden=False)  # embeddings are scaled by sqrt(hidden_size)

    def attn_delta(self, layer: nn.Module, hidden: torch.Tensor, ctx: ForwardContext, position: int) -> torch.Tensor:
        out = self.attention(layer.self_attn, layer.input_layernorm(hidden), ctx, position)
        return layer.post_attention_layernorm(out)

    def mlp_delta(self, layer: nn.Module, hidden: torch.Tensor, ctx: ForwardContext, position: int) -> torch.Tensor:
        return layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(hidden)))

    def shape_logits(self, model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits


@register_architecture
class Gemma2Adapter(_GemmaAdapter):
    model_types = ("gemma2",)
    # Attention logit soft-capping has no SDPA kernel; transformers refuses sdpa for Gemma 2.
    attn_implementation = "eager"


@register_architecture
class Gemma3TextAdapter(_GemmaAdapter):
    model_types = ("gemma3_text",)

    def rotary(self, model: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor, types: set[str]) -> dict:
        return {t: model.model.rotary_emb(hidden, position_ids, t) for t in types}

    def context(self, model: nn.Module, hidden: torch.Tensor) -> ForwardContext:
        if getattr(model.config, "use_bidirectional_attention", False):
            raise UnsupportedArchitecture(
                "gemma3_text with use_bidirectional_attention is an embedding model, not a causal LM; "
                "pruneflow scores next-token perplexity and cannot prune it"
            )
        return super().context(model, hidden)
