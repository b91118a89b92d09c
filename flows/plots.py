"""The pictures of a run: every candidate's score at every search step, perplexity against the parameters
removed, from the dense model through every step, and, with width pruning, channel importance per layer.

Scores are shown relative to each step's best candidate, on a colour scale that ends at a robust upper
fence, so one outlier (often the first MLP) does not flatten every other candidate into one colour. The
scale a picture uses is written into the PNG (text chunk `pruneflow-scale`), so it can be checked.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and workers
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from catalog import Catalog  # noqa: E402
from catalog.rows import left_race  # noqa: E402
from tasks.score import CandidateScore  # noqa: E402

SCALE_KEY = "pruneflow-scale"
# Tukey's fence: cells beyond q3 + 1.5 IQR are outliers and take the scale's last colour.
FENCE_IQR = 1.5


@dataclass(frozen=True)
class HeatScale:
    """The colour scale of the score picture: 0 is each step's best candidate, `vmax` where colours end."""

    measure: str
    vmax: float
    largest: float
    clipped: tuple[str, ...]  # blocks with a cell beyond vmax


def relative(score: CandidateScore, best: float, log_scale: bool, lowest_first: bool,
             paired_gaps: bool = False) -> float:
    """How far a candidate is from the step's best: log-ratio for perplexities, plain difference otherwise.
    With `paired_gaps` (racing with the ppl objective), a candidate that left the race is placed at its
    gap to the reference on the windows both saw (log-perplexity per token): its own perplexity covers
    only some windows, which may be easier or harder than the whole set."""
    if paired_gaps and left_race(score):
        return (score.gap_low + score.gap_high) / 2
    if log_scale and score.value > 0 and best > 0:
        gap = math.log(score.value) - math.log(best)
    else:
        gap = score.value - best
    return gap if lowest_first else -gap


def heat_scale(cells: dict[str, list[float]], measure: str) -> HeatScale:
    """`cells` holds each block's distances from its steps' best."""
    values = sorted(v for row in cells.values() for v in row if math.isfinite(v))
    largest = values[-1] if values else 0.0
    if len(values) >= 4:
        q1, _, q3 = statistics.quantiles(values, n=4)
        vmax = min(largest, q3 + FENCE_IQR * (q3 - q1))
    else:
        vmax = largest
    vmax = vmax if vmax > 0 else max(largest, 1e-9)
    clipped = tuple(b for b, row in cells.items() if any(v > vmax for v in row))
    return HeatScale(measure, vmax, largest, clipped)


def score_heatmap(steps: list[dict[str, CandidateScore]], removed: list[list[str]], path: Path, metric: str,
                  lowest_first: bool = True, paired_gaps: bool = False) -> Path:
    """Rows are the distinct search steps, columns the candidate blocks in model order. `removed[i]` holds
    the blocks removed from step i's ranking (several for strategies that rank once). Candidates that left
    a race are dotted; `paired_gaps` places them at their gap to the reference (see `relative`)."""
    blocks = sorted({b for step in steps for b in step}, key=_model_order)
    log_scale = metric == "perplexity"
    measure = f"log({metric} / step's best)" if log_scale else f"{metric}, distance from step's best"
    bests = [_best(step, lowest_first) for step in steps]
    grid = [[relative(step[b], best, log_scale, lowest_first, paired_gaps) if b in step else math.nan
             for b in blocks] for step, best in zip(steps, bests)]
    scale = heat_scale({b: [row[j] for row in grid] for j, b in enumerate(blocks)}, measure)

    width = max(8.0, min(16.0, 0.24 * len(blocks) + 3))
    fig, ax = plt.subplots(figsize=(width, max(4.2, 2.2 + 0.5 * len(steps))))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#d9d9d9")  # bad: no longer there, removed earlier
    image = ax.imshow(grid, aspect="auto", cmap=cmap, norm=Normalize(0.0, scale.vmax), interpolation="nearest")
    for i, gone in enumerate(removed):
        for order, block in enumerate(gone):
            if block in blocks:
                ax.text(blocks.index(block), i, "×" if len(gone) == 1 else str(order + 1), ha="center",
                        va="center", color="red", fontsize=11, fontweight="bold")
    raced = [(j, i) for i, step in enumerate(steps) for j, b in enumerate(blocks)
             if b in step and left_race(step[b])]
    if raced:
        ax.scatter(*zip(*raced), s=4, color="white", marker="o", linewidths=0)
    ax.set_xticks(range(len(blocks)), [_short(b) for b in blocks], rotation=90, fontsize=8)
    ax.set_yticks(range(len(steps)), [_row_label(i, gone) for i, gone in enumerate(removed)], fontsize=9)
    ax.set_xlabel("candidate block (layer.half)", fontsize=10)
    colorbar = fig.colorbar(image, ax=ax, extend="max" if scale.clipped else "neither", pad=0.01)
    colorbar.set_label(measure, fontsize=9)
    legend = [Line2D([], [], marker="x", color="red", linestyle="none", markersize=9,
                     label="removed at this step" if all(len(g) <= 1 for g in removed) else "removed (order)"),
              Patch(color="#d9d9d9", label="removed at an earlier step")]
    if raced:
        where = "paired gap to the reference" if paired_gaps else "perplexity of the windows seen"
        legend.append(Line2D([], [], marker="o", color="grey", linestyle="none", markersize=3,
                             label=f"left the race: {where}"))
    if scale.clipped:
        names = ", ".join(_short(b) for b in scale.clipped[:4]) + (", ..." if len(scale.clipped) > 4 else "")
        legend.append(Patch(color=cmap(1.0), label=f"beyond the scale: {names}"))
    ax.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, -0.32), ncol=3, fontsize=9, frameon=False)
    ax.set_title("every candidate at every search step (0 = the step's best; lower goes first)", fontsize=11)
    return _save(fig, path, {SCALE_KEY: json.dumps(asdict(scale))})


