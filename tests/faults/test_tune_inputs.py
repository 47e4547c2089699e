"""`tune/search.py` refuses what it cannot use before Ray starts: one `error: ...` line on stderr,
exit 2, no traceback, nothing created (no storage or experiment folder, no dataset, no Ray
session). Tests run as root, which permission bits do not stop: the unwritable storage paths are
ones no user can create folders in (under a regular file, under /proc, on a read-only mount)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from runs import REPO, train_env


def _files(root: Path) -> list[Path]:
    return sorted(root.rglob("*"))


def search(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """The search with a dataset root and Ray temp folder of its own (neither may appear)."""
    return subprocess.run([sys.executable, "tune/search.py", *args, f"data.root={tmp_path / 'data'}"], cwd=REPO,
                          env=train_env(RAY_TMPDIR=str(tmp_path / "ray"), RAY_USAGE_STATS_ENABLED="0"),
                          capture_output=True, text=True, timeout=300)


def assert_refused(run: subprocess.CompletedProcess, *fragments: str) -> None:
    out = run.stdout + run.stderr
    assert run.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith(("error:", "tune/search.py: error:"))]
    assert len(errors) == 1, run.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "a_file"
    path.write_text("not a folder\n")
    return path


def test_a_storage_path_under_a_regular_file_is_refused_before_ray_starts(tmp_path, a_file):
    before = _files(tmp_path)
    run = search(tmp_path, "--storage-path", str(a_file / "tune"), "--name", "x")
    assert_refused(run, "error: --storage-path: ", f"{a_file / 'tune'} cannot be created: {a_file} is a file")
    assert _files(tmp_path) == before and a_file.read_text() == "not a folder\n"  # no data, no ray/ folder


def test_a_storage_path_that_is_a_regular_file_is_refused(tmp_path, a_file):
    before = _files(tmp_path)
    assert_refused(search(tmp_path, "--storage-path", str(a_file)), f"--storage-path: {a_file} is a file, not a folder")
    assert _files(tmp_path) == before
    # the same for --resume, and for an experiment name that is a file in the storage folder
    assert_refused(search(tmp_path, "--resume", "--storage-path", str(a_file / "t")), f"{a_file} is a file")
    assert_refused(search(tmp_path, "--storage-path", str(tmp_path), "--name", a_file.name),
                   f"--name: {a_file} is a file, not an experiment folder")
    assert _files(tmp_path) == before


def test_a_storage_path_no_one_can_create_folders_in_is_refused(tmp_path):
    target = Path("/proc") / f"itself-tune-{tmp_path.name}"
    assert_refused(search(tmp_path, "--storage-path", str(target)),
                   f"--storage-path: cannot create folders in /proc (where {target} would be created)")
    assert not target.exists() and _files(tmp_path) == []


def test_a_read_only_storage_folder_is_refused(tmp_path, mount):
    ro = mount("ro,size=1m")
    run = search(tmp_path, "--storage-path", str(ro / "tune"))
    assert_refused(run, f"--storage-path: cannot create folders in {ro} (where {ro / 'tune'} would be "
                        "created): Read-only file system")
    assert _files(ro) == [] and _files(tmp_path) == [ro]


@pytest.mark.parametrize("args, message", [
    (["--num-samples", "0"], "error: --num-samples must be >= 1, got 0"),
    (["--bogus"], "error: unrecognized arguments: --bogus"),
    (["--name", "../elsewhere"], "error: --name: must be one folder name (no '/', not '.' or '..'), got '../elsewhere'"),
    (["--storage-path="], "error: --storage-path: must be a folder, got ''"),
])
def test_bad_arguments_are_one_error_line(tmp_path, args, message):
    storage = tmp_path / "tune"
    run = search(tmp_path, *([] if args == ["--storage-path="] else ["--storage-path", str(storage)]), *args)
    assert_refused(run, message)
    assert _files(tmp_path) == []
