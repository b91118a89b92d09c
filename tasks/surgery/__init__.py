"""Model surgery, in one place: what a block is per architecture, how to skip it, how to delete it."""

# One module per architecture family; importing it registers its adapter.
from tasks.surgery import gemma, gpt2, gpt_neox, llama, moe, olmo2, opt, phi3  # noqa: F401
from tasks.surgery.architecture import (
    ArchitectureAdapter,
    ForwardContext,
    HalfLayout,
    UnsupportedArchitecture,
    architecture_for,
    architecture_of,
    register_architecture,
    supported_model_types,
)
from tasks.surgery.blocks import Block, candidate_blocks, parse_block, units_of
from tasks.surgery.edit import (
    block_param_counts,
    layer_ids,
    load_model,
    remove_blocks,
    removed_units,
    save_model,
    total_params,
)

__all__ = [
    "ArchitectureAdapter",
    "Block",
    "ForwardContext",
    "HalfLayout",
    "UnsupportedArchitecture",
    "architecture_for",
    "architecture_of",
    "block_param_counts",
    "candidate_blocks",
    "layer_ids",
    "load_model",
    "parse_block",
    "register_architecture",
    "remove_blocks",
    "removed_units",
    "save_model",
    "supported_model_types",
    "total_params",
    "units_of",
]
