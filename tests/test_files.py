"""snapens.files: atomic writes name their temporary files after their process, and a tool's next start sweeps
those a killed process left (never a running one's, never anything else); places checked writable up front."""

import os
import subprocess
import sys

import pytest

from snapens.errors import SnapensError
from snapens.files import HOST, LEFTOVER, check_writable, partial_name, sweep_leftovers, write_atomic

from conftest import says


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_killed_writers_temporary_files_are_swept_and_no_one_elses(tmp_path, monkeypatch):
    gone, alive = dead_pid(), os.getpid()
    leftovers = [tmp_path / f".ensemble.json.snapens-{HOST}-{gone}.k3x9_q.tmp",
                 tmp_path / f".ensemble.snapens-{HOST}-{gone}.partial.pt2"]
    running = [tmp_path / f".ensemble.json.snapens-{HOST}-{alive}.abc123.tmp",
               tmp_path / f".ensemble.snapens-{HOST}-{alive}.partial.pt2"]
    others = [tmp_path / ".hidden", tmp_path / "ensemble.json", tmp_path / ".notes.tmp", tmp_path / ".lock",
              tmp_path / f".ensemble.json.snapens-elsewhere-{gone}.k3x9_q.tmp",  # another machine's, on shared disk
              tmp_path / f".cache.{gone}.k3x9_q.tmp", tmp_path / f".model.{gone}.partial.bin"]  # not snapens's
    for path in leftovers + running + others:
        path.write_bytes(b"x")
    assert sorted(sweep_leftovers(tmp_path)) == sorted(leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in running + others)
    assert sweep_leftovers(tmp_path / "absent") == []


def test_the_temporary_names_are_the_ones_swept(tmp_path, monkeypatch):
    assert LEFTOVER.match(partial_name(tmp_path / "out.pt2", ".pt2").name)
    names = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (names.append(os.path.basename(a)), real(a, b)))
    write_atomic(tmp_path / "results.json", b"{}")
    assert len(names) == 1 and LEFTOVER.match(names[0]) and f".snapens-{HOST}-{os.getpid()}." in names[0]


def test_check_writable_finds_the_nearest_folder(tmp_path):
    check_writable(tmp_path / "new" / "deeper" / "out.pt2", "out=")  # made later, under a writable folder
    (tmp_path / "file").write_text("x")
    check_writable(tmp_path / "file", "out=")  # replaced: its folder must be writable
    with pytest.raises(SnapensError) as info:
        check_writable(tmp_path / "file" / "x", "out=")
    says(info.value, f"cannot write {tmp_path}/file/x", "is a file, not a folder")
    if os.access("/proc/1", os.W_OK):
        pytest.skip("root may write anywhere here")
    with pytest.raises(SnapensError) as info:
        check_writable("/proc/1/x", "out=")
    says(info.value, "cannot write /proc/1/x", "pass a writable out=")
