"""Deployments: the parameter form Prefect renders, the generated prefect.yaml, and a real server."""

import os
import signal
import sys
import time

import httpx
import pytest
import yaml

from deploy.prefect_yaml import OUT, render
from flows.pipeline import prune_pipeline_flow, run_tags
from pipelines import PipelineSpec, load_spec
from tests.flowkit import tiny_pipeline
from tests.prefect_server import start, start_server, stop


def _walk(node, path="spec"):
    """Yield (path, schema) for every property below a JSON schema node, following $refs."""
    yield path, node
    for key, child in (node.get("properties") or {}).items():
        yield from _walk(child, f"{path}.{key}")
    for branch in node.get("anyOf", []) + node.get("oneOf", []):
        yield from _walk(branch, path)
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")


def test_flow_parameter_form_is_fully_typed():
    schema = prune_pipeline_flow.parameters.model_dump()
    definitions = schema["definitions"]

    def resolve(node):
        if "$ref" in node:
            return resolve(definitions[node["$ref"].split("/")[-1]])
        return {**node, **{k: [resolve(b) for b in node[k]] for k in ("anyOf", "oneOf") if k in node},
                **({"properties": {k: resolve(v) for k, v in node["properties"].items()}} if "properties" in node else {}),
                **({"items": resolve(node["items"])} if isinstance(node.get("items"), dict) else {})}

    spec = resolve(schema["properties"]["spec"])
    seen = 0
    for path, node in _walk(spec):
        seen += 1
        typed = any(k in node for k in ("type", "anyOf", "oneOf", "enum", "const"))
        assert typed, f"{path} has no type in the parameter schema"
        if node.get("type") == "object":
            assert node.get("properties"), f"{path} is an untyped mapping"
            assert node.get("additionalProperties") is False, f"{path} accepts unknown keys"
    assert seen > 20
    # What Prefect's form draws as a JSON editor or a frozen field is never there; every field says what it is.
    for path, node in _walk(spec):
        assert "oneOf" not in node and "const" not in node, f"{path}: {node}"
    for name, definition in definitions.items():
        for key, node in (definition.get("properties") or {}).items():
            assert node.get("description"), f"{name}.{key} has no description"
    fields: dict = {}
    for path, node in _walk(spec):
        fields.setdefault(path, node)  # a union's branches come after it under the same path
    from tasks.score import METRICS
    from tasks.search.registry import STRATEGIES

    assert set(fields["spec.score.metric"]["enum"]) == {name for name, _ in METRICS.items()} >= {"perplexity", "taylor"}
    assert set(fields["spec.search.strategy"]["enum"]) == {name for name, _ in STRATEGIES.items()} >= {"iterative"}
    assert fields["spec.search.target"]["anyOf"] and fields["spec.recover"]["anyOf"]
    assert schema["properties"]["fresh"]["description"]
    leaves = {p: n for p, n in _walk(spec) if n.get("type") in ("integer", "number", "string", "boolean")}
    assert "description" in leaves["spec.calibration.samples"] and leaves["spec.calibration.samples"]["minimum"] == 1


def test_generated_prefect_yaml_is_current_and_valid():
    assert OUT.read_text() == render(), "run: python -m deploy.prefect_yaml"
    document = yaml.safe_load(OUT.read_text())
    assert document["deployments"]
    for deployment in document["deployments"]:
        spec = PipelineSpec.model_validate(deployment["parameters"]["spec"])
        assert deployment["name"] == spec.name
        assert deployment["work_pool"]["name"] == "pruneflow-process"
        assert deployment["schedules"][0]["cron"].count(" ") == 4
        assert deployment["entrypoint"] == "flows/pipeline.py:prune_pipeline_flow"


