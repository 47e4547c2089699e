"""Where this process sits in the job: the one place that reads the launcher's environment.

Understands the DeepSpeed launcher and torchrun (RANK / WORLD_SIZE / LOCAL_RANK), and SLURM
(SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID). Anything else is a world of one. Model, loss
and data code receive rank and world size as arguments and never read `os.environ`.
"""

from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class WorldInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_info_from_env(env: dict | None = None) -> WorldInfo:
    """Rank, world size and local rank from torchrun/DeepSpeed, then SLURM, else (0, 1, 0)."""
    env = os.environ if env is None else env
    for rank, world, local in (("RANK", "WORLD_SIZE", "LOCAL_RANK"),
                               ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")):
        if rank in env and world in env:
            return WorldInfo(int(env[rank]), int(env[world]), int(env.get(local, 0)))
    return WorldInfo()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_process_env() -> WorldInfo:
    """Make torch.distributed initialisable whatever started us: SLURM's variables become
    RANK / WORLD_SIZE / LOCAL_RANK, and plain `python` is a world of one on this host (otherwise
    DeepSpeed falls back to MPI discovery). Returns where this process sits."""
    info = world_info_from_env()
    env = os.environ
    env.setdefault("RANK", str(info.rank))
    env.setdefault("WORLD_SIZE", str(info.world_size))
    env.setdefault("LOCAL_RANK", str(info.local_rank))
    if info.world_size == 1:
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in env]
    if missing:
        raise RuntimeError(f"{' and '.join(missing)} not set for a {info.world_size}-process job: start it with "
                           "deepspeed, torchrun or launch/slurm.py, which set them")
    return info
