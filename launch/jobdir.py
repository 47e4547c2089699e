"""The SLURM job folder, `<jobs-dir>/<name>-<timestamp>/`: the one place that names its files.

    submission.json              the command, job ids, executor, nodes, ranks, profile, git commit
    config.yaml                  the resolved training config (training jobs)
    attempts.jsonl               one line per attempt event: start (resume point, hosts), requeue,
                                 stopped, completed
    run/                         the training run directory (itself.rundir.RunDir), unless the
                                 command gave run_dir
    <jobid>_<rank>_log.out/.err  each rank's output            (names submitit gives them)
    <jobid>_<rank>_result.pkl    what each rank returned       (submitit's)
    <jobid>_submitted.pkl        the pickled job               (submitit's)
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
import time
from pathlib import Path

from itself.config import Config, config_yaml
from itself.errors import ConfigError
from itself.paths import Folder, check_can_create
from itself.rundir import RunDir, timestamped


class JobDir(Folder):
    """The files of one SLURM job (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self.made = False  # whether this process made the folder (`create`): never one it found

    SUBMISSION = "submission.json"
    CONFIG = "config.yaml"
    ATTEMPTS = "attempts.jsonl"
    RUN = "run"

    @classmethod
    def new(cls, jobs_dir: str | os.PathLike, name: str) -> "JobDir":
        """A new job's folder under `jobs_dir` (not created yet): a ConfigError now, naming
        --jobs-dir, if it could not be created there."""
        check_can_create(jobs_dir, "--jobs-dir")
        job = cls(Path(jobs_dir).resolve() / timestamped(name))  # (a link planted at the name: not followed)
        if os.path.lexists(job.path):
            raise job._exists()
        return job

    def _exists(self) -> ConfigError:
        return ConfigError(f"--jobs-dir: {self.path} exists already, and a job is given a new folder of its own "
                           "(another job of that name started in the same second, or someone made it beforehand): "
                           "submit again, or pass another --name")

    @property
    def run(self) -> RunDir:
        """The training run directory a job gets when the command gives no run_dir."""
        return RunDir(self.file(self.RUN))

    def log(self, job_id: str, rank: int = 0, stream: str = "out") -> Path:
        return self.file(f"{job_id}_{rank}_log.{stream}")

    def follow(self, job_id: str) -> str:
        """How to watch the job's output."""
        return f"tail -f {self.log(job_id)}   (rank r: {job_id}_<r>_log.out/err)"

    def result(self, job_id: str, rank: int = 0):
        """What the rank returned (submitit's result pickle, written by the job itself): the value,
        or None when it ended without one; a failed rank's error is printed as submitit kept it."""
        path = self.file(f"{job_id}_{rank}_result.pkl")
        if not path.exists():
            return None
        status, value = pickle.loads(path.read_bytes())  # (our own job's file, in our own folder)
        if status != "success":
            print(f"job {job_id} failed:\n{value}", file=sys.stderr, flush=True)
            return None
        return value

    # -- writing ---------------------------------------------------------------------------------

    def create(self) -> None:
        """Make the job's folder, new: one that exists by now (made since `new`, by anyone) is refused,
        never written into. A folder planted at the predictable name in a shared --jobs-dir could hold
        links at the names the launcher writes, or result pickles that `--wait` would read back."""
        if self.made:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(self.path)
        except FileExistsError:
            raise self._exists() from None
        self.made = True

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def write_config(self, cfg: Config) -> None:
        self.file(self.CONFIG).write_text(config_yaml(cfg))

    def write_submission(self, record: dict) -> None:
        record = {**record, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.file(self.SUBMISSION).write_text(json.dumps(record, indent=2) + "\n")

    def record_attempt(self, event: dict) -> None:
        """Append an attempt event (rank 0 of the job writes them)."""
        event = {**event, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with open(self.file(self.ATTEMPTS), "a") as f:
            f.write(json.dumps(event) + "\n")
