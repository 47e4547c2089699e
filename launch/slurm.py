"""Submit ITSELF training as one SLURM job over several nodes: `python launch/slurm.py --nodes 4`.

One task (rank) per GPU; the job checkpoints and requeues itself on the pre-emption / time-limit
warning and resumes from its latest checkpoint. Training options pass through: `--preset`,
`--config`, and `key=value` overrides, exactly as for itself/train.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from itself import logs
from itself.config import NAME, ConfigError, Config, config_yaml, deepspeed_file, to_dict
from itself.errors import UserError, exit_code
from itself.paths import check_can_create
from itself.presets import PRESETS, resolve_config
from itself.records import Results
from itself.rundir import RunDir
from launch.jobdir import JobDir
from launch.profiles import ProfileError, SlurmProfile, load_profile, validate

REPO = Path(__file__).resolve().parents[1]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}


def _parser() -> argparse.ArgumentParser:
    command = "itself-slurm" if Path(sys.argv[0]).name == "itself-slurm" else "launch/slurm.py"  # (as typed)
    p = argparse.ArgumentParser(prog=command, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Presets: " + ", ".join(PRESETS))
    cluster_arguments(p)
    t = p.add_argument_group("training (as itself/train.py)")
    t.add_argument("--preset", default="synthetic")
    t.add_argument("--config", help="YAML file of config sections")
    t.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def cluster_arguments(p: argparse.ArgumentParser, default_name: str = "the preset's run name",
                      dry_run: str = "the sbatch script and training config") -> None:
    """The job's shape and where it goes (shared with launch/index.py and launch/convert.py, which
    name their jobs and print their scripts otherwise)."""
    logs.add_arguments(p)
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--profile", default="default",
                   help="cluster profile: cluster_configs/slurm/NAME.yaml or a path (default: default)")
    o = p.add_argument_group("profile overrides")
    o.add_argument("--gpus-per-node", type=int)
    o.add_argument("--tasks-per-node", type=int, help="ranks per node on CPU-only nodes")
    o.add_argument("--cpus-per-task", type=int)
    o.add_argument("--mem-gb", type=float)
    o.add_argument("--partition")
    o.add_argument("--account")
    o.add_argument("--qos")
    o.add_argument("--constraint")
    o.add_argument("--time", help="time limit: HH:MM:SS, D-HH:MM:SS or minutes")
    o.add_argument("--exclusive", action=argparse.BooleanOptionalAction, default=None)
    o.add_argument("--signal-delay-s", type=int)
    o.add_argument("--max-requeues", type=int)
    p.add_argument("--jobs-dir", default="runs/slurm", help="where job folders go (default runs/slurm)")
    p.add_argument("--name", help=f"job name (default: {default_name})")
    p.add_argument("--dry-run", action="store_true", help=f"print {dry_run}; submit nothing")
    p.add_argument("--local", action="store_true", help="run the same job with submitit's local executor here")
    p.add_argument("--wait", action="store_true", help="wait for the job to finish and print its results")


def resolve_profile(args) -> SlurmProfile:
    profile = load_profile(args.profile)
    for field in ("gpus_per_node", "tasks_per_node", "cpus_per_task", "mem_gb", "partition", "account", "qos",
                  "constraint", "time", "exclusive", "signal_delay_s", "max_requeues"):
        value = getattr(args, field)
        if value is not None:
            setattr(profile, field, value)
    validate(profile, "command line")
    return profile


def slurm_parameters(profile: SlurmProfile, nodes: int, name: str) -> dict:
    """submitit SlurmExecutor parameters for a profile."""
    params = {
        "job_name": name, "nodes": nodes, "ntasks_per_node": profile.ranks_per_node,
        "time": profile.minutes(), "signal_delay_s": profile.signal_delay_s,
        "additional_parameters": {"requeue": True, **profile.sbatch_args},
    }
    if profile.gpus_per_node:
        params["gpus_per_node"] = profile.gpus_per_node
    optional = {"partition": profile.partition, "account": profile.account, "qos": profile.qos,
                "constraint": profile.constraint, "cpus_per_task": profile.cpus_per_task,
                "mem": f"{profile.mem_gb:g}GB" if profile.mem_gb else None,
                "exclusive": True if profile.exclusive else None,
                "srun_args": list(profile.srun_args) or None, "setup": list(profile.setup) or None}
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return commit + ("+uncommitted" if dirty else "") if commit else "unknown"
    except OSError:
        return "unknown"


def require_slurm() -> None:
    """A ProfileError unless SLURM's commands are here to submit with."""
    missing = [c for c in ("sbatch", "srun") if shutil.which(c) is None]
    if missing:
        raise ProfileError(f"{' and '.join(missing)} not found on PATH: submit from a SLURM login node, or run "
                           "the job here with --local (--dry-run shows the sbatch script anywhere)")


