"""Stage `prune`: delete the chosen blocks for real and save a checkpoint that loads elsewhere."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from transformers import AutoTokenizer, GenerationConfig

from pipelines.spec import PipelineSpec
from tasks.load import open_model
from tasks.refs import ArtifactRef
from tasks.surgery import remove_blocks, save_model
from tasks.surgery.edit import stubbed_units


class PruneError(ValueError):
    pass


def prune_stage(model_path: str, blocks: tuple[str, ...], spec: PipelineSpec, out_dir: Path) -> ArtifactRef:
    model = open_model(model_path, spec)
    remove_blocks(model, list(blocks))
    stubs = stubbed_units(model)
    if spec.prune.format == "hf" and stubs:
        raise PruneError(
            f"prune.format 'hf' keeps the original architecture, which cannot express removed halves {stubs}; "
            "use format 'auto' or 'pruneflow', or score.granularity 'layer'"
        )
    target = out_dir / "checkpoint-pruned"
    tmp = out_dir / f".checkpoint-pruned.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model.to("cpu"), AutoTokenizer.from_pretrained(model_path), tmp)
    _copy_generation_config(model_path, tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return ArtifactRef.of(target, "checkpoint")


def _copy_generation_config(source: str, out: Path) -> None:
    try:
        GenerationConfig.from_pretrained(source).save_pretrained(out)
    except OSError:
        pass  # the source has no generation config; transformers derives one from the model config
