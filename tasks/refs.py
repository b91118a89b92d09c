"""Small, hashable references that stages exchange instead of models or tensors."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

_CHUNK = 1 << 20
MB = 1 << 20
# Progress of a long part of a stage: (what, done, total, unit, detail), e.g.
# ("hashing model.gguf", 512, 2048, "MB", "").
Progress = Callable[[str, int, int, str, str], None]


class ByteMeter:
    """Bytes read of `total`, reported in MB at most every 64 MB and at the end: hashing a large model's
    weights takes many seconds, which a progress bar should show."""

    EVERY = 64 * MB

    def __init__(self, report: Progress | None, what: str, total: int):
        self.report, self.what, self.total = report, what, total
        self.done = self.sent = 0

    def add(self, count: int) -> None:
        self.done += count
        if self.report is not None and (self.done - self.sent >= self.EVERY or self.done >= self.total):
            self.sent = self.done
            total = max(1, math.ceil(self.total / MB))
            self.report(self.what, total if self.done >= self.total else self.done // MB, total, "MB", "")


def sha256_file(path: Path, on_chunk: Callable[[int], None] | None = None) -> str:
    """`on_chunk(bytes)` follows every chunk read (a ByteMeter's `add`)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
            if on_chunk is not None:
                on_chunk(len(chunk))
    return digest.hexdigest()


def sha256_tree(root: Path, on_chunk: Callable[[int], None] | None = None) -> str:
    """Digest of a directory: relative names and contents of every file, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(b"\0")
        digest.update(sha256_file(path, on_chunk).encode())
    return digest.hexdigest()


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


@dataclass(frozen=True)
class ArtifactRef:
    """A file or directory produced by a stage, named by its content digest."""

    path: str
    sha256: str
    kind: str
    bytes: int = 0

    @classmethod
    def of(cls, path: Path, kind: str, progress: Progress | None = None) -> "ArtifactRef":
        path = Path(path)
        size = tree_bytes(path) if path.is_dir() else path.stat().st_size
        meter = ByteMeter(progress, f"hashing {path.name}", size)
        digest = sha256_tree(path, meter.add) if path.is_dir() else sha256_file(path, meter.add)
        return cls(str(path), digest, kind, size)
