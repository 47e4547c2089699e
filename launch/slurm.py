"""Submit ITSELF training as one SLURM job over several nodes: `python launch/slurm.py --nodes 4`.

One task (rank) per GPU; the job checkpoints and requeues itself on the pre-emption / time-limit
warning and resumes from its latest checkpoint. Training options pass through: `--preset`,
`--config`, and `key=value` overrides, exactly as for itself/train.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path


from itself.config import NAME, ConfigError, config_yaml, to_dict
from itself.rundir import timestamped
from itself.presets import PRESETS, resolve_config
from launch.job import TrainJob
from itself.rundir import RunDir
from launch.profiles import ProfileError, SlurmProfile, load_profile, validate

REPO = Path(__file__).resolve().parents[1]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/slurm.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Presets: " + ", ".join(PRESETS))
    cluster_arguments(p)
    t = p.add_argument_group("training (as itself/train.py)")
    t.add_argument("--preset", default="synthetic")
    t.add_argument("--config", help="YAML file of config sections")
    t.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def cluster_arguments(p: argparse.ArgumentParser) -> None:
    """The job's shape and where it goes (shared with launch/index.py)."""
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--profile", default="default", help="cluster profile: cluster_configs/slurm/NAME.yaml or a path")
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
    p.add_argument("--name", help="job name (default: the preset's run name)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and training config; submit nothing")
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
    """A ProfileError unless SLURM's commands are here (submitit needs srun even to render a script)."""
    missing = [c for c in ("sbatch", "srun") if shutil.which(c) is None]
    if missing:
        raise ProfileError(f"{' and '.join(missing)} not found on PATH: submit from a SLURM login node, or run "
                           "the job here with --local")


def submit_error(e: Exception) -> str:
    """sbatch's own complaint, without submitit's wrapping (the last 'sbatch: error' lines)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    sbatch = [line for line in lines if "error" in line.lower() and "sbatch" in line.lower()]
    return " / ".join(sbatch[-3:] or lines[-3:] or [type(e).__name__])[:1000]


def make_executor(folder: Path, profile: SlurmProfile, nodes: int, name: str, local: bool):
    import submitit

    if local:
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(nodes=1, tasks_per_node=nodes * profile.ranks_per_node,
                                   timeout_min=profile.minutes(), gpus_per_node=profile.gpus_per_node)
        return executor
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=profile.max_requeues)
    executor.update_parameters(**slurm_parameters(profile, nodes, name))
    return executor


def sbatch_script(executor) -> str:
    """The script sbatch would get (submitit renders it; nothing is submitted)."""
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


def job_state(job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id, "-o"], capture_output=True, text=True, timeout=30).stdout
    for field in out.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return "UNKNOWN"


def wait_for(job, folder: Path, local: bool) -> dict | None:
    """Block until the job ends; its rank-0 result, or None when it ended without one."""
    result_file = folder / f"{job.job_id}_0_result.pkl"
    last = None
    while True:
        state = "RUNNING" if local and not job.done() else ("DONE" if local else job_state(job.job_id))
        if state != last:
            print(f"[{time.strftime('%H:%M:%S')}] job {job.job_id}: {state}", flush=True)
            last = state
        if (local and job.done()) or (not local and state in TERMINAL):
            break
        time.sleep(2)
    if not result_file.exists():
        return None
    status, value = pickle.loads(result_file.read_bytes())
    if status != "success":
        print(f"job {job.job_id} failed:\n{value}", file=sys.stderr)
        return None
    return value


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.nodes < 1:
            raise ConfigError("--nodes must be >= 1")
        cfg = resolve_config(args.preset, args.config, args.overrides)
        profile = resolve_profile(args)
        world = args.nodes * profile.ranks_per_node
        cfg.validate(world_size=world)
        if cfg.run_dir:  # (a job resumes from any checkpoint it finds: continuing must be asked for)
            RunDir(cfg.run_dir).check_reuse(cfg.train.resume)
        if args.name is not None and not NAME.fullmatch(args.name):
            raise ConfigError(f"--name: must be letters, digits, '.', '_' or '-' (a job and folder name), got {args.name!r}")
        if not args.local:
            require_slurm()
    except (ConfigError, ProfileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = args.name or cfg.name
    folder = (Path(args.jobs_dir) / timestamped(name)).resolve()
    # The run lives in the job folder, unless run_dir is given: to continue a failed run, resubmit
    # with run_dir=<its run folder> (a job resumes from the latest complete checkpoint it finds).
    cfg.run_dir = str(Path(cfg.run_dir).resolve()) if cfg.run_dir else str(folder / "run")
    executor = make_executor(folder, profile, args.nodes, name, args.local)
    if args.dry_run:
        print(f"# sbatch script ({args.nodes} nodes x {profile.ranks_per_node} tasks = {world} ranks, "
              f"{profile.gpus_per_node} GPUs per node)\n")
        print(sbatch_script(executor) if not args.local else "# --local: no sbatch script (submitit local executor)")
        print("\n# training config\n")
        print(config_yaml(cfg), end="")
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    try:
        job = executor.submit(TrainJob(to_dict(cfg), str(folder), profile.max_requeues))
    except Exception as e:  # noqa: BLE001 - sbatch refused the job (partition, account, limits ...)
        shutil.rmtree(folder, ignore_errors=True)
        print(f"error: the job was not submitted: {submit_error(e)}", file=sys.stderr)
        return 1
    (folder / "config.yaml").write_text(config_yaml(cfg))
    (folder / "submission.json").write_text(json.dumps({
        "command": [sys.executable, *sys.argv], "job_ids": [str(job.job_id)], "executor": "local" if args.local else "slurm",
        "nodes": args.nodes, "ranks": world, "profile": dataclasses.asdict(profile), "git_commit": git_commit(),
        "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"), "run_dir": cfg.run_dir,
    }, indent=2) + "\n")
    print(f"submitted job {job.job_id}: {args.nodes} node(s) x {profile.ranks_per_node} rank(s), "
          f"{profile.gpus_per_node} GPU(s)/node")
    print(f"job folder: {folder}")
    print(f"follow: tail -f {folder}/{job.job_id}_0_log.out   (rank r: {job.job_id}_<r>_log.out/err)")
    if not args.local:
        print(f"        squeue -j {job.job_id}   scontrol show job {job.job_id}   scancel {job.job_id}")
    print(f"results: {cfg.run_dir}/results.json   attempts: {folder}/attempts.jsonl")
    if args.wait:
        result = wait_for(job, folder, args.local)
        if result is None:
            print(f"job {job.job_id} ended without results; see {folder}", file=sys.stderr)
            return 1
        print(json.dumps({k: result[k] for k in ("run_dir", "best_epoch", "fusion_weight", "test") if k in result},
                         indent=2))
    return 0


def cli() -> None:
    raise SystemExit(main())


if __name__ == "__main__":
    cli()
