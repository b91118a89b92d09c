"""`pruneflow serve`: serve one pipeline as a Prefect deployment named after it."""

from __future__ import annotations

from flows.pipeline import DEPLOYMENT_TAGS, prune_pipeline_flow
from flows.preflight import preflight
from flows.temporary_server import prefect_api
from pipelines import load_spec


def serve_pipeline(path: str, cron: str | None = None, overrides: list[str] | None = None) -> None:
    spec = load_spec(path, overrides)
    preflight(spec)
    with prefect_api():  # the deployment's runs are given its URL too
        prune_pipeline_flow.serve(
            name=spec.name,
            cron=cron,
            parameters={"spec": spec.model_dump(mode="json")},
            tags=list(DEPLOYMENT_TAGS),  # the run tags itself from the spec it is given
            description=f"pruneflow pipeline '{spec.name}' from {path}",
        )