def require_submitit():
    """The submitit module, or a UserError saying how to install it (the `[slurm]` extra)."""
    try:
        import submitit
    except ImportError:
        raise UserError("submitting needs submitit: pip install 'itself-at-scale[slurm]' (or -e '.[slurm]' in a "
                        "clone)") from None
    return submitit


def submit_error(e: Exception) -> str:
    """sbatch's own complaint, without submitit's wrapping (the last 'sbatch: error' lines)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    sbatch = [line for line in lines if "error" in line.lower() and "sbatch" in line.lower()]
    return " / ".join(sbatch[-3:] or lines[-3:] or [type(e).__name__])[:1000]


class SubmitError(RuntimeError):
    """sbatch refused the job (a partition, account or limit it does not accept): exit 1."""


def submit(executor, job: JobDir, payload):
    """Submit `payload` in the job folder, created for it; removed again when sbatch refuses."""
    job.create()
    try:
        return executor.submit(payload)
    except Exception as e:  # noqa: BLE001 - sbatch refused the job (partition, account, limits ...)
        job.remove()
        raise SubmitError(f"the job was not submitted: {submit_error(e)}") from None


def submit_job(args, executor, job: JobDir, payload, profile: SlurmProfile, world: int, shape: str,
               config: Config | None = None, **extra):
    """Submit `payload` in the job folder and record it there (the training `config` when given,
    then submission.json, with `extra`); prints the job id, the job's `shape` and how to follow it.
    SubmitError when sbatch refuses."""
    submitted = submit(executor, job, payload)
    if config is not None:
        job.write_config(config)
    job.write_submission(submission(args, submitted.job_id, profile, world, **extra))
    print(f"submitted job {submitted.job_id}: {args.nodes} node(s) x {profile.ranks_per_node} rank(s){shape}")
    print(f"job folder: {job}")
    print(f"follow: {job.follow(submitted.job_id)}")
    return submitted


def executor_or_dry_run(args, job: JobDir, profile: SlurmProfile, name: str, shown: str):
    """The executor of the job `args` asks for, or None after printing the dry run (the sbatch
    script, then `shown`: what each rank runs) without submitting anything."""
    if args.dry_run:
        print(dry_run(job, profile, args.nodes, name, args.local))
        print(shown, end="")
        return None
    if not args.local:
        require_slurm()
    return make_executor(job, profile, args.nodes, name, args.local)


def submission(args, job_id, profile: SlurmProfile, world: int, **extra) -> dict:
    """What submission.json records of a job: the command, the job id, where it runs, the commit."""
    return {"command": [sys.executable, *sys.argv], **extra, "job_ids": [str(job_id)],
            "executor": "local" if args.local else "slurm", "nodes": args.nodes, "ranks": world,
            "profile": dataclasses.asdict(profile), "git_commit": git_commit()}


def make_executor(job: JobDir, profile: SlurmProfile, nodes: int, name: str, local: bool,
                  render_only: bool = False):
    """submitit's executor for the job: local, for SLURM, or (`render_only`) one that only renders
    the sbatch script, on any machine: submitit refuses to make a SLURM executor without srun on
    PATH, and rendering never runs it."""
    submitit = require_submitit()
    if local:
        job.create()  # (submitit's local executor makes its folder at once: ours, new, first)
        executor = submitit.LocalExecutor(folder=job.path)
        executor.update_parameters(nodes=1, tasks_per_node=nodes * profile.ranks_per_node,
                                   timeout_min=profile.minutes(), gpus_per_node=profile.gpus_per_node)
        return executor

    class ScriptOnly(submitit.SlurmExecutor):
        @classmethod
        def affinity(cls) -> int:
            return 1

    executor = (ScriptOnly if render_only else submitit.SlurmExecutor)(folder=job.path,
                                                                      max_num_timeout=profile.max_requeues)
    executor.update_parameters(**slurm_parameters(profile, nodes, name))
    return executor


def sbatch_script(executor) -> str:
    """The script sbatch would get from `executor` (submitit renders it; nothing is submitted)."""
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


def dry_run(job: JobDir, profile: SlurmProfile, nodes: int, name: str, local: bool) -> str:
    """What --dry-run prints first: the job's shape and its sbatch script."""
    world = nodes * profile.ranks_per_node
    head = (f"# sbatch script ({nodes} nodes x {profile.ranks_per_node} tasks = {world} ranks, "
            f"{profile.gpus_per_node} GPUs per node)\n\n")
    return head + ("# --local: no sbatch script (submitit local executor)" if local else
                   sbatch_script(make_executor(job, profile, nodes, name, local=False, render_only=True)))


