"""Prefect flows that wire the stages together."""

from __future__ import annotations

from typing import Any

__all__ = ["prune_pipeline", "prune_pipeline_flow"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so that `flows.cli` starts without the spec: composing the spec loads the
    # user's plugins, and a broken plugin must reach the command line's error handling (exit 2).
    if name in __all__:
        from flows import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'flows' has no attribute {name!r}")
