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
from catalog.speed import SIDE_BY_SIDE, is_ratio_metric, ratio_text, side_by_side, speed_ratios

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


def _speed_lines(evals: Sequence[EvaluationRow], stages: list[str]) -> list[str]:
    """Speed as medians with their spread, each stage's ratio to dense (median of the per-round ratios
    [lowest-highest round], "within noise" when the rounds straddle 1), and the ideal ratio (dense params /
    the stage's params: per-token compute scales with them)."""
    keys, values = _by_stage(evals, "speed")
    keys = [k for k in keys if not (k[1].endswith(_SPREAD) or is_ratio_metric(k[1]) or k[1] == SIDE_BY_SIDE)]
    if not keys:
        return []
    params = {e.stage: e.value for e in evals if e.kind == "size" and e.metric == "params"}
    ratios = speed_ratios(evals)
    others = [s for s in stages if s != "dense"]
    rows = []
    for dataset, metric in keys:
        def cell(stage: str) -> str:
            row = values.get((dataset, metric, stage))
            if row is None:
                return "-"
            spread = values.get((dataset, metric + _SPREAD, stage))
            return _value(metric, row.value) + ("" if spread is None else f" ±{100 * spread.value:.0f}%")

        measured = ratios.get((dataset, metric), {})
        compared = [measured[s].text() if s in measured else "-" for s in others]
        tokens_per_s = metric.endswith("tokens_per_s")
        ideal = [f"{params['dense'] / params[s]:.2f}x" if tokens_per_s and s in params and "dense" in params else "-"
                 for s in others]
        label = metric if dataset == "-" else f"{dataset} {metric}"
        rows.append([label, *(cell(s) for s in stages), *compared, *ideal])
    headers = ["metric", *stages, *(f"{s} / dense" for s in others), *(f"ideal {s} / dense" for s in others)]
    rounds = next((r.rounds for by_stage in ratios.values() for r in by_stage.values()), None)
    note = ("The models were timed in turn, round by round in one process (the order reversed every other round), "
            "after a warm-up" + (f", {rounds} rounds" if rounds else "") + ": tokens/s is the median of a model's "
            "rounds, ± their spread, (max - min) / median. A stage / dense ratio is the median of the per-round "
            "ratios [lowest-highest round], *within noise* when the rounds straddle 1. "
            "Ideal: dense params / the stage's params, what per-token compute would give.")
    apart = [s for s, together in side_by_side(evals).items() if not together]
    if apart:
        note += (f" {', '.join(apart)}: timed one after the other, not in turn (the models did not fit in memory "
                 "together), so a change of the machine's load between them reads as a ratio.")
    return ["## Speed", "", note, ""] + _table(headers, rows) + [""]


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
    for workload, by_stage in (summary.get("speed") or {}).items():
        stages = "  ".join(f"{stage}/dense {ratio_text(entry)}" for stage, entry in by_stage.items())
        lines.append(f"speed      {workload}: {stages}")
    lines += [
        f"recover    {summary['recover']}",
        f"checkpoint {summary['checkpoint']}",
        f"catalog    {summary['catalog']}",
        f"wall time  {summary['wall_seconds']:.1f} s for the run, {summary['invocation_seconds']:.1f} s this time",
    ]
    return "\n".join(lines)
