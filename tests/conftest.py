"""Shared fixtures: small synthetic datasets built once per test session."""

from __future__ import annotations

import os
import subprocess

import pytest

import shards

from runs import SMALL, SMALL_SHARD_SAMPLES

# One intra-op thread in every process of the suite (the workers and what they start inherit it):
# a rank plans its threads from the cores it may use, not knowing that the suite runs one worker
# more than the cores, each training or starting ranks of its own. The tiny test models gain
# nothing from a second thread (a 3-epoch small run: 14-15 CPU-s on one, 15-16 on two; the fast
# subset's gain is within this machine's spread, BENCHMARKS.md). The user's OMP_NUM_THREADS wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_sessionstart(session):
    """Compile the project's modules once (the controller, before any worker starts): the commands the
    tests start as processes then read bytecode instead of compiling every module again each time,
    which they would where PYTHONDONTWRITEBYTECODE is set (about 2 s of each start here)."""
    if hasattr(session.config, "workerinput"):
        return
    import compileall

    from runs import REPO

    for package in ("itself", "shards", "launch", "tune", "bench"):  # (py_compile writes even then)
        compileall.compile_dir(REPO / package, quiet=1)


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker more than the cores. The slow tests spend much of their time waiting on
    the Slurm jobs, Ray clusters and ranks they started, and the fast subset's processes and fixture
    builds leave gaps too: on 2 cores it took 3 min 15 s on 3 workers, 3 min 23 s to 4 min 12 s on 2
    (see the README). `-n logical` and PYTEST_XDIST_AUTO_NUM_WORKERS are xdist's own (None: its
    default answers)."""
    if config.getoption("numprocesses") == "logical" or os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores + 1


SHARED_FIXTURES = {
    "slurm": "the Slurm cluster (the munged it may start is stopped with it: one cluster at a time)",
    "cluster": "the 2-node Ray cluster of tests/test_tune_cluster.py",
    "trained_run": "the retrieval model trained on the default synthetic set",
    "small_run": "the small test run (and two_rank_run, its 2-rank twin, which takes it)",
    "uninterrupted": "the uninterrupted 2-rank run of the rank-failure tests",
    "corpus": "a converted corpus (pre-training; the conversion-resume tests)",
    "installed": "the built wheel in a venv of its own",
    "one_rank_index": "the small train split indexed by one rank",
    "compiled_steps": "the training steps of a torch.compile'd model (inductor compiles for minutes here)",
}
"""Fixtures built once per module or session that cost seconds to minutes: the tests that use one
share an xdist group, hence one worker, which builds it once (`-n 0` runs everything in one process)."""


@pytest.hookimpl(tryfirst=True)  # (before xdist reads the groups)
def pytest_collection_modifyitems(config, items):
    for item in items:
        parameters = getattr(getattr(item, "callspec", None), "params", {})  # (a parameter may share a name)
        shared = [name for name in SHARED_FIXTURES if name in item.fixturenames and name not in parameters]
        if shared:
            item.add_marker(pytest.mark.xdist_group(shared[0]))
    if hasattr(config, "workerinput"):
        # xdist hands out the groups first (the largest first), then single tests in this order: the
        # slow ones first, so that no search or multi-node job starts last and runs on while the
        # other workers idle. Grouped tests keep their order (a module's fixtures are built once).
        items.sort(key=lambda item: item.get_closest_marker("xdist_group") is None
                   and item.get_closest_marker("slow") is None)


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
def small_run(small_dataset, tmp_path_factory):
    """Run directory of `small_run_args` trained straight through (2 epochs of 8 steps), in this
    process: what resumed, killed or damaged runs are compared with (treat as read-only; copy it
    to change it)."""
    from runs import run_train, small_run_args

    run_dir = tmp_path_factory.mktemp("runs") / "straight"
    run_train(small_run_args(small_dataset) + [f"run_dir={run_dir}"])
    return run_dir


@pytest.fixture(scope="session")
def two_rank_run(small_run, small_dataset, tmp_path_factory):
    """Run directory of `small_run_args` trained straight through on 2 ranks (`deepspeed --num_gpus
    2`, a process each): compared with the one-rank `small_run`, continued on one rank, refetched
    over HTTP (treat as read-only). It takes `small_run` so that its tests share that xdist group:
    one worker trains both, once."""
    import shutil

    from itself.dist import free_port
    from runs import run_train, small_run_args

    run_dir = tmp_path_factory.mktemp("runs") / "two-ranks"
    launcher = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", "2", "--master_port", str(free_port())]
    run_train(small_run_args(small_dataset) + [f"run_dir={run_dir}"], launcher=launcher)
    return run_dir


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """(run directory with model.pt, dataset) of the default synthetic training cut to 4 epochs and
    one val evaluation (at the end), trained in this process: above chance, which is what the
    retrieval tests need of it (the queried identity in the top 10 about twice as often as chance;
    6 epochs: 2.3 times, 1.5 times more CPU)."""
    from runs import run_train

    base = tmp_path_factory.mktemp("trained")
    run_train(["train.epochs=4", "eval.every=4", "train.report_to=none", f"data.root={base / 'synthetic'}",
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
