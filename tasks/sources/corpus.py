"""Resolve a `data.source` string to a list of text documents."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Literal, get_args

from tasks.sources.builtin import (
    BUILTIN_CORPORA,
    BUILTIN_PREFIX,
    fetch_builtin,
    lookup_builtin,
)
from tasks.sources.errors import SourceError

Part = Literal["calibration", "evaluation", "all"]
PARTS: tuple[str, ...] = get_args(Part)
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
TEXT_FIELD = "text"

# Suffixes that mark a source as a file path rather than a hub dataset name; hub names may
# contain dots (".../the-stack-v1.2"), so only common data-file extensions count.
_FILE_SUFFIXES = {*LOCAL_SUFFIXES, ".json", ".csv", ".tsv", ".md", ".arrow", ".gz", ".zst", ".xz"}
_HUB_SYNTAX = re.compile(r"^(?P<name>[^:@\s]+)(?::(?P<config>[^:@\s]+))?(?:@(?P<split>[^:@\s]+))?$")
_LOCAL_HINT = "use a local .txt/.jsonl/.parquet file or a builtin corpus (builtin:wiki-vital-en, builtin:cmake-docs, builtin:sympy-code)"


def load_texts(source: str, part: Part) -> list[str]:
    """Non-empty documents of `source`; `part` selects a split of builtin corpora only.

    Documents are stripped: the tokenizer joins them with its own blank-line separator, so
    surrounding whitespace carries nothing but noise.
    """
    if part not in PARTS:
        raise SourceError(f"data part {part!r} is not one of: {', '.join(PARTS)}")
    source = source.strip()
    if not source:
        raise SourceError(
            "data.source is empty; accepted: a builtin corpus (builtin:wiki-vital-en, builtin:cmake-docs, "
            "builtin:sympy-code), a local .txt/.jsonl/.parquet "
            "file, or a hub dataset NAME[:CONFIG][@SPLIT]"
        )
    if source.startswith(BUILTIN_PREFIX):
        asset = lookup_builtin(BUILTIN_CORPORA, source[len(BUILTIN_PREFIX) :], "corpus")
        texts = split_articles(_read_summaries(fetch_builtin(asset)), part)
    elif _looks_local(source):
        texts = _read_local(Path(source).expanduser(), source)
    else:
        texts = _load_hub_dataset(source)
    return _require_text(texts, source)


def corpus_fingerprint(source: str, part: Part) -> str:
    """sha256 over the documents in order; each is length-prefixed so boundaries count too."""
    digest = hashlib.sha256()
    for text in load_texts(source, part):
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()


def is_evaluation(title: str) -> bool:
    """Held-out membership decided by the title alone, so it never changes with file order."""
    return int(hashlib.sha256(title.encode("utf-8")).hexdigest()[:8], 16) % 10 == 0


def split_articles(articles: Iterable[tuple[str, str]], part: Part) -> list[str]:
    """The texts of (title, text) pairs that belong to `part`, in their original order."""
    if part == "all":
        return [text for _, text in articles]
    want_evaluation = part == "evaluation"
    return [text for title, text in articles if is_evaluation(title) == want_evaluation]


def _read_summaries(path: Path) -> tuple[tuple[str, str], ...]:
    stat = path.stat()
    return _parse_summaries(str(path), stat.st_mtime_ns, stat.st_size)


# Calibration, evaluation and fingerprinting each read the same 6 MB JSON; parse it once.
@functools.lru_cache(maxsize=4)
def _parse_summaries(path: str, mtime_ns: int, size: int) -> tuple[tuple[str, str], ...]:
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    if not isinstance(data, dict):
        raise SourceError(f"builtin corpus file {Path(path).name} is not a JSON object of articles")
    articles = []
    for title, entry in data.items():
        extract = entry.get("extract") if isinstance(entry, dict) else None
        if not isinstance(extract, str):
            raise SourceError(
                f"builtin corpus file {Path(path).name}: article {title!r} has no string 'extract'"
            )
        if extract.strip():
            articles.append((title, extract.strip()))
    return tuple(articles)


def _looks_local(source: str) -> bool:
    if source.startswith(("/", "./", "../", "~")) or Path(source).expanduser().exists():
        return True
    name = source.split(":", 1)[0].split("@", 1)[0]
    return Path(name).suffix.lower() in _FILE_SUFFIXES


def _read_local(path: Path, source: str) -> list[str]:
    accepted = ", ".join(LOCAL_SUFFIXES)
    if not path.exists():
        raise SourceError(f"data.source: no such file: {source}; accepted local files: {accepted}")
    suffix = path.suffix.lower()
    if not path.is_file() or suffix not in LOCAL_SUFFIXES:
        raise SourceError(
            f"data.source: unsupported file {source!r} (extension {suffix or 'none'}); "
            f"accepted local files: {accepted}"
        )
    if suffix == ".txt":
        return _read_txt(path)
    if suffix == ".jsonl":
        return _read_jsonl(path)
    return _read_parquet(path)


def _read_txt(path: Path) -> list[str]:
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SourceError(f"data.source: {path} is not UTF-8 text ({exc.reason})") from exc
    return [doc.strip() for doc in re.split(r"\n[ \t\r\f\v]*\n", content)]


def _read_jsonl(path: Path) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SourceError(
                    f"data.source: {path} line {number} is not JSON ({exc.msg})"
                ) from exc
            if not isinstance(record, dict) or TEXT_FIELD not in record:
                found = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise SourceError(
                    f"data.source: {path} line {number} has no {TEXT_FIELD!r} field; found: {found}"
                )
            texts.append(_as_text(record[TEXT_FIELD], f"{path} line {number}"))
    return texts


def _read_parquet(path: Path) -> list[str]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        columns = pq.read_schema(path).names
        if TEXT_FIELD not in columns:
            raise SourceError(
                f"data.source: {path} has no {TEXT_FIELD!r} column; found columns: {columns}"
            )
        values = pq.read_table(path, columns=[TEXT_FIELD]).column(TEXT_FIELD).to_pylist()
    except pyarrow.ArrowException as exc:
        raise SourceError(f"data.source: {path} is not a readable parquet file ({exc})") from exc
    return [_as_text(value, f"{path} row {row}") for row, value in enumerate(values)]


def _as_text(value: object, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise SourceError(
            f"data.source: {where}: {TEXT_FIELD!r} is {type(value).__name__}, not a string"
        )
    return value.strip()


def _load_hub_dataset(source: str) -> list[str]:
    match = _HUB_SYNTAX.match(source)
    if match is None:
        raise SourceError(
            f"data.source {source!r} is neither a local file nor a hub dataset "
            "NAME[:CONFIG][@SPLIT] (e.g. Salesforce/wikitext:wikitext-2-raw-v1@test); "
            f"{_LOCAL_HINT}"
        )
    name, config, split = match["name"], match["config"], match["split"] or "train"
    unreachable = f"data.source: hub dataset {name} is not reachable"
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(variable, "").strip().lower() in {"1", "true", "yes", "on"}:
            raise SourceError(f"{unreachable} ({variable} is set); {_LOCAL_HINT}")
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except DatasetNotFoundError as exc:
        raise SourceError(f"data.source: hub dataset {name} was not found; {_LOCAL_HINT}") from exc
    except ConnectionError as exc:
        raise SourceError(f"{unreachable} ({exc}); {_LOCAL_HINT}") from exc
    except ValueError as exc:
        # datasets reports unknown configs and splits as ValueError, with the valid choices.
        raise SourceError(f"data.source: {source}: {exc}") from exc
    if TEXT_FIELD not in dataset.column_names:
        raise SourceError(
            f"data.source: hub dataset {source} has no {TEXT_FIELD!r} column; "
            f"found columns: {dataset.column_names}"
        )
    return [_as_text(value, f"{source} row {row}") for row, value in enumerate(dataset[TEXT_FIELD])]


def _require_text(texts: list[str], source: str) -> list[str]:
    documents = [text for text in texts if text]
    if not documents:
        raise SourceError(f"dataset {source} has no text")
    return documents
