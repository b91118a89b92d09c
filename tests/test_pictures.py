"""The run's pictures, rendered from a real catalog: the score scale survives an outlier, removed blocks are
marked, one-shot rankings are one row, and the perplexity curve starts at the dense model."""

import json
import math

from PIL import Image

from catalog import Catalog
from flows.plots import SCALE_KEY, perplexity_curve, relative, score_heatmap, scores_by_step

LAYERS = 6


def _start(catalog: Catalog, run_id: str) -> None:
    catalog.start_run(run_id=run_id, pipeline="p", spec_hash="h", spec_json="{}", model_fingerprint="fp",
                      data_fingerprint="d", model_source="m", output_dir="out")


def _iterative_with_outlier(catalog: Catalog) -> dict[int, dict[str, float]]:
    """Two iterative steps over 12 sub-blocks: perplexities 15.0-16.1, and layers.0.mlp near exp(14)."""
    _start(catalog, "r")
    removed: list[str] = []
    values: dict[int, dict[str, float]] = {}
    for step in range(2):
        blocks = [f"layers.{i}.{h}" for i in range(LAYERS) for h in ("attn", "mlp")
                  if f"layers.{i}.{h}" not in removed]
        values[step] = {b: 1.2e6 if b == "layers.0.mlp" else 15.0 + 0.1 * k + step for k, b in enumerate(blocks)}
        for block, value in values[step].items():
            catalog.add_score("r", step, block, "perplexity", value, 512, 0.1)
        best = min(values[step], key=values[step].get)
        catalog.add_step("r", step, best, values[step][best], 1000 - 10 * step)
        removed.append(best)
    return values


def _scale(path) -> dict:
    return json.loads(Image.open(path).text[SCALE_KEY])


def test_score_picture_scale_is_robust_to_an_outlier(tmp_path):
    catalog = Catalog(tmp_path / "catalog.duckdb")
    values = _iterative_with_outlier(catalog)
    steps, removed = scores_by_step(catalog, "r")
    assert removed == [["layers.0.attn"], ["layers.1.attn"]]
    scale = _scale(score_heatmap(steps, removed, tmp_path / "scores.png", "perplexity"))

    # The outlier is beyond the scale and named; the others spread over most of the colours.
    assert scale["clipped"] == ["layers.0.mlp"]
    assert math.isclose(scale["largest"], math.log(1.2e6 / 15.0), rel_tol=1e-9)
    spread = max(math.log(v / min(row.values())) for row in values.values() for b, v in row.items()
                 if b != "layers.0.mlp")
    assert spread <= scale["vmax"] < 0.2 * scale["largest"]
    assert spread / scale["vmax"] > 0.5
    assert scale["measure"] == "log(perplexity / step's best)"


def test_one_shot_ranking_is_one_row_with_every_removed_block(tmp_path):
    catalog = Catalog(tmp_path / "catalog.duckdb")
    _start(catalog, "r")
    for i in range(LAYERS):
        catalog.add_score("r", 0, f"layers.{i}", "block_influence", 0.1 * (i + 1), 512, 0.1)
    for step in range(3):
        catalog.add_step("r", step, f"layers.{step}", 0.1 * (step + 1), 1000 - step)
    steps, removed = scores_by_step(catalog, "r")
    assert len(steps) == 1 and removed == [["layers.0", "layers.1", "layers.2"]]
    scale = _scale(score_heatmap(steps, removed, tmp_path / "scores.png", "block_influence"))
    assert scale["clipped"] == [] and math.isclose(scale["vmax"], 0.5)


def test_perplexity_curve_starts_at_the_dense_model(tmp_path):
    path = perplexity_curve([0.0, 0.05, 0.1], [15.0, 16.0, 18.0], {"eval.txt": {"dense": 16.0, "pruned": 20.0}},
                            tmp_path / "ppl.png")
    with Image.open(path) as image:
        assert image.size[0] >= 700


def test_candidates_that_left_a_race_sit_at_their_paired_gap(tmp_path):
    """A leaver's perplexity covers only the windows it saw (here easier ones: below the step's best), so
    the picture places it at its gap to the reference on those windows, and dots it."""
    catalog = Catalog(tmp_path / "catalog.duckdb")
    _start(catalog, "r")
    catalog.add_score("r", 0, "layers.0.attn", "perplexity", 15.0, 4096, 0.4)
    catalog.add_score("r", 0, "layers.1.attn", "perplexity", 15.2, 4096, 0.4)
    catalog.add_score("r", 0, "layers.2.mlp", "perplexity", 14.0, 1024, 0.1, exact=False, std_error=0.01,
                      gap=(0.3, 0.5))
    catalog.add_step("r", 0, "layers.0.attn", 15.0, 900)
    steps, removed = scores_by_step(catalog, "r")
    leaver = steps[0]["layers.2.mlp"]
    assert (leaver.gap_low, leaver.gap_high) == (0.3, 0.5) and not leaver.exact
    assert math.isclose(relative(leaver, 15.0, True, True, paired_gaps=True), 0.4)
    assert relative(leaver, 15.0, True, True) < 0  # its own windows' perplexity would place it ahead of the best
    scale = _scale(score_heatmap(steps, removed, tmp_path / "scores.png", "perplexity", paired_gaps=True))
    assert math.isclose(scale["largest"], 0.4)
