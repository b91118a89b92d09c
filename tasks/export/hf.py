"""Format `hf`: the original architecture with fewer layers, loadable by plain `from_pretrained`.

Only whole layers can go: a standard architecture has no way to say that a layer lacks its attention
or MLP. Reading also accepts any checkpoint transformers loads, including pruneflow's interim format
(a standard config plus `pruneflow.removed`, read by `tasks.surgery.load_model`).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from tasks.export.common import adapters_problem, has_lone_halves, kept_layers, pruneflow_record, write_config, write_weights
from tasks.export.registry import ExportFormat, register_format
from tasks.surgery import load_model


@register_format
class HfFormat(ExportFormat):
    name = "hf"
    streams = True
    widths = "uniform"  # the config's sizes say them

    def problem(self, model: nn.Module) -> str | None:
        if not has_lone_halves(model):
            return adapters_problem(model, self.name)
        halves = [f"layers.{k.layer_id}.{part}" for k in kept_layers(model)
                  for part, kept in (("attn", k.attention), ("mlp", k.mlp)) if not kept]
        return (
            f"format 'hf' keeps the original architecture, which cannot express removed halves {halves}; "
            "use format 'auto', 'remote_code', 'nemotron_nas' or 'pruneflow', or score.granularity 'layer'"
        )

    def write(self, model: nn.Module, out_dir: Path) -> None:
        # config.json keeps the original model_type; the pruneflow record only documents the cut.
        config = write_weights(model, out_dir)
        config["pruneflow"] = pruneflow_record(model, self.name)
        write_config(out_dir, config)

    def claims(self, config: dict) -> bool:
        return True

    def load(self, path: Path, dtype: str, device: str) -> nn.Module:
        return load_model(path, dtype=dtype, device=device)
