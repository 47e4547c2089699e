"""`launch/slurm.py` against a real Slurm (slurmctld + 4 slurmd + munged on this machine):
a 4-node run, pre-emption -> checkpoint -> requeue -> resume, dry runs and profile errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from itself.filenames import COMPLETE, tag_for
from itself.rundir import RunDir
from runs import REPO, SECRETS, assert_no_secrets, run_main, run_train, small_run_args, wait_until
from slurm_cluster import SlurmCluster, missing_binaries


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = missing_binaries()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"Slurm binaries missing in CI: {missing} (.ci/run installs slurmctld slurmd slurm-client munge)")
        pytest.skip(f"Slurm not installed here ({', '.join(missing)}); .ci/run installs it")
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as env:
        yield env


def _command(script: str, env, jobs: Path, args, in_process: bool) -> subprocess.CompletedProcess:
    """`python launch/SCRIPT --jobs-dir JOBS ARGS` in `env`: its `main` run by this process (dry runs and
    refusals), or the script started as a user starts it (submissions)."""
    argv = ["--jobs-dir", str(jobs), *args]
    if in_process:
        from launch import index, slurm

        return run_main({"slurm.py": slurm.main, "index.py": index.main}[script], argv, env=env)
    return subprocess.run([sys.executable, f"launch/{script}", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def _submit(env, jobs: Path, *args: str, in_process: bool = False) -> subprocess.CompletedProcess:
    return _command("slurm.py", env, jobs, args, in_process)


def _job_folder(jobs: Path) -> Path:
    (folder,) = [p for p in jobs.iterdir() if p.is_dir()]
    return folder


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_four_nodes_train_with_world_size_four(slurm, tmp_path):
    # The command as typed (the default synthetic preset) on the 4-node test cluster; one epoch, and
    # the data built by the job itself in a folder of this test.
    run = _submit({**slurm, **SECRETS}, tmp_path / "jobs", "--nodes", "4", "--profile", "local-test", "--wait",
                  f"data.root={tmp_path / 'synthetic'}", "data.build_synthetic=true", "train.epochs=1")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    folder = _job_folder(tmp_path / "jobs")
    assert_no_secrets(folder)  # the job had them in its environment (sbatch exports it)
    submission = json.loads((folder / "submission.json").read_text())
    job_id = submission["job_ids"][0]
    assert f"submitted job {job_id}: 4 node(s) x 1 rank(s)" in run.stdout
    assert submission["ranks"] == 4 and len(submission["git_commit"]) >= 40 and "launch/slurm.py" in submission["command"][1]
    assert "4 rank(s) on cpu" in (folder / "run" / "train.log").read_text()
    run_dir = RunDir(folder / "run")
    assert len(run_dir.records("train")) == 2 and len(run_dir.evals("val")) == 1  # 20 steps, logged every 10
    assert run_dir.records("data")[0]["steps"] == 20  # 32 data slots over 4 ranks: the 1-rank batches
    results = run_dir.results()
    assert results.test_counts == {"gallery": 160, "queries": 320, "gallery_skipped": 0}
    assert set(results.test) == {"global", "grab", "fused"}
    for rank in range(4):  # per-rank logs
        assert (folder / f"{job_id}_{rank}_log.out").exists() and (folder / f"{job_id}_{rank}_log.err").exists()
    assert "train:" in (folder / "config.yaml").read_text()
    assert [e["event"] for e in _events(folder / "attempts.jsonl")] == ["start", "completed"]
    first = _events(folder / "attempts.jsonl")[0]
    assert first["hostnames"] == ["n1", "n2", "n3", "n4"] and first["world_size"] == 4


@pytest.mark.slow
def test_preempted_job_checkpoints_requeues_and_resumes(slurm, small_dataset, tmp_path):
    # Two nodes: the signal reaches every task of a multi-node job (four nodes are the test above).
    proc = subprocess.Popen([sys.executable, "launch/slurm.py", "--jobs-dir", str(tmp_path), "--nodes", "2",
                             "--profile", "local-test", "--wait", *small_run_args(small_dataset), "train.epochs=3"],
                            cwd=REPO, env=slurm, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: list(tmp_path.glob("*/submission.json")), 300, "the submission")
        folder = _job_folder(tmp_path)
        job_id = json.loads((folder / "submission.json").read_text())["job_ids"][0]
        metrics = folder / "run" / "metrics.jsonl"
        wait_until(lambda: any(e["type"] == "train" for e in _events(metrics)), 300, "the first training steps")
        # The scheduler's pre-emption / time-limit warning: SIGUSR2 to every task of the job.
        subprocess.run(["scancel", "--signal=USR2", job_id], env=slurm, check=True)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    attempts = _events(folder / "attempts.jsonl")
    assert [e["event"] for e in attempts] == ["start", "requeue", "start", "completed"], attempts
    saved = attempts[1]["checkpoint"]
    assert attempts[0]["resume_from"] is None and attempts[2]["resume_from"] == saved
    assert attempts[2]["attempt"] == 2 and attempts[0]["job_id"] == attempts[2]["job_id"] == job_id
    records = _events(metrics)
    interrupted = [r for r in records if r["type"] == "interrupted"]
    assert len(interrupted) == 1 and f"step{interrupted[0]['step']:08d}" == saved
    steps = [r["step"] for r in records if r["type"] == "train"]
    assert steps == sorted(steps) and len(steps) == len(set(steps)), "the step count continues, never restarts"
    assert steps[-1] == 24 and min(s for s in steps if s > interrupted[0]["step"]) <= interrupted[0]["step"] + 2
    assert (folder / "run" / "results.json").exists()


@pytest.mark.slow
def test_a_job_sbatch_refuses_is_an_error_line_and_exit_1(slurm, small_dataset, tmp_path):
    run = _submit(slurm, tmp_path, "--profile", "local-test", "--partition", "nosuch",
                  *small_run_args(small_dataset, "train.max_steps=1"), in_process=True)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]  # (sbatch's own lines come first)
    assert last.startswith("error: the job was not submitted:") and "invalid partition" in last.lower()
    assert not list(tmp_path.iterdir()), "no job folder is left by a job that was never submitted"


def _without_slurm(tmp_path: Path) -> dict:
    """This environment with a PATH holding python but no SLURM command (a laptop)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    return {**os.environ, "PATH": str(bin_dir)}


