"""The KV cache's keyword, as the installed transformers spells it.

transformers 5.24 renamed `past_key_values` to `cache` in every forward, mask builder, model output and
`generate()`'s model kwargs; the old name is deprecated (removal announced for 5.40), and when a caller
passes the old name while a wrapper passes the new one, the old value is silently dropped. pruneflow's
code passes the cache only through these helpers, so it speaks each supported release's own API and
raises no deprecation warning on either side of the rename.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

from transformers.cache_utils import DynamicCache
from transformers.generation.utils import GenerationMixin


def _cache_keyword() -> str:
    # Read from the API itself, not from a version number: the decorator keeps the real signature visible.
    parameters = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    return "cache" if "cache" in parameters else "past_key_values"


CACHE_ARG: str = _cache_keyword()
# Every name a layer may receive its cache under (GPT-NeoX's attention says layer_past in older releases).
LAYER_CACHE_ARGS: tuple[str, ...] = ("cache", "past_key_values", "layer_past")


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """`model(ids, **cache_kwargs(cache))`: the cache under this release's keyword."""
    return {CACHE_ARG: cache}


def output_cache(output: Any) -> Any:
    """The cache a forward returned (`output.cache`, or `output.past_key_values` before 5.24)."""
    return getattr(output, CACHE_ARG)


def layer_cache(kwargs: dict[str, Any]) -> Any:
    """The cache a layer was handed, whichever name its caller used."""
    return next((kwargs[k] for k in LAYER_CACHE_ARGS if kwargs.get(k) is not None), None)


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """Takes the cache out of `kwargs` under every name, so that only this release's name is passed on:
    given both names, transformers keeps the new one's value, even None, and drops the old one's."""
    cache = layer_cache(kwargs)
    for name in LAYER_CACHE_ARGS:
        kwargs.pop(name, None)
    return cache


def cache_slots(config: Any) -> dict[int, int]:
    """Layer position -> KV-cache slot of a pruned checkpoint's config (its `keeps_attention(position)`):
    slot j belongs to the j-th kept attention; a model without any attention gives position 0 the one slot
    that counts tokens."""
    kept = [p for p in range(config.num_hidden_layers) if config.keeps_attention(p)] or [0]
    return {position: slot for slot, position in enumerate(kept)}


def slot_cache(config: Any) -> DynamicCache:
    """A cache with one layer per slot of `cache_slots(config)`, each of that layer's type (sliding or full)."""
    slots = cache_slots(config)
    cache_config = copy.copy(config)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        cache_config.layer_types = [layer_types[p] for p in slots]
    cache_config.num_hidden_layers = len(slots)
    return DynamicCache(config=cache_config)


def use_slot_cache(generation_config: Any, model_kwargs: dict[str, Any], config: Any) -> None:
    """For `_prepare_cache_for_generation`: generate() sizes its default cache by num_hidden_layers; a cache
    the caller chose (or another implementation) stays, the default one becomes `slot_cache(config)`."""
    cache = model_kwargs.get(CACHE_ARG)
    default = generation_config.cache_implementation in (None, "dynamic")
    if default and type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False):
        model_kwargs[CACHE_ARG] = slot_cache(config)
