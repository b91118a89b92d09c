"""A real Prefect server as a process of its own: the default suite's shared one (conftest.py) and the
deployment test's. Imports nothing of Prefect, so conftest can start one before Prefect reads its settings."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import IO


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(args: list[str], env: dict[str, str] | None, log: IO) -> subprocess.Popen:
    """A process in a session of its own, so `stop` takes its children with it."""
    return subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)


def start_server(env: dict[str, str] | None, log_path: Path, timeout: float = 180) -> tuple[subprocess.Popen, str]:
    """`prefect server start` on a free local port, once its API answers: the process and the API URL.
    Raises RuntimeError with the end of the server's log if it does not answer within `timeout` seconds."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    with open(log_path, "w") as log:
        server = start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                       env, log)
    deadline = time.time() + timeout
    while time.time() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2) as response:
                if response.status == 200:
                    return server, api
        except OSError:
            time.sleep(0.5)
    stop([server])
    raise RuntimeError("Prefect server did not start:\n" + Path(log_path).read_text()[-3000:])


def stop(processes: list[subprocess.Popen]) -> None:
    # Clients before the server they talk to (a client whose server is gone first spends its time
    # reconnecting); each gets 20 s after SIGTERM, then SIGKILL, and is waited for either way, so the
    # return codes say whether SIGTERM was enough.
    for proc in reversed(processes):
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)
