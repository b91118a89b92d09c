"""Stage `calibrate` (and evaluation data): text -> fixed token windows stored as safetensors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from pydantic import Field

from tasks.export import load_tokenizer
from tasks.refs import ArtifactRef
from tasks.settings import Settings
from tasks.sources import load_texts
from tasks.sources.mixture import WeightedSource, apportion
from tasks.windows import leading_stream, leading_windows, sample_windows, save_windows, tokenize_stream


class CalibrationSpec(Settings):
    dataset: str | tuple[WeightedSource, ...] = Field(
        "builtin:wiki-vital-en",
        description="builtin:wiki-vital-en, a local .txt/.jsonl/.parquet file, or a hub dataset NAME[:CONFIG][@SPLIT]; "
                    "or a mixture: a list of {source, weight}, whose windows are shared in proportion to the weights.",
        min_length=1,
    )
    samples: int = Field(32, ge=1, le=100_000, description="Number of calibration windows.")
    seq_len: int = Field(512, ge=8, le=131_072, description="Tokens per calibration window.")
    seed: int = Field(0, ge=0, description="Seed that draws the calibration windows.")

    def sources(self) -> list[tuple[str, int]]:
        """Each source with the windows it gives: one source gives them all; a mixture shares them by
        weight (largest remainders), so every source's share is fixed by the spec alone."""
        if isinstance(self.dataset, str):
            return [(self.dataset, self.samples)]
        shares = apportion(self.samples, [s.weight for s in self.dataset])
        return [(s.source, n) for s, n in zip(self.dataset, shares)]


def calibrate_stage(model_path: str, spec: CalibrationSpec, out_dir: Path, key: str,
                    trust_remote_code: bool = False,
                    on_documents: Callable[[str, int, int], None] | None = None) -> ArtifactRef:
    """`on_documents(source, done, total)` follows the tokenization of each source (progress bars)."""
    tokenizer = load_tokenizer(model_path, trust_remote_code)
    return save_windows(calibration_windows(spec, tokenizer, on_documents),
                        out_dir / "calibration" / f"calibration-{key[:16]}.safetensors", "calibration")


def calibration_windows(spec: CalibrationSpec, tokenizer,
                        on_documents: Callable[[str, int, int], None] | None = None) -> torch.Tensor:
    """The calibration windows: drawn from each source by the seed, then, for a mixture, put in one seeded
    order so that micro-batches mix the sources."""
    def counter(source: str) -> Callable[[int, int], None] | None:
        return None if on_documents is None else lambda done, total: on_documents(source, done, total)

    parts = [sample_windows(tokenize_stream(load_texts(source, "calibration"), tokenizer, counter(source)),
                            spec.seq_len, count, spec.seed)
             for source, count in spec.sources() if count > 0]
    if len(parts) == 1:
        return parts[0]
    windows = torch.cat(parts)
    return windows[torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(spec.seed))].clone()


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
