"""The Python files written into self-contained checkpoints.

They are pruneflow's own modules under `templates/` (written for Llama, imported and tested as they
are), with names substituted for the model's family, so the checkpoint carries readable code that only
needs transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tasks.export.registry import ExportError

TEMPLATES = Path(__file__).resolve().parent / "templates"


@dataclass(frozen=True)
class Family:
    """How a transformers family spells its names: `Llama` in classes, `llama` in module paths."""

    class_prefix: str
    module: str


# Families whose decoder layer is norm -> attention -> residual, norm -> MLP -> residual, with the
# classes <Prefix>Attention, <Prefix>MLP, <Prefix>RMSNorm, <Prefix>DecoderLayer, <Prefix>Model, ...
FAMILIES: dict[str, Family] = {
    "llama": Family("Llama", "llama"),
    "mistral": Family("Mistral", "mistral"),
    "qwen2": Family("Qwen2", "qwen2"),
    "qwen3": Family("Qwen3", "qwen3"),
}


def family_of(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise ExportError(
            f"no modeling template for model_type '{model_type}'; self-contained export supports "
            f"{', '.join(sorted(FAMILIES))} (add one to tasks/export/codegen.py FAMILIES)"
        )
    return FAMILIES[model_type]


# The modeling template imports it; checkpoints carry pruneflow's own module verbatim (it needs only torch).
ADAPTERS_FILE = "residual_adapters.py"
SHARED = {ADAPTERS_FILE: Path(__file__).resolve().parent.parent / "surgery" / "residual_adapters.py"}


def render(template: str, renames: list[tuple[str, str]]) -> str:
    text = SHARED.get(template, TEMPLATES / template).read_text()
    for old, new in renames:
        text = text.replace(old, new)
    return text


def for_family(family: Family) -> list[tuple[str, str]]:
    return [("Llama", family.class_prefix), ("llama", family.module)]


def write_code(out_dir: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (out_dir / name).write_text(text)
