"""Stage `evaluate`: every registered evaluator that applies (perplexity on every evaluation dataset,
parameter count and checkpoint size, downstream tasks), on one checkpoint. Serving speed compares
checkpoints side by side, so it is a stage of its own (`tasks.speed_stage`)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from tasks.calibrate import EvalData
from tasks.windows import load_windows
from tasks.evaluation import (EvaluateSpec, Evaluation, EvaluationInput, Evaluator, evaluate_all,
                             register_evaluator)
from tasks.load import ModelSpec, open_model, resolve_device, resolve_dtype
from tasks.refs import ArtifactRef, tree_bytes
from tasks.registry import Extra
from tasks.residual import perplexity, predictions
from tasks.surgery import total_params, units_of


@register_evaluator
class PerplexityEvaluator(Evaluator):
    name = "perplexity"
    order = 10
    streams = True

    def evaluate(self, given: EvaluationInput) -> list[Evaluation]:
        out = []
        for item in given.data:
            windows = load_windows(item.ref)
            ppl = perplexity(given.model, windows, given.batch_windows, on_windows=given.window_counter(item.dataset))
            seq_len = windows.shape[1]
            out.append(Evaluation(given.stage, "perplexity", item.dataset, "perplexity", ppl, predictions(windows),
                                  seq_len, seq_len))
        return out


@register_evaluator
class SizeEvaluator(Evaluator):
    name = "size"
    order = 20
    streams = True

    def evaluate(self, given: EvaluationInput) -> list[Evaluation]:
        return [Evaluation(given.stage, "size", "-", "params", float(total_params(given.model))),
                Evaluation(given.stage, "size", "-", "checkpoint_bytes", float(_weight_bytes(Path(given.model_path))))]


@register_evaluator
class TaskEvaluator(Evaluator):
    """Zero-shot lm-evaluation-harness tasks (`evaluate.tasks`); lm-eval is an optional extra."""

    name = "task"
    order = 40
    extra = Extra(("lm_eval",), "pip install 'pruneflow[eval]' (or pip install lm-eval)")

    def wanted(self, evaluate: EvaluateSpec) -> bool:
        return bool(evaluate.tasks)

    def evaluate(self, given: EvaluationInput) -> list[Evaluation]:
        from tasks.downstream import downstream_evaluations

        spec = given.evaluate
        return downstream_evaluations(given.model, given.model_path, given.stage, spec.tasks, spec.task_paths,
                                      spec.task_limit, given.batch_windows, given.trust_remote_code,
                                      given.on_requests)


def evaluate_stage(model_path: str, stage: str, data: list[EvalData], model_spec: ModelSpec, batch_windows: int,
                   evaluate: EvaluateSpec,
                   on_window: Callable[[str, int, int], None] | None = None,
                   on_requests: Callable[[str, int, int], None] | None = None) -> list[Evaluation]:
    """`on_window(dataset, done, total)` follows every micro-batch of evaluation windows, `on_requests(task,
    done, total)` a downstream task's requests (progress bars)."""
    device = resolve_device(model_spec.device)
    given = EvaluationInput(stage, open_model(model_path, model_spec, "evaluate", streams=True), model_path, tuple(data),
                            resolve_dtype(model_spec.dtype, device), device, batch_windows, evaluate,
                            model_spec.trust_remote_code, on_window, on_requests)
    return evaluate_all(given)


def calibration_trajectory(model_path: str, model_spec: ModelSpec, calibration: ArtifactRef, blocks: tuple[str, ...],
                           batch_windows: int,
                           on_windows: Callable[[int, int], None] | None = None) -> tuple[float, ...]:
    """Calibration perplexity of the dense model and after each removal in order (len(blocks) + 1 values):
    the curve of the run's picture, the same for every strategy and metric (a step's own score is not
    always this perplexity: one_shot scores each block alone, other metrics are not perplexities).
    `on_windows(done, total)` follows every micro-batch of all the passes together (progress bars)."""
    model = open_model(model_path, model_spec, "the calibration trajectory", streams=True)
    windows = load_windows(calibration)
    count, passes = windows.shape[0], len(blocks) + 1

    def counter(k: int) -> Callable[[int, int], None] | None:
        if on_windows is None:
            return None
        return lambda done, _total: on_windows(k * count + done, passes * count)

    return tuple(perplexity(model, windows, batch_windows, skip=tuple(units_of(blocks[:k])), on_windows=counter(k))
                 for k in range(passes))


def _weight_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors")) or tree_bytes(path)
