"""Stage `evaluate`: perplexity on every evaluation dataset, parameter count and checkpoint size."""

from __future__ import annotations

from pathlib import Path

from tasks.calibrate import EvalData
from tasks.windows import load_windows
from tasks.evaluation import EvaluateSpec, Evaluation
from tasks.export.registry import format_of
from tasks.load import ModelSpec, open_model, resolve_device, resolve_dtype
from tasks.refs import tree_bytes
from tasks.residual import perplexity, predictions
from tasks.speed import speed_evaluations
from tasks.surgery import total_params


def evaluate_stage(model_path: str, stage: str, data: list[EvalData], model_spec: ModelSpec, batch_windows: int,
                   evaluate: EvaluateSpec) -> list[Evaluation]:
    model = open_model(model_path, model_spec)
    out = []
    for item in data:
        windows = load_windows(item.ref)
        ppl = perplexity(model, windows, batch_windows)
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


def _weight_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors")) or tree_bytes(path)
