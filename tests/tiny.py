"""Tiny random models and token windows built from a config in the test (no download)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

VOCAB = 128


def tiny_config(family: str = "llama", layers: int = 4, **sizes):
    """`sizes`: other widths (hidden_size, intermediate_size, num_attention_heads, num_key_value_heads)."""
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    common.update(sizes)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(family)


def tiny_model(family: str = "llama", layers: int = 4, seed: int = 0, **sizes):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, layers, **sizes), attn_implementation="sdpa")
    # Random init gives near-identical blocks; scale weights so blocks differ clearly in importance.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "embed" not in name:
                param.mul_(1.0 + torch.rand(()) * 20.0)
    return model.eval()


def tiny_windows(samples: int = 4, seq_len: int = 32, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (samples, seq_len), generator=generator)


def recurrence_windows(n: int, length: int, generator: torch.Generator, vocab: int = VOCAB) -> torch.Tensor:
    """Windows of a fixed recurrence (x -> 5x + 3 mod vocab) with 15% noise tokens: a model can learn it, so
    removing a block it relies on hurts every window alike (the paired gaps racing needs), unlike random
    tokens."""
    steps = [torch.randint(0, vocab, (n, 1), generator=generator)]
    for _ in range(length - 1):
        steps.append((steps[-1] * 5 + 3) % vocab)
    tokens = torch.cat(steps, 1)
    noise = torch.rand(tokens.shape, generator=generator) < 0.15
    return torch.where(noise, torch.randint(0, vocab, tokens.shape, generator=generator), tokens)



CHARS = "".join(chr(c) for c in range(32, 127)) + "\n"


def tiny_tokenizer():
    """A character-level fast tokenizer (97 symbols + unk + eos), saved and reloaded like any HF tokenizer."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{ch: i + 1 for i, ch in enumerate(CHARS)}, "</s>": len(CHARS) + 1}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>")


def tiny_bpe_tokenizer():
    """A byte-level BPE tokenizer like GPT-2's (one token per byte, a few merges, `</s>`), the kind GGUF carries."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [("a", "b"), ("c", "d"), ("ab", "cd")]
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({a + b: len(vocab) + i for i, (a, b) in enumerate(merges)})
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>")
    tokenizer.add_special_tokens({"eos_token": "</s>"})
    return tokenizer


def tiny_checkpoint(path, family: str = "llama", layers: int = 4, seed: int = 0, **sizes):
    """A tiny random model with its tokenizer, saved as a Hugging Face directory."""
    model = tiny_model(family, layers, seed, **sizes)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def tiny_corpus(path, articles: int = 60, seed: int = 0):
    """A local .txt corpus: articles of pseudo-words separated by blank lines."""
    import random

    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6))) for _ in range(40)]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(30, 60))) + "." for _ in range(articles)]
    path.write_text("\n\n".join(docs))
    return path
