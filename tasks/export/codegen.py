"""The Python files written into self-contained checkpoints.

They are pruneflow's own modules under `templates/` (written for Llama, imported and tested as they
are), with names substituted for the model's family, so the checkpoint carries readable code that only
needs transformers. Two modeling templates: `modeling_pruned.py` rebuilds each layer with only its kept
halves (families laid out like Llama, listed in LAYERED); `modeling_stand_ins.py` builds the family's own
model and puts parameter-free stand-ins where halves were removed, which serves any family pruneflow has
an architecture adapter for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tasks.export.registry import ExportError

TEMPLATES = Path(__file__).resolve().parent / "templates"
LAYERED_TEMPLATE = "modeling_pruned.py"
STAND_INS_TEMPLATE = "modeling_stand_ins.py"


@dataclass(frozen=True)
class Family:
    """How a transformers family spells its names: classes, the module they live in, its model_type."""

    model_type: str
    module: str  # transformers.models.<module>
    config_class: str
    lm_class: str

    @property
    def class_prefix(self) -> str:
        return self.lm_class.removesuffix("ForCausalLM").removesuffix("LMHeadModel")


# Families whose decoder layer is norm -> attention -> residual, norm -> MLP -> residual, with the
# classes <Prefix>Attention, <Prefix>MLP, <Prefix>RMSNorm, <Prefix>DecoderLayer, <Prefix>Model, ...
LAYERED = ("llama", "mistral", "qwen2", "qwen3")


def family_of(model_type: str) -> Family:
    """The family's names as the installed transformers registers them."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ExportError(
            f"no modeling template for model_type '{model_type}': this transformers release has no causal LM "
            "class for it to build the checkpoint's code on"
        )
    return Family(model_type, model_type_to_module_name(model_type), CONFIG_MAPPING_NAMES[model_type],
                  MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])


def modeling_template(model_type: str) -> str:
    return LAYERED_TEMPLATE if model_type in LAYERED else STAND_INS_TEMPLATE


# The modeling templates import them; checkpoints carry pruneflow's own modules verbatim (they need only
# torch and transformers).
ADAPTERS_FILE = "residual_adapters.py"
KV_CACHE_FILE = "kv_cache.py"
WIDTHS_FILE = "layer_widths.py"
STAND_INS_FILE = "removed_halves.py"
_SURGERY = Path(__file__).resolve().parent.parent / "surgery"
SHARED = {ADAPTERS_FILE: _SURGERY / ADAPTERS_FILE, KV_CACHE_FILE: _SURGERY / KV_CACHE_FILE,
          WIDTHS_FILE: TEMPLATES / WIDTHS_FILE, STAND_INS_FILE: _SURGERY / "removed.py"}


def render(template: str, renames: list[tuple[str, str]]) -> str:
    text = SHARED.get(template, TEMPLATES / template).read_text()
    for old, new in renames:
        text = text.replace(old, new)
    return text


def for_family(family: Family) -> list[tuple[str, str]]:
    """Renames that turn a Llama template into the family's: module paths and class names first, then
    the remaining words (docstrings); the layered families' names follow Llama's exactly."""
    if family.model_type in LAYERED:
        return [("Llama", family.class_prefix), ("llama", family.module)]
    module = f"transformers.models.{family.module}"
    return [
        ("transformers.models.llama.configuration_llama", f"{module}.configuration_{family.module}"),
        ("transformers.models.llama.modeling_llama", f"{module}.modeling_{family.module}"),
        ("PrunedLlama", f"Pruned{family.class_prefix}"),
        ("LlamaConfig", family.config_class),
        ("LlamaForCausalLM", family.lm_class),
        ("pruneflow_llama", f"pruneflow_{family.model_type}"),
        ("Llama", family.class_prefix),
    ]


def write_code(out_dir: Path, files: dict[str, str]) -> list[str]:
    """Writes the given files and the shared modules that every modeling template imports; returns their names."""
    files = {**{name: render(name, []) for name in SHARED}, **files}
    for name, text in files.items():
        # Whole files or none: a reader (or an interrupted refresh) never sees a half-written module.
        partial = out_dir / f".{name}.tmp"
        partial.write_text(text)
        partial.replace(out_dir / name)
    return sorted(files)
