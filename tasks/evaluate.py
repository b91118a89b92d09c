"""Stage `evaluate`: perplexity on every evaluation dataset, parameter count and checkpoint size."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from tasks.calibrate import EvalData
from tasks.windows import load_windows
from tasks.evaluation import EvaluateSpec, Evaluation
from tasks.export.registry import format_of
from tasks.load import ModelSpec, open_model, resolve_device, resolve_dtype
from tasks.refs import ArtifactRef, tree_bytes
from tasks.residual import perplexity, predictions
from tasks.speed import speed_evaluations
from tasks.surgery import total_params, units_of


def evaluate_stage(model_path: str, stage: str, data: list[EvalData], model_spec: ModelSpec, batch_windows: int,
                   evaluate: EvaluateSpec,
                   on_window: Callable[[str, int, int], None] | None = None) -> list[Evaluation]:
    """`on_window(dataset, done, total)` follows every micro-batch of evaluation windows (progress bars)."""
    model = open_model(model_path, model_spec)
    out = []
    for item in data:
        windows = load_windows(item.ref)
        counter = None if on_window is None else (lambda done, total, name=item.dataset: on_window(name, done, total))
        ppl = perplexity(model, windows, batch_windows, on_windows=counter)
        seq_len = windows.shape[1]
        out.append(Evaluation(stage, "perplexity", item.dataset, "perplexity", ppl, predictions(windows), seq_len, seq_len))
    out.append(Evaluation(stage, "size", "-", "params", float(total_params(model))))
    out.append(Evaluation(stage, "size", "-", "checkpoint_bytes", float(_weight_bytes(Path(model_path)))))
    # Speed is measured the way a user serves the checkpoint; the `pruneflow` format has no runtime
    # outside pruneflow, so it gets no speed rows (the report's speed table then lacks that stage).
    if format_of(Path(model_path)).servable:
        device = resolve_device(model_spec.device)
        out.extend(speed_evaluations(model_path, stage, resolve_dtype(model_spec.dtype, device), device))
    if evaluate.tasks:
        from tasks.downstream import downstream_evaluations  # lm-eval is an optional extra

        out.extend(downstream_evaluations(model, model_path, stage, evaluate.tasks, evaluate.task_paths,
                                          evaluate.task_limit, batch_windows))
    return out


def calibration_trajectory(model_path: str, model_spec: ModelSpec, calibration: ArtifactRef, blocks: tuple[str, ...],
                           batch_windows: int) -> tuple[float, ...]:
    """Calibration perplexity of the dense model and after each removal in order (len(blocks) + 1 values):
    the curve of the run's picture, the same for every strategy and metric (a step's own score is not
    always this perplexity: one_shot scores each block alone, other metrics are not perplexities)."""
    model = open_model(model_path, model_spec)
    windows = load_windows(calibration)
    return tuple(perplexity(model, windows, batch_windows, skip=tuple(units_of(blocks[:k])))
                 for k in range(len(blocks) + 1))


def _weight_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors")) or tree_bytes(path)
