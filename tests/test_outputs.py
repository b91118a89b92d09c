"""Output-folder ownership: one pipeline per folder; no new run over an unfinished one."""

import pytest

from flows.outputs import OutputDirError, check_owner, claim


def test_unfinished_run_blocks_a_changed_spec_but_not_its_own_resume(tmp_path):
    out = tmp_path / "out"
    claim(out, "demo", identity="a", run_id="run-a")
    statuses = {"run-a": "running"}
    check_owner(out, "demo", "a", statuses.get)  # resuming with the same spec is fine
    with pytest.raises(OutputDirError, match="unfinished run run-a"):
        check_owner(out, "demo", "b", statuses.get)
    statuses["run-a"] = "failed"
    with pytest.raises(OutputDirError, match="resume it with its own spec"):
        check_owner(out, "demo", "b", statuses.get)
    statuses["run-a"] = "completed"
    check_owner(out, "demo", "b", statuses.get)  # a finished run leaves room for a new one


def test_folder_of_another_pipeline_or_foreign_files_is_refused(tmp_path):
    out = tmp_path / "out"
    claim(out, "demo", identity="a", run_id="run-a")
    with pytest.raises(OutputDirError, match="belongs to pipeline 'demo'"):
        check_owner(out, "other", "a", lambda run: None)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="not a pruneflow run folder"):
        check_owner(foreign, "demo", "a", lambda run: None)
    assert (foreign / "notes.txt").read_text() == "mine"
