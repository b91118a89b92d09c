"""One process at a time per output folder and per run id: a second one is refused, naming the first.

The locks are `flock`s on small files (the output folder's `.pruneflow-lock`, and one per run id beside the
catalog), so the kernel drops them when the holder dies, even by SIGKILL: a killed run never leaves a
stale lock. The files stay (removing a locked file would let two processes lock two different files).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tasks.errors import UserError


class RunInUse(UserError):
    pass


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return "another process"
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info.get("since", 0)))
    return f"process {info.get('pid')} on {info.get('host')} (since {started}: {info.get('command')})"


@contextmanager
def exclusive(path: Path, what: str) -> Iterator[None]:
    """Holds the lock file `path` for the block, or raises RunInUse naming the process that holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise RunInUse(f"{what} is in use by {_holder(path)}; wait for it to finish, or stop it and run again "
                           "(the run resumes where it stopped)") from exc
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                  "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def folder_lock(out_dir: Path) -> Path:
    return out_dir / ".pruneflow-lock"


def run_lock(catalog: Path, run_id: str) -> Path:
    return catalog.parent / f".{catalog.name}.run-{run_id}.lock"
