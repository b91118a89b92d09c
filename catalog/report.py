"""Plain-text tables for `pruneflow runs` and `pruneflow show`.

Plain ASCII on purpose: the output is read in terminals, CI logs and pasted into issues.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import asdict
from datetime import datetime
from typing import Sequence

from catalog.rows import ArtifactRow, EvaluationRow, RunRow, RunSummary, ScoreRow, StepRow, left_race
from catalog.speed import speed_ratios

_MISSING = "-"
_RUN_ID_WIDTH = 12
_MODEL_WIDTH = 40
_LOWER_BOUND = ">="


def format_duration(seconds: float | None) -> str:
    """`45s`, `12m03s`, `2h05m09s`."""
    if seconds is None or not math.isfinite(seconds):
        return _MISSING
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_number(value: float | None) -> str:
    if value is None:
        return _MISSING
    if not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
        return f"{value:.3e}"
    return f"{value:.2f}"


def format_percent(ratio: float | None) -> str:
    return _MISSING if ratio is None else f"{ratio * 100:.1f}%"


def format_bytes(size: int | None) -> str:
    if size is None:
        return _MISSING
    if size < 1024:
        return f"{size} B"
    amount = size / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if amount < 1024:
            return f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{amount:.1f} TiB"


def format_time(moment: datetime | None) -> str:
    return _MISSING if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    """Columns padded to their widest cell; indexes in `right` are right-aligned (numbers)."""
    widths = [len(h) for h in headers]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"table row has {len(row)} cells for {len(headers)} columns: {row!r}")
        widths = [max(w, len(cell)) for w, cell in zip(widths, row)]

    def line(cells: Sequence[str]) -> str:
        padded = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths))
        ]
        return "  ".join(padded).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def _shorten_tail(text: str, width: int) -> str:
    # Model sources end with the informative part (repo name, file name), so keep the tail.
    return text if len(text) <= width else "..." + text[-(width - 3):]


def format_runs(summaries: Sequence[RunSummary]) -> str:
    headers = ["run", "pipeline", "status", "model", "blocks removed", "params removed",
               "dense ppl", "final ppl", "wall time"]
    rows = [
        [
            s.run_id[:_RUN_ID_WIDTH],
            s.pipeline,
            s.status,
            _shorten_tail(s.model_source, _MODEL_WIDTH),
            str(s.blocks_removed),
            format_percent(s.params_removed),
            format_number(s.dense_ppl),
            format_number(s.final_ppl),
            format_duration(s.wall_seconds),
        ]
        for s in summaries
    ]
    table = format_table(headers, rows, right=(4, 5, 6, 7, 8))
    return table if rows else table + "\n(no runs recorded in this catalog yet)"


def _pretty_json(text: str) -> str:
    try:
        return json.dumps(json.loads(text), indent=2, sort_keys=True)
    except ValueError:
        # The catalog validates JSON on write, but `show` must still display a hand-edited row.
        return text


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _lower_bound(score: ScoreRow) -> bool:
    return not score.exact and not left_race(score)


def _step_lines(steps: Sequence[StepRow], scores: Sequence[ScoreRow], verbose: bool = False) -> list[str]:
    by_step: dict[int, list[ScoreRow]] = defaultdict(list)
    for score in scores:
        by_step[score.step].append(score)
    raced = any(left_race(s) for s in scores)

    rows = []
    for step in steps:
        candidates = by_step.get(step.step, [])
        winner = [s for s in candidates if s.block == step.block]
        bound = _LOWER_BOUND if any(_lower_bound(s) for s in winner) else ""
        lower = {s.block for s in candidates if _lower_bound(s)}
        left = {s.block for s in candidates if left_race(s)}
        rows.append([
            str(step.step),
            step.block,
            bound + format_number(step.value),
            str(len({s.block for s in candidates})),
            str(len(lower)),
            *([str(len(left))] if raced else []),
            f"{step.params_remaining:,}",
        ])
    headers = ["step", "removed block", "score", "candidates", "lower bounds", *(["left race"] if raced else []),
               "params remaining"]
    lines = [f"steps ({len(steps)})"]
    lines.append(format_table(headers, rows, right=tuple(i for i in range(len(headers)) if i != 1))
                 if rows else "(no block removed yet)")
    if raced:
        lines += ["", *_race_lines(by_step, verbose)]

    # Scores without a step row belong to a step the search had not finished when it stopped.
    # No "best so far": whether lower or higher wins depends on the metric, which the
    # catalog does not know.
    done = {step.step for step in steps}
    for number in sorted(set(by_step) - done):
        scored = {s.block for s in by_step[number]}
        lines.append(f"step {number} unfinished: {_count(len(scored), 'candidate')} scored")
    return lines


def _race_lines(by_step: dict[int, list[ScoreRow]], verbose: bool) -> list[str]:
    """Candidates that left a race: the perplexity of the windows each saw, and its gap to the reference in
    log-perplexity per token with the confidence interval that let it leave. Without `verbose`, the
    closest one per step (the smallest lower end: how near the race came to keeping it)."""
    rows = []
    for step in sorted(by_step):
        left = sorted((s for s in by_step[step] if left_race(s)), key=lambda s: (s.gap_low, s.block))
        for score in left if verbose else left[:1]:
            rows.append([str(step), score.block, format_number(score.value), f"{score.n_tokens:,}",
                         f"{(score.gap_low + score.gap_high) / 2:+.4f}",
                         f"[{score.gap_low:+.4f}, {score.gap_high:+.4f}]"])
    title = "left the race" if verbose else "left the race, the closest per step (--verbose: all)"
    headers = ["step", "block", "ppl of windows seen", "tokens", "gap (log-ppl/token)", "interval"]
    return [title, format_table(headers, rows, right=(0, 2, 3, 4))]


def _headline(run: RunRow, steps: Sequence[StepRow], evaluations: Sequence[EvaluationRow],
              artifacts: Sequence[ArtifactRow]) -> list[tuple[str, str]]:
    """What a user looks for first: what was removed, what it cost, where the result is."""
    fields = [("run", f"{run.run_id}  ({run.status})"), ("pipeline", run.pipeline), ("model", run.model_source)]
    removed = ", ".join(s.block for s in steps) or "(nothing yet)"
    fields.append(("removed", f"{_count(len(steps), 'block')}: {removed}"))
    params = {e.stage: e.value for e in evaluations if e.kind == "size" and e.metric == "params"}
    if "dense" in params and "pruned" in params:
        fields.append(("params", f"{int(params['dense']):,} -> {int(params['pruned']):,} "
                                 f"({format_percent(1 - params['pruned'] / params['dense'])} removed)"))
    ppl: dict[str, list[str]] = defaultdict(list)
    for e in evaluations:
        if e.kind == "perplexity":
            ppl[e.dataset].append(f"{e.stage} {format_number(e.value)}")
    fields += [("perplexity", f"{dataset}: {'  '.join(values)}") for dataset, values in ppl.items()]
    fields += [("speed", f"{workload} {metric}: " + "  ".join(f"{stage}/dense {ratio.text()}"
                                                             for stage, ratio in by_stage.items()))
               for (workload, metric), by_stage in speed_ratios(evaluations).items()]
    checkpoints = {a.stage: a.path for a in artifacts if a.kind == "checkpoint"}
    final = checkpoints.get("recovered") or checkpoints.get("pruned")
    fields.append(("checkpoint", final or "(not written yet)"))
    report = next((a.path for a in artifacts if a.kind == "report-md"), None)
    if report:
        fields.append(("report", report))
    fields.append(("wall time", format_duration(run.wall_seconds)))
    return fields


WIDTH_HEADERS = ("layer", "query heads", "KV heads", "MLP channels", "removed halves", "params")


def width_rows(width: dict | None) -> list[list[str]]:
    """The per-layer table of a width plan (a run summary's `width`): widths now, lost halves, parameters."""
    if not width:
        return []
    return [[f"layers.{r['layer']}", str(r["heads"]), str(r["kv_heads"]), str(r["channels"]),
             ", ".join(r["removed"]) or "-", f"{r['params']:,}"] for r in width["layers"]]


RECONSTRUCTION_STAGES = ("before", "greedy", "swaps", "cut", "refit")


def reconstruction_table(width: dict | None) -> tuple[list[str], list[list[str]]]:
    """Per reconstructed unit, its output error against the dense model's after each stage the run took
    (relative squared error, %); no rows without a reconstructing strategy."""
    rows = (width or {}).get("reconstruction") or []
    stages = [s for s in RECONSTRUCTION_STAGES if any(s in r for r in rows)]
    return ["unit", *stages], [[r["unit"], *(f"{100 * r[s]:.2f}" if s in r else _MISSING for s in stages)]
                               for r in rows]


def reconstruction_title() -> str:
    return ("reconstruction error per unit, % of the dense output's energy (before: drift from earlier pruning; "
            "cut: the kept columns unchanged)")


def _width_size(name: str, kept: int, shares: dict) -> str:
    """`intermediate_size 1382 (90% of 1536)`; a count the strategy rounded says so."""
    if name not in shares:
        return f"{name} {kept}"
    asked = shares[name]
    rounded = "" if asked["count"] == kept else f" = {asked['count']}, rounded to {kept} by the strategy"
    return f"{name} {kept} ({asked['share']} of {asked['of']}{rounded})"


def width_title(width: dict) -> str:
    shape = ", ".join(_width_size(k, v, width.get("shares") or {}) for k, v in width["shape"].items())
    if width.get("params_ratio"):
        shape += f", chosen for params_ratio {width['params_ratio']}"
    return f"width plan ({width['metric']}, {width.get('strategy', 'uniform')}: {shape})"


def _aligned(fields: Sequence[tuple[str, str]]) -> str:
    width = max(len(label) for label, _ in fields)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in fields)


