"""Checks spec names against the method registries, with a "did you mean" hint."""

from __future__ import annotations


def check_registered(kind: str, value: str) -> str:
    # Imported here: the registries fill themselves by importing their method modules.
    from tasks.score import METRICS
    from tasks.search import STRATEGIES

    registry = {"metric": METRICS, "strategy": STRATEGIES}[kind]
    if value not in registry:
        raise ValueError(registry.unknown_message(value))
    return value