def scores_by_step(catalog: Catalog, run_id: str) -> tuple[list[dict[str, CandidateScore]], list[list[str]]]:
    """The run's distinct scored steps and, for each, the blocks removed from its ranking: a step without
    scores of its own (one_shot, consecutive) was chosen from the last scored step before it."""
    by_step: dict[int, dict[str, CandidateScore]] = {}
    for row in catalog.scores(run_id):
        by_step.setdefault(row.step, {})[row.block] = CandidateScore(row.block, row.value, row.n_tokens,
                                                                     row.seconds, row.exact, row.std_error,
                                                                     row.gap_low, row.gap_high)
    scored = sorted(by_step)
    removed: dict[int, list[str]] = {s: [] for s in scored}
    for step in catalog.steps(run_id):
        source = max((s for s in scored if s <= step.step), default=None)
        if source is not None:
            removed[source].append(step.block)
    return [by_step[s] for s in scored], [removed[s] for s in scored]


def perplexity_curve(params_removed: list[float], calibration: list[float], evals: dict[str, dict[str, float]],
                     path: Path, final_removed: float | None = None) -> Path:
    """`params_removed[k]` and `calibration[k]` after k removals (k = 0: the dense model); evaluation
    perplexity of the dense, pruned and (when there is one) recovered models, the latter two at
    `final_removed` when width pruning removed more than the steps."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    xs = [100 * r for r in params_removed]
    final = xs[-1] if final_removed is None else 100 * final_removed
    ax.plot(xs, calibration, marker="o", label="calibration windows, after each step")
    for k, (x, y) in enumerate(zip(xs, calibration)):
        ax.annotate("dense" if k == 0 else str(k - 1), (x, y), textcoords="offset points", xytext=(0, 6),
                    ha="center", fontsize=8)
    for dataset, stages in evals.items():
        line, = ax.plot([xs[0], final], [stages["dense"], stages["pruned"]], marker="s", linestyle="--",
                        label=f"evaluation {Path(dataset).name}: dense, pruned")
        if "recovered" in stages:
            ax.plot([final], [stages["recovered"]], marker="*", markersize=13, linestyle="none",
                    color=line.get_color(), label=f"evaluation {Path(dataset).name}: recovered")
    ax.set_xlabel("parameters removed (%)", fontsize=10)
    ax.set_ylabel("perplexity", fontsize=10)
    ax.set_title("perplexity from the dense model through every search step (numbers: step)", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    return _save(fig, path)


def width_importance(channels: dict[int, list[float]], kept: dict[int, int], path: Path) -> Path:
    """Per layer, its MLP channels' importance from highest to lowest (relative to the layer's highest), with
    the width the plan keeps marked: how much importance each layer's cut leaves behind."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    cmap = plt.get_cmap("viridis")
    for n, (layer, values) in enumerate(sorted(channels.items())):
        ordered = sorted(values, reverse=True)
        top = ordered[0] or 1.0
        colour = cmap(n / max(1, len(channels) - 1))
        ax.plot(range(len(ordered)), [v / top for v in ordered], color=colour, linewidth=1, label=f"layer {layer}")
        if layer in kept:
            ax.axvline(kept[layer], color=colour, linestyle=":", linewidth=0.8)
    ax.set_xlabel("MLP channels, most important first (dotted: the width kept)", fontsize=10)
    ax.set_ylabel("importance / layer's highest", fontsize=10)
    ax.set_title("channel importance per layer and the cut", fontsize=11)
    ax.grid(alpha=0.3)
    if len(channels) <= 12:
        ax.legend(fontsize=8, ncol=2)
    return _save(fig, path)


