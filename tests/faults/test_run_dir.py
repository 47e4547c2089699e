"""An unwritable or full run directory is an error before training starts, naming the directory,
the cause and what to do. Real file systems: small and read-only tmpfs mounts (needs root, as CI
has; skipped with the reason otherwise)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from itself.checkpoint import check_safe
from itself.filenames import latest_tag
from runs import REPO, run_train, small_run_args, train_env, wait_until


def assert_refused_before_training(run, *fragments):
    assert run.returncode == 2, run.stderr[-3000:]
    error = run.stderr.strip().splitlines()[-1]
    assert error.startswith("error: run_dir: ")
    for fragment in fragments:
        assert fragment in error
    assert "epoch 1" not in run.stdout + run.stderr  # no step was taken


def test_read_only_run_dir_is_an_error_before_training(small_dataset, mount):
    run_dir = mount("ro,size=4m") / "run"
    run = run_train(small_run_args(small_dataset) + [f"run_dir={run_dir}"], check=False)
    assert_refused_before_training(run, f"cannot write to {run_dir}", "Read-only file system", "choose a writable run_dir")


def test_full_run_dir_is_an_error_before_training(small_dataset, mount):
    run_dir = mount("size=8m") / "run"  # a checkpoint of the tiny test model is ~43 MiB
    run = run_train(small_run_args(small_dataset) + [f"run_dir={run_dir}"], check=False)
    assert_refused_before_training(run, f"{run_dir} has", "MiB free, but this run needs about",
                                   "train.keep_last=2", "lower train.keep_last")
    assert not (run_dir / "checkpoints").exists()


def test_disk_already_full_is_an_error_before_training(small_dataset, mount):
    point = mount("size=1m")
    (point / "filler").write_bytes(b"\0" * ((1 << 20) - 8192))  # leaves less than the 64 KiB probe
    run = run_train(small_run_args(small_dataset) + [f"run_dir={point / 'run'}"], check=False)
    assert_refused_before_training(run, "No space left on device")


def test_a_file_in_the_way_of_the_run_dir_is_an_error(small_dataset, tmp_path):
    (tmp_path / "taken").write_text("")
    run = run_train(small_run_args(small_dataset) + [f"run_dir={tmp_path / 'taken' / 'run'}"], check=False)
    assert_refused_before_training(run, "cannot write to", "Not a directory")


@pytest.mark.slow
def test_disk_filling_up_mid_run_fails_loudly_and_the_run_resumes_once_there_is_room(small_dataset, mount):
    run_dir = mount("size=160m") / "run"  # room for keep_last=1 + 2 checkpoints of ~43 MiB and model.pt
    args = small_run_args(small_dataset) + [f"run_dir={run_dir}", "train.checkpoint_every=2", "train.keep_last=1"]
    proc = subprocess.Popen([sys.executable, "itself/train.py", *args], cwd=REPO, env=train_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    filler = run_dir.parent / "filler"
    try:
        first = run_dir / "checkpoints" / "step00000002" / "COMPLETE"
        wait_until(lambda: first.exists() or proc.poll() is not None, 300, "the first checkpoint")
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        with open(filler, "wb") as f:  # another job fills the disk
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
                    f.flush()
            except OSError:
                pass
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode != 0 and "No space left on device" in err
    assert "to continue, rerun the same command with" in err and "train.resume=latest" in err
    tag = latest_tag(run_dir / "checkpoints")
    assert tag is not None and not (run_dir / "results.json").exists()
    check_safe(run_dir / "checkpoints" / tag)  # the last complete checkpoint is whole
    filler.unlink()
    run_train(args + ["train.resume=latest"])
    assert f"resumed from {run_dir / 'checkpoints' / tag}" in (run_dir / "train.log").read_text()
    assert (run_dir / "results.json").exists()


# ----------------------------------------------------------------------------------- planted links


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")


@needs_root
@pytest.mark.parametrize("name", ["train.log", "metrics.jsonl", "config.yaml", "results.json", "checkpoints",
                                  "checkpoints/step00000016", "tensorboard/events.out.tfevents", ".", "tensorboard"])
def test_a_run_folder_someone_else_made_or_planted_in_is_refused_and_nothing_touched(small_dataset, tmp_path, name):
    # A run may run as root, in a folder another user could write (a shared runs/, a predictable
    # timestamped name): a link they planted at a name the run writes would have it append to,
    # replace or delete whatever the link points at; a folder of theirs could get one later.
    victim, run_dir = tmp_path / "victim", tmp_path / "run"
    victim.write_text("precious\n")
    target = run_dir / name
    if name in (".", "tensorboard"):  # their folder
        target.mkdir(parents=True)
    else:  # their link
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(victim)
    os.lchown(target, 65534, 65534)
    run = run_train(small_run_args(small_dataset, "train.max_steps=1", f"run_dir={run_dir}"), check=False)
    assert_refused_before_training(run, "belongs to uid 65534, not to you (uid 0)")
    assert victim.read_text() == "precious\n"


def test_a_run_folder_anyone_can_write_is_refused_and_ones_own_links_are_followed(tmp_path):
    from itself.rundir import RunDir
    from itself.safeio import UnsafePath

    run = RunDir(tmp_path / "run")
    (tmp_path / "scratch").mkdir()
    run.path.mkdir()
    (run.path / "checkpoints").symlink_to(tmp_path / "scratch")  # (checkpoints on a bigger disk)
    run.check_owned()
    os.chmod(tmp_path / "scratch", 0o777)
    with pytest.raises(UnsafePath, match="checkpoints is writable by anyone.*chmod o-w"):
        run.check_owned()


def test_the_write_probe_and_the_failure_note_never_follow_a_link(tmp_path):
    from itself.resume import report_failure
    from itself.rundir import RunDir

    victim, run = tmp_path / "victim", RunDir(tmp_path / "run")
    victim.write_text("precious\n")
    run.path.mkdir()
    (run.path / f".write-test-{os.getpid()}").symlink_to(victim)  # (the probe's name was predictable)
    (run.path / "train.log").symlink_to(victim)
    assert run.unwritable() is None
    report_failure(RuntimeError("boom"), 0, run, "at step 3")  # (its note goes to train.log)
    assert victim.read_text() == "precious\n"


def test_a_link_planted_at_the_synthetic_sets_build_lock_is_not_followed(tmp_path):
    from itself.data.sources import ensure_dataset
    from itself.errors import DataError

    victim, root = tmp_path / "victim", tmp_path / "shared" / "synthetic"
    victim.write_text("precious\n")
    root.parent.mkdir()
    (root.parent / "synthetic.lock").symlink_to(victim)
    with pytest.raises(DataError, match="synthetic.lock: it is a symbolic link"):
        ensure_dataset(root, build_synthetic=True)
    assert victim.read_text() == "precious\n" and not root.exists()


def test_a_folder_in_place_of_the_run_log_is_one_error_line(small_dataset, tmp_path):
    (tmp_path / "run" / "train.log").mkdir(parents=True)
    run = run_train(small_run_args(small_dataset, "train.max_steps=1", f"run_dir={tmp_path / 'run'}"), check=False)
    assert_refused_before_training(run, f"cannot write {tmp_path / 'run' / 'train.log'}: Is a directory")
    assert "Traceback" not in run.stderr
