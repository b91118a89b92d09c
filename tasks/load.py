"""Stage `load`: resolve any model source to a local checkpoint and check it can be pruned as asked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import torch
from torch import nn
from pydantic import Field
from transformers import AutoModelForCausalLM

from tasks.search.goal import check_reachable
from tasks.search.settings import ScoreSection, SearchSection
from tasks.sources import resolve_model
from tasks.sources.models import config_location
from tasks.stream.open import NotStreamed, open_streamed, residency
from tasks.sources.weights import check_weight_files
from tasks.errors import UserError
from tasks.export import load_checkpoint, model_config
from tasks.refs import Progress
from tasks.settings import Settings
from tasks.surgery import architecture_for, layer_ids, total_params

DType = Literal["float32", "bfloat16", "float16", "auto"]
Device = Literal["auto", "cpu", "cuda"]


class ModelSpec(Settings):
    source: str = Field(
        description=(
            "Model to prune: a local Hugging Face directory, a hub id, a path to a .gguf file, "
            "or builtin:smollm2-135m."
        ),
        min_length=1,
    )
    dtype: DType = Field("float32", description="Weights and compute dtype; auto: bfloat16 on a CUDA device that supports it, else float32.")
    device: Device = Field("auto", description="auto picks cuda when available, else cpu.")
    trust_remote_code: bool = Field(
        False,
        description=(
            "Run Python shipped in the model folder (a config or tokenizer auto_map) when it needs its own code. "
            "Off by default: such a folder is refused. pruneflow's own checkpoints never need it."
        ),
    )
    memory_budget_gb: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(
        "auto",
        description=(
            "Memory the model's weights may take on model.device, in GB (1e9 bytes). A model larger than this "
            "is streamed: its layers are read one at a time from the checkpoint's safetensors shards while they "
            "run. auto: 75% of the device's free memory (of the host's available memory on cpu). Not part of a "
            "run's identity: streamed and resident runs compute the same numbers."
        ),
    )

    # Settings that say how a run works, not what it computes: left out of run ids and cache keys.
    NOT_IDENTITY: ClassVar[frozenset[str]] = frozenset({"memory_budget_gb"})


@dataclass(frozen=True)
class ModelRef:
    path: str
    fingerprint: str
    source: str
    model_type: str
    num_layers: int
    params: int
    # The spec's model.trust_remote_code, for the stages that read the folder's tokenizer.
    trust_remote_code: bool = False


def resolve_device(device: str, setting: str = "model.device") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"{setting}: 'cuda' was asked for but no CUDA device is available; use 'auto' or 'cpu'")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """`auto`: bfloat16 on a CUDA device that computes in it natively, else float32 (bfloat16 matmuls on a
    CPU without bf16 units run several times slower than float32)."""
    if dtype != "auto":
        return dtype
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


class DeviceError(UserError):
    pass


def source_config(model: ModelSpec):
    """The source model's config, its weights neither read nor converted (`validate` resolves width shares on it)."""
    where = config_location(model.source)
    if where.gguf_file is None:
        return model_config(where.folder, model.trust_remote_code)
    from transformers import AutoConfig

    # A GGUF carries no code; its header holds the sizes a conversion would write to config.json.
    return AutoConfig.from_pretrained(where.folder, gguf_file=where.gguf_file, trust_remote_code=False)


def skeleton(path: str, trust_remote_code: bool = False) -> nn.Module:
    """The architecture without weights (meta device): enough to enumerate and count blocks."""
    config = model_config(Path(path), trust_remote_code)
    architecture_for(config.model_type)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def load_stage(model: ModelSpec, score: ScoreSection, search: SearchSection,
               progress: Progress | None = None) -> ModelRef:
    """Resolves `model.source` and checks that the search can reach its target on this architecture; `progress`
    follows hashing the weights and converting a GGUF."""
    resolved = resolve_model(model.source, progress)
    check_weight_files(Path(resolved.path))
    skeleton_model = skeleton(str(resolved.path), model.trust_remote_code)
    check_reachable(skeleton_model, search.rules(layer_ids(skeleton_model), score.granularity), search.goal_target())
    return ModelRef(
        path=str(resolved.path),
        fingerprint=resolved.fingerprint,
        source=model.source,
        model_type=skeleton_model.config.model_type,
        num_layers=skeleton_model.config.num_hidden_layers,
        params=total_params(skeleton_model),
        trust_remote_code=model.trust_remote_code,
    )


def open_model(path: str, model: ModelSpec, stage: str, streams: bool = False) -> nn.Module:
    """Any model pruneflow reads (a source model or an export in any format) as pruneflow's in-memory model.

    A model larger than `model.memory_budget_gb` comes back streamed (tasks.stream) to a stage that
    `streams`, and is refused, naming `stage`, by one that does not."""
    device = resolve_device(model.device)
    dtype = resolve_dtype(model.dtype, device)
    plan = residency(path, dtype, device, model.memory_budget_gb)
    if not plan.streams:
        return load_checkpoint(path, dtype=dtype, device=device)
    if not streams:
        raise NotStreamed(
            f"{stage} does not stream weights yet, and this model needs streaming ({plan.describe()}); "
            "raise model.memory_budget_gb to at least the weights' size to run it whole")
    return open_streamed(path, dtype, device, plan, stage)
