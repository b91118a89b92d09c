"""Concurrent runs, full disks and wall time: a second process is refused naming the first; a disk too small
is refused before anything is written, and one that fills during a checkpoint write fails the run with
the reason, leaves no temporary folder, and resumes once space is freed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import pytest

from flows.cli import main
from tests.flowkit import tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def test_a_second_process_on_the_same_folder_is_refused_naming_the_first(tmp_path, capsys):
    pipeline = tiny_pipeline(tmp_path)
    out = tmp_path / "out" / "tiny"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from pathlib import Path
            from flows.locks import exclusive, folder_lock
            with exclusive(folder_lock(Path({str(out)!r})), "output_dir"):
                print("held", flush=True)
                time.sleep(600)
            """)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["run", str(pipeline)]) == 2
        err = capsys.readouterr().err
        assert f"output_dir {out} is in use by process {holder.pid}" in err, err
        assert not (tmp_path / "out" / "catalog.duckdb").exists() or _runs(tmp_path) == []
    finally:
        holder.kill()
        holder.wait()


def _runs(root: Path) -> list[tuple]:
    with duckdb.connect(str(root / "out" / "catalog.duckdb"), read_only=True) as conn:
        return conn.execute("select status, summary_json from runs").fetchall()


@pytest.fixture
def small_disk(tmp_path):
    """A real 40 MB file system (tmpfs), where this machine lets the tests mount one."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_disk_without_room_for_a_checkpoint_is_refused_before_anything_is_written(tmp_path, small_disk, capsys):
    pipeline = tiny_pipeline(tmp_path)
    (small_disk / "filler").write_bytes(b"\0" * 20_000_000)
    assert main(["run", str(pipeline), "--set", f"output_dir={small_disk / 'tiny'}"]) == 2
    err = capsys.readouterr().err
    assert "output_dir" in err and "MB free" in err, err
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


@pytest.mark.integration
def test_a_disk_that_fills_during_a_checkpoint_write_fails_the_run_and_resumes_when_freed(tmp_path, small_disk):
    pipeline = tiny_pipeline(tmp_path, output_dir=str(small_disk / "tiny"))
    # Fills the disk as the prune stage starts (after preflight), leaving less than the checkpoint needs.
    script = textwrap.dedent(f"""
        import shutil, sys
        import flows.stages
        from flows.cli import main
        original = flows.stages.prune_stage
        def fill_then_prune(*args, **kwargs):
            free = shutil.disk_usage({str(small_disk)!r}).free
            with open({str(small_disk / 'filler')!r}, "wb") as f:
                f.write(b"\\0" * (free - 64_000))
            return original(*args, **kwargs)
        flows.stages.prune_stage = fill_then_prune
        sys.exit(main(["run", sys.argv[1]]))
        """)
    full = subprocess.run([sys.executable, "-c", script, str(pipeline)], capture_output=True, text=True, env=ENV,
                          timeout=600)
    assert full.returncode == 2, full.stderr[-3000:]
    assert "no space left" in full.stderr and "Traceback" not in full.stderr, full.stderr[-3000:]
    ((status, summary),) = _runs(tmp_path)
    assert status == "failed" and "DiskFull" in summary
    assert not list(small_disk.rglob("*.tmp*"))
    (small_disk / "filler").unlink()
    again = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(pipeline)], capture_output=True, text=True,
                           env=ENV, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _runs(tmp_path)[0][0] == "completed"
