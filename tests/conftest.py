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

import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

# The default suite runs many pipelines as processes of their own (through the command line, as a user
# would). Each would start its own ephemeral Prefect server, about 8 s of a 2-core machine's time; one
# real server for the session serves them all. The marked sets (integration, llama.cpp, vLLM) keep
# ephemeral servers, as a user's first run has.


def _default_marks(config) -> str:
    """The `-m` expression of pyproject's addopts: the one the default suite runs with."""
    options = config.getini("addopts")
    return next((options[i + 1] for i, option in enumerate(options[:-1]) if option == "-m"), "")


def _start_prefect_server() -> subprocess.Popen:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    api = f"http://127.0.0.1:{port}/api"
    log = open(os.path.join(os.environ["PREFECT_HOME"], "server.log"), "w")
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2) as response:
                if response.status == 200:
                    os.environ["PREFECT_API_URL"] = api
                    return server
        except OSError:
            time.sleep(0.5)
    _stop(server)
    raise RuntimeError(f"the session's Prefect server did not start: see {log.name}")


def _stop(server: subprocess.Popen) -> None:
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)


def pytest_configure(config) -> None:
    # Before any test module imports prefect, whose settings are read once.
    default = _default_marks(config)
    if default and config.option.markexpr == default and "PREFECT_API_URL" not in os.environ:
        server = _start_prefect_server()
        config.add_cleanup(lambda: _stop(server))


@pytest.fixture(params=["llama", "qwen2"])
def family(request) -> str:
    return request.param