def test_generated_schedules_are_paused_spread_and_tags_leave_parameters_to_the_run(tmp_path):
    document = yaml.safe_load(OUT.read_text())
    schedules = [d["schedules"] for d in document["deployments"]]
    assert all(len(s) == 1 and s[0]["active"] is False for s in schedules)  # opt-in: deploying starts nothing
    starts = []
    for (schedule,) in schedules:
        minute, hour, *rest = schedule["cron"].split()
        assert rest == ["*", "*", "*"]
        starts.append(60 * int(hour) + int(minute))
    assert len(set(starts)) == len(starts), "two deployments start at the same minute"
    assert min(starts) >= 60 and max(starts) < 7 * 60  # between 01:00 and 07:00 UTC
    assert min(b - a for a, b in zip(sorted(starts), sorted(starts)[1:])) >= 30
    # A run changed in the UI must not carry the deployment's target: deployments hold no parameter tags.
    assert all(d["tags"] == ["pruneflow"] for d in document["deployments"])

    spec = load_spec(tiny_pipeline(tmp_path), ["search.target.blocks=2", "search.strategy=one_shot",
                                               "score.metric=block_influence", "score.granularity=layer"])
    assert run_tags(spec)[1:] == ["pipeline:tiny", f"model:{spec.model.source}", "target:2-blocks",
                                  "granularity:layer", "strategy:one_shot", "metric:block_influence"]


@pytest.mark.integration
def test_served_pipeline_runs_from_a_real_server(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PYTHONPATH": os.getcwd(), "HF_HUB_OFFLINE": "1"}
    env.pop("PREFECT_API_URL", None)
    path = tiny_pipeline(tmp_path)
    try:
        server, api = start_server(env, tmp_path / "server.log")
    except RuntimeError as exc:
        pytest.fail(str(exc))
    processes = [server]
    with open(tmp_path / "serve.log", "w") as serve_log:
        try:
            client_env = {**env, "PREFECT_API_URL": api}
            processes.append(start([sys.executable, "-m", "flows.cli", "serve", str(path), "--cron", "0 3 * * *"],
                                   client_env, serve_log))
            _check_deployment_and_run(api, tmp_path)
        finally:
            stop(processes)
    # `pruneflow serve` and the server stop on SIGTERM, as under a process supervisor.
    assert [proc.returncode != -signal.SIGKILL for proc in processes] == [True, True]


def _check_deployment_and_run(api: str, tmp_path) -> None:
    deadline = time.time() + 120
    deployment = None
    while time.time() < deadline and deployment is None:
        response = httpx.post(f"{api}/deployments/filter", json={}, timeout=5)
        found = [d for d in response.json() if d["name"] == "tiny"]
        deployment = found[0] if found else None
        time.sleep(1)
    assert deployment, "the served deployment did not appear:\n" + (tmp_path / "serve.log").read_text()[-3000:]
    schedules = httpx.get(f"{api}/deployments/{deployment['id']}/schedules", timeout=5).json()
    assert [s["schedule"]["cron"] for s in schedules] == ["0 3 * * *"]
    assert "pruneflow" in deployment["tags"]

    flow = httpx.get(f"{api}/flows/{deployment['flow_id']}", timeout=5).json()
    assert flow["name"] == "prune-pipeline", flow

    # Through the server's REST API: this process's Prefect client settings were fixed at import.
    flow_run = httpx.post(f"{api}/deployments/{deployment['id']}/create_flow_run", json={}, timeout=10).json()
    deadline = time.time() + 420
    while time.time() < deadline:
        flow_run = httpx.get(f"{api}/flow_runs/{flow_run['id']}", timeout=10).json()
        if flow_run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            break
        time.sleep(2)
    assert flow_run["state"]["type"] == "COMPLETED", (flow_run["state"], (tmp_path / "serve.log").read_text()[-4000:])
    assert flow_run["name"].startswith("tiny | ")

    from catalog import Catalog

    catalog = Catalog(tmp_path / "out" / "catalog.duckdb")
    (summary,) = catalog.run_summaries()
    assert summary.status == "completed" and summary.blocks_removed == 3
    artifacts = httpx.post(f"{api}/artifacts/filter",
                           json={"artifacts": {"flow_run_id": {"any_": [flow_run["id"]]}}}, timeout=5).json()
    kinds = {a["type"] for a in artifacts}
    keys = {a["key"] for a in artifacts}
    assert {"progress", "table", "markdown"} <= kinds
    assert {"tiny-search-progress", "tiny-step-0", "tiny-step-2", "tiny-summary"} <= keys
    summary_md = next(a for a in artifacts if a["key"] == "tiny-summary")["data"]
    assert "data:image/png;base64," in summary_md and "layers." in summary_md
