"""Shared fixtures: tiny random models built from a config (no download), isolated Prefect home."""

from __future__ import annotations

import os
import tempfile

# Before anything imports prefect or transformers: no hub, quiet and isolated Prefect.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="pruneflow-prefect-"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from pathlib import Path

import pytest

from tests.prefect_server import start_server, stop

# The default suite runs many pipelines as processes of their own (through the command line, as a user
# would). Each would start its own ephemeral Prefect server, about 8 s of a 2-core machine's time; one
# real server for the session serves them all. The marked sets (integration, llama.cpp, vLLM) keep
# ephemeral servers, as a user's first run has.


def _default_marks(config) -> str:
    """The `-m` expression of pyproject's addopts: the one the default suite runs with."""
    options = config.getini("addopts")
    return next((options[i + 1] for i, option in enumerate(options[:-1]) if option == "-m"), "")


def pytest_configure(config) -> None:
    # Before any test module imports prefect, whose settings are read once.
    default = _default_marks(config)
    if default and config.option.markexpr == default and "PREFECT_API_URL" not in os.environ:
        server, api = start_server(None, Path(os.environ["PREFECT_HOME"]) / "server.log")
        os.environ["PREFECT_API_URL"] = api
        config.add_cleanup(lambda: stop([server]))


@pytest.fixture(params=["llama", "qwen2"])
def family(request) -> str:
    return request.param
