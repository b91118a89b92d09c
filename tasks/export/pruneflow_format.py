"""Format `pruneflow`: kept weights and pruneflow's record, no modeling code; only pruneflow reads it.

For architectures without a modeling template (see tasks/export/codegen.py), this is what `auto` writes
when lone halves were removed. `config.json` has model_type `pruneflow_<base>` so that transformers
refuses the folder instead of building the removed halves with random weights; pruneflow reads it back
with `tasks.export.load_checkpoint`. Checkpoints of the earlier interim format (the base model_type plus
`pruneflow.removed`) are read by the `hf` format, through `tasks.surgery.load_model`.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from tasks.export.common import (
    PRUNED_MODEL_TYPE_PREFIX,
    load_recorded,
    pruneflow_record,
    recorded_format,
    write_config,
    write_weights,
)
from tasks.export.registry import ExportFormat, register_format


@register_format
class PruneflowFormat(ExportFormat):
    name = "pruneflow"
    streams = True
    widths = "per_layer"  # each layer's widths come from the recorded plan
    servable = False
    carries_adapters = True

    def write(self, model: nn.Module, out_dir: Path) -> None:
        config = write_weights(model, out_dir)
        config.update(model_type=PRUNED_MODEL_TYPE_PREFIX + model.config.model_type,
                      pruneflow=pruneflow_record(model, self.name))
        config.pop("auto_map", None)
        write_config(out_dir, config)

    def claims(self, config: dict) -> bool:
        return recorded_format(config) == self.name

    def load(self, path: Path, dtype: str, device: str) -> nn.Module:
        return load_recorded(path, dtype, device)
