"""Small, hashable references that stages exchange instead of models or tensors."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_tree(root: Path) -> str:
    """Digest of a directory: relative names and contents of every file, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(b"\0")
        digest.update(sha256_file(path).encode())
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
    def of(cls, path: Path, kind: str) -> "ArtifactRef":
        path = Path(path)
        if path.is_dir():
            return cls(str(path), sha256_tree(path), kind, tree_bytes(path))
        return cls(str(path), sha256_file(path), kind, path.stat().st_size)
