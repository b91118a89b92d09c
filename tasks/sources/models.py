"""Resolve a `model.source` string to a local Hugging Face directory with a content fingerprint."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tasks.refs import ByteMeter, Progress, sha256_file
from tasks.sources.builtin import (
    BUILTIN_MODELS,
    BUILTIN_PREFIX,
    cache_dir,
    fetch_builtin,
    lookup_builtin,
)
from tasks.sources.errors import SourceError

FINGERPRINT_FILE = "pruneflow-fingerprint.txt"
ACCEPTED = "a local Hugging Face directory, a hub id, a .gguf file, or builtin:smollm2-135m"

# Files that decide what the model computes; tokenizer and generation files do not.
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.index.json")
_HUB_PATTERNS = ["*.safetensors", "*.json", "*.model", "*.txt", "*.tiktoken"]
GGUF_MAGIC = b"GGUF"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

_fingerprint_memo: dict[tuple, str] = {}


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    fingerprint: str
    source: str


def resolve_model(source: str, progress: Progress | None = None) -> ResolvedModel:
    """A directory that `AutoModelForCausalLM.from_pretrained` can load, for any accepted source; `progress`
    follows what takes long (hashing the weights, converting a GGUF)."""
    source = _given(source)
    gguf = _gguf_file(source)
    if gguf is not None:
        path = convert_gguf(gguf, progress)
        return ResolvedModel(path, _read_sidecar(path), source)
    local = Path(source).expanduser()
    if local.exists():
        return ResolvedModel(_local_folder(local, source), model_fingerprint(local, progress), source)
    _check_hub_id(source)
    path = _download_from_hub(source)
    return ResolvedModel(path, model_fingerprint(path, progress), source)


@dataclass(frozen=True)
class ConfigLocation:
    """Where a model's config is read: `folder`'s config.json, or the header of the GGUF file `gguf_file` in it."""

    folder: Path
    gguf_file: str | None = None


def config_location(source: str) -> ConfigLocation:
    """Where the config of `model.source` is read without loading, converting or downloading its weights: a
    folder's config.json (a GGUF's converted copy, found by the GGUF's hash, once there is one), else the GGUF's
    own header; from the hub, config.json alone. The builtin model's GGUF is still fetched once, as a run
    fetches it."""
    source = _given(source)
    gguf = _gguf_file(source)
    if gguf is not None:
        converted = _converted_folder(gguf)
        if (converted / FINGERPRINT_FILE).is_file():
            return ConfigLocation(converted)
        return ConfigLocation(gguf.parent, gguf.name)
    local = Path(source).expanduser()
    if local.exists():
        return ConfigLocation(_local_folder(local, source))
    _check_hub_id(source)
    return ConfigLocation(_download_from_hub(source, weights=False))


def _given(source: str) -> str:
    source = source.strip()
    if not source:
        raise SourceError(f"model.source is empty; accepted: {ACCEPTED}")
    return source


def _gguf_file(source: str) -> Path | None:
    """The GGUF file a builtin or a local `.gguf` source names, checked for GGUF's magic bytes; else None."""
    if source.startswith(BUILTIN_PREFIX):
        return fetch_builtin(lookup_builtin(BUILTIN_MODELS, source[len(BUILTIN_PREFIX) :], "model"))
    path = Path(source).expanduser()
    if not (path.is_file() and path.suffix == ".gguf"):
        return None
    with path.open("rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise SourceError(f"model.source: {source} does not start with the GGUF magic bytes, so it is not "
                              f"a GGUF file; accepted: {ACCEPTED}")
    return path


def _local_folder(path: Path, source: str) -> Path:
    """A local source that is not a GGUF: a folder with a readable config.json, or a refusal."""
    if path.is_dir() and (path / "config.json").is_file():
        _check_config_json(path / "config.json", source)
        return path.resolve()
    if path.is_dir():
        raise SourceError(
            f"model.source: directory {source} has no config.json; accepted: {ACCEPTED}"
        )
    raise SourceError(f"model.source: unsupported file {source}; accepted: {ACCEPTED}")


def _check_hub_id(source: str) -> None:
    if source.endswith(".gguf") or not _HUB_ID.match(source):
        raise SourceError(
            f"model.source: no such file or directory: {source}; accepted: {ACCEPTED}"
        )


