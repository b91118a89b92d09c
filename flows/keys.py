"""Explicit cache keys: stage name + code version + the sections and upstream digests a task is given.

Never a hash of a model or tensor: upstream artifacts enter a key by their sha256 only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

from pipelines.spec import PipelineSpec
from tasks.calibrate import EvalData
from tasks.load import ModelRef
from tasks.refs import ArtifactRef

# Bump when a stage's results change meaning, so old cached results are not reused.
# 4: keys are built from the typed sections each task is given, not from a table of spec paths.
CODE_VERSION = "pruneflow-stages-4"

# Parameters that carry live objects (catalog handles, callbacks, output folders) or only say where work
# runs (`execution`: every runner computes the same numbers), never part of a key.
_RUNTIME_PARAMS = {"recorder", "progress", "out_dir", "checkpoint_path", "checkpoint_paths", "execution",
                   "pipeline"}


def keyable(value: Any) -> Any:
    if isinstance(value, ArtifactRef):
        return {"kind": value.kind, "sha256": value.sha256}
    if isinstance(value, ModelRef):
        return {"model": value.fingerprint}
    if isinstance(value, EvalData):
        return {"dataset": value.dataset, "sha256": value.ref.sha256}
    if isinstance(value, BaseModel):
        # Defaults left out, as in PipelineSpec.section_json: a new setting keeps old cache keys valid.
        return value.model_dump(mode="json", exclude_defaults=True, exclude=set(getattr(value, "NOT_IDENTITY", ())))
    if dataclasses.is_dataclass(value):
        return keyable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): keyable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [keyable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def stage_key(stage: str, parameters: dict[str, Any]) -> str:
    """The stage name, the code version and every parameter the task was given but runtime handles."""
    payload = {
        "stage": stage,
        "code": CODE_VERSION,
        "inputs": {k: keyable(v) for k, v in sorted(parameters.items()) if k not in _RUNTIME_PARAMS},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def cache_key_fn(stage: str) -> Callable[[Any, dict[str, Any]], str]:
    def key(_context: Any, parameters: dict[str, Any]) -> str:
        return f"{stage}-{stage_key(stage, parameters)}"

    return key


def identity_hash(spec: PipelineSpec) -> str:
    return hashlib.sha256(spec.section_json(*spec.identity_sections()).encode()).hexdigest()


def derive_run_id(spec: PipelineSpec, model_fingerprint: str, data_fingerprint: str) -> str:
    """Same pipeline + same model + same calibration tokens = same run, so a rerun finds it."""
    material = json.dumps([identity_hash(spec), model_fingerprint, data_fingerprint])
    return hashlib.sha256(material.encode()).hexdigest()[:20]
