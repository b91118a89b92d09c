"""Llama whose layers may each lack attention or MLP, or keep fewer heads and channels (written by pruneflow;
load with trust_remote_code=True).

The family's own model is built at the pruned config's size, then every removed half is replaced by a
parameter-free stand-in (`removed_halves.py`): its slot outputs zeros and the norms that belong to it
(`config.pruneflow["layout"]`) become identities, so the family's own layer forward adds nothing to the
residual stream there, unless recovery gave the half an adapter (`residual_adapters.py`), which then adds
its output where the half used to. Only kept attention owns a KV-cache slot (slot j belongs to the j-th
kept attention), so the cache holds keys and values for kept attention only.
"""

from __future__ import annotations

import inspect

from torch import nn
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.models.llama.modeling_llama import LlamaForCausalLM

from .configuration_pruned import PrunedLlamaConfig
from .kv_cache import cache_kwargs, cache_slots, pop_cache, slot_cache, use_slot_cache
from .layer_widths import narrow_attention, narrow_mlp
from .removed_halves import RemovedAttention, RemovedMLP
from .residual_adapters import ADAPTERS_ATTR, build_adapters, hook_adapters, placement


def cut_layer(layer: nn.Module, config: PrunedLlamaConfig, position: int, slots: dict[int, int]) -> None:
    """Stand-ins for the layer's removed halves, its own widths for the kept ones, and kept attention's
    cache slot (the attention modules index the cache by `layer_idx`)."""
    layout = config.pruneflow["layout"]
    for part, keeps in (("attn", config.keeps_attention(position)), ("mlp", config.keeps_mlp(position))):
        slot, norms = layout[part]["slot"], layout[part]["identities"]
        if keeps:
            continue
        for name in norms:
            setattr(layer, name, nn.Identity())
        stand_in = RemovedAttention(0, holds_length=position in slots) if part == "attn" else RemovedMLP()
        setattr(layer, slot, stand_in)
    if config.pruneflow.get("plan"):
        widths = config.layer_widths(position)
        if config.keeps_attention(position):
            narrow_attention(getattr(layer, layout["attn"]["slot"]), widths)
        if config.keeps_mlp(position):
            narrow_mlp(getattr(layer, layout["mlp"]["slot"]), widths["channels"])
    if config.keeps_attention(position):
        for module in getattr(layer, layout["attn"]["slot"]).modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = slots[position]


def use_base_weight_conversions(config: PrunedLlamaConfig) -> None:
    """Transformers converts some families' weights as they load (Mixtral's per-expert matrices into one
    tensor, GPT-NeoX's `embed_out` into `lm_head`), by class name or model_type, and not for custom code
    unless registered; this checkpoint's model_type needs its base family's conversions."""
    conversions = (get_checkpoint_conversion_mapping(LlamaForCausalLM.__name__)
                   or get_checkpoint_conversion_mapping(config.pruneflow["base_model_type"]))
    if conversions is not None:
        register_checkpoint_conversion_mapping(config.model_type, conversions, overwrite=True)


class PrunedLlamaForCausalLM(LlamaForCausalLM):
    config_class = PrunedLlamaConfig

    def __init__(self, config: PrunedLlamaConfig):
        use_base_weight_conversions(config)
        # The parent builds every half (on the meta device under from_pretrained); the removed ones are replaced.
        super().__init__(config)
        layout = config.pruneflow["layout"]
        layers = self.get_submodule(layout["layers"])
        slots = cache_slots(config)
        for position, layer in enumerate(layers):
            cut_layer(layer, config, position, slots)
        ranks = config.pruneflow.get("adapters") or {}
        if ranks:
            setattr(self, ADAPTERS_ATTR, build_adapters(config.hidden_size, ranks))
            hook_adapters(layers, lambda layer, part: getattr(layer, layout[part]["slot"]), getattr(self, ADAPTERS_ATTR),
                          placement(config.pruneflow["layer_ids"], list(ranks)))
        self.post_init()

    def forward(self, input_ids=None, use_cache=None, logits_to_keep=0, **kwargs):
        # The family's forward would size a default cache by num_hidden_layers; give it one slot per kept attention.
        cache = pop_cache(kwargs)
        wants_cache = self.config.use_cache if use_cache is None else use_cache
        if wants_cache and cache is None and not self.training:
            cache = slot_cache(self.config)
        return super().forward(input_ids=input_ids, use_cache=use_cache, logits_to_keep=logits_to_keep,
                               **cache_kwargs(cache), **kwargs)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        use_slot_cache(generation_config, model_kwargs, self.config)


# generate() reads the forward's parameters to decide what to pass it (logits_to_keep, position_ids, ...):
# show it the family's own.
PrunedLlamaForCausalLM.forward.__signature__ = inspect.signature(LlamaForCausalLM.forward)

__all__ = ["PrunedLlamaForCausalLM"]
