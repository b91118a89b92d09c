"""The two pictures of a run: score per block over search steps, and perplexity against params removed."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and workers
import matplotlib.pyplot as plt  # noqa: E402

from tasks.score import CandidateScore  # noqa: E402


def score_heatmap(steps: list[dict[str, CandidateScore]], removed: list[str], path: Path, metric: str) -> Path:
    """Rows are search steps, columns the candidate blocks in model order; removed blocks are blank."""
    blocks = sorted({b for step in steps for b in step}, key=_model_order)
    grid = [[_cell(step.get(b)) for b in blocks] for step in steps]
    width = max(6.0, min(18.0, 0.18 * len(blocks) + 2))
    fig, ax = plt.subplots(figsize=(width, 1.0 + 0.35 * max(1, len(steps))))
    image = ax.imshow(grid, aspect="auto", cmap="viridis_r", interpolation="nearest")
    ax.set_xticks(range(len(blocks)), [b.removeprefix("layers.") for b in blocks], rotation=90, fontsize=6)
    ax.set_yticks(range(len(steps)), [f"{i}: -{removed[i].removeprefix('layers.')}" if i < len(removed) else str(i)
                                      for i in range(len(steps))], fontsize=7)
    ax.set_xlabel("candidate block")
    ax.set_ylabel("step: removed")
    fig.colorbar(image, ax=ax, label=f"log {metric}" if metric == "perplexity" else metric)
    ax.set_title("score of every candidate at every search step (lower = removed first)", fontsize=9)
    return _save(fig, path)


def perplexity_curve(params_removed: list[float], values: list[float], evals: dict[str, dict[str, float]],
                     path: Path) -> Path:
    """Calibration perplexity after each step; evaluation perplexity of the dense, pruned (and recovered) models."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([100 * r for r in params_removed], values, marker="o", label="calibration (search)")
    for dataset, stages in evals.items():
        line, = ax.plot([0.0, 100 * params_removed[-1]], [stages["dense"], stages["pruned"]], marker="s",
                        linestyle="--", label=f"evaluation: {Path(dataset).name}")
        if "recovered" in stages:
            ax.plot([100 * params_removed[-1]], [stages["recovered"]], marker="*", markersize=11, linestyle="none",
                    color=line.get_color(), label=f"recovered: {Path(dataset).name}")
    ax.set_xlabel("parameters removed (%)")
    ax.set_ylabel("perplexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _cell(score: CandidateScore | None) -> float:
    if score is None:
        return math.nan
    return math.log(score.value) if score.value > 0 else score.value


def _model_order(block: str) -> tuple[int, int]:
    # A beam candidate is a removal set "a+b": order it by its first block.
    parts = block.split("+")[0].split(".")
    return int(parts[1]), {"attn": 0, "mlp": 1}.get(parts[2] if len(parts) > 2 else "", -1)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
