"""Inputs cannot make us run code or write where they should not: YAML is read with safe_load,
SLURM values cannot leave their line of the batch script, names cannot escape their folder, and
run folders hold no credentials from the environment. (Pickles: test_checkpoints.py; tar members
and annotation paths: test_data_faults.py, tests/test_converters.py.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

from runs import SECRETS, assert_no_secrets, run_main, run_train, small_run_args

EVIL_YAML = "train: !!python/object/apply:os.system ['touch {marker}']\n"


def slurm_cli(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """`python launch/slurm.py --dry-run ARGS`, run by this process."""
    from launch.slurm import main

    return run_main(main, ["--jobs-dir", tmp_path / "jobs", "--dry-run", *args])


def test_training_config_yaml_cannot_run_code(small_dataset, tmp_path):
    marker, config = tmp_path / "code-ran", tmp_path / "evil.yaml"
    config.write_text(EVIL_YAML.format(marker=marker))
    run = run_train(small_run_args(small_dataset) + ["--config", str(config)], check=False)
    assert run.returncode == 2 and f"error: --config: {config}: not valid YAML" in run.stderr
    assert not marker.exists()


def test_slurm_profile_yaml_cannot_run_code(tmp_path):
    marker, profile = tmp_path / "code-ran", tmp_path / "evil.yaml"
    profile.write_text(f"partition: !!python/object/apply:os.system ['touch {marker}']\n")
    run = slurm_cli(tmp_path, "--profile", str(profile))
    assert run.returncode == 2 and "not valid YAML" in run.stderr
    assert not marker.exists()


@pytest.mark.parametrize("args,profile,message", [
    (["--partition", "gpu\ntouch /tmp/pwned"], None, "command line: partition: must be one line"),
    (["--account", "lab\r"], None, "command line: account: must be one line"),
    ([], "sbatch_args: {mail-user: \"me\\n#SBATCH --uid=0\"}", "sbatch_args.mail-user: must be one line"),
    ([], "sbatch_args: {'x; touch /tmp/pwned': 1}", "sbatch_args key 'x; touch /tmp/pwned' must be an sbatch option name"),
    ([], "srun_args: [\"--cpu-bind=none\\nrm -rf ~\"]", "srun_args[0]: must be one line"),
    ([], "setup: [\"module load cuda\\nrm -rf ~\"]", "setup[0]: must be one line"),
    (["--name", "../../elsewhere"], None, "--name: must be letters, digits"),
    (["name=../../elsewhere"], None, "name: must be letters, digits"),
])
def test_slurm_values_cannot_inject_lines_or_escape_folders(tmp_path, args, profile, message):
    if profile is not None:
        (tmp_path / "p.yaml").write_text(profile + "\n")
        args = ["--profile", str(tmp_path / "p.yaml"), *args]
    run = slurm_cli(tmp_path, *args)
    assert run.returncode == 2 and message in run.stderr, run.stderr[-2000:]
    assert not (tmp_path / "jobs").exists()


def test_slurm_values_with_shell_syntax_are_quoted_in_the_batch_script(tmp_path):
    run = slurm_cli(tmp_path, "--account", "lab$(touch /tmp/pwned);x", "--constraint", "a100|h100")
    assert run.returncode == 0, run.stderr
    assert "#SBATCH --account='lab$(touch /tmp/pwned);x'" in run.stdout
    assert "#SBATCH --constraint='a100|h100'" in run.stdout


def _plant_job_folder(folder, victim) -> None:
    """A job folder someone made beforehand at a name the launcher will choose: links at the names
    it writes, a result pickle `--wait` would read back."""
    folder.mkdir(parents=True)
    for name in ("submission.json", "config.yaml", "attempts.jsonl"):
        (folder / name).symlink_to(victim)


def test_a_job_folder_planted_at_its_predictable_name_is_refused_and_nothing_written(tmp_path):
    # Job folders are named <name>-YYYYmmdd-HHMMSS: in a shared --jobs-dir, anyone can make the
    # next minute's names first. The launcher refuses a folder that exists (exit 2), and one made
    # between its plan and its submission too; the planted links' target keeps its bytes.
    import time

    from itself.errors import ConfigError
    from launch.jobdir import JobDir

    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    jobs, now = tmp_path / "jobs", time.time()
    for t in range(-1, 60):
        _plant_job_folder(jobs / f"planted-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now + t))}", victim)
    run = slurm_cli(tmp_path, "--name", "planted")
    assert run.returncode == 2 and "exists already, and a job is given a new folder of its own" in run.stderr, run.stderr
    (tmp_path / "attacker").mkdir(mode=0o777)
    for t in range(-1, 60):  # (a link to a folder not yet made: resolving it would make the job there)
        (jobs / f"linked-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now + t))}").symlink_to(tmp_path / "attacker" / "job")
    run = slurm_cli(tmp_path, "--name", "linked")
    assert run.returncode == 2 and "exists already" in run.stderr, run.stderr
    job = JobDir.new(tmp_path / "other", "later")  # (nothing there yet: planned)
    _plant_job_folder(job.path, victim)
    with pytest.raises(ConfigError, match="exists already"):
        job.create()
    assert victim.read_text() == "untouched\n" and not (tmp_path / "attacker" / "job").exists()


@pytest.mark.slow
def test_run_folder_holds_no_credentials_from_the_environment(small_dataset, tmp_path):
    run_dir = tmp_path / "run"  # (a process of its own: the credentials are there from its first import on)
    run_train(small_run_args(small_dataset) + [f"run_dir={run_dir}", "train.epochs=1"], launcher=[sys.executable],
              **SECRETS)
    assert (run_dir / "model.pt").exists() and (run_dir / "checkpoints").is_dir()
    assert_no_secrets(run_dir)
