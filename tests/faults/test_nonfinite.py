"""A non-finite loss or gradient never reaches the weights: the step is skipped and counted
(train.nonfinite=skip), or training stops with a message and a checkpoint (stop, or too many
skips in a row). Both DeepSpeed's own overflow skip (ZeRO >= 1, bf16) and ours (ZeRO-0 fp32)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess

import pytest
import torch

from itself.filenames import tag_for
from itself.dist import free_port
from nan_injection import nan_at
from runs import REPO, small_run_args, train_env, train_in_process


def run_with_nan(steps: str, kind: str, args: list[str], rank: str = "all",
                 launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """`itself/train.py ARGS` with the model's forward going non-finite at `steps` (tests/nan_injection.py):
    in this process, or under `launcher` (ranks of their own)."""
    if launcher is None:
        with nan_at(steps, kind, rank):
            return train_in_process(args)
    return subprocess.run([*launcher, str(REPO / "tests" / "nan_injection.py"), steps, kind, rank, *args], cwd=REPO,
                          env=train_env(PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=600)


def weights(run_dir, step: int) -> dict:
    path = run_dir / "checkpoints" / tag_for(step) / "mp_rank_00_model_states.pt"
    return torch.load(path, weights_only=True)["module"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_went_on_finite(run_dir) -> None:
    """After its skipped step the run trained on with finite losses and exported a finite model
    whose test retrieval is a real percentage."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["type"] == "train"]
    assert losses and all(math.isfinite(x) for x in losses), losses
    state = torch.load(run_dir / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    r1 = json.loads((run_dir / "results.json").read_text())["test"]["fused"]["R1"]
    assert math.isfinite(r1) and 0 <= r1 <= 100, r1


def args_for(dataset, run_dir, *extra) -> list[str]:
    return small_run_args(dataset) + [f"run_dir={run_dir}", "train.epochs=1", "train.checkpoint_every=1",
                                      "train.keep_last=20", *extra]


@pytest.mark.parametrize("stage,kind,precision", [("zero1", "loss", "fp32"), ("zero0", "grad", "fp32"),
                                                  ("zero0", "loss", "fp32"), ("zero2", "grad", "bf16")])
@pytest.mark.slow
def test_skip_policy_drops_the_update_counts_it_and_training_goes_on(small_dataset, tmp_path, stage, kind, precision):
    run_dir = tmp_path / "run"
    run = run_with_nan("4", kind, args_for(small_dataset, run_dir, f"train.deepspeed={stage}",
                                           f"train.precision={precision}"))
    assert run.returncode == 0, run.stderr[-3000:]
    log = (run_dir / "train.log").read_text()
    reason = "non-finite loss" if kind == "loss" else "non-finite gradients"
    assert f"step 4 (epoch 1): {reason}" in log and "update skipped (1 in a row, 1 in all)" in log
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "skipped"] == [4]
    assert [r["skipped_steps"] for r in records if r["type"] == "train"][-1] == 1
    assert_same_weights(weights(run_dir, 3), weights(run_dir, 4))  # the update of step 4 was not applied
    after = weights(run_dir, 5)
    assert not torch.equal(after["grab_image.linear.weight"], weights(run_dir, 4)["grab_image.linear.weight"])
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert_went_on_finite(run_dir)


@pytest.mark.slow
def test_stop_policy_saves_the_last_finite_state_and_exits_with_a_message(small_dataset, tmp_path):
    run_dir = tmp_path / "run"
    run = run_with_nan("4", "loss", args_for(small_dataset, run_dir, "train.nonfinite=stop"))
    assert run.returncode != 0
    assert ("NonFiniteError: non-finite loss at step 4 (epoch 1); stopping (train.nonfinite=stop). "
            "Checkpoint step00000004 holds the last finite weights") in run.stderr
    assert "train.resume=latest" in run.stderr
    assert (run_dir / "checkpoints" / "step00000004" / "COMPLETE").exists()
    assert_same_weights(weights(run_dir, 3), weights(run_dir, 4))
    assert not (run_dir / "results.json").exists()


@pytest.mark.slow
def test_too_many_skips_in_a_row_stop_a_diverged_run(small_dataset, tmp_path):
    run_dir = tmp_path / "run"
    run = run_with_nan("3,4,5", "loss", args_for(small_dataset, run_dir, "train.max_skipped_steps=3"))
    assert run.returncode != 0
    assert "3 skipped steps in a row reach train.max_skipped_steps=3" in run.stderr
    assert_same_weights(weights(run_dir, 2), weights(run_dir, 5))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero0", "zero1"])
def test_a_nan_on_one_rank_skips_the_step_on_every_rank(small_dataset, tmp_path, stage):
    run_dir = tmp_path / "run"
    launcher = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", "2", "--master_port", str(free_port())]
    run = run_with_nan("4", "loss", args_for(small_dataset, run_dir, f"train.deepspeed={stage}"), rank="1",
                       launcher=launcher)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "2 rank(s) on cpu" in run.stdout
    log = (run_dir / "train.log").read_text()
    assert "step 4 (epoch 1): non-finite gradients" in log  # (rank 0's own loss was finite)
    assert_same_weights(weights(run_dir, 3), weights(run_dir, 4))
    assert_went_on_finite(run_dir)
