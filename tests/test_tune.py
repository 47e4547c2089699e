"""`tune/search.py` with a real Ray on this machine: trials, ASHA pruning, p_end <= p_start, the
best config trains as is, and an interrupted search resumes without redoing finished trials."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from runs import REPO, SECRETS, assert_no_secrets, small_run_args, train_env

EPOCHS = 4


def _args(root) -> list[str]:
    return small_run_args(root, f"train.epochs={EPOCHS}")


def _env(tmp_path) -> dict:
    return train_env(RAY_TMPDIR="/tmp/ray-itself", **SECRETS)  # short: Ray's socket paths must fit


def _search(tmp_path, *extra, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "tune/search.py", "--storage-path", str(tmp_path), *extra],
                            cwd=REPO, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_search_prunes_with_asha_and_its_best_config_trains(small_dataset, tmp_path):
    proc = _search(tmp_path, "--name", "s", "--num-samples", "6", "--metric", "mAP", *_args(small_dataset))
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    exp = tmp_path / "s"
    assert_no_secrets(exp)  # trials inherit the credentials; no trial folder or result keeps them
    table = pd.read_parquet(exp / "results.parquet")
    assert len(table) == 6 and list(pd.read_csv(exp / "results.csv")["trial_id"]) == list(table["trial_id"])
    assert (table["p_end"] <= table["p_start"]).all()
    assert (table["evaluations"] < EPOCHS).any(), "ASHA stopped no trial early"
    assert (table["evaluations"] == EPOCHS).any()
    assert ((table["p_start"] == 0.65) & (table["p_end"] == 0.5) & (table["discard_ratio"] == 0.25)).any()
    assert table["val_mAP"].iloc[0] == table["val_mAP"].max()
    assert (exp / "val_mAP_vs_params.png").stat().st_size > 1000
    best = yaml.safe_load((exp / "best_config.yaml").read_text())
    assert best["model"]["p_start"] == pytest.approx(table["p_start"].iloc[0])
    run = subprocess.run([sys.executable, "itself/train.py", "--config", str(exp / "best_config.yaml"),
                          "train.epochs=1", f"run_dir={tmp_path / 'best_run'}"], cwd=REPO, env=_env(tmp_path),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "best_run" / "results.json").exists()


def _finished_trials(exp: Path) -> dict[str, int]:
    """Trial folder -> reported results, for trials that reached the last epoch."""
    done = {}
    for result in exp.glob("run_trial_*/result.json"):
        lines = result.read_text().splitlines()
        if lines and json.loads(lines[-1])["training_iteration"] == EPOCHS:
            done[result.parent.name] = len(lines)
    return done


def test_interrupted_search_resumes_without_redoing_finished_trials(small_dataset, tmp_path):
    exp = tmp_path / "r"
    proc = _search(tmp_path, "--name", "r", "--num-samples", "5", "--searcher", "random", *_args(small_dataset))
    deadline = time.time() + 600
    while time.time() < deadline and not _finished_trials(exp) and proc.poll() is None:
        time.sleep(0.5)
    finished = _finished_trials(exp)
    assert finished and proc.poll() is None, "the search ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)  # Tune saves its state and stops
    proc.communicate(timeout=300)
    assert not (exp / "results.csv").exists() or len(pd.read_csv(exp / "results.csv")) <= 5
    resumed = _search(tmp_path, "--resume", "--name", "r", *_args(small_dataset))
    out, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, out[-4000:]
    table = pd.read_csv(exp / "results.csv")
    assert len(table) == 5 and table["evaluations"].min() >= 1
    after = _finished_trials(exp)
    for trial, reports in finished.items():
        assert after[trial] == reports, f"{trial} was trained again"
