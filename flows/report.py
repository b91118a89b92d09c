"""The final report of a run, as markdown beside report.json: numbers, chosen blocks, recovery, pictures.

Built from the catalog rows of the run, so it says exactly what the catalog holds; `pruneflow show`
prints it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from catalog.report import WIDTH_HEADERS, reconstruction_table, reconstruction_title, width_rows, width_title
from catalog.rows import EvaluationRow, StepRow

_STAGES = ("dense", "pruned", "recovered")


def _value(metric: str, value: float) -> str:
    if metric in ("params", "checkpoint_bytes"):
        return f"{int(value):,}"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.3f}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
            *("| " + " | ".join(row) + " |" for row in rows)]


def _by_stage(evals: Sequence[EvaluationRow], kind: str) -> tuple[list[tuple[str, str]], dict]:
    keys: list[tuple[str, str]] = []
    values: dict[tuple[str, str, str], EvaluationRow] = {}
    for e in evals:
        if e.kind != kind:
            continue
        if (e.dataset, e.metric) not in keys:
            keys.append((e.dataset, e.metric))
        values[(e.dataset, e.metric, e.stage)] = e
    return keys, values


def _evaluation_tables(evals: Sequence[EvaluationRow]) -> list[str]:
    stages = [s for s in _STAGES if any(e.stage == s for e in evals)]
    lines: list[str] = []
    keys, values = _by_stage(evals, "perplexity")
    if keys:
        lines += ["## Perplexity", ""]
        rows = []
        for dataset, metric in keys:
            first = next(values[(dataset, metric, s)] for s in stages if (dataset, metric, s) in values)
            cells = [_value(metric, values[(dataset, metric, s)].value) if (dataset, metric, s) in values else "-"
                     for s in stages]
            rows.append([dataset, *cells, str(first.n_tokens), str(first.seq_len), str(first.stride)])
        lines += _table(["dataset", *stages, "predicted tokens", "window", "stride"], rows) + [""]
    lines += _speed_lines(evals, stages)
    for kind, title in (("task", "Downstream tasks (lm-evaluation-harness, zero-shot)"), ("size", "Size")):
        keys, values = _by_stage(evals, kind)
        if not keys:
            continue
        rows = []
        for dataset, metric in keys:
            cells = [_value(metric, values[(dataset, metric, s)].value) if (dataset, metric, s) in values else "-"
                     for s in stages]
            label = metric if dataset == "-" else f"{dataset} {metric}"
            samples = next((values[(dataset, metric, s)].n_samples for s in stages if (dataset, metric, s) in values), None)
            rows.append([label, *cells] + ([str(samples)] if kind == "task" else []))
        headers = ["metric", *stages] + (["examples"] if kind == "task" else [])
        lines += [f"## {title}", ""] + _table(headers, rows) + [""]
    return lines


_SPREAD = "_spread"


def _apart(a: float, spread_a: float, b: float, spread_b: float) -> bool:
    """Whether two medians' ranges (median x (1 ± spread / 2)) do not overlap."""
    low_a, high_a = a * (1 - spread_a / 2), a * (1 + spread_a / 2)
    low_b, high_b = b * (1 - spread_b / 2), b * (1 + spread_b / 2)
    return high_a < low_b or high_b < low_a


def _speed_lines(evals: Sequence[EvaluationRow], stages: list[str]) -> list[str]:
    """Speed as medians with their spread, each stage's ratio to dense, and the ideal ratio (dense params /
    the stage's params: per-token compute scales with them). A ratio the spreads cannot tell from 1 is
    reported as noise, not as a gain or a loss."""
    keys, values = _by_stage(evals, "speed")
    keys = [k for k in keys if not k[1].endswith(_SPREAD)]
    if not keys:
        return []
    params = {e.stage: e.value for e in evals if e.kind == "size" and e.metric == "params"}
    others = [s for s in stages if s != "dense"]
    rows = []
    for dataset, metric in keys:
        def spread(stage: str) -> float | None:
            row = values.get((dataset, metric + _SPREAD, stage))
            return None if row is None else row.value

        def cell(stage: str) -> str:
            row = values.get((dataset, metric, stage))
            if row is None:
                return "-"
            noise = spread(stage)
            return _value(metric, row.value) + ("" if noise is None else f" ±{100 * noise:.0f}%")

        dense = values.get((dataset, metric, "dense"))
        ratios = []
        for stage in others:
            row = values.get((dataset, metric, stage))
            if dense is None or row is None:
                ratios.append("-")
                continue
            apart = _apart(dense.value, spread("dense") or 0.0, row.value, spread(stage) or 0.0)
            ratios.append(f"{row.value / dense.value:.2f}x" if apart else "within noise")
        tokens_per_s = metric.endswith("tokens_per_s")
        ideal = [f"{params['dense'] / params[s]:.2f}x" if tokens_per_s and s in params and "dense" in params else "-"
                 for s in others]
        label = metric if dataset == "-" else f"{dataset} {metric}"
        rows.append([label, *(cell(s) for s in stages), *ratios, *ideal])
    headers = ["metric", *stages, *(f"{s} / dense" for s in others), *(f"ideal {s} / dense" for s in others)]
    repeats = next((e.n_samples for e in evals if e.kind == "speed" and e.n_samples), None)
    note = (f"Median of {repeats} timed runs after a warm-up; ± is their spread, (max - min) / median. "
            if repeats else "")
    note += ("A ratio is given only when the two ranges, median x (1 ± spread / 2), do not overlap. "
             "Ideal: dense params / the stage's params, what per-token compute would give.")
    return ["## Speed", "", note,
            ""] + _table(headers, rows) + [""]


