"""cluster_configs/ray/start_ray_slurm.sh on a real Slurm (slurmctld + 4 slurmd + munged on this
machine): a batch job starts the Ray head on its first node and a Ray worker on each other node with
srun, runs tune/search.py --address on them, and the trials run on more than one node. Two nodes of
one CPU each and two trials: both trials start at once, so one must run on the worker node."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from itself.dist import free_port
from runs import REPO, small_run_args
from test_slurm import slurm  # noqa: F401  (the module-scoped Slurm cluster)

pytestmark = pytest.mark.slow


def _ray_processes(tmp_root: str) -> list[str]:
    """Processes of this test's Ray nodes still running (their command lines name its temp root)."""
    ps = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if tmp_root in line]


def test_a_slurm_job_starts_ray_on_its_nodes_and_searches_across_them(slurm, small_dataset, tmp_path):  # noqa: F811
    tmp_root = tempfile.mkdtemp(prefix="rs-", dir="/tmp")  # node-local Ray folders: short socket paths
    env = {**slurm, "RAY_TMPDIR": tmp_root, "RAY_PORT": str(free_port()), "RAY_CLUSTER_DIR": str(tmp_path / "ray"),
           "RAY_USAGE_STATS_ENABLED": "0"}
    out = tmp_path / "job.out"
    try:
        job = _submit(env, out, tmp_path, small_dataset)
    finally:
        leftovers = _ray_processes(tmp_root)
        shutil.rmtree(tmp_root, ignore_errors=True)
    log = out.read_text() if out.exists() else ""
    assert job.returncode == 0, job.stderr[-2000:] + log[-5000:]
    assert not leftovers, f"Ray processes outlived the job: {leftovers}"
    assert "ray: 2 node(s) up" in log
    table = pd.read_parquet(tmp_path / "s" / "results.parquet")
    assert len(table) == 2 and (table["evaluations"] == 1).all(), log[-3000:]
    names = {place.split("(")[0] for row in table["nodes"] for place in row.split(" -> ")}
    assert names <= {"n1", "n2", "n3", "n4"} and len(names) == 2, table["nodes"].tolist()
    assert (tmp_path / "ray" / "auth_token").stat().st_mode & 0o077 == 0, "the cluster token is readable by others"


def _submit(env: dict, out: Path, storage: Path, data: Path) -> subprocess.CompletedProcess:
    """The documented batch use: sbatch the script from the repository root; --wait for its end."""
    return subprocess.run(["sbatch", "--wait", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=30",
                           f"--output={out}", "cluster_configs/ray/start_ray_slurm.sh", "--storage-path", str(storage),
                           "--name", "s", "--num-samples", "2", *small_run_args(data, "train.epochs=1")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
