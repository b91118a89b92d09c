"""Tokenize documents into one stream and cut it into fixed-length windows."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tasks.refs import ArtifactRef
from tasks.sources.errors import SourceError

SEPARATOR = "\n\n"
# Documents per tokenizer call. Within a chunk the documents are joined with SEPARATOR and
# tokenized as one string, so only chunk boundaries can differ from tokenizing everything at once.
DOCS_PER_CHUNK = 64
# Chunks handed to the fast tokenizer per call; it encodes a batch in parallel.
CHUNKS_PER_BATCH = 8


def tokenize_stream(texts: Sequence[str], tokenizer,
                    on_documents: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """The documents joined by blank lines, as one 1-D LongTensor of ids without special tokens;
    `on_documents(done, total)` follows each batch of documents (progress).

    Tokenizing a multi-megabyte string in one call holds every intermediate encoding at once,
    so the documents go through in chunks of DOCS_PER_CHUNK, joined inside a chunk, and each
    later chunk carries the separator in front ("\\n\\n" + chunk). With byte-level BPE
    tokenizers (GPT-2 / SmolLM2 / Llama-3 style) a document never ends in whitespace and the
    pre-tokenizer always splits before whitespace, so a chunk boundary is also a split point of
    the full string and the result equals tokenizing SEPARATOR.join(texts) exactly. Tokenizers
    that merge across that point (e.g. SentencePiece without a byte-level pre-tokenizer) can
    differ by a token or two per chunk boundary, which is negligible for calibration/evaluation.
    """
    if not texts:
        raise SourceError("no documents to tokenize")
    chunks = [
        SEPARATOR.join(texts[start : start + DOCS_PER_CHUNK])
        for start in range(0, len(texts), DOCS_PER_CHUNK)
    ]
    chunks = chunks[:1] + [SEPARATOR + chunk for chunk in chunks[1:]]
    pieces = []
    for start in range(0, len(chunks), CHUNKS_PER_BATCH):
        batch = chunks[start : start + CHUNKS_PER_BATCH]
        # verbose=False: a stream is meant to be longer than the model's context.
        encoded = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        pieces.extend(torch.tensor(ids, dtype=torch.long) for ids in encoded)
        if on_documents is not None:
            on_documents(min((start + CHUNKS_PER_BATCH) * DOCS_PER_CHUNK, len(texts)), len(texts))
    return torch.cat(pieces)


def _window_count(stream: torch.Tensor, seq_len: int, limit: int | None = None) -> int:
    if stream.dim() != 1:
        raise SourceError(f"token stream must be 1-D, got shape {tuple(stream.shape)}")
    if seq_len < 1:
        raise SourceError(f"seq_len must be a positive number of tokens, got {seq_len}")
    usable = stream.numel() if limit is None else min(stream.numel(), limit)
    return usable // seq_len


def sample_windows(stream: torch.Tensor, seq_len: int, samples: int, seed: int) -> torch.Tensor:
    """`samples` distinct non-overlapping windows, drawn by a seeded permutation, in drawn order."""
    if samples < 1:
        raise SourceError(f"samples must be at least 1, got {samples}")
    available = _window_count(stream, seq_len)
    if available < samples:
        raise SourceError(
            f"calibration data gives {available} windows of {seq_len} tokens; need "
            f"samples={samples}; use a longer dataset or fewer samples / shorter seq_len"
        )
    windows = stream[: available * seq_len].view(available, seq_len)
    order = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:samples]
    return windows[order].clone()


def leading_windows(stream: torch.Tensor, seq_len: int, max_tokens: int) -> torch.Tensor:
    """The first floor(min(len, max_tokens) / seq_len) contiguous windows, for evaluation."""
    count = _window_count(stream, seq_len, max_tokens)
    if count == 0:
        raise SourceError(
            f"evaluation data gives 0 windows of {seq_len} tokens (stream has {stream.numel()} "
            f"tokens, max_tokens={max_tokens}); use a longer dataset, a larger max_tokens "
            "or a shorter seq_len"
        )
    return stream[: count * seq_len].view(count, seq_len).clone()


def leading_stream(texts: list[str], tokenizer, max_tokens: int) -> torch.Tensor:
    """Tokens of the leading documents, enough for max_tokens (a big corpus is not tokenized whole)."""
    stream = torch.empty(0, dtype=torch.long)
    for end in range(DOCS_PER_CHUNK, len(texts) + DOCS_PER_CHUNK, DOCS_PER_CHUNK):
        stream = tokenize_stream(texts[:end], tokenizer)
        if stream.numel() >= max_tokens:
            break
    return stream


def save_windows(windows: torch.Tensor, path: Path, kind: str) -> ArtifactRef:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"input_ids": windows.to(torch.int64).contiguous()}, str(tmp))
    os.replace(tmp, path)
    return ArtifactRef.of(path, kind)


def load_windows(ref: ArtifactRef | str) -> torch.Tensor:
    return load_file(ref.path if isinstance(ref, ArtifactRef) else ref)["input_ids"]
