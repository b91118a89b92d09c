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

import pytest


@pytest.fixture(params=["llama", "qwen2"])
def family(request) -> str:
    return request.param
