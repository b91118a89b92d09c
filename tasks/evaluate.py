"""Stage `evaluate`: perplexity on every evaluation dataset, parameter count and checkpoint size."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelines.spec import PipelineSpec
from tasks.calibrate import EvalData, load_windows
from tasks.load import open_model
from tasks.refs import tree_bytes
from tasks.residual import perplexity, predictions
from tasks.surgery import total_params


@dataclass(frozen=True)
class Evaluation:
    stage: str
    kind: str
    dataset: str
    metric: str
    value: float
    n_tokens: int | None = None
    seq_len: int | None = None
    stride: int | None = None


def evaluate_stage(model_path: str, stage: str, data: list[EvalData], spec: PipelineSpec) -> list[Evaluation]:
    model = open_model(model_path, spec)
    out = []
    for item in data:
        windows = load_windows(item.ref)
        ppl = perplexity(model, windows, spec.score.batch_windows)
        seq_len = windows.shape[1]
        out.append(Evaluation(stage, "perplexity", item.dataset, "perplexity", ppl, predictions(windows), seq_len, seq_len))
    out.append(Evaluation(stage, "size", "-", "params", float(total_params(model))))
    out.append(Evaluation(stage, "size", "-", "checkpoint_bytes", float(_weight_bytes(Path(model_path)))))
    return out


def _weight_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors")) or tree_bytes(path)
