"""Config of a Llama model from which pruneflow removed whole layers and lone attention or MLP halves.

Written into the checkpoint by pruneflow; `config.json` names it in `auto_map`.
"""

from __future__ import annotations

from transformers.models.llama.configuration_llama import LlamaConfig


class PrunedLlamaConfig(LlamaConfig):
    model_type = "pruneflow_llama"

    # `layer_ids`: original index of every kept layer, in order; `removed`: every removed block of the
    # ORIGINAL model as `layers.N.attn` / `layers.N.mlp`; `base_model_type`: the unpruned architecture.
    pruneflow: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        record = self.pruneflow or {}
        layer_ids = record.get("layer_ids", list(range(self.num_hidden_layers)))
        if len(layer_ids) != self.num_hidden_layers:
            raise ValueError(
                f"pruneflow.layer_ids names {len(layer_ids)} layers but num_hidden_layers is {self.num_hidden_layers}"
            )
        self.pruneflow = {**record, "layer_ids": list(layer_ids), "removed": sorted(record.get("removed", []))}

    def keeps_attention(self, position: int) -> bool:
        return self._keeps(position, "attn")

    def keeps_mlp(self, position: int) -> bool:
        return self._keeps(position, "mlp")

    def _keeps(self, position: int, part: str) -> bool:
        layer_id = self.pruneflow["layer_ids"][position]
        return f"layers.{layer_id}.{part}" not in self.pruneflow["removed"]


__all__ = ["PrunedLlamaConfig"]
