"""The server side of a run's temporary Prefect server (`flows/temporary_server.py` starts it): Prefect's API
on an inherited listening socket, until the inherited guard pipe reads end-of-file, which happens when the
run's process is gone, however it ended.

It is run as a file (`runpy.run_path`) and imports nothing of pruneflow: the server runs the file beside
the module that started it, whichever copy of pruneflow the server's path would find.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

# Seconds the server is given to shut down once its run is gone, before it ends itself; requests still
# being answered get the first DRAIN_S of them.
SHUTDOWN_GRACE = 5.0
DRAIN_S = 2


def serve(listener_fd: int, guard_fd: int) -> None:
    """Prefect's API app as Prefect's own temporary server runs it: no UI, an ephemeral server's services."""
    import uvicorn
    from prefect.server.api.server import create_app

    server = uvicorn.Server(uvicorn.Config(create_app(ephemeral=True, final=True), log_level="error",
                                           lifespan="on", timeout_graceful_shutdown=DRAIN_S))
    threading.Thread(target=_stop_when_run_ends, args=(guard_fd, server), daemon=True).start()
    server.run(sockets=[socket.socket(fileno=listener_fd)])
    # The app has shut down (its lifespan ran); threads Prefect's server leaves behind would only hold the
    # interpreter's exit for seconds.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _stop_when_run_ends(guard_fd: int, server) -> None:
    while os.read(guard_fd, 1):  # nothing is ever written: this returns b"" once no process holds the write end
        pass
    if not server.started:  # still starting (a migration, which the database rolls back): nothing to drain
        os._exit(0)
    server.should_exit = True
    time.sleep(SHUTDOWN_GRACE)
    os._exit(1)  # the graceful shutdown hung


if __name__ == "__main__":
    serve(int(sys.argv[-2]), int(sys.argv[-1]))
