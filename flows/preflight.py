"""Checks that need no Prefect: bad input fails in seconds, before a server starts or a file is written."""

from __future__ import annotations

from pathlib import Path

from flows.keys import identity_hash
from flows.outputs import check_owner
from pipelines import PipelineSpec
from tasks.load import load_stage, resolve_device
from tasks.sources import load_texts


def preflight(spec: PipelineSpec) -> None:
    check_owner(Path(spec.output_dir), spec.name, identity_hash(spec))
    resolve_device(spec.model.device)
    load_stage(spec)
    load_texts(spec.calibration.dataset, "calibration")
    for dataset in spec.evaluate.datasets:
        load_texts(dataset, "evaluation")
