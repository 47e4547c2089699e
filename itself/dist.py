"""The process layer: where this process sits in the job, its device and threads, its process group,
and "rank 0 decides, every rank learns it". Training, indexing and the benches start through here.

Understands the DeepSpeed launcher and torchrun (RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE),
and SLURM (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID / SLURM_NTASKS_PER_NODE). Anything else is a
world of one. Every value is checked before any process group forms: a launcher mistake
(`RANK=3 WORLD_SIZE=2`, a port that is not a number, a master address that does not resolve) is
one `error:` line within seconds, never a hang. Model, loss and data code receive rank and world
size as arguments and never read `os.environ`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import socket
from datetime import timedelta
from typing import Callable, TypeVar

from .errors import UserError

log = logging.getLogger(__name__)
T = TypeVar("T")


class LaunchError(UserError):
    """The launcher's environment cannot start this process (exit 2, with the fix)."""


@dataclasses.dataclass(frozen=True)
class WorldInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 0
    """Ranks on this host, when the launcher says (0: unknown)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_LAUNCHERS = (("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
              ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"))


def _int(env, name: str, low: int, high: int | None = None) -> int:
    text = str(env[name]).strip()
    try:
        value = int(text)
    except ValueError:
        raise LaunchError(f"{name}={text[:40]!r} is not a whole number; unset it, or start the job with deepspeed, "
                          "torchrun, srun or launch/slurm.py, which set it") from None
    if value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise LaunchError(f"{name}={value} is out of range (must be {bound}); check how the job was started")
    return value


def world_info_from_env(env: dict | None = None) -> WorldInfo:
    """Rank, world size and local rank from torchrun/DeepSpeed, then SLURM, else (0, 1, 0); a
    LaunchError naming the variable when they are not consistent."""
    env = os.environ if env is None else env
    for rank, world, local, local_world in _LAUNCHERS:
        if rank in env and world in env:
            world_size = _int(env, world, 1, 1 << 20)
            r = _int(env, rank, 0)
            if r >= world_size:
                raise LaunchError(f"{rank}={r} but {world}={world_size}: ranks are 0..{world_size - 1}; check how "
                                  "the job was started (a rank started by hand needs every rank of the world)")
            local_size = _int(env, local_world, 1, world_size) if env.get(local_world, "").strip().isdigit() else 0
            local_rank = _int(env, local, 0, world_size - 1) if local in env else 0
            if local_size and local_rank >= local_size:
                raise LaunchError(f"{local}={local_rank} but {local_world}={local_size}: local ranks are "
                                  f"0..{local_size - 1}")
            return WorldInfo(r, world_size, local_rank, local_size)
        if (rank in env) != (world in env):
            given, missing = (rank, world) if rank in env else (world, rank)
            raise LaunchError(f"{given} is set but {missing} is not: set both (or neither, for a world of one)")
    return WorldInfo()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return True
    return False


def ensure_process_env() -> WorldInfo:
    """Make torch.distributed initialisable whatever started us: SLURM's variables become
    RANK / WORLD_SIZE / LOCAL_RANK, and plain `python` is a world of one on this host (otherwise
    DeepSpeed falls back to MPI discovery). Checks MASTER_ADDR / MASTER_PORT. Returns where this
    process sits; a LaunchError with the fix when it cannot start."""
    info = world_info_from_env()
    env = os.environ
    env.setdefault("RANK", str(info.rank))
    env.setdefault("WORLD_SIZE", str(info.world_size))
    env.setdefault("LOCAL_RANK", str(info.local_rank))
    if info.world_size == 1:
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
        # A world of one needs no fixed port: the launcher's default (29500) may be taken by another
        # run on this machine, which would fail this one with EADDRINUSE.
        if _port_in_use(_int(env, "MASTER_PORT", 1, 65535)):
            log.info("MASTER_PORT %s is in use on this machine; this single-process run takes a free port",
                     env["MASTER_PORT"])
            env["MASTER_PORT"] = str(free_port())
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not env.get(v)]
    if missing:
        raise LaunchError(f"{' and '.join(missing)} not set for a {info.world_size}-process job: start it with "
                          "deepspeed, torchrun or launch/slurm.py, which set them")
    _int(env, "MASTER_PORT", 1, 65535)
    try:
        socket.getaddrinfo(env["MASTER_ADDR"], None)
    except (socket.gaierror, UnicodeError) as e:
        raise LaunchError(f"MASTER_ADDR={env['MASTER_ADDR'][:80]!r} does not resolve ({e}); give the first "
                          "node's host name or address") from None
    return info


# ----------------------------------------------------------------------------------- device and threads


def resolve_device(name: str, local_rank: int):
    """`auto` (this rank's GPU when there is one), `cuda` or `cpu`."""
    import torch

    from .errors import ConfigError

    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("train.device: cuda requested but no CUDA device is visible")
    torch.cuda.set_device(local_rank % torch.cuda.device_count())
    return torch.device("cuda", torch.cuda.current_device())


def share_cpu_threads(where: WorldInfo, cpu_threads: int = 0) -> None:
    """On CPU, split the cores this process may use among the ranks of this host (oversubscription
    is ruinous); `cpu_threads` > 0 (train.cpu_threads) overrides. The policy is `itself.cpus`."""
    from .cpus import apply_cpu_plan

    apply_cpu_plan(where, cpu_threads)


# ----------------------------------------------------------------------------------- the process


class Process:
    """This process in its job: rank, world, device; a process group when the world is larger than
    one (or when asked), and the collectives every entry point needs to agree."""

    def __init__(self, where: WorldInfo, device):
        self.where, self.device = where, device
        self.rank, self.world, self.local_rank = where.rank, where.world_size, where.local_rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def grouped(self) -> bool:
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized()

    def decide(self, make: Callable[[], T]) -> T:
        """`make()` runs on rank 0; every rank returns its value, or raises the same error: a
        UserError (its type and message) as that error, anything else as a RuntimeError naming it."""
        box: list = [None]
        if self.is_main:
            try:
                box = [("ok", make())]
            except UserError as e:
                box = [("user", (type(e), str(e)))]
            except Exception as e:
                if self.world > 1 and self.grouped:  # tell the others before failing here
                    self._broadcast([("failed", f"{type(e).__name__}: {e}")])
                raise
        if self.world > 1 and self.grouped:
            box = self._broadcast(box)
        status, value = box[0]
        if status == "user":
            kind, message = value
            raise (kind if isinstance(kind, type) and issubclass(kind, UserError) else UserError)(message)
        if status == "failed":
            raise RuntimeError(f"rank 0 failed: {value}")
        return value

    def share(self, value: T) -> T:
        """Rank 0's `value` on every rank."""
        return self._broadcast([value])[0] if self.world > 1 and self.grouped else value

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any (so all ranks act at the same step)."""
        if not (self.world > 1 and self.grouped):
            return flag
        import torch
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=self.device if self._backend_device() else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.world > 1 and self.grouped:
            import torch.distributed as dist

            dist.barrier()

    def join_group(self, timeout_s: float) -> None:
        """Form the process group with the other ranks (gloo on CPU, NCCL on GPU), if not formed yet."""
        _init_group(self.device, timeout_s)

    def close(self) -> None:
        """Leave the group cleanly (a live group aborts the process at interpreter shutdown). When
        DeepSpeed joined it, through DeepSpeed: it drops the groups it keeps, so that a second run in
        this process (train() called again, from a notebook or a test) starts from nothing."""
        if self.grouped:
            import torch.distributed as dist

            deepspeed_comm = sys.modules.get("deepspeed.comm.comm")  # (the module that holds `cdb`)
            if deepspeed_comm is not None and getattr(deepspeed_comm, "cdb", None) is not None \
                    and deepspeed_comm.cdb.is_initialized():
                deepspeed_comm.destroy_process_group()
            else:
                dist.destroy_process_group()

    def _broadcast(self, box: list) -> list:
        import torch.distributed as dist

        dist.broadcast_object_list(box, src=0)
        return box

    def _backend_device(self) -> bool:
        import torch.distributed as dist

        return dist.get_backend() != "gloo"


def start(device: str = "auto", timeout_s: float = 600, *, group: str = "auto", cpu_threads: int = 0) -> Process:
    """Start this process: check the launcher's environment, pick the device (this rank's GPU with
    `auto`), share the CPU cores among this host's ranks, and form the process group (`group`:
    `auto` = when the world is larger than one, `always`, `never`). A collective waits at most
    `timeout_s` for the other ranks; `cpu_threads` > 0 (train.cpu_threads) sets the CPU threads."""
    where = ensure_process_env()
    dev = resolve_device(device, where.local_rank)
    if dev.type == "cpu":
        share_cpu_threads(where, cpu_threads)
    proc = Process(where, dev)
    if group == "always" or (group == "auto" and where.world_size > 1):
        proc.join_group(timeout_s)
    return proc


def _init_group(device, timeout_s: float) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    except Exception as e:  # noqa: BLE001 - the rendezvous: say what to fix, not where torch failed
        text = str(e)
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if "EADDRINUSE" in text or "address already in use" in text.lower():
            raise LaunchError(f"MASTER_PORT {port} on {addr} is in use (another training or job on this machine?): "
                              "start with another port: `deepspeed --master_port PORT ...`, `torchrun --master-port "
                              "PORT ...`, or MASTER_PORT=PORT") from None
        if "timed out" in text.lower() or "timeout" in type(e).__name__.lower():
            raise LaunchError(f"the other ranks did not join at {addr}:{port} within {timeout_s:g} s (is every rank "
                              "started, and MASTER_ADDR reachable from every node?)") from None
        raise