def job_state(job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id, "-o"], capture_output=True, text=True, timeout=30).stdout
    for field in out.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return "UNKNOWN"


def wait_for(job, folder: JobDir, local: bool):
    """Block until the job ends; its rank-0 result, or None when it ended without one."""
    last = None
    while True:
        state = "RUNNING" if local and not job.done() else ("DONE" if local else job_state(job.job_id))
        if state != last:
            print(f"[{time.strftime('%H:%M:%S')}] job {job.job_id}: {state}", flush=True)
            last = state
        if (local and job.done()) or (not local and state in TERMINAL):
            break
        time.sleep(2)
    return folder.result(job.job_id)


def results_summary(results: Results) -> dict:
    """What --wait prints of a finished run's results.json."""
    return {"run_dir": results.run_dir, "best_epoch": results.best_epoch, "fusion_weight": results.fusion_weight,
            "selection": results.selection, "test": results.test}


def plan(args) -> tuple[Config, SlurmProfile, JobDir]:
    """The validated training config, cluster profile and (new, not yet created) job folder; a
    UserError for anything the user can fix, found before anything is written or submitted."""
    if args.nodes < 1:
        raise ConfigError("--nodes must be >= 1")
    if args.name is not None and not NAME.fullmatch(args.name):
        raise ConfigError(f"--name: must be letters, digits, '.', '_' or '-' (a job and folder name), got {args.name!r}")
    cfg = resolve_config(args.preset, args.config, args.overrides)
    profile = resolve_profile(args)
    cfg.validate(world_size=args.nodes * profile.ranks_per_node)
    deepspeed_file(cfg.train.deepspeed)  # (read by every rank when the job starts: checked here)
    job = JobDir.new(args.jobs_dir, args.name or cfg.name)
    if cfg.run_dir:  # (a job resumes from any checkpoint it finds: continuing must be asked for)
        check_can_create(cfg.run_dir, "run_dir")
        RunDir(cfg.run_dir).check_reuse(cfg.train.resume)
    # The run lives in the job folder, unless run_dir is given: to continue a failed run, resubmit
    # with run_dir=<its run folder> (a job resumes from the latest complete checkpoint it finds).
    cfg.run_dir = str(Path(cfg.run_dir).resolve()) if cfg.run_dir else str(job.run)
    return cfg, profile, job


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.setup_from(args)
    submitted: dict = {}
    code = exit_code(lambda: _submit_training(args, submitted), failures=(SubmitError,))
    return _wait_for_training(**submitted) if code == 0 and args.wait and submitted else code


def _submit_training(args, submitted: dict) -> int:
    """Plan the job and submit it (or print the dry run); `submitted` gets what --wait follows."""
    cfg, profile, job = plan(args)
    name, world = args.name or cfg.name, args.nodes * profile.ranks_per_node
    executor = executor_or_dry_run(args, job, profile, name, "\n# training config\n\n" + config_yaml(cfg))
    if executor is None:
        return 0
    from launch.job import TrainJob

    queued = submit_job(args, executor, job, TrainJob(to_dict(cfg), str(job.path), profile.max_requeues),
                        profile, world, f", {profile.gpus_per_node} GPU(s)/node", config=cfg, run_dir=cfg.run_dir)
    if not args.local:
        print(f"        squeue -j {queued.job_id}   scontrol show job {queued.job_id}   scancel {queued.job_id}")
    run = RunDir(cfg.run_dir)
    print(f"results: {run.file(RunDir.RESULTS)}   attempts: {job.path / JobDir.ATTEMPTS}")
    submitted.update(queued=queued, job=job, run=run, local=args.local)
    return 0


def _wait_for_training(queued, job: JobDir, run: RunDir, local: bool) -> int:
    if wait_for(queued, job, local) is None or not run.file(RunDir.RESULTS).exists():
        print(f"job {queued.job_id} ended without results; see {job}", file=sys.stderr)
        return 1
    print(json.dumps(results_summary(run.results()), indent=2))
    return 0


def cli() -> None:
    raise SystemExit(main())


if __name__ == "__main__":
    cli()
