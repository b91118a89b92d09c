"""Llama whose layers may each lack attention or MLP, or keep fewer heads and channels (written by pruneflow;
load with trust_remote_code=True).

A removed half has no weights and computes nothing: its layer adds zero to the residual stream there,
unless recovery gave it an adapter (`residual_adapters.py`, listed in `config.pruneflow["adapters"]`),
which then adds its output where the half used to. Only kept attention owns a KV-cache slot (slot j
belongs to the j-th kept attention), so the cache holds keys and values for kept attention only.
"""

from __future__ import annotations

from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.llama.modeling_llama import (LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP,
                                                      LlamaModel, LlamaPreTrainedModel, LlamaRMSNorm)

from .configuration_pruned import PrunedLlamaConfig
from .kv_cache import cache_kwargs, cache_slots, pop_cache, slot_cache, use_slot_cache
from .layer_widths import narrow_attention, narrow_mlp
from .residual_adapters import ADAPTERS_ATTR, adapter_key, apply_all, build_adapters, placement


class PrunedLlamaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: PrunedLlamaConfig, layer_idx: int, cache_slot: int | None):
        # Build only the kept halves (the parent's __init__ would allocate both).
        GradientCheckpointingLayer.__init__(self)
        self.hidden_size = config.hidden_size
        # Qwen's forwards before transformers 5.24 pick each layer's mask by this attribute.
        self.attention_type = (getattr(config, "layer_types", None) or ["full_attention"] * (layer_idx + 1))[layer_idx]
        self.input_layernorm = self.self_attn = None
        self.post_attention_layernorm = self.mlp = None
        widths = config.layer_widths(layer_idx)
        if config.keeps_attention(layer_idx):
            self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.self_attn = narrow_attention(LlamaAttention(config=config, layer_idx=layer_idx), widths)
            self.self_attn.layer_idx = cache_slot
        if config.keeps_mlp(layer_idx):
            self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.mlp = narrow_mlp(LlamaMLP(config), widths["channels"])
        self.use_adapters(None, [], None, None, [])

    def use_adapters(self, adapters, before, attn, mlp, after):
        # Held outside the module tree: the adapters' weights belong to the ForCausalLM's ModuleDict.
        self.__dict__["_adapters"] = (adapters, before, attn, mlp, after)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, use_cache=False,
                position_embeddings=None, **kwargs):
        adapters, before, attn_unit, mlp_unit, after = self.__dict__["_adapters"]
        hidden_states = apply_all(adapters, before, hidden_states)
        if attn_unit is not None:
            hidden_states = adapters[adapter_key(attn_unit)](hidden_states)
        if self.self_attn is not None:
            attn_out, _ = self.self_attn(
                hidden_states=self.input_layernorm(hidden_states),
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
            hidden_states = hidden_states + attn_out
        if self.mlp is not None:
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        if mlp_unit is not None:
            hidden_states = adapters[adapter_key(mlp_unit)](hidden_states)
        return apply_all(adapters, after, hidden_states)


class PrunedLlamaModel(LlamaModel):
    config_class = PrunedLlamaConfig
    _no_split_modules = ["PrunedLlamaDecoderLayer"]

    def __init__(self, config: PrunedLlamaConfig):
        # The parent builds full layers (on the meta device under from_pretrained); replace them.
        super().__init__(config)
        slots = cache_slots(config)
        self.layers = nn.ModuleList(
            [PrunedLlamaDecoderLayer(config, p, slots.get(p)) for p in range(config.num_hidden_layers)]
        )
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                use_cache=None, **kwargs):
        cache = pop_cache(kwargs)
        wants_cache = self.config.use_cache if use_cache is None else use_cache
        if wants_cache and cache is None and not (self.gradient_checkpointing and self.training):
            cache = slot_cache(self.config)
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               inputs_embeds=inputs_embeds, use_cache=use_cache, **cache_kwargs(cache), **kwargs)

    def use_adapters(self, adapters: nn.ModuleDict) -> None:
        plan = placement(self.config.pruneflow["layer_ids"], list(self.config.pruneflow.get("adapters") or {}))
        last = len(self.layers) - 1
        for position, layer in enumerate(self.layers):
            layer.use_adapters(adapters, plan.before.get(position, []), plan.attn.get(position),
                               plan.mlp.get(position), plan.after if position == last else [])


class PrunedLlamaForCausalLM(LlamaForCausalLM):
    config_class = PrunedLlamaConfig
    _no_split_modules = ["PrunedLlamaDecoderLayer"]

    def __init__(self, config: PrunedLlamaConfig):
        LlamaPreTrainedModel.__init__(self, config)
        self.model = PrunedLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        ranks = config.pruneflow.get("adapters") or {}
        if ranks:
            setattr(self, ADAPTERS_ATTR, build_adapters(config.hidden_size, ranks))
            self.model.use_adapters(getattr(self, ADAPTERS_ATTR))
        self.post_init()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        # generate() sizes a default cache by num_hidden_layers; give it one slot per kept attention instead.
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        use_slot_cache(generation_config, model_kwargs, self.config)


__all__ = ["PrunedLlamaDecoderLayer", "PrunedLlamaForCausalLM", "PrunedLlamaModel"]
