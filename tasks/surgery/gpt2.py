"""GPT-2: learned absolute positions, pre-norm blocks under `transformer.h`.

Attention half: ln_1 + attn. MLP half: ln_2 + mlp. The embedding adds `wpe` of positions 0..T-1 to the
token embeddings. With `scale_attn_by_inverse_layer_idx` an attention divides its scores by its layer
index + 1, fixed when the layer is built: deleting a layer would renumber (and rescale) the later ones in
any reloaded checkpoint, so such deletions are refused.
"""

from __future__ import annotations

import torch
from torch import nn

from tasks.surgery.architecture import ArchitectureAdapter, ForwardContext, HalfLayout, register_architecture
from tasks.surgery.decoder import build_masks, first_tensor, positions


@register_architecture
class GPT2Adapter(ArchitectureAdapter):
    model_types = ("gpt2",)
    attn = HalfLayout("attn", norms=("ln_1",))
    mlp = HalfLayout("mlp", norms=("ln_2",))

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.transformer.h

    def embed(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        tokens = model.transformer.wte(input_ids)
        return tokens + model.transformer.wpe(positions(tokens))

    def context(self, model: nn.Module, hidden: torch.Tensor) -> ForwardContext:
        position_ids = positions(hidden)
        types = ("full_attention",) * len(self.decoder_layers(model))
        return ForwardContext(position_ids, types, build_masks(model.config, hidden, position_ids, types))

    def attn_delta(self, layer: nn.Module, hidden: torch.Tensor, ctx: ForwardContext, position: int) -> torch.Tensor:
        return first_tensor(layer.attn(layer.ln_1(hidden), attention_mask=ctx.mask(position)))

    def mlp_delta(self, layer: nn.Module, hidden: torch.Tensor, ctx: ForwardContext, position: int) -> torch.Tensor:
        return layer.mlp(layer.ln_2(hidden))

    def final_norm(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return model.transformer.ln_f(hidden)

    def check_layer_deletion(self, model: nn.Module, kept_positions: list[int]) -> None:
        shifted = [p for new, p in enumerate(kept_positions) if new != p]
        if getattr(model.config, "scale_attn_by_inverse_layer_idx", False) and shifted:
            raise ValueError(
                "gpt2 with scale_attn_by_inverse_layer_idx scales each attention by its layer index; deleting "
                f"layers would change the attention of the later layers at positions {shifted}. Remove only "
                "the last layers, or lone attention/MLP halves (score.granularity attn, mlp or sublayer)"
            )
