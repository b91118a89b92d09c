"""The temporary Prefect server of a run that has no server configured: it goes when the run goes, by any cause.

Prefect starts its own temporary (ephemeral) server as a child and stops it at interpreter exit, so a run
ended by a signal (SIGTERM from `timeout`, Slurm, Kubernetes or systemd, SIGKILL from the OOM killer)
left it running, re-parented to init. pruneflow starts that server itself instead and holds the write
end of a pipe whose read end only the server has. Nothing is ever written to it: when the run's process
ends, however it ends, the kernel closes the write end, the server reads end-of-file and shuts down.
(A parent-death signal, `prctl(PR_SET_PDEATHSIG)`, is Linux-only and fires when the *thread* that started
the child exits, which need not be the end of the run.) Pipes and inherited descriptors are POSIX, as are
pruneflow's locks.

The server is started once per process, on the first run that needs it, and kept for the process's other
runs, as Prefect keeps its own. The server side is `flows/guarded_server.py`.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tasks.errors import UserError

SERVER_SIDE = Path(__file__).with_name("guarded_server.py")
# Run as a file, not a module: no path is added to the server's sys.path (see guarded_server.py).
_RUN_FILE = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"
# Seconds to wait for a stopped server: its own shutdown grace, then a little.
_STOP_WAIT = 15.0


class ServerStartError(UserError):
    pass


@dataclass
class TemporaryServer:
    process: subprocess.Popen
    api_url: str
    guard: int  # the write end of the pipe the server watches

    def stop(self) -> None:
        """Close the guard (the server sees end-of-file and shuts down) and wait for it."""
        global _shared
        if _shared is self:
            _shared = None
        if self.guard >= 0:
            os.close(self.guard)
            self.guard = -1
        try:
            self.process.wait(timeout=_STOP_WAIT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


_shared: TemporaryServer | None = None
_starting = threading.Lock()


def _needs_one() -> bool:
    """No API URL is set (environment or profile) and Prefect would start a temporary server of its own."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    return settings.api.url is None and settings.server.ephemeral.enabled


@contextmanager
def prefect_api() -> Iterator[str | None]:
    """Within: Prefect talks to this process's temporary server (its API URL is yielded), started on first
    use, when no server is configured; otherwise to the configured one, untouched (None is yielded)."""
    if not _needs_one():
        yield None
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = shared_server()
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield server.api_url


def shared_server() -> TemporaryServer:
    global _shared
    with _starting:
        if _shared is not None and _shared.process.poll() is not None:
            _shared.stop()  # it died (killed on its own): its guard is closed, and a new one started
        if _shared is None:
            _shared = start()
            atexit.register(_shared.stop)
        return _shared


def _close_in_forked_child() -> None:
    # A process forked from the run (multiprocessing, data loader workers) would otherwise hold the guard
    # open and keep the server alive after the run is gone.
    if _shared is not None and _shared.guard >= 0:
        os.close(_shared.guard)
        _shared.guard = -1


os.register_at_fork(after_in_child=_close_in_forked_child)


def start(timeout: float | None = None) -> TemporaryServer:
    """Start a server on a free local port and return it once its API answers.

    The listening socket is opened here and handed to the server, so no other process can take the port
    between choosing and serving it. The server runs in a session of its own, so a Ctrl-C at the terminal
    reaches the run only, which still reports its end to the server before the guard closes.
    """
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    timeout = timeout or settings.server.ephemeral.startup_timeout_seconds
    listener = socket.create_server(("127.0.0.1", 0))
    api_url = f"http://127.0.0.1:{listener.getsockname()[1]}/api"
    watched, guard = os.pipe()
    env = {**os.environ, **settings.to_environment_variables(exclude_unset=True)}
    try:
        process = subprocess.Popen(
            [sys.executable, "-c", _RUN_FILE, str(SERVER_SIDE), str(listener.fileno()), str(watched)],
            pass_fds=(listener.fileno(), watched), env=env, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    except BaseException:
        os.close(guard)
        raise
    finally:
        os.close(watched)
        listener.close()
    print(f"Started a temporary Prefect server at {api_url} (it stops when this process ends, however "
          "it ends; set PREFECT_API_URL to use a server of your own)", file=sys.stderr)
    server = TemporaryServer(process, api_url, guard)
    try:
        _wait_healthy(server, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_healthy(server: TemporaryServer, timeout: float) -> None:
    import httpx  # Prefect's own HTTP client, so proxies are treated as its client will treat them

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise ServerStartError(f"the temporary Prefect server exited with code {server.process.returncode} "
                                   "before answering (its output is above); set PREFECT_API_URL to a running "
                                   "Prefect server instead")
        try:
            if httpx.get(f"{server.api_url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise ServerStartError(f"the temporary Prefect server did not answer within {timeout:g} s "
                           "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); raise that setting, or set "
                           "PREFECT_API_URL to a running Prefect server")
