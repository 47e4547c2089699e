"""`launch/convert.py`: a corpus converted by a SLURM job array (task i: chunks i::N) and a dependent
merge job -- on a real Slurm (4 slurmd on this machine), with submitit's local executor, and as a
dry run -- writes the same bytes as a conversion on one machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from corpus_plant import plant_mals, plant_webperson
from runs import REPO, run_main
from test_corpora import build, snapshot
from test_slurm import slurm  # noqa: F401 - the real Slurm of this machine, as test_slurm.py starts it


def launch(env, jobs: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch/convert.py", "--jobs-dir", str(jobs), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_dry_run_prints_the_array_and_the_dependent_merge(tmp_path):
    plant_mals(tmp_path / "raw", faults=False)
    from launch.convert import main

    run = run_main(main, ["--jobs-dir", tmp_path / "jobs", "--nodes", "4", "--profile", "local-test", "--dry-run",
                          "--", "--dataset", "mals", "--root", tmp_path / "raw", "--out", tmp_path / "out"])
    assert run.returncode == 0, run.stderr
    assert "#SBATCH --array=0-3%4" in run.stdout and "--dependency='afterany:<array job id>'" in run.stdout
    assert "#SBATCH --gpus-per-node" not in run.stdout and "#SBATCH --ntasks-per-node=1" in run.stdout
    assert not (tmp_path / "jobs").exists() and not (tmp_path / ".out.convert").exists()  # nothing planned or sent


def test_what_cannot_be_converted_is_an_error_before_anything_is_sent(tmp_path, capsys):
    from launch.convert import main

    plant_mals(tmp_path / "raw", faults=False)
    out = ["--out", str(tmp_path / "out")]
    assert main(["--dry-run", "--", "--dataset", "rstpreid", "--root", str(tmp_path / "raw"), *out]) == 2
    assert capsys.readouterr().err.startswith("error: --dataset rstpreid: launch/convert.py converts the corpora")
    assert main(["--local", "--", "--dataset", "mals", "--root", str(tmp_path / "nowhere"), *out]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["--nodes", "0", "--", "--dataset", "mals", "--root", str(tmp_path / "raw"), *out]) == 2
    assert "--nodes must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / ".out.convert").exists()


@pytest.mark.slow
def test_local_executor_array_writes_what_one_machine_writes(tmp_path):
    plant_mals(tmp_path / "raw")
    flags = ["--dataset", "mals", "--root", str(tmp_path / "raw"), "--chunk-size", "6", "--val-fraction", "0.1"]
    run = launch(os.environ.copy(), tmp_path / "jobs", "--nodes", "3", "--local", "--", *flags, "--out",
                 str(tmp_path / "out"), "--no-progress")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "plan: 35 records in 6 chunks (6 to convert)" in run.stdout
    one = build(*flags, "--out", str(tmp_path / "one"), "--workers", "1")
    assert one.returncode == 0, one.stderr
    assert snapshot(tmp_path / "out") == snapshot(tmp_path / "one")


@pytest.mark.slow
def test_slurm_array_on_four_nodes_then_merge(slurm, tmp_path):
    plant_webperson(tmp_path / "raw", n=80, files=2)
    flags = ["--dataset", "webperson", "--root", str(tmp_path / "raw"), "--chunk-size", "10", "--val-fraction", "0.05"]
    run = launch(slurm, tmp_path / "jobs", "--nodes", "4", "--profile", "local-test", "--wait", "--", *flags,
                 "--out", str(tmp_path / "out"), "--no-progress")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (folder,) = [p for p in (tmp_path / "jobs").iterdir() if p.is_dir()]
    submission = json.loads((folder / "submission.json").read_text())
    array = submission["job_ids"][0].split("_")[0]
    assert submission["tasks"] == 4 and submission["chunks"] == 8 and len(submission["job_ids"]) == 5
    hosts = set()
    for task in range(4):  # each task converted its own two chunks: i and i + 4
        log = (folder / f"{array}_{task}_0_log.out").read_text()
        assert f"task {task}: converting 2 chunks" in log
        hosts.add(log.split(" on ")[1].split()[0])
    assert len(hosts) >= 2  # the array ran on several nodes of the test cluster
    one = build(*flags, "--out", str(tmp_path / "one"), "--workers", "1")
    assert one.returncode == 0, one.stderr
    assert snapshot(tmp_path / "out") == snapshot(tmp_path / "one")
