"""Cheap checks of a model folder's weight files before anything runs: headers only, never the tensors.

A truncated or corrupt safetensors file otherwise fails deep inside a stage, after the catalog and the
output folder were written; its header says exactly how long the file must be.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

from tasks.sources.errors import SourceError

# safetensors caps its header at 100 MB; anything larger is not a safetensors file.
_MAX_HEADER = 100_000_000


def check_weight_files(model_dir: Path) -> None:
    """Every *.safetensors header is whole and describes a file of exactly its size; every .bin is a zip
    archive; an index names only shards that exist."""
    for file in sorted(model_dir.glob("*.safetensors")):
        _check_safetensors(file)
    for file in sorted(model_dir.glob("pytorch_model*.bin")):
        if not zipfile.is_zipfile(file):
            raise _bad(file, "is not a torch zip archive")
    for index in sorted(model_dir.glob("*.index.json")):
        _check_index(index)


def _bad(file: Path, problem: str) -> SourceError:
    return SourceError(f"model.source: weight file {file} {problem}; replace it with an intact copy")


def _check_safetensors(file: Path) -> None:
    size = file.stat().st_size
    with file.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise _bad(file, f"is {size} bytes, too short for a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > min(_MAX_HEADER, size - 8):
            raise _bad(file, f"declares a {length}-byte header in a {size}-byte file (truncated or not safetensors)")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _bad(file, f"has a header that is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise _bad(file, "has a header that is not a JSON object")
    ends = [_end(file, name, entry) for name, entry in header.items() if name != "__metadata__"]
    expected = 8 + length + max(ends, default=0)
    if expected != size:
        raise _bad(file, f"is {size} bytes but its header describes {expected} (truncated or padded)")


def _end(file: Path, name: str, entry: object) -> int:
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise _bad(file, f"has no valid data_offsets for tensor {name!r}")
    return offsets[1]


def _check_index(index: Path) -> None:
    try:
        weight_map = json.loads(index.read_text()).get("weight_map", {})
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise _bad(index, f"is not a JSON index ({exc})") from exc
    missing = sorted({str(s) for s in weight_map.values()} - {p.name for p in index.parent.iterdir()})
    if missing:
        raise _bad(index, f"names shards that are not in the folder: {', '.join(missing[:5])}")
