"""Stage `prune`: delete the chosen blocks for real and export a checkpoint that loads where models are served."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from typing import Literal

from pydantic import Field, create_model
from safetensors.torch import load_file
from transformers import GenerationConfig

from tasks.errors import DiskFull, UserError, is_disk_full
from tasks.export import ExportError, export_model, format_names, get_format, load_tokenizer, resolve_format
from tasks.load import ModelSpec, open_model
from tasks.refs import ArtifactRef, Progress
from tasks.settings import Settings
from tasks.stream.residency import streamed
from tasks.surgery import remove_blocks
from tasks.surgery.width import WidthPlan, apply_width, set_output_weights


class PruneError(UserError):
    pass


FORMAT_HELP = (
    "auto: a standard checkpoint when only whole layers go, else a self-contained one; "
    "hf: original architecture (whole layers only); remote_code: modeling code in the checkpoint; "
    "nemotron_nas: DeciLM block_configs that vLLM serves; gguf: one file that llama.cpp serves (Llama); "
    "pruneflow: weights and record only; or any export format a plugin registers."
)


class PruneSpec(Settings):
    """The `prune` section as the stage reads it; `prune_section` makes the spec's class, whose `format`
    accepts exactly the formats registered when the spec is composed (plugins included)."""

    format: str = Field("auto", description=FORMAT_HELP)


def prune_section(module: str) -> type[PruneSpec]:
    """PruneSpec with `format` restricted to `auto` and the registered export formats, read now, after
    plugins have loaded (an enum, so the Prefect form offers the names)."""
    names = Literal[("auto", *format_names())]  # type: ignore[valid-type]
    return create_model("PruneSpec", __base__=PruneSpec, __module__=module,
                        format=(names, Field("auto", description=FORMAT_HELP)))


def prune_stage(model_path: str, blocks: tuple[str, ...], model: ModelSpec, prune: PruneSpec,
                out_dir: Path, plan_json: str | None = None, width_weights: ArtifactRef | None = None,
                progress: Progress | None = None) -> ArtifactRef:
    """Writes `out_dir/checkpoint-pruned` in `prune.format` (the format is recorded in its config.json):
    the blocks removed, then the width plan (if any) applied to what is left, with the output projections
    a reconstructing width strategy refitted (`width_weights`). `progress` follows its steps."""
    if progress is not None:
        progress("checkpoint", 0, 3, "steps", "reading the model")
    depth_only = plan_json is None and width_weights is None
    pruned = open_model(model_path, model, "prune" if depth_only else "prune with a width plan", streams=depth_only)
    remove_blocks(pruned, list(blocks))
    if plan_json is not None:
        apply_width(pruned, WidthPlan.from_json(plan_json))
    if width_weights is not None:
        set_output_weights(pruned, load_file(width_weights.path))
    return write_checkpoint(pruned, model_path, out_dir / "checkpoint-pruned", prune.format, model.trust_remote_code,
                            progress, first_step=1)


def write_checkpoint(model, source_path: str, target: Path, requested_format: str,
                     trust_remote_code: bool = False, progress: Progress | None = None,
                     first_step: int = 0) -> ArtifactRef:
    """Export `model` to `target` with the source's tokenizer and generation config; all or nothing.
    `progress` follows its steps (writing, hashing) after the caller's `first_step` ones."""
    try:
        fmt = resolve_format(requested_format, model)
    except ExportError as err:
        raise PruneError(str(err)) from err
    if streamed(model) is not None and not get_format(fmt).streams:
        raise PruneError(f"prune.format '{fmt}' does not write a streamed model yet (one larger than "
                         f"model.memory_budget_gb); formats that do: {', '.join(n for n in format_names() if get_format(n).streams)}")

    def step(done: int, what: str) -> None:
        if progress is not None:
            progress("checkpoint", first_step + done, first_step + 2, "steps", what)

    tmp = target.parent / f".{target.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    step(0, f"writing {fmt}")
    try:
        # The tokenizer first: a format that carries it inside its file (gguf) reads it from the folder.
        load_tokenizer(source_path, trust_remote_code).save_pretrained(tmp)
        export_model(model if streamed(model) is not None else model.to("cpu"), tmp, fmt)
        _copy_generation_config(source_path, tmp)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(exc):
            raise DiskFull(f"output_dir: no space left on the device of {target.parent} while writing {target.name}; "
                           "free some space (or set another output_dir) and run again: the run resumes") from exc
        raise
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    step(1, "hashing")
    ref = ArtifactRef.of(target, "checkpoint", progress)
    step(2, "written")
    return ref


def _copy_generation_config(source: str, out: Path) -> None:
    try:
        GenerationConfig.from_pretrained(source).save_pretrained(out)
    except OSError:
        pass  # the source has no generation config; the one saved with the weights stays
