"""`tune/search.py` refuses what it cannot use before Ray starts: one `error: ...` line on stderr,
exit 2, no traceback, nothing created (no storage or experiment folder, no dataset, no Ray
session). Tests run as root, which permission bits do not stop: the unwritable storage paths are
ones no user can create folders in (under a regular file, under /proc, on a read-only mount)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from runs import REPO, run_main, train_env


def _files(root: Path) -> list[Path]:
    return sorted(root.rglob("*"))


def search(tmp_path: Path, *args: str, process: bool = False) -> subprocess.CompletedProcess:
    """The search with a dataset root and Ray temp folder of its own (neither may appear): its `main`
    run by this process, or (`process`) the script as a user starts it."""
    args = [*args, f"data.root={tmp_path / 'data'}"]
    env = train_env(RAY_TMPDIR=str(tmp_path / "ray"), RAY_USAGE_STATS_ENABLED="0")
    if not process:
        from tune.search import main

        return run_main(main, args, env=env)
    return subprocess.run([sys.executable, "tune/search.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


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


@pytest.mark.slow
def test_a_storage_path_under_a_regular_file_is_refused_before_ray_starts(tmp_path, a_file):
    before = _files(tmp_path)
    run = search(tmp_path, "--storage-path", str(a_file / "tune"), "--name", "x", process=True)
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


def test_an_address_where_nothing_listens_is_refused_at_once(tmp_path):
    import socket
    import time

    with socket.socket() as s:  # a port nothing listens on (bound, never listening, closed)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    run = search(tmp_path, "--address", f"127.0.0.1:{port}", "--storage-path", str(tmp_path / "tune"))
    assert_refused(run, f"error: no Ray cluster answers at 127.0.0.1:{port} within 10 s", "ray start --head")
    assert time.monotonic() - started < 120  # (Ray's own client waited for minutes; most of this is imports)
    assert _files(tmp_path) == []
    assert_refused(search(tmp_path, "--address", "headnode"), "error: --address: expected HOST:PORT")


def _experiment(tmp_path: Path) -> Path:
    """An experiment folder as a search leaves it (its settings and base config), from the real types."""
    from itself.config import config_yaml
    from itself.presets import resolve_config
    from tune.folders import ExperimentDir
    from tune.settings import SearchSettings

    exp = ExperimentDir(tmp_path / "tune" / "x")
    exp.path.mkdir(parents=True)
    settings = SearchSettings(metric="val_R1", searcher="optuna", num_samples=2, searcher_seed=0,
                              searched=["p_start", "p_end", "discard_ratio"], seeds=[0], confirm_top=0,
                              confirm_seeds=[1, 2], gpus_per_trial=0, cpus_per_trial=1, max_failures=2,
                              reduction_factor=2, max_evaluations=8, grace_period=3, derived_grace_period=3,
                              steps_per_epoch=20, signal_onset_epochs=3.0, val_chance_R1=2.5, val_queries=320,
                              signal_floor_R1=5.12)
    exp.file(ExperimentDir.BASE_CONFIG).write_text(config_yaml(resolve_config("synthetic", None, [])))
    exp.file(ExperimentDir.SETTINGS).write_text(settings.to_json())
    return exp.path


def test_a_second_search_into_a_running_experiment_is_refused_naming_it(tmp_path):
    import os

    from tune.folders import ExperimentDir

    path = _experiment(tmp_path)
    running = ExperimentDir(path)
    running.lock()  # this test process is the search running there
    try:
        run = search(tmp_path, "--resume", "--name", "x", "--storage-path", str(tmp_path / "tune"))
        assert_refused(run, f"error: the search experiment {path} is in use by another process (pid {os.getpid()} ",
                       "wait for it to finish")
        assert not (tmp_path / "ray").exists()  # refused before Ray started
        run = search(tmp_path, "--name", "x", "--storage-path", str(tmp_path / "tune"))  # a new search into it
        assert_refused(run, f"--name: {path} already holds an experiment; pass --resume to continue it")
    finally:
        running.unlock()


@pytest.mark.parametrize("damage, message", [
    ("settings", "search.json: not the settings of a search"),
    ("base", "base_config.yaml: not the base config this search wrote"),
])
def test_a_damaged_experiment_is_one_error_line_on_resume(tmp_path, damage, message):
    from tune.folders import ExperimentDir

    path = _experiment(tmp_path)
    name = ExperimentDir.SETTINGS if damage == "settings" else ExperimentDir.BASE_CONFIG
    (path / name).write_text("{truncated" if damage == "settings" else "train: [unclosed\n")
    run = search(tmp_path, "--resume", "--name", "x", "--storage-path", str(tmp_path / "tune"))
    assert_refused(run, message, "start a new search")
    assert not (tmp_path / "ray").exists()


def test_unreadable_config_files_are_one_error_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json\n")
    storage = ["--storage-path", str(tmp_path / "tune")]
    assert_refused(search(tmp_path, *storage, "--config", "/dev/zero"), "error: --config: /dev/zero is not a regular file")
    assert_refused(search(tmp_path, *storage, f"train.deepspeed={bad}"), f"error: train.deepspeed: {bad} is not valid JSON")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]


@pytest.mark.parametrize("how", ["another user's", "writable by anyone"])
def test_resume_never_unpickles_an_experiment_someone_else_wrote_or_could_change(tmp_path, how):
    # --resume has Ray unpickle tuner.pkl (and the rest of its state): code, if someone else wrote it.
    import os
    import pickle

    from runs import RunsCode

    path, marker = _experiment(tmp_path), tmp_path / "code-ran"
    (path / "tuner.pkl").write_bytes(pickle.dumps(RunsCode(marker)))
    if how == "another user's":
        if os.geteuid() != 0:
            pytest.skip("giving a file to another user needs root")
        os.chown(path / "tuner.pkl", 65534, 65534)
        message = f"{path / 'tuner.pkl'} belongs to uid 65534, not to you (uid 0)"
    else:
        os.chmod(path / "tuner.pkl", 0o666)
        message = f"{path / 'tuner.pkl'} is writable by anyone"
    run = search(tmp_path, "--resume", "--name", "x", "--storage-path", str(tmp_path / "tune"))
    assert_refused(run, f"error: --resume: {message}", "unpickles the experiment's state, which runs code")
    assert not marker.exists() and not (tmp_path / "ray").exists()


@pytest.mark.parametrize("how", ["another user's", "writable by anyone", "another user's link"])
def test_a_new_search_never_writes_into_a_folder_someone_else_made_or_could_change(tmp_path, how):
    # An empty folder at --name (a predictable search-<preset>-<time> in a shared storage path): its
    # maker could plant links at the names the search then writes (as root, through them).
    import os

    storage = tmp_path / "tune"
    folder = storage / "x"
    if how == "another user's link":
        (tmp_path / "mine").mkdir()
        storage.mkdir()
        folder.symlink_to(tmp_path / "mine")
    else:
        folder.mkdir(parents=True)
    if how == "writable by anyone":
        os.chmod(folder, 0o777)
        message = f"{folder} is writable by anyone"
    else:
        if os.geteuid() != 0:
            pytest.skip("giving a file to another user needs root")
        os.chown(folder, 65534, 65534, follow_symlinks=False)
        message = f"{folder} belongs to uid 65534, not to you (uid 0)"
    run = search(tmp_path, "--name", "x", "--storage-path", str(storage))
    assert_refused(run, f"error: --name: {message}: a new search writes its settings")
    assert [p.name for p in folder.iterdir()] == [] and not (tmp_path / "data").exists()
