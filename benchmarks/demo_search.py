"""The BlockPruner demo's model and calibration corpus, as the search benchmarks load them: SmolLM2-135M in
float32 (bf16 is several times slower on CPU) and the token stream its calibration windows are cut from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pipelines import PipelineSpec, load_spec
from tasks.sources import load_texts, resolve_model
from tasks.surgery import load_model
from tasks.windows import sample_windows, tokenize_stream

PIPELINE = Path(__file__).resolve().parent.parent / "pipelines" / "smollm2-blockpruner.yaml"


@dataclass
class DemoSearch:
    spec: PipelineSpec
    model: nn.Module
    stream: torch.Tensor  # the calibration split, tokenized
    tokenizer: PreTrainedTokenizerBase

    def windows(self, count: int, seq_len: int) -> torch.Tensor:
        """`count` windows of `seq_len` tokens, drawn with the pipeline's calibration seed."""
        return sample_windows(self.stream, seq_len, count, self.spec.calibration.seed)


def load_demo_search(threads: int | None = None) -> DemoSearch:
    if threads:
        torch.set_num_threads(threads)
    spec = load_spec(PIPELINE)
    path = str(resolve_model(spec.model.source).path)
    model = load_model(path, dtype="float32").eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    stream = tokenize_stream(load_texts(spec.calibration.dataset, "calibration"), tokenizer)
    return DemoSearch(spec, model, stream, tokenizer)
