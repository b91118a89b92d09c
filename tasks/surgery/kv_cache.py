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


def cache_slots(keeps_attention: list[bool]) -> dict[int, int]:
    """Layer position -> KV-cache slot, for the layers that keep their attention (slot j belongs to the j-th
    kept attention); a model without any attention gives position 0 the one slot that counts tokens."""
    kept = [p for p, keeps in enumerate(keeps_attention) if keeps] or [0]
    return {position: slot for slot, position in enumerate(kept)}


def slot_cache_config(config: Any, slots: dict[int, int]) -> Any:
    """The config a cache is built from: one layer per slot, with that slot's layer type."""
    cache_config = copy.copy(config)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        cache_config.layer_types = [layer_types[p] for p in slots]
    cache_config.num_hidden_layers = len(slots)
    return cache_config
