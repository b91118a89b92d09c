"""A width shape given as shares of the dense model's widths ("90%"): one recipe, any model of a family.

Shares resolve on the source model's config (no weights read), to the nearest count, halves up; query heads to
the nearest multiple of the kept KV groups. `validate` prints what they resolve to, the run records both.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import LlamaConfig, Qwen2Config

from catalog import Catalog
from flows.cli import main as cli
from pipelines import SpecError, validate_mapping
from tasks.surgery.width import WidthError, WidthPlan
from tasks.width import WidthShape, resolve_shape
from tests.flowkit import tiny_pipeline
from tests.tiny import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SHARES = {"intermediate_size": "75%", "num_key_value_heads": "50%", "hidden_size": "75%"}
# The default tiny model and one twice as wide in attention and wider in its MLP and hidden channels.
NARROW = {"channels": 96, "kv_heads": 2, "heads": 4, "hidden": 64}
WIDE = {"channels": 160, "kv_heads": 4, "heads": 8, "hidden": 128}


def _dense(channels: int, heads: int, kv_heads: int, hidden: int = 64) -> dict[str, int]:
    return {"channels": channels, "heads": heads, "kv_heads": kv_heads, "hidden": hidden, "head_dim": 16}


def test_shares_round_to_the_nearest_count_and_heads_to_whole_groups():
    dense = _dense(channels=10, heads=8, kv_heads=4)
    counts = {s: resolve_shape(WidthShape(intermediate_size=s), dense).intermediate_size
              for s in ("25%", "15%", "14%", "100%")}
    assert counts == {"25%": 3, "15%": 2, "14%": 1, "100%": 10}  # 2.5 -> 3, 1.5 -> 2 (halves up), 1.4 -> 1
    # 60% of 8 heads is 4.8; with 2 of 4 groups kept, the nearest multiple of 2 is 4 (2 heads in each group).
    shape = resolve_shape(WidthShape(num_key_value_heads="50%", num_attention_heads="60%"), dense)
    assert (shape.num_key_value_heads, shape.num_attention_heads) == (2, 4)
    assert resolve_shape(WidthShape(num_attention_heads="40%"), dense).num_attention_heads == 4  # 3.2 -> 4 of 4 groups
    counted = WidthShape(intermediate_size=7, num_key_value_heads=2)
    assert resolve_shape(counted, dense) == counted  # counts stay as they are
    with pytest.raises(WidthError, match=r"num_attention_heads '65%' of the model's 8 query heads resolves to 6, but "
                                         r"the kept KV groups \(2\) hold at most 4; give at most 50%"):
        resolve_shape(WidthShape(num_key_value_heads="50%", num_attention_heads="65%"), dense)
    with pytest.raises(WidthError, match=r"hidden_size '0.5%' of the model's 64 hidden channels resolves to 0; "
                                         r"give at least 0.79%"):
        resolve_shape(WidthShape(hidden_size="0.5%"), dense)
    assert resolve_shape(WidthShape(hidden_size="0.79%"), dense).hidden_size == 1


@pytest.mark.parametrize("value, message", [
    (0.9, "0.9 is not a width: give an absolute count (an integer, e.g. 1382) or the share of the dense width kept, "
          "as a percentage (e.g. '90%'); for a share write '90%'"),
    (1.0, "for a share write '100%'"),  # never read as one channel, nor silently as all of them
    ("0%", "a share kept is above 0% and at most 100%"),
    ("120%", "a share kept is above 0% and at most 100%"),
    ("ninety", "'ninety' is not a width"),
    (0, "keep at least 1"),
])
def test_a_width_that_is_neither_a_count_nor_a_share_is_refused(value, message):
    spec = {"name": "t", "model": {"source": "m"}, "search": {"target": {"blocks": 0}}, "output_dir": "o",
            "width": {"shape": {"intermediate_size": value}}}
    with pytest.raises(SpecError) as info:
        validate_mapping(spec)
    assert any(line.startswith("width.shape.intermediate_size: ") and message in line for line in info.value.errors), \
        info.value.errors


def _validated(capsys, pipeline: Path, *sets: str) -> list[str]:
    assert cli(["validate", str(pipeline), *(a for s in sets for a in ("--set", s))]) == 0
    return capsys.readouterr().out.splitlines()


def _resolved(lines: list[str]) -> dict[str, str]:
    """The resolved-widths lines of `validate`: field -> "75% of 96 -> 72"."""
    return {line.split()[0]: " ".join(line.split()[1:]) for line in lines if line.startswith("  ")}


def test_one_share_recipe_cuts_the_same_fraction_of_two_models(tmp_path, capsys):
    """The same YAML on a narrow and a wide model, through the CLI: validate prints each model's counts, the run
    keeps them in every layer, and the catalog and `show` record the shares beside the counts."""
    pipeline = tiny_pipeline(tmp_path, search={"target": {"blocks": 0}},
                             width={"metric": "activation", "shape": SHARES})
    wide = tiny_checkpoint(tmp_path / "wide", hidden_size=128, intermediate_size=160, num_attention_heads=8,
                           num_key_value_heads=4)
    catalog_path = tmp_path / "out" / "catalog.duckdb"
    models = {"narrow": (NARROW, []), "wide": (WIDE, [f"model.source={wide}", f"output_dir={tmp_path / 'out' / 'wide'}"])}
    kept = {}
    for name, (dense, sets) in models.items():
        expected = {"intermediate_size": dense["channels"] * 3 // 4, "num_key_value_heads": dense["kv_heads"] // 2,
                    "hidden_size": dense["hidden"] * 3 // 4}
        lines = _validated(capsys, pipeline, *sets)
        assert lines[1].startswith(f"width.shape resolved on {wide if sets else tmp_path / 'model'} (llama;")
        assert _resolved(lines) == {
            "intermediate_size": f"75% of {dense['channels']} -> {expected['intermediate_size']}",
            "num_key_value_heads": f"50% of {dense['kv_heads']} -> {expected['num_key_value_heads']}",
            "hidden_size": f"75% of {dense['hidden']} -> {expected['hidden_size']}"}

        assert cli(["run", str(pipeline), *(a for s in sets for a in ("--set", s))]) == 0
        out = capsys.readouterr().out
        run_id = out.split()[1]
        catalog = Catalog(catalog_path)
        plan = WidthPlan.from_json(catalog.plan(run_id))
        assert len(plan.layers) == 4 and len(plan.hidden) == expected["hidden_size"]
        assert {(len(w.channels), len(w.kv_heads), len(w.heads)) for w in plan.layers.values()} == {
            (expected["intermediate_size"], expected["num_key_value_heads"], dense["heads"] // 2)}
        width = catalog.get_run(run_id).summary["width"]
        assert width["shape"] == expected
        assert width["shares"] == {k: {"share": SHARES[k], "of": dense[key], "count": expected[k]}
                                   for k, key in (("intermediate_size", "channels"), ("num_key_value_heads", "kv_heads"),
                                                  ("hidden_size", "hidden"))}
        assert f"intermediate_size {expected['intermediate_size']} (75% of {dense['channels']})" in out
        kept[name] = {k: expected[k] / dense[key] for k, key in (("intermediate_size", "channels"),
                                                                  ("num_key_value_heads", "kv_heads"),
                                                                  ("hidden_size", "hidden"))}
    assert kept["narrow"] == kept["wide"] == {"intermediate_size": 0.75, "num_key_value_heads": 0.5, "hidden_size": 0.75}


def test_a_share_the_model_cannot_take_exits_2_naming_the_field(tmp_path):
    """As a user runs it: a process, exit 2, one message with the field, the model's size and the resolved count
    (`run` refuses it the same way before writing anything: tests/test_bad_inputs.py)."""
    pipeline = tiny_pipeline(tmp_path, search={"target": {"blocks": 0}},
                             width={"metric": "activation", "shape": {"intermediate_size": "0.4%"}})
    done = subprocess.run([sys.executable, "-m", "flows.cli", "validate", str(pipeline)], capture_output=True,
                          text=True, cwd=tmp_path, stdin=subprocess.DEVNULL, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.splitlines()[-1] == ("pruneflow validate: error: width.shape.intermediate_size '0.4%' of the "
                                            "model's 96 MLP channels resolves to 0; give at least 0.53% or a count")
    assert "Traceback" not in done.stderr and done.stdout == ""


# SmolLM2-135M's and Qwen2.5-0.5B's sizes (their config.json, no weights): the published recipes' shares give
# SmolLM2 the counts the recipes wrote before (so their recorded results stand) and cut Qwen by the same shares.
SMOLLM2 = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      tie_word_embeddings=True)
QWEN = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                   num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                   tie_word_embeddings=True)
RECIPES = {
    "smollm2-quark-osscar.yaml": {"smollm2": {"intermediate_size": "90% of 1536 -> 1382"},
                                  "qwen": {"intermediate_size": "90% of 4864 -> 4378"}},
    "smollm2-minitron-width.yaml": {"smollm2": {"intermediate_size": "66.67% of 1536 -> 1024"},
                                    "qwen": {"intermediate_size": "66.67% of 4864 -> 3243"}},
    "smollm2-sheared.yaml": {"smollm2": {"intermediate_size": "54.17% of 1536 -> 832",
                                         "num_key_value_heads": "66.67% of 3 -> 2"},
                             "qwen": {"intermediate_size": "54.17% of 4864 -> 2635",
                                      "num_key_value_heads": "66.67% of 2 -> 1"}},
}


def test_the_published_recipes_resolve_on_a_config_alone(tmp_path, capsys):
    for name, config in (("smollm2", SMOLLM2), ("qwen", QWEN)):
        config.save_pretrained(tmp_path / name)
        assert [p.name for p in (tmp_path / name).iterdir()] == ["config.json"]
        for recipe, expected in RECIPES.items():
            lines = _validated(capsys, ROOT / "pipelines" / recipe, f"model.source={tmp_path / name}")
            assert _resolved(lines) == expected[name], (recipe, lines)


def test_validate_reads_a_gguf_header_without_converting_it(tmp_path, capsys, monkeypatch):
    from tasks.export import export_model
    from tasks.export.gguf_format import GGUF_FILE
    from tests.tiny import tiny_bpe_tokenizer, tiny_model

    exported = tmp_path / "exported"
    exported.mkdir()
    tiny_bpe_tokenizer().save_pretrained(exported)
    assert export_model(tiny_model(vocab_size=260), exported, "gguf") == "gguf"
    alone = tmp_path / "tiny.gguf"
    (exported / GGUF_FILE).rename(alone)
    monkeypatch.setenv("PRUNEFLOW_CACHE", str(tmp_path / "cache"))
    pipeline = tiny_pipeline(tmp_path, search={"target": {"blocks": 0}}, width={"shape": SHARES})
    lines = _validated(capsys, pipeline, f"model.source={alone}")
    assert _resolved(lines) == {"intermediate_size": "75% of 96 -> 72", "num_key_value_heads": "50% of 2 -> 1",
                                "hidden_size": "75% of 64 -> 48"}
    assert not (tmp_path / "cache" / "models").exists()  # no conversion: the weights were never read
