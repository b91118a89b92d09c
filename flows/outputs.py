"""The output folder: which pipeline owns it, which of its runs is current, and files written into it.

A folder belongs to one pipeline. It can hold several runs of that pipeline (each in its own
`run-<id>` subfolder, so nothing of an earlier run is overwritten), but a changed spec may not start a
new run while the current one is unfinished: that run must be resumed with its own spec first, or the
new spec pointed at another folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from tasks.errors import UserError

OWNER_FILE = "pruneflow-run.json"


class OutputDirError(UserError):
    pass


def _owner(out_dir: Path) -> dict | None:
    path = out_dir / OWNER_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise OutputDirError(f"output_dir {out_dir}: {OWNER_FILE} is not valid JSON ({exc}); move the folder aside") from exc


def check_owner(out_dir: Path, pipeline: str, identity: str, run_status: Callable[[str], str | None]) -> None:
    """Refuse a folder of another pipeline, or one whose current run is unfinished under another spec."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputDirError(f"output_dir: {out_dir} is a file, not a folder; choose a folder path")
    owner = _owner(out_dir)
    if owner is None:
        if out_dir.exists() and any(not p.name.startswith(".") for p in out_dir.iterdir()):
            raise OutputDirError(
                f"output_dir {out_dir} exists and is not a pruneflow run folder; choose an empty or new folder"
            )
        return
    if owner.get("pipeline") != pipeline:
        raise OutputDirError(
            f"output_dir {out_dir} belongs to pipeline '{owner.get('pipeline')}', not '{pipeline}'; "
            "set another output_dir (e.g. --set output_dir=...)"
        )
    current = owner.get("run_id")
    if owner.get("identity") != identity and current and run_status(current) in ("running", "failed"):
        raise OutputDirError(
            f"output_dir {out_dir} holds unfinished run {current} of '{pipeline}', and this spec changes what "
            "that run searches (model, calibration, score or search sections); resume it with its own spec, "
            "start it over with --fresh, or set another output_dir"
        )


def claim(out_dir: Path, pipeline: str, identity: str, run_id: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    owner = _owner(out_dir) or {}
    runs = sorted(set(owner.get("runs", [])) | {run_id})
    record = {"pipeline": pipeline, "run_id": run_id, "identity": identity, "runs": runs}
    write_json(out_dir / OWNER_FILE, record)


def run_dir(out_dir: Path, run_id: str) -> Path:
    return out_dir / f"run-{run_id[:12]}"


def write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)
    return path


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_writable_folder(folder: Path, setting: str, need_bytes: int = 0) -> None:
    """`folder` is, or can be made, a writable directory with `need_bytes` free; probed with an unnamed
    temporary file, so nothing appears in it."""
    base = _existing_ancestor(folder)
    if not base.is_dir():
        raise OutputDirError(f"{setting}: {base} is a file, not a folder; choose a folder path")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as exc:
        raise OutputDirError(f"{setting}: cannot write in {base} ({exc.strerror}); choose a writable folder") from exc
    free = shutil.disk_usage(base).free
    if free < need_bytes:
        raise OutputDirError(
            f"{setting}: {base} has {free / 1e6:,.0f} MB free, and a checkpoint of this model needs about "
            f"{need_bytes / 1e6:,.0f} MB; free some space or choose another folder"
        )


def check_catalog_file(catalog: Path) -> None:
    if catalog.is_dir():
        raise OutputDirError(f"catalog: {catalog} is a folder; name a DuckDB file, e.g. {catalog / 'catalog.duckdb'}")
    check_writable_folder(catalog.parent, "catalog")


# What the writers here and in the stages leave while writing (`name.tmp<pid>`, `.name.tmp<pid>` folders,
# `.module.py.tmp`); a finished file or folder never ends like this.
_TEMPORARY = re.compile(r"\.tmp\d*$")


def sweep_temporaries(out_dir: Path) -> list[Path]:
    """Removes what interrupted writes left in the output folder. Only while holding the folder's lock:
    then no other process is writing there."""
    if not out_dir.is_dir():
        return []
    found = sorted(p for p in out_dir.rglob("*") if _TEMPORARY.search(p.name))
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return found
