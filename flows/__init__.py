"""Prefect flows that wire the stages together."""

from flows.pipeline import prune_pipeline, prune_pipeline_flow

__all__ = ["prune_pipeline", "prune_pipeline_flow"]
