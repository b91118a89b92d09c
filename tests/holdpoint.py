"""A test hook loaded as a plugin (`PRUNEFLOW_PLUGINS=tests.holdpoint`), so a test can stop a `pruneflow run`
in the middle of its search stage: while the file named by `PRUNEFLOW_TEST_HOLD` exists, the run holds
right after committing its second candidate score, having created that file's `.reached` sibling."""

from __future__ import annotations

import os
import time
from pathlib import Path

import flows.recorder

HOLD_AFTER = 2  # committed scores before the hold: what a resumed run must reuse

_hold = os.environ.get("PRUNEFLOW_TEST_HOLD")
if _hold:
    _record_score = flows.recorder.CatalogRecorder.record_score
    _committed = [0]

    def _record_then_hold(self, step, score) -> None:
        _record_score(self, step, score)
        _committed[0] += 1
        hold = Path(_hold)
        if _committed[0] == HOLD_AFTER and hold.exists():
            hold.with_suffix(".reached").touch()
            while hold.exists():
                time.sleep(0.05)

    flows.recorder.CatalogRecorder.record_score = _record_then_hold
