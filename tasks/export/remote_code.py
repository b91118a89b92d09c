"""Format `remote_code`: a self-contained checkpoint carrying the modeling code it needs.

Files: `model.safetensors` (kept blocks only, original parameter names), `config.json` (model_type
`pruneflow_<family>`, `auto_map`, and `pruneflow.{layer_ids,removed}` in original block ids),
`configuration_pruned.py` and `modeling_pruned.py` (a config class and model classes subclassing the
family's transformers classes), `residual_adapters.py` (recovery adapters, used when recovery added any)
and `kv_cache.py` (the cache keyword of the transformers release that loads it). Loads offline with
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`.

The model_type is not the base one on purpose: a plain `from_pretrained` without trust_remote_code then
refuses the checkpoint instead of silently building the removed blocks with random weights.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from tasks.export.codegen import FAMILIES, family_of, for_family, render, write_code
from tasks.export.common import (
    PRUNED_MODEL_TYPE_PREFIX,
    load_recorded,
    pruneflow_record,
    recorded_format,
    write_config,
    write_weights,
)
from tasks.export.registry import ExportFormat, register_format

CONFIG_FILE = "configuration_pruned.py"
MODELING_FILE = "modeling_pruned.py"


@register_format
class RemoteCodeFormat(ExportFormat):
    name = "remote_code"
    widths = "per_layer"  # each layer's widths come from the recorded plan
    carries_code = True
    carries_adapters = True

    def problem(self, model: nn.Module) -> str | None:
        if model.config.model_type not in FAMILIES:
            return (
                f"format 'remote_code' has no modeling template for model_type '{model.config.model_type}' "
                f"(supported: {', '.join(sorted(FAMILIES))})"
            )
        return None

    def write(self, model: nn.Module, out_dir: Path) -> None:
        family = family_of(model.config.model_type)
        prefix = f"Pruned{family.class_prefix}"
        config = write_weights(model, out_dir)
        config.update(
            model_type=PRUNED_MODEL_TYPE_PREFIX + family.module,
            architectures=[f"{prefix}ForCausalLM"],
            auto_map={
                "AutoConfig": f"{Path(CONFIG_FILE).stem}.{prefix}Config",
                "AutoModelForCausalLM": f"{Path(MODELING_FILE).stem}.{prefix}ForCausalLM",
            },
            pruneflow=pruneflow_record(model, self.name),
        )
        write_config(out_dir, config)
        write_code(out_dir, self.code_files(config))

    def code_files(self, config: dict) -> dict[str, str]:
        renames = for_family(family_of(config["pruneflow"]["base_model_type"]))
        return {CONFIG_FILE: render(CONFIG_FILE, renames), MODELING_FILE: render(MODELING_FILE, renames)}

    def claims(self, config: dict) -> bool:
        return recorded_format(config) == self.name

    def load(self, path: Path, dtype: str, device: str) -> nn.Module:
        return load_recorded(path, dtype, device)
