"""The base of every settings section a stage or method takes from the pipeline spec."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Settings(BaseModel):
    """Unknown keys are errors (a typo never passes silently), and a section never changes once read."""

    model_config = ConfigDict(extra="forbid", frozen=True)
