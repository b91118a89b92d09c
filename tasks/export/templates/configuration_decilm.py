"""Nemotron-NAS (DeciLM) config: a Llama whose layers may lack attention or FFN, declared per layer.

Written into the checkpoint by pruneflow. `block_configs` has one entry per layer; an `attention` or
`ffn` section with `no_op: true` is a removed block (no weights, and no KV cache for attention).
vLLM serves this format natively as `DeciLMForCausalLM`.
"""

from __future__ import annotations

from types import SimpleNamespace

from transformers.models.llama.configuration_llama import LlamaConfig


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """DeciLM's rule: two thirds of ffn_mult x hidden, rounded up to a multiple of 256."""
    size = int(2 * ffn_mult * hidden_size / 3)
    return size if size % 256 == 0 else size + 256 - size % 256


def _block(entry: dict | SimpleNamespace) -> SimpleNamespace:
    # Attribute access (`block.attention.no_op`) is what vLLM reads; only keys present become attributes,
    # because vLLM tells `ffn_mult` from an explicit `intermediate_size` with hasattr.
    if isinstance(entry, SimpleNamespace):
        return entry
    return SimpleNamespace(attention=SimpleNamespace(**entry["attention"]), ffn=SimpleNamespace(**entry["ffn"]))


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    block_configs: list | None = None
    # Written by pruneflow: original index of every kept layer and the removed blocks of the original model.
    pruneflow: dict | None = None

    def __post_init__(self, **kwargs):
        self.block_configs = [_block(entry) for entry in self.block_configs or []]
        if self.block_configs:
            self._check_blocks()
        super().__post_init__(**kwargs)

    def _check_blocks(self) -> None:
        if len(self.block_configs) != self.num_hidden_layers:
            raise ValueError(
                f"block_configs has {len(self.block_configs)} entries but num_hidden_layers is {self.num_hidden_layers}"
            )
        kv_heads = {self.num_attention_heads // b.attention.n_heads_in_group
                    for b in self.block_configs if not b.attention.no_op}
        sizes = {self.intermediate_of(b.ffn) for b in self.block_configs if not b.ffn.no_op}
        # Blocks may differ (layer_widths says each one's); the config-wide sizes are the widest.
        if kv_heads:
            self.num_key_value_heads = max(kv_heads)
        if sizes:
            self.intermediate_size = max(sizes)

    def intermediate_of(self, ffn: SimpleNamespace) -> int:
        if getattr(ffn, "ffn_mult", None) is not None:
            return ffn_mult_to_intermediate_size(ffn.ffn_mult, self.hidden_size)
        return ffn.intermediate_size

    def keeps_attention(self, position: int) -> bool:
        return not self.block_configs or not self.block_configs[position].attention.no_op

    def keeps_mlp(self, position: int) -> bool:
        return not self.block_configs or not self.block_configs[position].ffn.no_op

    def layer_widths(self, position: int) -> dict[str, int]:
        """Query heads, KV heads and FFN channels of the block at `position`."""
        if not self.block_configs:
            return {"heads": self.num_attention_heads, "kv_heads": self.num_key_value_heads,
                    "channels": self.intermediate_size}
        block = self.block_configs[position]
        group = block.attention.n_heads_in_group
        return {"heads": self.num_attention_heads,
                "kv_heads": self.num_attention_heads // group if group else self.num_key_value_heads,
                "channels": self.intermediate_of(block.ffn) if not block.ffn.no_op else self.intermediate_size}

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["block_configs"] = [
            {"attention": dict(vars(b.attention)), "ffn": dict(vars(b.ffn))} for b in self.block_configs
        ]
        return out


__all__ = ["DeciLMConfig"]
