"""Calibration mixtures: `calibration.dataset` as a list of weighted sources."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.calibrate import CalibrationSpec, calibration_windows
from tasks.sources.mixture import WeightedSource, apportion
from tests.flowkit import tiny_pipeline
from tests.tiny import CHARS, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _corpus(path: Path, letters: str, seed: int) -> str:
    import random

    rng = random.Random(seed)
    docs = [" ".join("".join(rng.choice(letters) for _ in range(4)) for _ in range(50)) for _ in range(20)]
    path.write_text("\n\n".join(docs))
    return str(path)


@pytest.mark.parametrize("total, weights, shares", [(8, [3, 1], [6, 2]), (7, [1, 1], [4, 3]), (10, [1, 1, 1], [4, 3, 3]),
                                                    (5, [0.2, 0.7, 0.1], [1, 4, 0])])
def test_apportion_shares_by_largest_remainder(total, weights, shares):
    assert apportion(total, weights) == shares


def test_a_mixture_draws_each_source_in_proportion_and_mixes_the_order(tmp_path):
    a = _corpus(tmp_path / "a.txt", "abcde", 0)
    b = _corpus(tmp_path / "b.txt", "vwxyz", 1)
    spec = CalibrationSpec(dataset=(WeightedSource(source=a, weight=3), WeightedSource(source=b, weight=1)),
                           samples=8, seq_len=16, seed=0)
    windows = calibration_windows(spec, tiny_tokenizer())
    from_a = [bool(set(w.tolist()) & {CHARS.index(c) + 1 for c in "abcde"}) for w in windows]
    assert windows.shape == (8, 16) and sum(from_a) == 6
    assert from_a != sorted(from_a, reverse=True)  # shuffled together, not six of a then two of b
    again = calibration_windows(spec, tiny_tokenizer())
    assert (again == windows).all()
    # One source as a one-entry mixture gives exactly the plain spec's windows.
    plain = calibration_windows(CalibrationSpec(dataset=a, samples=8, seq_len=16, seed=0), tiny_tokenizer())
    single = calibration_windows(CalibrationSpec(dataset=(WeightedSource(source=a),), samples=8, seq_len=16, seed=0),
                                 tiny_tokenizer())
    assert (plain == single).all()


def test_bad_mixtures_are_refused_by_the_command_line(tmp_path):
    pipeline = tiny_pipeline(tmp_path)
    spec = yaml.safe_load(pipeline.read_text())
    spec["calibration"]["dataset"] = [{"source": spec["calibration"]["dataset"], "weight": 0}]
    pipeline.write_text(yaml.safe_dump(spec))
    done = subprocess.run([sys.executable, "-m", "flows.cli", "validate", str(pipeline)], capture_output=True,
                          text=True, cwd=ROOT, env=os.environ, stdin=subprocess.DEVNULL, timeout=300)
    assert done.returncode == 2 and "calibration.dataset" in done.stderr and "weight" in done.stderr
    assert "Traceback" not in done.stderr