def format_show(
    run: RunRow,
    steps: Sequence[StepRow],
    scores: Sequence[ScoreRow],
    evaluations: Sequence[EvaluationRow],
    artifacts: Sequence[ArtifactRow],
    verbose: bool = False,
) -> str:
    """The headline, the steps and the evaluations; `verbose` adds identities, the whole spec, the stored
    summary (raw series included) and every artifact."""
    sections = [_aligned(_headline(run, steps, evaluations, artifacts)),
                "\n".join(_step_lines(steps, scores, verbose))]
    width = (run.summary or {}).get("width")
    if width:
        sections.append(width_title(width) + "\n" + format_table(WIDTH_HEADERS, width_rows(width), right=(1, 2, 3, 5)))
        headers, rows = reconstruction_table(width)
        if rows:
            sections.append(reconstruction_title() + "\n" + format_table(headers, rows,
                                                                           right=tuple(range(1, len(headers)))))
    # Speed needs its spread and ratios beside it to mean anything: report.md has that table.
    shown = evaluations if verbose else [e for e in evaluations if e.kind not in ("perplexity", "speed")]
    eval_rows = [
        [e.stage, e.kind, e.dataset, e.metric, format_number(e.value),
         _MISSING if e.n_tokens is None else f"{e.n_tokens:,}",
         _MISSING if e.seq_len is None else str(e.seq_len),
         _MISSING if e.stride is None else str(e.stride)]
        for e in shown
    ]
    title = ("evaluations" if verbose
             else "other evaluations (perplexity and speed ratios above; speed in full in the report)")
    sections.append(
        f"{title} ({len(shown)})\n"
        + (format_table(["stage", "kind", "dataset", "metric", "value", "tokens", "seq len",
                         "stride"], eval_rows, right=(4, 5, 6, 7))
           if eval_rows else "(none)")
    )
    if not verbose:
        sections.append("(--verbose: fingerprints, the whole spec, the stored summary and every artifact; "
                        "--json: all of it as JSON)")
        return "\n\n".join(sections)
    sections.append(_aligned([
        ("model fingerprint", run.model_fingerprint), ("data fingerprint", run.data_fingerprint),
        ("spec hash", run.spec_hash), ("output dir", run.output_dir), ("created", format_time(run.created_at)),
        ("finished", format_time(run.finished_at)),
    ]))
    sections.append("spec\n" + _pretty_json(run.spec_json))
    if run.summary_json is not None:
        sections.append("summary\n" + _pretty_json(run.summary_json))
    artifact_rows = [
        [a.stage, a.kind, format_bytes(a.bytes), a.sha256[:12], a.path] for a in artifacts
    ]
    sections.append(
        f"artifacts ({len(artifacts)})\n"
        + (format_table(["stage", "kind", "size", "sha256", "path"], artifact_rows, right=(2,))
           if artifact_rows else "(none)")
    )
    return "\n\n".join(sections)


def show_json(
    run: RunRow,
    steps: Sequence[StepRow],
    scores: Sequence[ScoreRow],
    evaluations: Sequence[EvaluationRow],
    artifacts: Sequence[ArtifactRow],
) -> str:
    """Everything the catalog holds on one run, as one JSON document (`pruneflow show RUN --json`)."""
    def rows(items) -> list[dict]:
        return [asdict(item) for item in items]

    run_data = {k: v for k, v in asdict(run).items() if k not in ("spec_json", "summary_json")}
    return json.dumps({"run": run_data, "spec": run.spec, "summary": run.summary, "steps": rows(steps),
                       "scores": rows(scores), "evaluations": rows(evaluations), "artifacts": rows(artifacts)},
                      indent=2, default=str)  # datetimes as ISO-like text
