"""Convert a person pre-training corpus on several SLURM nodes:

    python launch/convert.py --nodes 4 [--profile NAME] [cluster options] -- --dataset webperson --root R --out O [build flags]

The build flags are `itself-shards build`'s (corpora only: webperson, synth-pedes, mals,
luperson-t, ham-pedes, pairs). Here, with the output's lock held, the corpus is planned (`shards.chunking`:
the annotations read once and cut into chunks; an existing plan of the same settings is reused).
Then two jobs are submitted: a job array of N tasks, task i converting the unfinished chunks i,
i + N, i + 2N, ... with every core of its node, and a merge job that starts when the array has
ended (afterany) and writes the dataset, or fails naming the chunks that are missing. Both are
requeued on the time-limit / pre-emption warning and carry on where they stopped: finished chunks
are kept. Submitting the same command again converts only what is missing. `--out` and the
conversion's work folder beside it (`.<out>.convert`) must be on a file system every node sees.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import socket
import sys
from pathlib import Path

import submitit

from itself import logs
from itself.errors import UserError
from launch.profiles import ProfileError
from launch.jobdir import JobDir
from launch.slurm import (cluster_arguments, git_commit, make_executor, require_slurm, resolve_profile, sbatch_script,
                          submit_error, wait_for)
from shards.chunking import chunk_done, load_plan
from shards.chunks import convert_chunks
from shards.cli import build_args, corpus_options
from shards.corpora import CORPORA
from shards.corpus_build import merge_corpus, plan_corpus, settings_of
from shards.errors import BuildError, BuildFailed, RejectsError, error_line


class ConvertTask(submitit.helpers.Checkpointable):
    """Task `task` of the array: converts the unfinished chunks task, task + tasks, ... with every
    core it was given. Requeued on the warning, it converts what is still missing."""

    def __init__(self, work: str, tasks: int):
        self.work, self.tasks = work, tasks

    def __call__(self, task: int) -> dict:
        work = Path(self.work)
        plan = load_plan(work)
        if plan is None:
            raise BuildError(f"{work} holds no conversion plan (removed meanwhile?)")
        mine = [i for i in range(task, len(plan["chunks"]), self.tasks) if not chunk_done(work, i)]
        workers = len(os.sched_getaffinity(0))
        node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        print(f"task {task}: converting {len(mine)} chunks with {workers} processes on {node}", flush=True)
        images = convert_chunks(work, mine, workers, progress=False)
        print(f"task {task}: converted {len(mine)} chunks ({images} records)", flush=True)
        return {"task": task, "chunks": mine, "records": images, "node": node}


class MergeTask(submitit.helpers.Checkpointable):
    """The merge job: writes the dataset from the converted chunks and commits it."""

    def __init__(self, out: str, strict: bool, allow_rejects: bool, overwrite: bool):
        self.out, self.strict, self.allow_rejects, self.overwrite = out, strict, allow_rejects, overwrite

    def __call__(self) -> dict:
        info = merge_corpus(self.out, strict=self.strict, allow_rejects=self.allow_rejects, overwrite=self.overwrite)
        print(f"wrote {self.out}: read {info['read']} = written {info['written']} + rejected {info['rejected']}",
              flush=True)
        return {k: info[k] for k in ("read", "written", "rejected", "rejected_by_reason")}


def _arguments(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(cluster options, the build flags after `--`)."""
    cut = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(prog="launch/convert.py", description=__doc__,
                                usage="%(prog)s [cluster options] -- BUILD FLAGS (of itself-shards build)",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    cluster_arguments(p, "convert-<the --out folder's name>", "the sbatch scripts (the array and the merge)")
    return p.parse_args(argv[:cut]), argv[cut + 1:]


def _cpu_profile(args):
    """The profile for conversion tasks: one task per node, no GPU."""
    profile = resolve_profile(args)
    profile.gpus_per_node, profile.tasks_per_node = 0, 1
    return profile


def _local_executor(folder: Path, profile):
    executor = submitit.LocalExecutor(folder=folder)
    executor.update_parameters(timeout_min=profile.minutes())
    return executor


def main(argv: list[str] | None = None) -> int:
    args, rest = _arguments(sys.argv[1:] if argv is None else list(argv))
    logs.setup_from(args)
    try:
        build = build_args(rest)
        if build.dataset not in CORPORA:
            raise BuildError(f"--dataset {build.dataset}: launch/convert.py converts the corpora ({', '.join(CORPORA)}); "
                             "build the others with itself-shards build --workers N on one node")
        if args.nodes < 1:
            raise ProfileError("--nodes must be >= 1")
        profile = _cpu_profile(args)
        options = corpus_options(build)
        settings_of(build.dataset, build.root, options)  # (the input is there, before anything is submitted)
        name = args.name or re.sub(r"[^A-Za-z0-9._-]", "_", f"convert-{Path(build.out).name}")
        job_dir = JobDir.new(args.jobs_dir, name)
        if not args.local and not args.dry_run:
            require_slurm()
    except (BuildError, UserError) as e:
        print(error_line(e), file=sys.stderr)
        return 2
    folder = job_dir.path
    executor = None if args.local else make_executor(job_dir, profile, 1, name, False, render_only=args.dry_run)
    if args.dry_run:
        print(f"# array job: {args.nodes} tasks (one node each), task i converting chunks i, i+{args.nodes}, ...\n")
        if args.local:
            print("# --local: no sbatch script (submitit local executor)")
        else:
            executor.parameters["map_count"] = args.nodes
            print(sbatch_script(executor))
            del executor.parameters["map_count"]
            executor.update_parameters(dependency="afterany:<array job id>")
            print("\n# then the merge job (one task), after the array:\n")
            print(sbatch_script(executor))
        print(f"\n# conversion: itself-shards build {' '.join(rest)}")
        return 0
    try:
        work, plan = plan_corpus(build.dataset, build.root, build.out, options, overwrite=build.overwrite,
                                 progress=not build.no_progress)
    except BuildError as e:
        print(error_line(e), file=sys.stderr)
        return 2
    n = len(plan["chunks"])
    left = sum(not chunk_done(work, i) for i in range(n))
    print(f"plan: {plan['read']} records in {n} chunks ({left} to convert) in {work}")
    try:
        job_dir.create()
    except UserError as e:
        print(error_line(e), file=sys.stderr)
        return 2
    if args.local:  # (submitit's local executor makes its folder at once: after ours, new)
        executor = _local_executor(folder, profile)
    tasks = max(1, min(args.nodes, left))
    merge = MergeTask(build.out, build.strict, build.allow_rejects, build.overwrite)
    try:
        array = executor.map_array(ConvertTask(str(work), tasks), list(range(tasks)))
        if args.local:
            for job in array:
                job.result()
            merged = None
            merge()
        else:
            array_id = str(array[0].job_id).split("_")[0]
            executor.update_parameters(dependency=f"afterany:{array_id}")
            merged = executor.submit(merge)
    except (BuildError, BuildFailed, RejectsError) as e:
        print(error_line(e), file=sys.stderr)
        return 2 if isinstance(e, BuildError) else 1
    except Exception as e:  # noqa: BLE001 - sbatch refused, a local task failed
        print(error_line(f"the conversion could not run: {submit_error(e)}; finished chunks are kept in {work}"),
              file=sys.stderr)
        return 1
    ids = [str(j.job_id) for j in array] + ([str(merged.job_id)] if merged is not None else [])
    job_dir.write_submission({
        "command": [sys.executable, *sys.argv], "build": rest, "job_ids": ids, "tasks": tasks,
        "executor": "local" if args.local else "slurm", "profile": dataclasses.asdict(profile),
        "work": str(work), "chunks": n, "git_commit": git_commit(),
    })
    if args.local:
        return 0
    print(f"submitted array job {array[0].job_id.split('_')[0]} ({tasks} tasks) and merge job {merged.job_id} "
          f"(after the array) converting into {build.out}")
    print(f"job folder: {folder}")
    print(f"follow: tail -f {folder}/{merged.job_id}_0_log.out   (task i: {array[0].job_id.split('_')[0]}_<i>_0_log.out)")
    if args.wait:
        if wait_for(merged, job_dir, False) is None:
            print(f"the merge job {merged.job_id} ended without writing {build.out}; see {folder}", file=sys.stderr)
            return 1
        print(f"wrote {build.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
