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


# The modeling template imports them; checkpoints carry pruneflow's own modules verbatim (they need only
# torch and transformers).
ADAPTERS_FILE = "residual_adapters.py"
KV_CACHE_FILE = "kv_cache.py"
WIDTHS_FILE = "layer_widths.py"
_SURGERY = Path(__file__).resolve().parent.parent / "surgery"
SHARED = {ADAPTERS_FILE: _SURGERY / ADAPTERS_FILE, KV_CACHE_FILE: _SURGERY / KV_CACHE_FILE,
          WIDTHS_FILE: TEMPLATES / WIDTHS_FILE}


def render(template: str, renames: list[tuple[str, str]]) -> str:
    text = SHARED.get(template, TEMPLATES / template).read_text()
    for old, new in renames:
        text = text.replace(old, new)
    return text


def for_family(family: Family) -> list[tuple[str, str]]:
    return [("Llama", family.class_prefix), ("llama", family.module)]


def write_code(out_dir: Path, files: dict[str, str]) -> list[str]:
    """Writes the given files and the shared modules that every modeling template imports; returns their names."""
    files = {**{name: render(name, []) for name in SHARED}, **files}
    for name, text in files.items():
        # Whole files or none: a reader (or an interrupted refresh) never sees a half-written module.
        partial = out_dir / f".{name}.tmp"
        partial.write_text(text)
        partial.replace(out_dir / name)
    return sorted(files)
