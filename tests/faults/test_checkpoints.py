"""Checkpoints survive a kill mid-write, and nothing we load can run code: checkpoints, exported
models and pretrained weights are read with torch.load(weights_only=True) (or as TorchScript)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from itself.checkpoint import check_safe
from itself.filenames import latest_tag, tag_for
from itself.model.export import load_exported
from itself.safeio import UnsafeCheckpointError
from itself.model.backbone import build_clip
from runs import REPO, RunsCode, run_train, small_run_args, train_env

# Run itself/train.py with torch.save patched to write half of the model-state file of one
# checkpoint and then SIGKILL the process: a real kill, at a known point of a checkpoint write.
KILL_DURING_SAVE = """
import io, os, signal, sys
from pathlib import Path
import torch

target, real_save = sys.argv[1], torch.save

def save(obj, f, *args, **kwargs):
    path = Path(f) if isinstance(f, (str, os.PathLike)) else None
    if path is not None and path.parent.name == target and path.name.endswith("model_states.pt"):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        with open(path, "wb") as out:
            out.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            out.flush()
            os.fsync(out.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)

torch.save = save
sys.argv = ["itself/train.py", *sys.argv[2:]]
from itself.train import main
raise SystemExit(main())
"""


@pytest.mark.slow
def test_kill_while_writing_a_checkpoint_keeps_the_previous_one_and_resume_uses_it(small_dataset, small_run, tmp_path):
    run_dir = tmp_path / "run"
    args = small_run_args(small_dataset) + [f"run_dir={run_dir}", "train.checkpoint_every=2"]
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, "step00000004", *args], cwd=REPO,
                            env=train_env(), capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "step00000004").is_dir() and not (ckpts / "step00000004" / "COMPLETE").exists()
    assert (ckpts / "latest").read_text() == "step00000002" and latest_tag(ckpts) == "step00000002"
    check_safe(ckpts / "step00000002")  # intact: every file of it loads

    resume = run_train(args + ["train.resume=latest"])
    log = (run_dir / "train.log").read_text()
    assert f"ignoring incomplete checkpoint {ckpts / 'step00000004'}" in log
    assert f"resumed from {ckpts / 'step00000002'}: epoch 1, step 2" in log
    assert "Traceback" not in resume.stderr
    # The partial folder was replaced by a complete checkpoint of the same step, and the run ends
    # where an uninterrupted one does (exact resume: float noise only).
    assert (ckpts / "step00000004").exists() is False or (ckpts / "step00000004" / "COMPLETE").exists()
    want, got = (json.loads((r / "results.json").read_text()) for r in (small_run, run_dir))
    for branch, metrics in want["test"].items():
        for name, value in metrics.items():
            assert got["test"][branch][name] == pytest.approx(value, abs=1e-6), (branch, name)


def test_every_file_a_run_writes_loads_with_weights_only(small_run):
    files = sorted(small_run.rglob("*.pt"))
    assert small_run / "model.pt" in files and len(files) >= 3
    for path in files:
        torch.load(path, weights_only=True)


def test_checkpoint_holding_code_is_refused_at_resume(small_run, tmp_path, small_dataset):
    run_dir = tmp_path / "run"
    shutil.copytree(small_run, run_dir)
    marker = tmp_path / "code-ran"
    tag = latest_tag(run_dir / "checkpoints")
    torch.save({"module": RunsCode(marker)}, run_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt")
    run = run_train(small_run_args(small_dataset) + [f"run_dir={run_dir}", "train.resume=latest"], check=False)
    assert run.returncode != 0 and "UnsafeCheckpointError" in run.stderr and "refused" in run.stderr
    assert "posix.system" in run.stderr  # says what it found
    assert not marker.exists()


def test_a_link_to_a_folder_inside_a_checkpoint_is_refused(tmp_path):
    # The check walks the folder without entering linked folders; DeepSpeed's loader would open
    # `zero/<param>/fp32.pt` through one (a universal checkpoint's layout) and unpickle it.
    marker, elsewhere, folder = tmp_path / "code-ran", tmp_path / "elsewhere", tmp_path / "ckpt"
    (elsewhere / "weight").mkdir(parents=True)
    torch.save({"param": RunsCode(marker)}, elsewhere / "weight" / "fp32.pt")
    folder.mkdir()
    torch.save({"module": {}}, folder / "mp_rank_00_model_states.pt")
    (folder / "zero").symlink_to(elsewhere)
    with pytest.raises(UnsafeCheckpointError, match="zero is a link to a folder"):
        check_safe(folder)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["COMPLETE", "mp_rank_00_model_states.pt"])
def test_a_fifo_in_a_checkpoint_is_refused_without_waiting_on_it(small_run, tmp_path, name):
    # Reading a FIFO blocks until someone writes to it: a hostile checkpoint could hang a resume.
    import threading

    from itself.checkpoint import verify_files

    folder = tmp_path / "ckpt"
    shutil.copytree(small_run / "checkpoints" / latest_tag(small_run / "checkpoints"), folder)
    (folder / name).unlink()
    os.mkfifo(folder / name)
    errors = []

    def check():
        try:
            check_safe(folder)
            verify_files(folder)
        except Exception as e:  # noqa: BLE001 - recorded for the assertion
            errors.append(e)

    worker = threading.Thread(target=check, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), f"blocked on the FIFO {name}"
    assert len(errors) == 1 and name in str(errors[0]), errors


def test_exported_model_holding_code_is_refused(tmp_path):
    marker, path = tmp_path / "code-ran", tmp_path / "model.pt"
    torch.save({"format": "itself-model/1", "state_dict": RunsCode(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        load_exported(path)
    assert not marker.exists()


def test_pretrained_weights_holding_code_are_refused(tmp_path):
    marker, path = tmp_path / "code-ran", tmp_path / "clip.pt"
    torch.save({"state_dict": RunsCode(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        build_clip("tiny", (32, 32), pretrained=str(path))
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")
def test_torchscript_weights_load_without_unpickling(tmp_path):
    # OpenAI's released CLIP files are TorchScript archives: read through torch.jit, not pickle.
    torch.manual_seed(0)
    square = build_clip("tiny", (32, 32))

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual, self.transformer = square.visual, square.transformer

        def forward(self, x):
            return x

    path = tmp_path / "clip-jit.pt"
    torch.jit.save(torch.jit.script(Holder()), path)
    with pytest.raises(ValueError, match="missing"):  # read fine; a partial model is then reported
        build_clip("tiny", (32, 32), pretrained=str(path))


# ------------------------------------------------------------------------------ what a resume continues


def _resumable_copy(small_run, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(small_run, run_dir)
    return run_dir


def test_a_model_of_another_shape_is_refused_before_anything_is_written(small_run, tmp_path, small_dataset):
    run_dir = _resumable_copy(small_run, tmp_path)
    before = (run_dir / "config.yaml").read_bytes()
    run = run_train(small_run_args(small_dataset, f"run_dir={run_dir}", "train.resume=latest", "model.grab_dim=64"),
                    check=False)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert "holds a model of another shape" in run.stderr and "model.grab_dim: 32 -> 64" in run.stderr
    assert (run_dir / "config.yaml").read_bytes() == before  # the run is left as it was


def test_a_resume_on_other_data_is_refused(small_run, tmp_path, small_dataset):
    import shards
    from runs import SMALL, SMALL_SHARD_SAMPLES

    other = tmp_path / "other"  # the same sizes and identity count, other images
    shards.build_synthetic(other, SMALL.__class__(**{**SMALL.__dict__, "seed": 5}), max_samples=SMALL_SHARD_SAMPLES,
                           progress=False)
    run_dir = _resumable_copy(small_run, tmp_path)
    run = run_train(small_run_args(other, f"run_dir={run_dir}", "train.resume=latest"), check=False)
    assert run.returncode == 2 and "was trained on other data than data.root" in run.stderr, run.stderr[-2000:]


def test_a_latest_pointer_leaving_the_run_is_reported_and_not_followed(small_run, tmp_path, caplog):
    run_dir = _resumable_copy(small_run, tmp_path)
    (tmp_path / "step99999999").mkdir()
    (tmp_path / "step99999999" / "COMPLETE").write_text("")
    latest = run_dir / "checkpoints" / "latest"
    latest.write_text("../../step99999999")
    assert latest_tag(run_dir / "checkpoints") == tag_for(16)  # the newest complete one of the run
    assert f"{latest} names something else, not a complete checkpoint of this run: ignored" in caplog.text
    latest.unlink()
    (tmp_path / "pointer").write_text(tag_for(8))  # a link to a file that names a real checkpoint
    latest.symlink_to(tmp_path / "pointer")
    assert latest_tag(run_dir / "checkpoints") == tag_for(16)
    assert caplog.text.count("ignored; taking the newest complete one (step00000016)") == 2


def test_a_truncated_file_in_a_complete_checkpoint_names_it_and_the_previous_checkpoint(small_run, tmp_path,
                                                                                        small_dataset):
    run_dir = _resumable_copy(small_run, tmp_path)
    damaged = run_dir / "checkpoints" / tag_for(16) / "mp_rank_00_model_states.pt"
    size = damaged.stat().st_size
    with open(damaged, "r+b") as f:
        f.truncate(size // 3)
    run = run_train(small_run_args(small_dataset, f"run_dir={run_dir}", "train.resume=latest"), check=False)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert "mp_rank_00_model_states.pt" in run.stderr and ("cannot be read" in run.stderr or
                                                              f"of its {size} bytes" in run.stderr)
    previous = run_dir / "checkpoints" / tag_for(8)
    assert f"continue from the previous complete checkpoint with train.resume={previous}" in run.stderr
    run_train(small_run_args(small_dataset, f"run_dir={run_dir}", f"train.resume={previous}"))  # ... and it works