def _check_config_json(config: Path, source: str) -> None:
    try:
        data = json.loads(config.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"model.source: {source}/config.json is not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise SourceError(f"model.source: {source}/config.json is not a model configuration (a JSON object with "
                          "a model_type)")


def model_fingerprint(model_dir: Path, progress: Progress | None = None) -> str:
    """sha256 over config.json and the weight files (names and contents), in sorted order.

    Memoized by (path, size, mtime) of those files so repeated resolves do not rehash gigabytes.
    """
    files = _fingerprinted_files(model_dir)
    if not any(f.name != "config.json" for f in files):
        raise SourceError(
            f"model.source: directory {model_dir} has config.json but no weights "
            "(*.safetensors or pytorch_model*.bin)"
        )
    stats = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    key = (str(model_dir.resolve()), stats)
    if key not in _fingerprint_memo:
        digest = hashlib.sha256()
        meter = ByteMeter(progress, f"hashing {model_dir.name}", sum(size for _, size, _ in stats))
        for f in files:
            digest.update(f.name.encode())
            digest.update(b"\0")
            digest.update(sha256_file(f, meter.add).encode())
        _fingerprint_memo[key] = digest.hexdigest()
    return _fingerprint_memo[key]


def _fingerprinted_files(model_dir: Path) -> list[Path]:
    found = {model_dir / "config.json"}
    for pattern in _WEIGHT_PATTERNS:
        found.update(p for p in model_dir.glob(pattern) if p.is_file())
    return sorted(found, key=lambda p: p.name)


def convert_gguf(gguf_path: Path, progress: Progress | None = None) -> Path:
    """A safetensors copy of a GGUF model, converted once and cached by the GGUF's sha256."""
    if not gguf_path.is_file():
        raise SourceError(
            f"model.source: no such file or directory: {gguf_path}; accepted: {ACCEPTED}"
        )
    target = _converted_folder(gguf_path, progress)
    # A cached directory only ever appears by renaming a finished one, so existence means complete.
    if (target / FINGERPRINT_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        _convert_into(gguf_path, tmp, progress)
        (tmp / FINGERPRINT_FILE).write_text(model_fingerprint(tmp, progress) + "\n")
        # mkdtemp creates 0700; the finished cache entry should be readable like any other.
        tmp.chmod(0o755)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished the same conversion first; its copy is equivalent.
            if not (target / FINGERPRINT_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _converted_folder(gguf_path: Path, progress: Progress | None = None) -> Path:
    meter = ByteMeter(progress, f"hashing {gguf_path.name}", gguf_path.stat().st_size)
    return cache_dir() / "models" / sha256_file(gguf_path, meter.add)


def _convert_into(gguf_path: Path, out_dir: Path, progress: Progress | None = None) -> None:
    # Imported here so that resolving a local directory does not pay for importing transformers.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def step(done: int, what: str) -> None:
        # Dequantizing has no hook of its own (transformers shows its tensors on the terminal): steps it is.
        if progress is not None:
            progress(f"converting {gguf_path.name}", done, 2, "steps", what)

    started = time.perf_counter()
    step(0, "dequantizing")
    # A GGUF carries no code; the flag only makes sure nothing beside it in the folder is ever run or asked about.
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, trust_remote_code=False
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, trust_remote_code=False)
    # The dequantized weights are plain fp32, but save_pretrained refuses while a GGUF
    # quantization config is still attached.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    step(1, "writing safetensors")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    step(2, "written")
    (out_dir / "pruneflow-conversion.txt").write_text(
        f"converted from {gguf_path.name} in {time.perf_counter() - started:.1f}s\n"
    )


def _read_sidecar(model_dir: Path) -> str:
    return (model_dir / FINGERPRINT_FILE).read_text().strip()


def _download_from_hub(repo_id: str, weights: bool = True) -> Path:
    """The repository's snapshot (weights, configs, tokenizer), or its config.json alone."""
    not_reachable = (
        f"model.source: {repo_id} is not a local path and the Hugging Face hub is not reachable"
    )
    suggestion = "pass a local Hugging Face directory, a .gguf file, or builtin:smollm2-135m"
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        raise SourceError(f"{not_reachable} (HF_HUB_OFFLINE is set); {suggestion}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        path = Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS if weights else ["config.json"]))
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise SourceError(
            f"model.source: hub repository {repo_id} was not found (or is gated); {suggestion}"
        ) from exc
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, ConnectionError) as exc:
        raise SourceError(f"{not_reachable} ({type(exc).__name__}); {suggestion}") from exc
    if not (path / "config.json").is_file() or (weights and not any(path.glob("*.safetensors"))):
        raise SourceError(
            f"model.source: hub repository {repo_id} has no config.json with safetensors weights; "
            "download it yourself and pass the local directory"
        )
    return path
