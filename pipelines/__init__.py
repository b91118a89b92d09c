"""The declarative layer: pipeline spec models, YAML loading, ready-made pipelines."""

from pathlib import Path

from pipelines.loader import SpecError, load_spec, validate_mapping
from pipelines.spec import IDENTITY_SECTIONS, PipelineSpec

PIPELINES_DIR = Path(__file__).parent

__all__ = ["IDENTITY_SECTIONS", "PIPELINES_DIR", "PipelineSpec", "SpecError", "load_spec", "validate_mapping"]
