"""Stage `calibrate` (and evaluation data): text -> fixed token windows stored as safetensors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from tasks.export import load_tokenizer
from tasks.refs import ArtifactRef
from tasks.settings import Settings
from tasks.sources import load_texts
from tasks.windows import leading_stream, leading_windows, sample_windows, save_windows, tokenize_stream


class CalibrationSpec(Settings):
    dataset: str = Field(
        "builtin:wiki-vital-en",
        description="builtin:wiki-vital-en, a local .txt/.jsonl/.parquet file, or a hub dataset NAME[:CONFIG][@SPLIT].",
        min_length=1,
    )
    samples: int = Field(32, ge=1, le=100_000, description="Number of calibration windows.")
    seq_len: int = Field(512, ge=8, le=131_072, description="Tokens per calibration window.")
    seed: int = Field(0, ge=0, description="Seed that draws the calibration windows.")


def calibrate_stage(model_path: str, spec: CalibrationSpec, out_dir: Path, key: str,
                    trust_remote_code: bool = False) -> ArtifactRef:
    tokenizer = load_tokenizer(model_path, trust_remote_code)
    stream = tokenize_stream(load_texts(spec.dataset, "calibration"), tokenizer)
    windows = sample_windows(stream, spec.seq_len, spec.samples, spec.seed)
    return save_windows(windows, out_dir / "calibration" / f"calibration-{key[:16]}.safetensors", "calibration")


@dataclass(frozen=True)
class EvalData:
    dataset: str
    ref: ArtifactRef


def eval_data_stage(model_path: str, datasets: tuple[str, ...], seq_len: int, max_tokens: int, out_dir: Path,
                    key: str, trust_remote_code: bool = False) -> list[EvalData]:
    """`evaluate.datasets` as evaluation windows: their leading `max_tokens` tokens in `seq_len` windows."""
    tokenizer = load_tokenizer(model_path, trust_remote_code)
    out = []
    for index, dataset in enumerate(datasets):
        stream = leading_stream(load_texts(dataset, "evaluation"), tokenizer, max_tokens)
        windows = leading_windows(stream, seq_len, max_tokens)
        path = out_dir / "evaluation" / f"eval-{key[:16]}-{index}.safetensors"
        out.append(EvalData(dataset, save_windows(windows, path, "evaluation-data")))
    return out
