"""How many CPU threads and loader processes a rank uses: the cores this process may actually run
on (affinity mask, cgroup quota, SLURM's cpus-per-task), shared among the ranks of its host.

Oversubscription is ruinous on CPU: a rank that starts one OpenMP thread per core of the host,
on a machine where other jobs (or other ranks) hold those cores, waits on its slowest thread at
every operator. The plan never asks for more threads than the cores it may use, unless the user
says so (`train.cpu_threads`, then OMP_NUM_THREADS). Waiting threads also sleep instead of
spinning (OMP_WAIT_POLICY, set in itself/__init__.py): on a busy 2-core machine that, not the
thread count, was the difference between 3-minute and 15-second epochs (BENCHMARKS.md).

`plan_cpus` is the pure computation (values in, a CpuPlan out); `apply_cpu_plan` reads this
process's affinity, cgroup and environment, sets torch's threads and logs the plan once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Collection, Mapping

log = logging.getLogger(__name__)

CGROUP = Path("/sys/fs/cgroup")


@dataclasses.dataclass(frozen=True)
class CpuPlan:
    cores: int
    """Cores this rank may use (its share of what the process may run on; at least 1)."""
    threads: int
    """Intra-op threads (torch.set_num_threads)."""
    interop: int
    """Inter-op threads (torch.set_num_interop_threads)."""
    loader_workers: int
    """Most DataLoader processes a rank runs by default (`data.num_workers=-1`): cores - 1, so the
    loader and the training threads do not compete for the same cores. 0: read in the rank."""
    source: str
    """Where the numbers came from, for the log line."""


def parse_cpu_max(text: str | None) -> float | None:
    """Cores allowed by a cgroup v2 `cpu.max` ("150000 100000" -> 1.5; "max 100000" -> None)."""
    parts = (text or "").split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def parse_cfs(quota_text: str | None, period_text: str | None) -> float | None:
    """Cores allowed by cgroup v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us` (quota -1: unlimited)."""
    return parse_cpu_max(f"{(quota_text or '').strip()} {(period_text or '').strip()}")


def plan_cpus(*, affinity: Collection[int] | None, cpu_count: int, quota: float | None = None,
              env: Mapping[str, str] | None = None, local_ranks: int = 1, cpu_threads: int = 0) -> CpuPlan:
    """The plan of one rank from values: its affinity set, the host's core count, the cgroup quota
    in cores (None: none), the environment (SLURM_CPUS_PER_TASK, OMP_NUM_THREADS), the ranks on
    this host and the config's `train.cpu_threads` (0: auto)."""
    env = env or {}
    limits = [(max(1, cpu_count), f"{cpu_count} cores")]
    if affinity:
        limits.append((len(affinity), f"affinity mask of {len(affinity)} cores"))
    if quota is not None:
        limits.append((max(1, int(quota)), f"cgroup quota of {quota:g} cores"))
    slurm = _positive(env.get("SLURM_CPUS_PER_TASK"))
    # SLURM_CPUS_PER_TASK is already per task (per rank): it is not shared again among local ranks.
    if slurm is not None:
        limits.append((slurm, f"SLURM_CPUS_PER_TASK={slurm}"))
    cores, why = min(limits, key=lambda lim: (lim[0], not lim[1].startswith("SLURM")))
    ranks = max(1, local_ranks)
    if not why.startswith("SLURM") and ranks > 1:
        cores, why = max(1, cores // ranks), f"{why} / {ranks} local ranks"
    threads, source = cores, why
    omp = _positive(env.get("OMP_NUM_THREADS"))
    if cpu_threads > 0:
        threads, source = cpu_threads, f"train.cpu_threads={cpu_threads} ({why}: {cores})"
    elif omp is not None:
        threads, source = omp, f"OMP_NUM_THREADS={omp} ({why}: {cores})"
    # Inter-op threads only run independent ops side by side (torch.jit.fork, a few parallel
    # backends); an eager training step is one chain of ops, so a pool of one per core would sit
    # idle at best and, when used, compete with the intra-op threads for the same cores. One, or two
    # when there are cores to spare beyond a few intra-op threads.
    interop = 2 if threads >= 8 else 1
    return CpuPlan(cores=cores, threads=threads, interop=interop, loader_workers=max(0, cores - 1), source=source)


def _positive(text: str | None) -> int | None:
    text = (text or "").strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


# ----------------------------------------------------------------------------------- this process


def cgroup_quota(root: Path = CGROUP) -> float | None:
    """The tightest CPU quota (in cores) on this process's cgroup and its parents, v2 or v1."""
    found = []
    for folder in _cgroup_folders(root):
        found.append(parse_cpu_max(_read(folder / "cpu.max")))
    for v1 in (root / "cpu", root / "cpu,cpuacct"):
        found.append(parse_cfs(_read(v1 / "cpu.cfs_quota_us"), _read(v1 / "cpu.cfs_period_us")))
    quotas = [q for q in found if q is not None]
    return min(quotas) if quotas else None


def _cgroup_folders(root: Path) -> list[Path]:
    """The v2 cgroup of this process (from /proc/self/cgroup) and its parents up to `root`."""
    rel = ""
    for line in (_read(Path("/proc/self/cgroup")) or "").splitlines():
        if line.startswith("0::"):
            rel = line[3:].strip().strip("/")
    parts = [p for p in rel.split("/") if p and p != ".."]
    return [root.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def local_ranks(where=None, env: Mapping[str, str] | None = None) -> int:
    """Ranks on this host: the launcher's count, else (unknown) as many as the world, up to the cores."""
    env = os.environ if env is None else env
    known = getattr(where, "local_world_size", 0) or _positive(env.get("LOCAL_WORLD_SIZE"))
    world = getattr(where, "world_size", 0) or _positive(env.get("WORLD_SIZE")) or 1
    return known or min(world, os.cpu_count() or 1)


def current_plan(where=None, cpu_threads: int = 0) -> CpuPlan:
    """The plan of this process, from its affinity, cgroup and environment."""
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return plan_cpus(affinity=affinity, cpu_count=os.cpu_count() or 1, quota=cgroup_quota(), env=os.environ,
                     local_ranks=local_ranks(where), cpu_threads=cpu_threads)


_applied: CpuPlan | None = None


def apply_cpu_plan(where=None, cpu_threads: int = 0) -> CpuPlan:
    """Set torch's intra-op and inter-op threads from this process's plan and log it once."""
    global _applied
    import torch

    plan = current_plan(where, cpu_threads)
    torch.set_num_threads(plan.threads)
    try:
        torch.set_num_interop_threads(plan.interop)
    except RuntimeError:  # only settable before the first inter-op work; then it keeps its pool
        pass
    if plan != _applied:
        log.info("CPU threads: %d intra-op, %d inter-op, at most %d loader worker(s) per rank (from %s)",
                 plan.threads, torch.get_num_interop_threads(), plan.loader_workers, plan.source)
    _applied = plan
    return plan


def loader_worker_cap() -> int:
    """The most loader processes a rank starts when `data.num_workers` is auto: from the plan
    applied in this process, or this process's plan when none was (a GPU run)."""
    return (_applied or current_plan()).loader_workers
