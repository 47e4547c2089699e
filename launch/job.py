"""The SLURM job: sets up the distributed environment from SLURM / submitit, runs
`itself.train.train`, and on the pre-emption warning checkpoints and requeues itself."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import time

import submitit

from itself.config import from_dict
from itself.records import Interrupted
from itself.rundir import RunDir
from launch.jobdir import JobDir


def master_port(job_id: str) -> int:
    """A port derived from the job id, so concurrent jobs on a node do not collide."""
    digits = re.sub(r"\D", "", str(job_id)) or "0"
    return 15000 + int(digits) % 20000


def resolve_master_addr(first_node: str) -> str:
    """The address of the job's first node: its NodeAddr from scontrol, else its resolvable name."""
    try:
        out = subprocess.run(["scontrol", "show", "node", first_node, "-o"], capture_output=True, text=True,
                             timeout=30).stdout
        m = re.search(r"\bNodeAddr=(\S+)", out)
        if m and m.group(1) != first_node:
            return m.group(1)
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        socket.gethostbyname(first_node)
        return first_node
    except OSError:
        raise RuntimeError(f"cannot resolve the job's first node {first_node!r} (MASTER_ADDR): neither "
                           "scontrol's NodeAddr nor DNS / /etc/hosts knows it; add it to /etc/hosts or set "
                           "NodeAddr in slurm.conf") from None


def set_rank_environment(env: "submitit.JobEnvironment") -> bool:
    """This task's rank, world and rendezvous for torch.distributed, from SLURM via submitit;
    True under submitit's local executor."""
    local = os.environ.get("SUBMITIT_EXECUTOR") == "local"
    os.environ.update({
        "RANK": str(env.global_rank), "WORLD_SIZE": str(env.num_tasks), "LOCAL_RANK": str(env.local_rank),
        "LOCAL_WORLD_SIZE": str(env.num_tasks // max(1, env.num_nodes)),
        "MASTER_ADDR": "127.0.0.1" if local else resolve_master_addr(env.hostnames[0]),
        "MASTER_PORT": str(master_port(env.job_id)),
    })
    # Threads per rank: the CPUs Slurm gave the task (set before torch is imported).
    os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("SLURM_CPUS_PER_TASK", "1"))
    return local


def attempt_resume(resume: str, run: RunDir, restarts: int) -> str:
    """`train.resume` for this attempt of a job: what the user gave (`latest`, a checkpoint folder),
    or `auto` (the run's newest complete checkpoint if any, else the start) when they gave nothing.
    A requeued attempt continues its own run (`auto`) once the run has a checkpoint of its own:
    the user's starting point is where the first attempt began, not where a requeue goes on."""
    if restarts > 0 and run.latest_checkpoint() is not None:
        return "auto"
    return resume or "auto"


class TrainJob(submitit.helpers.Checkpointable):
    """Runs one rank of the training. Submitted once; re-run as is by every requeue, when it resumes
    from the run's latest complete checkpoint."""

    def __init__(self, config: dict, job_folder: str, max_requeues: int):
        self.config, self.job_folder, self.max_requeues = config, job_folder, max_requeues

    def __call__(self) -> dict:
        from itself.train import train

        env = submitit.JobEnvironment()
        local = set_rank_environment(env)
        stop = {"requested": False}

        def on_warning(signum, frame):  # every rank gets it; train() stops all at the same step
            stop["requested"] = True
            print(f"[launch] rank {env.global_rank}: got {signal.Signals(signum).name}, will checkpoint", flush=True)

        signal.signal(signal.SIGUSR2, on_warning)
        cfg = from_dict(self.config)
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        run = RunDir(cfg.run_dir)
        cfg.train.resume = attempt_resume(cfg.train.resume, run, restarts)
        source = run.resume_source(cfg.train.resume)
        self._record(env, {"event": "start", "attempt": restarts + 1, "resume_from": source.name if source else None,
                           "hostnames": env.hostnames, "world_size": env.num_tasks})
        result = train(cfg, should_stop=lambda: stop["requested"])
        if not isinstance(result, Interrupted):
            self._record(env, {"event": "completed", "attempt": restarts + 1})
            return dataclasses.asdict(result)  # (plain data in submitit's result file)
        if local or restarts >= self.max_requeues:
            why = "local executor" if local else f"max_requeues={self.max_requeues} reached"
            self._record(env, {"event": "stopped", "attempt": restarts + 1, "reason": why,
                               "checkpoint": result.checkpoint})
            return dataclasses.asdict(result)
        self._record(env, {"event": "requeue", "attempt": restarts + 1, "checkpoint": result.checkpoint})
        if env.global_rank == 0:
            subprocess.run(["scontrol", "requeue", str(env.job_id)], check=True, timeout=60)
        time.sleep(300)  # Slurm ends this attempt now; never report a result for it
        sys.exit(1)

    def checkpoint(self, *args, **kwargs):
        """submitit's own pre-emption path (if its handler runs instead of ours): requeue the same
        job; it resumes from the latest complete checkpoint."""
        return submitit.helpers.DelayedSubmission(TrainJob(self.config, self.job_folder, self.max_requeues))

    def _record(self, env, event: dict) -> None:
        if env.global_rank == 0:
            JobDir(self.job_folder).record_attempt({**event, "job_id": str(env.job_id)})


class IndexJob(submitit.helpers.Checkpointable):
    """One rank of `python -m itself.retrieve index` (or `add`) in a SLURM job. Requeued on the
    time-limit / pre-emption warning (submitit's handler), it runs again and embeds only the parts
    that are not finished."""

    def __init__(self, argv: list[str]):
        self.argv = argv

    def __call__(self) -> dict:
        env = submitit.JobEnvironment()
        set_rank_environment(env)
        from itself.retrieve.cli import main

        code = main(self.argv)
        if code != 0:
            raise RuntimeError(f"rank {env.global_rank}: python -m itself.retrieve {' '.join(self.argv)} exited with "
                               f"status {code}; its error is in this task's log")
        return {"rank": env.global_rank, "world_size": env.num_tasks, "hostname": socket.gethostname()}
