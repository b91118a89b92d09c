"""Stage `load`: resolve any model source to a local checkpoint and check it can be pruned as asked."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from pipelines.spec import PipelineSpec
from tasks.search.driver import Target, check_reachable
from tasks.sources import resolve_model
from tasks.export import load_checkpoint
from tasks.surgery import adapter_for, total_params


@dataclass(frozen=True)
class ModelRef:
    path: str
    fingerprint: str
    source: str
    model_type: str
    num_layers: int
    params: int


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("model.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """`auto`: bfloat16 on a CUDA device that computes in it natively, else float32 (bfloat16 matmuls on a
    CPU without bf16 units run several times slower than float32)."""
    if dtype != "auto":
        return dtype
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def skeleton(path: str) -> nn.Module:
    """The architecture without weights (meta device): enough to enumerate and count blocks."""
    config = AutoConfig.from_pretrained(path)
    adapter_for(config.model_type)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def search_target(spec: PipelineSpec) -> Target:
    target = spec.search.target
    return Target(blocks=getattr(target, "blocks", None), params_ratio=getattr(target, "params_ratio", None))


def load_stage(spec: PipelineSpec) -> ModelRef:
    resolved = resolve_model(spec.model.source)
    model = skeleton(str(resolved.path))
    check_reachable(model, spec.score.granularity, search_target(spec), spec.search.protect,
                    protect_first=spec.search.protect_first, protect_last=spec.search.protect_last)
    return ModelRef(
        path=str(resolved.path),
        fingerprint=resolved.fingerprint,
        source=spec.model.source,
        model_type=model.config.model_type,
        num_layers=model.config.num_hidden_layers,
        params=total_params(model),
    )


def open_model(path: str, spec: PipelineSpec) -> nn.Module:
    """Any model pruneflow reads (a source model or an export in any format) as pruneflow's in-memory model."""
    device = resolve_device(spec.model.device)
    return load_checkpoint(path, dtype=resolve_dtype(spec.model.dtype, device), device=device)
