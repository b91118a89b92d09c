"""The run's output folder: who owns it, and the report written into it."""

from __future__ import annotations

import json
import os
from pathlib import Path

OWNER_FILE = "pruneflow-run.json"


class OutputDirError(ValueError):
    pass


def _owner(out_dir: Path) -> dict | None:
    path = out_dir / OWNER_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise OutputDirError(f"output_dir {out_dir}: {OWNER_FILE} is not valid JSON ({exc}); move the folder aside") from exc


def check_owner(out_dir: Path, pipeline: str, identity: str, run_id: str | None = None) -> None:
    """Refuse a folder that holds another run's outputs, before anything is written into it.

    Without run_id (before any stage wrote): also refuse a non-empty folder that is not a run folder.
    """
    owner = _owner(out_dir)
    if owner is None:
        if run_id is None and out_dir.exists() and any(p for p in out_dir.iterdir() if not p.name.startswith(".")):
            raise OutputDirError(
                f"output_dir {out_dir} exists and is not a pruneflow run folder; choose an empty or new folder"
            )
        return
    same = owner.get("identity") == identity and (run_id is None or owner.get("run_id") == run_id)
    if not same:
        raise OutputDirError(
            f"output_dir {out_dir} belongs to run {owner.get('run_id')} of pipeline '{owner.get('pipeline')}', "
            f"and this spec is a different run (model, calibration, score or search changed); "
            "set another output_dir (e.g. --set output_dir=...) or remove that folder"
        )


def claim(out_dir: Path, pipeline: str, identity: str, run_id: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{OWNER_FILE}.tmp{os.getpid()}"
    tmp.write_text(json.dumps({"run_id": run_id, "pipeline": pipeline, "identity": identity}, indent=2))
    os.replace(tmp, out_dir / OWNER_FILE)


def write_json(path: Path, data: dict) -> Path:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)
    return path
