"""Speed ratios when the machine's load changes during the measurement: the pipeline's speed stage timing its
models one after the other (what the evaluate stage did before, one checkpoint at a time) against in turn,
round by round in one process (what the speed stage does now).

SmolLM2-135M, fp32, the pipeline's workloads (`SpeedSettings.quick()`: 5 rounds after a warm-up, a 128-token
prefill and 32 greedy decode steps after 16 tokens), two pairs:
- dense against itself (the same checkpoint loaded twice): the true ratio is 1;
- dense against the demo's eight attention removals (`benchmarks/pruned_speed.DEMO_BLOCKS`, `remote_code`).
Conditions: steady (whatever else runs on the machine), and `--busy` spinning processes started when a
quarter, or half, of the timed runs are done (for one after the other, half is when the second model starts).

    .venv/bin/python -m benchmarks.speed_drift --threads 1 --busy 2

Writes benchmarks/results/speed_drift.md and .json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from benchmarks.pruned_speed import DEMO_BLOCKS
from benchmarks.search_speed import machine
from catalog.speed import speed_ratios
from tasks.export import export_model, load_checkpoint
from tasks.sources import resolve_model
from tasks.speed_stage import SpeedSettings, speed_stage
from tasks.surgery import remove_blocks

RESULTS = Path(__file__).resolve().parent / "results"
CONDITIONS = {"steady": None, "load rises at 1/4 of the runs": 0.25, "load rises at 1/2 of the runs": 0.5}
METHODS = {"one after the other": False, "in turn": True}


# Spins on a core while its parent lives, so a benchmark killed by any signal leaves no spinner behind.
_SPIN = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    pass\n"


class Load:
    """`count` processes that spin on a core each, started on demand and stopped at the end."""

    def __init__(self, count: int):
        self.count, self.procs = count, []

    def start(self) -> None:
        if not self.procs:
            self.procs = [subprocess.Popen([sys.executable, "-c", _SPIN]) for _ in range(self.count)]

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()
        self.procs = []


def measure(paths: dict[str, str], together: bool, rise_at: float | None, load: Load) -> dict:
    settings = SpeedSettings.quick()
    total = settings.runs(len(paths))

    def on_run(done: int, _total: int, _detail: str) -> None:
        if rise_at is not None and done == int(total * rise_at):
            load.start()

    started = time.perf_counter()
    try:
        rows = speed_stage(paths, "float32", "cpu", settings=settings, together=together, on_run=on_run)
    finally:
        load.stop()
    out = {"seconds": time.perf_counter() - started}
    values = {(r.stage, r.dataset, r.metric): r.value for r in rows}
    for (workload, metric), by_stage in speed_ratios(rows).items():
        ratio = by_stage["pruned"]
        out[metric.split("_")[0]] = {"median": ratio.median, "low": ratio.low, "high": ratio.high,
                                     "within_noise": ratio.within_noise, "text": ratio.text(), "workload": workload,
                                     "before": earlier_report(*(values[(stage, workload, m)] for stage in (
                                         "dense", "pruned") for m in (metric, f"{metric}_spread")))}
    return out


def earlier_report(dense: float, dense_spread: float, pruned: float, pruned_spread: float) -> str:
    """What the report said before this stage: the ratio of the two medians, or "within noise" when the ranges
    median x (1 +- spread / 2) overlap."""
    apart = (dense * (1 + dense_spread / 2) < pruned * (1 - pruned_spread / 2)
             or pruned * (1 + pruned_spread / 2) < dense * (1 - dense_spread / 2))
    return f"{pruned / dense:.2f}x" if apart else f"within noise ({pruned / dense:.2f}x)"


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = ["# Speed ratios under a change of load: one after the other against in turn", "",
             f"Produced by `python -m benchmarks.speed_drift --threads {report['threads']} --busy {report['busy']}` "
             "(module docstring). SmolLM2-135M, fp32, the pipeline's speed workloads, 5 rounds each. "
             "A ratio is the median of the per-round ratios [lowest-highest round]; *within noise* when they "
             "straddle 1.", "",
             f"Machine: {m['cpu_model']}, {m['cores_usable_by_process']} usable cores, torch threads "
             f"{report['threads']}, load average at start {m['load_average_1_5_15']} (other jobs share it).", "",
             "| pair | condition | timed | prefill ratio | decode ratio | earlier report: prefill | decode | seconds |",
             "|---|---|---|---|---|---|---|---:|"]
    for row in report["rows"]:
        lines.append(f"| {row['pair']} | {row['condition']} | {row['method']} | {row['prefill']['text']} | "
                     f"{row['decode']['text']} | {row['prefill']['before']} | {row['decode']['before']} | "
                     f"{row['seconds']:.0f} |")
    lines += ["", "*Earlier report*: how the report read the same rows before this release (the ratio of the two "
              "medians, within noise when the ranges median x (1 ± spread / 2) overlap); the evaluate stage then "
              "timed the models one after the other.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--busy", type=int, default=2, help="spinning processes started when the load rises")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    source = str(resolve_model("builtin:smollm2-135m").path)
    report = {"threads": args.threads, "busy": args.busy, "machine": machine(), "rows": []}
    load = Load(args.busy)
    with tempfile.TemporaryDirectory(prefix="speed-drift-") as tmp:
        pruned = Path(tmp) / "pruned"
        export_model(remove_blocks(load_checkpoint(source), list(DEMO_BLOCKS)), pruned, "remote_code")
        AutoTokenizer.from_pretrained(source).save_pretrained(pruned)
        pairs = {"dense against itself (true ratio 1)": {"dense": source, "pruned": source},
                 "8 attention removals against dense": {"dense": source, "pruned": str(pruned)}}
        for pair, paths in pairs.items():
            for condition, rise_at in CONDITIONS.items():
                for method, together in METHODS.items():
                    row = {"pair": pair, "condition": condition, "method": method,
                           **measure(paths, together, rise_at, load)}
                    print(row["pair"], "|", condition, "|", method, "|", row["prefill"]["text"], "|",
                          row["decode"]["text"], flush=True)
                    report["rows"].append(row)
                    write(report)  # after every row: a long run stopped early keeps what it measured
    print(markdown(report))
    return 0


def write(report: dict) -> None:
    (RESULTS / "speed_drift.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / "speed_drift.md").write_text(markdown(report))


if __name__ == "__main__":
    raise SystemExit(main())
