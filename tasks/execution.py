"""The `execution` section: where and how side by side a search step's scoring runs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from tasks.load import Device
from tasks.settings import Settings


class ExecutionSpec(Settings):
    """Where a search step's scoring runs. Never part of a run's identity or cache keys: every runner
    computes the same numbers (see tasks/distributed)."""

    runner: Literal["local", "dask"] = Field(
        "local", description="local: in the flow process; dask: calibration windows sharded over Dask workers."
    )
    address: str | None = Field(
        None, min_length=1, description="dask: address of a running scheduler, e.g. tcp://10.0.0.5:8786."
    )
    workers: int | None = Field(
        None, ge=1, le=1024, description="dask: start a local cluster of this many worker processes for the run."
    )
    threads: int = Field(1, ge=1, le=1024, description="dask: torch threads in each worker process.")
    device: Device | None = Field(None, description="dask: device on each worker; default model.device.")
    parallel_candidates: int | Literal["auto"] = Field(
        "auto",
        description=(
            "local: search candidates evaluated side by side, each on one torch thread (same scores); "
            "auto: one per usable CPU core up to 4, one on a GPU."
        ),
    )

    @field_validator("parallel_candidates")
    @classmethod
    def _some_candidates(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= 256:
            raise ValueError("execution.parallel_candidates must be 'auto' or an integer from 1 to 256")
        return value

    @model_validator(mode="after")
    def _settings_fit_runner(self) -> "ExecutionSpec":
        given = sorted(self.model_fields_set & {"address", "workers", "threads", "device"})
        if self.runner == "dask" and "parallel_candidates" in self.model_fields_set:
            raise ValueError(
                "execution.parallel_candidates applies only with execution.runner: local "
                "(Dask workers take execution.threads)"
            )
        if self.runner == "local":
            if given:
                raise ValueError(
                    f"execution.{', execution.'.join(given)} apply only with execution.runner: dask"
                )
            return self
        if (self.address is None) == (self.workers is None):
            raise ValueError(
                "execution.runner: dask needs exactly one of execution.address (a running scheduler) "
                "or execution.workers (a local cluster started for the run)"
            )
        import importlib.util

        if importlib.util.find_spec("prefect_dask") is None:
            raise ValueError("execution.runner: dask needs the dask extra: pip install 'pruneflow[dask]'")
        return self
