"""Shared fixtures: small synthetic datasets built once per test session."""

from __future__ import annotations

import subprocess

import pytest

import shards

from runs import SMALL, SMALL_SHARD_SAMPLES


@pytest.fixture(autouse=True)
def _logging_as_pytest_found_it():
    """Each test starts with the project's loggers reaching pytest's capture (caplog): a command run
    in-process by an earlier test routes them to its own console handler."""
    yield
    from itself import logs

    logs.reset()


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """Path of a small synthetic dataset (treat as read-only; copy it to modify)."""
    out = tmp_path_factory.mktemp("data") / "small"
    shards.build_synthetic(out, SMALL, max_samples=SMALL_SHARD_SAMPLES, progress=False)
    return out


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """(run directory with model.pt, dataset) of the default synthetic training cut to 6 epochs and
    one val evaluation (at the end), trained in this process: far above chance, which is what the
    retrieval tests need of it."""
    from runs import run_train

    base = tmp_path_factory.mktemp("trained")
    run_train(["train.epochs=6", "eval.every=6", "train.report_to=none", f"data.root={base / 'synthetic'}",
               "data.build_synthetic=true", f"run_dir={base / 'run'}"])
    return base / "run", base / "synthetic"


@pytest.fixture(scope="session")
def untrained_model(small_dataset, tmp_path_factory):
    """model.pt of an ITSELF with random weights in the small test config (64-d global, 32-d GRAB):
    enough to embed, index and search without training."""
    import torch

    from itself.config import to_dict
    from itself.model import ITSELF
    from itself.model.export import export
    from itself.presets import resolve_config
    from runs import small_run_args

    cfg = resolve_config("synthetic", None, small_run_args(small_dataset))
    torch.manual_seed(0)
    model = ITSELF(cfg.model, 32, cfg.data.image_size)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    export(path, model.state_dict(), to_dict(cfg), 32, 0.4)
    return path


@pytest.fixture
def mount(tmp_path):
    """mount(options) -> a fresh tmpfs mounted with those options, unmounted afterwards (a real small,
    full or read-only file system; the test is skipped where mounting needs root and we are not)."""
    mounted = []

    def make(options: str):
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield make
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)
