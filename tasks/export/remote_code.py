"""Format `remote_code`: a self-contained checkpoint carrying the modeling code it needs.

Files: `model.safetensors` (kept blocks only, original parameter names), `config.json` (model_type
`pruneflow_<family>`, `auto_map`, and `pruneflow.{layer_ids,removed}` in original block ids),
`configuration_pruned.py` and `modeling_pruned.py` (a config class and model classes subclassing the
family's transformers classes; see tasks/export/codegen.py for its two templates), `residual_adapters.py`
(recovery adapters, used when recovery added any), `removed_halves.py` (stand-ins of removed halves),
`layer_widths.py` and `kv_cache.py` (the cache keyword of the transformers release that loads it). Every
family with an architecture adapter has one. Loads offline with
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`.

The model_type is not the base one on purpose: a plain `from_pretrained` without trust_remote_code then
refuses the checkpoint instead of silently building the removed blocks with random weights.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from tasks.export.codegen import LAYERED, family_of, for_family, modeling_template, render, write_code
from tasks.export.common import (
    PRUNED_MODEL_TYPE_PREFIX,
    load_recorded,
    pruneflow_record,
    recorded_format,
    write_config,
    write_weights,
)
from tasks.export.registry import ExportError, ExportFormat, register_format
from tasks.surgery import architecture_of

CONFIG_FILE = "configuration_pruned.py"
MODELING_FILE = "modeling_pruned.py"


@register_format
class RemoteCodeFormat(ExportFormat):
    name = "remote_code"
    streams = True
    widths = "per_layer"  # each layer's widths come from the recorded plan
    carries_code = True
    carries_adapters = True

    def problem(self, model: nn.Module) -> str | None:
        try:
            family_of(model.config.model_type)
        except ExportError as exc:
            return f"format 'remote_code': {exc}"
        return None

    def write(self, model: nn.Module, out_dir: Path) -> None:
        family = family_of(model.config.model_type)
        prefix = f"Pruned{family.class_prefix}"
        config = write_weights(model, out_dir)
        record = pruneflow_record(model, self.name)
        if family.model_type not in LAYERED:
            record["layout"] = stand_in_layout(model)
        config.update(
            model_type=PRUNED_MODEL_TYPE_PREFIX + family.model_type,
            architectures=[f"{prefix}ForCausalLM"],
            auto_map={
                "AutoConfig": f"{Path(CONFIG_FILE).stem}.{prefix}Config",
                "AutoModelForCausalLM": f"{Path(MODELING_FILE).stem}.{prefix}ForCausalLM",
            },
            pruneflow=record,
        )
        write_config(out_dir, config)
        write_code(out_dir, self.code_files(config))

    def code_files(self, config: dict) -> dict[str, str]:
        base = config["pruneflow"]["base_model_type"]
        renames = for_family(family_of(base))
        return {CONFIG_FILE: render(CONFIG_FILE, renames), MODELING_FILE: render(modeling_template(base), renames)}

    def claims(self, config: dict) -> bool:
        return recorded_format(config) == self.name

    def load(self, path: Path, dtype: str, device: str) -> nn.Module:
        return load_recorded(path, dtype, device)


def stand_in_layout(model: nn.Module) -> dict:
    """Where the family keeps its layers (a module path) and, per half, the slot a stand-in takes and the
    modules that become identities with it: the architecture adapter's `HalfLayout`, written down for the
    checkpoint's code."""
    adapter = architecture_of(model)
    layers = adapter.decoder_layers(model)
    path = next(name for name, module in model.named_modules() if module is layers)
    halves = {part: adapter.half(part) for part in ("attn", "mlp")}
    return {"layers": path,
            **{part: {"slot": half.slot, "identities": [*half.norms, *half.inner]} for part, half in halves.items()}}