def reconstruction_errors(rows: list[dict], path: Path) -> Path:
    """Per reconstructed unit in model order, its output error after each stage (a run summary's
    `width.reconstruction`): where the greedy choice, the swaps and the refit each bring a layer."""
    fig, ax = plt.subplots(figsize=(max(8.0, min(16.0, 0.3 * len(rows) + 3)), 4.5))
    styles = {"before": ("grey", ":"), "cut": ("tab:red", "--"), "greedy": ("tab:orange", "-"),
              "swaps": ("tab:green", "-"), "refit": ("tab:blue", "-")}
    for stage, (colour, line) in styles.items():
        points = [(n, 100 * r[stage]) for n, r in enumerate(rows) if stage in r]
        if points:
            ax.plot(*zip(*points), color=colour, linestyle=line, marker=".", linewidth=1, label=stage)
    ax.set_xticks(range(len(rows)), [r["unit"].removeprefix("layers.") for r in rows], rotation=90, fontsize=7)
    ax.set_ylabel("error, % of the dense output's energy", fontsize=10)
    ax.set_title("reconstruction error per unit and stage", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def domain_weights(trace: list[dict], path: Path) -> Path:
    """Dynamic batch loading: each domain's weight over training steps (left) and its held-apart loss
    against its reference (right)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    domains = list(trace[0]["weights"])
    for n, domain in enumerate(domains):
        colour = plt.get_cmap("tab10")(n % 10)
        label = domain.removeprefix("builtin:")
        left.plot([t["step"] for t in trace], [t["weights"][domain] for t in trace], color=colour, marker=".",
                  label=label)
        seen = [t for t in trace if t["losses"]]
        right.plot([t["step"] for t in seen], [t["losses"][domain] for t in seen], color=colour, marker=".",
                   label=label)
        right.axhline(trace[0]["reference"][domain], color=colour, linestyle=":", linewidth=0.8)
    _label(left, "training step", "share of the training windows", "domain weights")
    _label(right, "training step", "held-apart loss (dotted: reference)", "domain losses")
    return _save(fig, path)


def mask_training(rows: list[dict], path: Path) -> Path:
    """A mask-learning width strategy's steps: LM loss (left); each structure's expected size and its gap
    to the ramped target (right)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    steps = [r["step"] for r in rows]
    left.plot(steps, [r["loss"] for r in rows], color="tab:blue", linewidth=1, label="LM loss")
    left.plot(steps, [r["loss"] + r["penalty"] for r in rows], color="tab:grey", linewidth=1, linestyle=":",
              label="LM loss + penalty")
    for n, key in enumerate(k for k in rows[0] if k.startswith("expected.")):
        colour = plt.get_cmap("tab10")(n % 10)
        name = key.removeprefix("expected.")
        right.plot(steps, [r[key] for r in rows], color=colour, linewidth=1, label=name)
        if f"gap.{name}" in rows[0]:
            right.plot(steps, [r[key] - r[f"gap.{name}"] for r in rows], color=colour, linewidth=0.8, linestyle=":")
    _label(left, "step", "", "training loss")
    _label(right, "step", "share of the dense size (dotted: target)", "expected sizes of the masks")
    return _save(fig, path)


def _label(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel, fontsize=10)
    ax.set_ylabel(ylabel, fontsize=10)
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _best(step: dict[str, CandidateScore], lowest_first: bool) -> float:
    exact = [s.value for s in step.values() if s.exact] or [s.value for s in step.values()]
    return min(exact) if lowest_first else max(exact)


def _short(block: str) -> str:
    return "+".join(b.removeprefix("layers.") for b in block.split("+"))


def _row_label(step: int, gone: list[str]) -> str:
    if not gone:
        return f"step {step}"
    if len(gone) == 1:
        return f"step {step}: removed {_short(gone[0])}"
    return f"step {step}: ranked once, {len(gone)} removed"


def _model_order(block: str) -> tuple[int, int]:
    # A beam candidate is a removal set "a+b": order it by its first block.
    parts = block.split("+")[0].split(".")
    return int(parts[1]), {"attn": 0, "mlp": 1}.get(parts[2] if len(parts) > 2 else "", -1)


def _save(fig, path: Path, metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata=metadata)
    plt.close(fig)
    return path
