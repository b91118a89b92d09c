"""Search strategies by name (`search.strategy`): one module each, one registration line."""

from __future__ import annotations

from typing import Callable

STRATEGIES: dict[str, Callable] = {}


def register_strategy(name: str) -> Callable[[Callable], Callable]:
    def register(fn: Callable) -> Callable:
        STRATEGIES[name] = fn
        return fn

    return register
