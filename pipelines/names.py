"""Checks spec names against the method registries, with a "did you mean" hint."""

from __future__ import annotations

import difflib


def did_you_mean(value: str, known: list[str]) -> str:
    close = difflib.get_close_matches(value, known, n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def check_registered(kind: str, value: str) -> str:
    # Imported here: the registries fill themselves by importing their method modules.
    from tasks.score import METRICS
    from tasks.search import STRATEGIES

    registry = {"metric": METRICS, "strategy": STRATEGIES}[kind]
    if value not in registry:
        known = sorted(registry)
        raise ValueError(f"unknown {kind} '{value}'; accepted: {', '.join(known)}{did_you_mean(value, known)}")
    return value
