"""A corpus conversion killed midway -- the whole build by SIGKILL, or one of its worker processes --
keeps its finished chunks; the same command again converts only the rest and writes the same
bytes as a conversion that was never interrupted. Real processes, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from corpus_plant import plant_webperson
from runs import REPO, wait_until
from test_corpora import build, check_dataset, snapshot

ARGS = ["--dataset", "webperson", "--chunk-size", "40", "--shard-samples", "16", "--val-fraction", "0.02"]


def _done(out: Path) -> list[Path]:
    return sorted((out.parent / f".{out.name}.convert" / "chunks").glob("[0-9]*/chunk.json"))


def _start(root: Path, out: Path, chunks: int) -> subprocess.Popen:
    """A conversion with 2 workers in the background, once it has converted `chunks` chunks."""
    proc = subprocess.Popen([sys.executable, "-m", "shards", "build", *ARGS, "--root", str(root), "--out", str(out),
                             "--workers", "2", "--no-progress"], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_until(lambda: len(_done(out)) >= chunks or proc.poll() is not None, 300, f"{chunks} converted chunks")
    return proc


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(raw corpus of 4,800 images in 120 chunks, the dataset an uninterrupted conversion writes)."""
    base = tmp_path_factory.mktemp("resume")
    plant_webperson(base / "raw", n=4800, files=3, size=(64, 128))
    run = build(*ARGS, "--root", str(base / "raw"), "--out", str(base / "reference"), "--workers", "1", timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return base / "raw", base / "reference"


@pytest.mark.slow
def test_a_build_killed_by_sigkill_resumes_with_only_the_rest(corpus, tmp_path):
    raw, reference = corpus
    out = tmp_path / "out"
    proc = _start(raw, out, chunks=3)
    os.killpg(proc.pid, signal.SIGKILL)  # the build and its workers, at once, mid-conversion
    proc.wait(timeout=60)
    finished = _done(out)
    assert 3 <= len(finished) < 120 and not out.exists()
    first = finished[0].parent
    kept = {p.name: p.stat().st_ino for p in first.glob("train-*.tar")}
    run = build(*ARGS, "--root", str(raw), "--out", str(out), "--workers", "2", timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"resuming: {len(finished)} of 120 chunks already converted" in run.stderr
    assert snapshot(out) == snapshot(reference)
    check_dataset(out)
    # The finished chunk was not converted again: its shards are the dataset's (hard links).
    inodes = {p.stat().st_ino for p in (out / "train").iterdir()}
    assert set(kept.values()) <= inodes


@pytest.mark.slow
def test_a_killed_worker_fails_the_build_which_the_same_command_finishes(corpus, tmp_path):
    raw, reference = corpus
    out = tmp_path / "out"
    proc = _start(raw, out, chunks=1)
    workers = psutil.Process(proc.pid).children()
    assert workers, "the build runs its chunks in worker processes"
    workers[0].send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr[-3000:]
    error = stderr.strip().splitlines()[-1]
    assert error.startswith("error: the build failed: chunk ") and "worker process died" in error
    assert "run the same command again to convert the rest" in error and "Traceback" not in stderr
    assert not out.exists()
    run = build(*ARGS, "--root", str(raw), "--out", str(out), "--workers", "1", timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "resuming: " in run.stderr
    assert snapshot(out) == snapshot(reference)
