"""Submit gallery indexing as one SLURM job over several nodes:

    python launch/index.py --nodes 2 [--profile NAME] [cluster options] -- index --model M --gallery G --out DIR
    python launch/index.py --nodes 2 -- add --index DIR --gallery MORE_IMAGES

Every task (one per GPU, or --tasks-per-node on CPU nodes) is a rank of `python -m itself.retrieve
index` (or `add`) with the arguments after `--`: each embeds its share of the gallery's parts on
its device, rank 0 merges them into the index. On the time-limit / pre-emption warning the job is
requeued and embeds only the parts it had not finished. The model, the gallery and the index
folder must be on a file system every node sees.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from itself import logs
from itself.config import NAME
from itself.errors import exit_code
from itself.retrieve.cli import parser as retrieve_parser
from launch.jobdir import JobDir
from launch.profiles import ProfileError
from launch.slurm import SubmitError, cluster_arguments, executor_or_dry_run, resolve_profile, submit_job, wait_for


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/index.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    cluster_arguments(p, "index-<the index folder's name> or add-<...>", "the sbatch script")
    p.add_argument("retrieve", nargs=argparse.REMAINDER, metavar="-- index|add ARGS",
                   help="the arguments of python -m itself.retrieve index / add")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.setup_from(args)
    command = args.retrieve[1:] if args.retrieve[:1] == ["--"] else args.retrieve
    if command[:1] not in (["index"], ["add"]):
        print("error: give the indexing command after --: `-- index --model M --gallery G --out DIR` or "
              "`-- add --index DIR --gallery G`", file=sys.stderr)
        return 2
    retrieve = retrieve_parser().parse_args(command)  # (exits 2 with argparse's message when wrong)
    out = retrieve.out  # (the index folder: --out of index, --index of add)
    submitted: dict = {}
    code = exit_code(lambda: _submit_indexing(args, command, out, submitted), failures=(SubmitError,))
    return _wait_for_index(out, **submitted) if code == 0 and args.wait and submitted else code


def _submit_indexing(args, command: list[str], out: str, submitted: dict) -> int:
    """Submit the indexing job (or print the dry run); `submitted` gets what --wait follows."""
    if args.nodes < 1:
        raise ProfileError("--nodes must be >= 1")
    if args.name is not None and not NAME.fullmatch(args.name):
        raise ProfileError(f"--name: must be letters, digits, '.', '_' or '-' (a job and folder name), got {args.name!r}")
    profile = resolve_profile(args)
    name = args.name or re.sub(r"[^A-Za-z0-9._-]", "_", f"{command[0]}-{Path(out).name}")
    job = JobDir.new(args.jobs_dir, name)
    world = args.nodes * profile.ranks_per_node
    executor = executor_or_dry_run(args, job, profile, name,
                                   f"\n# every rank runs: python -m itself.retrieve {' '.join(command)}\n")
    if executor is None:
        return 0
    from launch.job import IndexJob

    queued = submit_job(args, executor, job, IndexJob(command), profile, world, f" indexing into {out}",
                        retrieve=command)
    submitted.update(queued=queued, job=job, local=args.local)
    return 0


def _wait_for_index(out: str, queued, job: JobDir, local: bool) -> int:
    if wait_for(queued, job, local) is None:
        print(f"job {queued.job_id} ended without results; see {job}", file=sys.stderr)
        return 1
    from itself.retrieve.store import IndexDir

    info = IndexDir(out).info()
    print(f"index {out}: {info['images']} images in {len(info['batches'])} batch(es), "
          f"{info['index']['kind']} index")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
