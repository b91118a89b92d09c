"""The KV cache's keyword, as the installed transformers spells it.

transformers 5.24 renamed `past_key_values` to `cache` in every forward, mask builder, model output and
`generate()`'s model kwargs; the old name is deprecated (removal announced for 5.40), and when a caller
passes the old name while a wrapper passes the new one, the old value is silently dropped. pruneflow's
code passes the cache only through these helpers, so it speaks each supported release's own API and
raises no deprecation warning on either side of the rename.
"""

from __future__ import annotations

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
