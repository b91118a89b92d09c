"""Training windows for recovery: token streams per source, a seeded draw of windows for every step.

Each step's windows depend only on (seed, step), so a resumed run sees exactly the batches an
uninterrupted one would. Builtin corpora give their calibration part: evaluation text is never trained on.
"""

from __future__ import annotations

import torch

from tasks.windows import leading_stream
from tasks.export import load_tokenizer
from tasks.recover.registry import RecoveryError
from tasks.sources import load_texts


class TrainingStreams:
    """`held_apart` windows per source are cut from the front of its text before training draws from the
    rest: a domain's loss can be watched on text the model never trains on (dynamic batch loading)."""

    def __init__(self, tokenizer_path: str, weights: dict[str, float], seq_len: int, tokens_needed: int,
                 trust_remote_code: bool = False, held_apart: int = 0):
        tokenizer = load_tokenizer(tokenizer_path, trust_remote_code)
        self.sources = sorted(weights)
        self.weights = torch.tensor([weights[s] for s in self.sources], dtype=torch.float64)
        self.seq_len = seq_len
        self.streams: dict[str, torch.Tensor] = {}
        self.held: dict[str, torch.Tensor] = {}
        for source in self.sources:
            stream = leading_stream(load_texts(source, "calibration"), tokenizer, tokens_needed + held_apart * seq_len)
            cut = held_apart * seq_len
            if stream.numel() < cut + seq_len + 1:
                raise RecoveryError(
                    f"training source {source} has {stream.numel()} tokens, fewer than one window of "
                    f"{seq_len}" + (f" after the {held_apart} held apart" if held_apart else "")
                    + "; use a shorter seq_len or more text"
                )
            self.held[source] = stream[:cut].view(held_apart, seq_len)
            self.streams[source] = stream[cut:]

    def batch(self, step: int, batch_size: int, seed: int, weights: torch.Tensor | None = None) -> torch.Tensor:
        """The windows of `step`: sources drawn by `weights` (default: the mixture's), then a window of each."""
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        picks = torch.multinomial(self.weights if weights is None else weights, batch_size, replacement=True,
                                  generator=generator)
        rows = []
        for pick in picks.tolist():
            stream = self.streams[self.sources[pick]]
            start = int(torch.randint(0, stream.numel() - self.seq_len + 1, (1,), generator=generator))
            rows.append(stream[start : start + self.seq_len])
        return torch.stack(rows)


def calibration_batches(windows: torch.Tensor, batch_windows: int, seed: int):
    """Batches of calibration windows for adapter refinement: a seeded draw per step."""

    def batch(step: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        count = min(batch_windows, windows.shape[0])
        return windows[torch.randperm(windows.shape[0], generator=generator)[:count]]

    return batch