def _recovery_lines(recovery: dict | None) -> list[str]:
    if not recovery:
        return ["## Recovery", "", "none (recover.method: none; the pruned checkpoint is final)", ""]
    lines = ["## Recovery", "", f"- method: `{recovery['method']}`, {recovery['seconds']:.1f} s, "
             f"{recovery['trainable_params']:,} trainable parameters",
             f"- checkpoint: `{recovery['checkpoint']}` (format `{recovery['format']}`)"]
    losses = recovery.get("losses") or []
    if losses:
        lines.append(f"- training loss: {losses[0]:.4f} at step 1 -> {losses[-1]:.4f} at step {len(losses)}"
                     + (f" (resumed at step {recovery['resumed_from_step']})" if recovery.get("resumed_from_step") else ""))
    fit = recovery.get("fit") or {}
    if fit:
        lines.append("- share of each removed block's output its adapter recovers (calibration data): "
                     + ", ".join(f"{u} {v:.3f}" for u, v in fit.items()))
    domains = recovery.get("domains") or []
    if domains:
        names = list(domains[0]["weights"])
        lines += ["", "Dynamic batch loading: domain weights after each update (held-apart loss; reference "
                  + ", ".join(f"{n} {domains[0]['reference'][n]:.3f}" for n in names) + ")", ""]
        lines += _table(["step", *names], [[str(d["step"]), *(
            f"{d['weights'][n]:.3f}" + (f" ({d['losses'][n]:.3f})" if d["losses"] else "") for n in names)]
            for d in domains])
    return lines + [""]


def markdown_report(summary: dict, steps: Sequence[StepRow], evals: Sequence[EvaluationRow], folder: Path) -> str:
    lines = [
        f"# pruneflow report: {summary['pipeline']}",
        "",
        f"- run `{summary['run_id']}`, model `{summary.get('model', '')}`",
        f"- parameters {summary['params_dense']:,} -> {summary['params_pruned']:,} "
        f"({100 * summary['params_removed_ratio']:.2f}% removed)",
        f"- pruned checkpoint: `{summary['checkpoint']}`",
        f"- wall time {summary['wall_seconds']:.1f} s",
        "",
        "## Removed blocks, in search order",
        "",
    ]
    rows = [[str(s.step), s.block, f"{s.value:.4f}", f"{s.params_remaining:,}"] for s in steps]
    lines += _table(["step", "block", "score", "params remaining"], rows) + [""]
    if summary.get("width"):
        lines += [f"## {width_title(summary['width']).capitalize()}", ""]
        lines += _table(list(WIDTH_HEADERS), width_rows(summary["width"])) + [""]
        headers, rows = reconstruction_table(summary["width"])
        if rows:
            lines += [f"### {reconstruction_title().capitalize()}", ""] + _table(headers, rows) + [""]
    lines += _evaluation_tables(evals)
    lines += _recovery_lines(summary.get("recovery"))
    pictures = summary.get("pictures") or {}
    if pictures:
        lines += ["## Pictures", ""]
        for kind, path in pictures.items():
            lines.append(f"![{kind}]({os.path.relpath(path, folder)})")
        lines.append("")
    return "\n".join(lines)


def format_outcome(summary: dict) -> str:
    """What `pruneflow run` prints at the end, and the flow logs (a worker's log then shows it too)."""
    lines = [
        f"run        {summary['run_id']}",
        f"pipeline   {summary['pipeline']}",
        f"removed    {len(summary['blocks'])} blocks: {', '.join(summary['blocks'])}",
        f"params     {summary['params_dense']:,} -> {summary['params_pruned']:,} "
        f"({100 * summary['params_removed_ratio']:.2f}% removed)",
    ]
    if summary.get("width"):
        lines.append(f"width      {width_title(summary['width'])}; per layer: pruneflow show {summary['run_id'][:8]}")
    for dataset, values in summary["perplexity"].items():
        stages = "  ".join(f"{stage} {value:.3f}" for stage, value in values.items())
        lines.append(f"perplexity {dataset}: {stages}")
    lines += [
        f"recover    {summary['recover']}",
        f"checkpoint {summary['checkpoint']}",
        f"catalog    {summary['catalog']}",
        f"wall time  {summary['wall_seconds']:.1f} s for the run, {summary['invocation_seconds']:.1f} s this time",
    ]
    return "\n".join(lines)
