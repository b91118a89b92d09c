"""Each layer's own widths in pruneflow's code-carrying checkpoints (a width plan keeps fewer query heads, KV
heads or MLP channels in some layers). Written into the checkpoint verbatim; it needs only torch.

The family's attention and MLP modules are built at the config's sizes, then their projections are
replaced by ones of the layer's sizes before the weights load; the attention forward reshapes with -1
heads, so only each KV head's repeat count changes besides.
"""

from __future__ import annotations

from torch import nn


def _linear(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    if (old.in_features, old.out_features) == (in_features, out_features):
        return old
    return nn.Linear(in_features, out_features, bias=old.bias is not None)


def narrow_attention(attn: nn.Module, widths: dict[str, int]) -> nn.Module:
    """`widths`: the layer's query heads and KV heads (its channels go to narrow_mlp)."""
    hidden, size = attn.o_proj.out_features, attn.head_dim
    attn.q_proj = _linear(attn.q_proj, hidden, widths["heads"] * size)
    attn.k_proj = _linear(attn.k_proj, hidden, widths["kv_heads"] * size)
    attn.v_proj = _linear(attn.v_proj, hidden, widths["kv_heads"] * size)
    attn.o_proj = _linear(attn.o_proj, widths["heads"] * size, hidden)
    attn.num_key_value_groups = widths["heads"] // widths["kv_heads"]
    return attn


def narrow_mlp(mlp: nn.Module, channels: int) -> nn.Module:
    hidden = mlp.down_proj.out_features
    mlp.gate_proj = _linear(mlp.gate_proj, hidden, channels)
    mlp.up_proj = _linear(mlp.up_proj, hidden, channels)
    mlp.down_proj = _linear(mlp.down_proj, channels, hidden)
    mlp.intermediate_size = channels
    return mlp