def test_without_slurm_commands_the_error_says_so(tmp_path):
    run = _submit(_without_slurm(tmp_path), tmp_path / "jobs", "--nodes", "2", in_process=True)
    assert run.returncode == 2 and run.stderr.startswith("error: sbatch and srun not found on PATH"), run.stderr[-2000:]
    assert "--dry-run shows the sbatch script anywhere" in run.stderr
    assert not (tmp_path / "jobs").exists()


def test_a_dry_run_needs_no_slurm(tmp_path):
    # The README's check of what would be submitted, on a machine without SLURM: the script and
    # the config are rendered all the same, and nothing is written.
    env, jobs = _without_slurm(tmp_path), tmp_path / "jobs"
    run = _submit(env, jobs, "--nodes", "4", "--dry-run", in_process=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "#SBATCH --nodes=4" in run.stdout and "srun --unbuffered" in run.stdout and "name: synthetic" in run.stdout
    index = _submit_index(env, jobs, "--nodes", "2", "--dry-run", "--", "index", "--model", "M", "--gallery", "G",
                          "--out", "D", in_process=True)
    assert index.returncode == 0, index.stderr[-2000:]
    assert "#SBATCH --nodes=2" in index.stdout and "every rank runs: python -m itself.retrieve index" in index.stdout
    assert not jobs.exists()


def test_a_job_keeps_the_resume_point_the_user_gave(tmp_path):
    from launch.job import attempt_resume

    run = RunDir(tmp_path / "run")
    elsewhere = tmp_path / "other" / "checkpoints" / tag_for(8)
    assert attempt_resume("", run, restarts=0) == "auto"  # nothing given: the run's newest checkpoint, if any
    assert attempt_resume(str(elsewhere), run, restarts=0) == str(elsewhere)  # never overwritten
    assert attempt_resume("latest", run, restarts=0) == "latest"
    assert attempt_resume(str(elsewhere), run, restarts=1) == str(elsewhere)  # requeued before its own checkpoint
    own = run.checkpoints / tag_for(4)
    own.mkdir(parents=True)
    (own / COMPLETE).write_text("")
    # A requeued attempt goes on from its own run, not back to where the first attempt began.
    assert attempt_resume(str(elsewhere), run, restarts=1) == "auto" and run.resume_source("auto") == own
    assert attempt_resume(str(elsewhere), run, restarts=0) == str(elsewhere)


def test_dry_run_prints_the_sbatch_script_with_the_right_counts(tmp_path):
    run = _submit(os.environ.copy(), tmp_path, "--nodes", "4", "--gpus-per-node", "8", "--preset", "cuhk-pedes",
                  "--partition", "a100", "--time", "2-00:00:00", "--dry-run", in_process=True)
    assert run.returncode == 0, run.stderr
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=a100", "#SBATCH --time=2880", "#SBATCH --requeue", "#SBATCH --signal=USR2@180"):
        assert line in run.stdout
    assert "32 ranks" in run.stdout and "name: cuhk-pedes" in run.stdout
    assert not list(tmp_path.iterdir()), "a dry run submits nothing"


def test_missing_or_invalid_profile_is_a_clear_error(tmp_path, capsys):
    from launch import slurm

    def refused(*args: str) -> str:
        assert slurm.main(["--jobs-dir", str(tmp_path), "--dry-run", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err
        return err

    assert "--profile nosuch:" in refused("--profile", "nosuch") and "profiles: default, local-test" in refused(
        "--profile", "nosuch")
    bad = tmp_path / "bad.yaml"
    for text, message in (("partition: gpu\ngpus_per_nod: 8\n", "unknown field 'gpus_per_nod'"),
                          ("gpus_per_node: eight\n", "field 'gpus_per_node' must be int"),
                          ("time: soon\n", "time: cannot read 'soon'"),
                          ("a: &a [x, x]\nb: [*a, *a]\n", "YAML aliases (*name) are not allowed")):
        bad.write_text(text)
        assert message in refused("--profile", str(bad))
    assert "mem_gb must be a number >= 0, got nan" in refused("--mem-gb", "nan")


@pytest.mark.slow
def test_local_executor_runs_the_same_job_here(small_dataset, tmp_path):
    run = _submit(os.environ.copy(), tmp_path, "--local", "--nodes", "2", "--profile", "local-test", "--wait",
                  *small_run_args(small_dataset), "train.epochs=1")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    folder = _job_folder(tmp_path)
    assert "2 rank(s) on cpu" in (folder / "run" / "train.log").read_text()
    assert [e["event"] for e in _events(folder / "attempts.jsonl")] == ["start", "completed"]


@pytest.mark.slow
def test_a_failed_run_continues_by_resubmitting_with_its_run_dir(small_dataset, tmp_path):
    # What the failure message says to do ("rerun the same command with run_dir=... train.resume=latest")
    # works through the launcher too: the new job trains on in the old run folder.
    run_dir = tmp_path / "earlier" / "run"
    run_train([*small_run_args(small_dataset), "train.epochs=1", f"run_dir={run_dir}"])
    refused = _submit(os.environ.copy(), tmp_path / "jobs", "--local", "--profile", "local-test",
                      *small_run_args(small_dataset), f"run_dir={run_dir}")  # e.g. an old job's config.yaml
    assert refused.returncode == 2 and "already holds checkpoints; pass train.resume=latest" in refused.stderr
    run = _submit(os.environ.copy(), tmp_path / "jobs", "--local", "--profile", "local-test", "--wait",
                  *small_run_args(small_dataset), "train.epochs=2", f"run_dir={run_dir}", "train.resume=latest")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    folder = _job_folder(tmp_path / "jobs")
    assert json.loads((folder / "submission.json").read_text())["run_dir"] == str(run_dir)
    assert _events(folder / "attempts.jsonl")[0]["resume_from"] == tag_for(8)
    assert "resumed from" in (run_dir / "train.log").read_text()
    assert json.loads((run_dir / "results.json").read_text())["best_epoch"] in (1, 2)


@pytest.mark.slow
def test_a_job_starts_from_the_checkpoint_the_user_named(small_dataset, tmp_path):
    # train.resume=<a checkpoint of another run>: the job's first attempt starts there (the launcher
    # once replaced it by its own choice, and the job trained from scratch).
    earlier = tmp_path / "earlier"
    run_train([*small_run_args(small_dataset), "train.epochs=1", f"run_dir={earlier}"])
    checkpoint = earlier / "checkpoints" / tag_for(8)
    run = _submit(os.environ.copy(), tmp_path / "jobs", "--local", "--profile", "local-test", "--wait",
                  *small_run_args(small_dataset), "train.epochs=2", f"train.resume={checkpoint}")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    folder = _job_folder(tmp_path / "jobs")
    assert _events(folder / "attempts.jsonl")[0]["resume_from"] == tag_for(8)
    assert f"resumed from {checkpoint}" in (folder / "run" / "train.log").read_text()
    assert RunDir(folder / "run").records("train")[0]["step"] > 8  # (no step of epoch 1 trained again)


def _submit_index(env, jobs: Path, *args: str, in_process: bool = False) -> subprocess.CompletedProcess:
    return _command("index.py", env, jobs, args, in_process)


@pytest.mark.slow
def test_index_job_on_two_nodes_embeds_half_each_as_one_rank_would(slurm, small_dataset, untrained_model, tmp_path):
    import numpy as np

    from itself.retrieve.build import BuildRequest, run_build
    from itself.retrieve.store import IndexDir

    out = tmp_path / "index"
    index = ["index", "--model", str(untrained_model), "--gallery", str(small_dataset), "--split", "train",
             "--no-progress"]
    run = _submit_index(slurm, tmp_path / "jobs", "--nodes", "2", "--profile", "local-test", "--wait", "--",
                        *index, "--out", str(out))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"index {out}: 64 images in 1 batch(es), flat index" in run.stdout
    folder = _job_folder(tmp_path / "jobs")
    job_id = json.loads((folder / "submission.json").read_text())["job_ids"][0]
    for rank in range(2):  # each node embedded 4 of the 8 parts
        assert f"rank {rank}: embedded 32 images in 4 parts" in (folder / f"{job_id}_{rank}_log.err").read_text()
    reference = tmp_path / "one"
    run_build(BuildRequest(gallery=str(small_dataset), out=str(reference), model=str(untrained_model), split="train",
                           progress=False))
    two, one = IndexDir(out).embeddings(), IndexDir(reference).embeddings()
    assert two.items() == one.items()
    for a, b in zip(two.rows(np.arange(64)), one.rows(np.arange(64))):
        assert np.allclose(a, b, atol=1e-6)


def test_index_dry_run_and_a_missing_command(tmp_path):
    run = _submit_index(os.environ.copy(), tmp_path, "--nodes", "3", "--gpus-per-node", "4", "--dry-run", "--",
                        "index", "--model", "m.pt", "--gallery", "g", "--out", "o", in_process=True)
    assert run.returncode == 0, run.stderr
    for line in ("#SBATCH --nodes=3", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4", "#SBATCH --requeue"):
        assert line in run.stdout
    assert "12 ranks" in run.stdout and "every rank runs: python -m itself.retrieve index --model m.pt" in run.stdout
    assert not list(tmp_path.iterdir()), "a dry run submits nothing"
    run = _submit_index(os.environ.copy(), tmp_path, "--dry-run", "--", "query", "--index", "o", in_process=True)
    assert run.returncode == 2 and "give the indexing command after --" in run.stderr
    run = _submit_index(os.environ.copy(), tmp_path, "--dry-run", "--", "index", "--gallery", "g", in_process=True)
    assert run.returncode == 2 and "required: --model, --out" in run.stderr
