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

    def layer_widths(self, position: int) -> dict[str, int]:
        """Query heads, KV heads and MLP channels of the layer at `position`: a width plan
        (`pruneflow.plan`, kept unit indices per original layer id) may narrow each layer its own way."""
        layer_id = str(self.pruneflow["layer_ids"][position])
        kept = ((self.pruneflow.get("plan") or {}).get("layers") or {}).get(layer_id) or {}
        return {
            "heads": len(kept["heads"]) if "heads" in kept else self.num_attention_heads,
            "kv_heads": len(kept["kv_heads"]) if "kv_heads" in kept else self.num_key_value_heads,
            "channels": len(kept["channels"]) if "channels" in kept else self.intermediate_size,
        }

    def _keeps(self, position: int, part: str) -> bool:
        layer_id = self.pruneflow["layer_ids"][position]
        return f"layers.{layer_id}.{part}" not in self.pruneflow["removed"]


__all__ = ["PrunedLlamaConfig"]
