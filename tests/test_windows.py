"""Token streams and fixed windows: exact joining, seeded sampling, evaluation prefixes."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from tasks import windows
from tasks.sources import SourceError
from tasks.windows import leading_windows, sample_windows, tokenize_stream

DOCUMENTS = [
    f"Document {i} talks about item {i * 37 % 101}: it's {'big' if i % 3 else 'small'}, "
    f"costs ${i}.{i % 10}0 and ends {'with a period.' if i % 2 else 'without one'}"
    for i in range(150)
] + ["Ünïcödé — ok?", "inner\n\nblank line", "tab\tseparated 123456789"]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE (GPT-2 style, like SmolLM2) trained here, so no download."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(DOCUMENTS * 3, trainer)
    # A BOS-adding post-processor proves that tokenize_stream asks for no special tokens.
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", core.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>")


# --- tokenize_stream ------------------------------------------------------------------------


@pytest.mark.parametrize("docs_per_chunk,chunks_per_batch", [(64, 8), (4, 2), (1, 1)])
def test_stream_equals_tokenizing_the_joined_text(
    tokenizer, monkeypatch: pytest.MonkeyPatch, docs_per_chunk: int, chunks_per_batch: int
) -> None:
    monkeypatch.setattr(windows, "DOCS_PER_CHUNK", docs_per_chunk)
    monkeypatch.setattr(windows, "CHUNKS_PER_BATCH", chunks_per_batch)
    stream = tokenize_stream(DOCUMENTS, tokenizer)
    joined = tokenizer("\n\n".join(DOCUMENTS), add_special_tokens=False)["input_ids"]
    assert stream.dtype == torch.long and stream.dim() == 1
    assert stream.tolist() == joined
    assert tokenizer.bos_token_id not in stream.tolist()
    assert tokenizer.decode(stream) == "\n\n".join(DOCUMENTS)


def test_single_document(tokenizer) -> None:
    stream = tokenize_stream(["just one"], tokenizer)
    assert stream.tolist() == tokenizer("just one", add_special_tokens=False)["input_ids"]


def test_no_documents(tokenizer) -> None:
    with pytest.raises(SourceError, match="no documents to tokenize"):
        tokenize_stream([], tokenizer)


# --- sample_windows -------------------------------------------------------------------------


STREAM = torch.arange(1000, dtype=torch.long)


def test_sample_shape_and_alignment() -> None:
    drawn = sample_windows(STREAM, seq_len=16, samples=10, seed=0)
    assert drawn.shape == (10, 16) and drawn.dtype == torch.long
    # Each row is one of the non-overlapping windows: starts on a multiple of seq_len, contiguous.
    starts = drawn[:, 0]
    assert torch.all(starts % 16 == 0)
    assert torch.equal(drawn, starts[:, None] + torch.arange(16))
    assert len(set(starts.tolist())) == 10


def test_sample_order_is_the_seeded_permutation() -> None:
    drawn = sample_windows(STREAM, seq_len=16, samples=5, seed=3)
    expected = torch.randperm(1000 // 16, generator=torch.Generator().manual_seed(3))[:5]
    assert (drawn[:, 0] // 16).tolist() == expected.tolist()


def test_sample_is_deterministic_per_seed() -> None:
    assert torch.equal(sample_windows(STREAM, 16, 8, seed=7), sample_windows(STREAM, 16, 8, seed=7))
    assert not torch.equal(
        sample_windows(STREAM, 16, 8, seed=7), sample_windows(STREAM, 16, 8, seed=8)
    )


def test_sample_can_take_every_window() -> None:
    drawn = sample_windows(STREAM, seq_len=100, samples=10, seed=0)
    assert sorted(drawn[:, 0].tolist()) == list(range(0, 1000, 100))


def test_sample_does_not_alias_the_stream() -> None:
    stream = STREAM.clone()
    drawn = sample_windows(stream, 16, 2, seed=0)
    drawn.zero_()
    assert torch.equal(stream, STREAM)


def test_too_few_windows() -> None:
    expected = (
        "calibration data gives 7 windows of 128 tokens; need samples=8; "
        "use a longer dataset or fewer samples / shorter seq_len"
    )
    with pytest.raises(SourceError) as error:
        sample_windows(STREAM, seq_len=128, samples=8, seed=0)
    assert str(error.value) == expected


@pytest.mark.parametrize("seq_len,samples", [(0, 1), (-4, 1), (16, 0)])
def test_invalid_sizes(seq_len: int, samples: int) -> None:
    with pytest.raises(SourceError, match="must be"):
        sample_windows(STREAM, seq_len, samples, seed=0)


def test_stream_must_be_one_dimensional() -> None:
    with pytest.raises(SourceError, match="must be 1-D"):
        sample_windows(STREAM.view(10, 100), 16, 1, seed=0)


# --- leading_windows ------------------------------------------------------------------------


def test_leading_windows_are_the_contiguous_prefix() -> None:
    lead = leading_windows(STREAM, seq_len=64, max_tokens=300)
    assert lead.shape == (4, 64)
    assert torch.equal(lead.flatten(), STREAM[:256])


def test_leading_windows_capped_by_stream_length() -> None:
    lead = leading_windows(STREAM, seq_len=64, max_tokens=10_000)
    assert lead.shape == (15, 64)
    assert torch.equal(lead.flatten(), STREAM[:960])


def test_no_leading_window() -> None:
    with pytest.raises(SourceError, match="evaluation data gives 0 windows of 512 tokens"):
        leading_windows(STREAM, seq_len=512, max_tokens=500)
    with pytest.raises(SourceError, match="stream has 1000 tokens"):
        leading_windows(STREAM, seq_len=2000, max_tokens=10_000)


# --- real tokenizer (slow) ------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_wiki_stream_matches_joined_tokenization() -> None:
    from transformers import AutoTokenizer

    from tasks.sources import load_texts, resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("builtin:smollm2-135m").path)
    texts = load_texts("builtin:wiki-vital-en", "all")
    stream = tokenize_stream(texts, tokenizer)
    joined = tokenizer("\n\n".join(texts), add_special_tokens=False, verbose=False)["input_ids"]
    assert stream.tolist() == joined
    assert leading_windows(stream, 512, 16_384).shape == (32, 512)
