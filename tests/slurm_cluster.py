"""A real Slurm cluster on this host for tests: munged, slurmctld and one slurmd per node
(`slurmd -N nX`, all on 127.0.0.1 with their own ports), started from a generated slurm.conf and
stopped by PID. Needs the Debian packages slurmctld, slurmd, slurm-client and munge (installed by
.ci/run) and root."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("slurmctld", "slurmd", "munged", "sbatch", "scontrol", "sinfo")


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
    """`with SlurmCluster(tmp, nodes=4) as env:` -> environment (SLURM_CONF) for sbatch & co."""

    def __init__(self, workdir: Path, nodes: int = 4, cpus_per_node: int = 2):
        self.dir, self.nodes, self.cpus = Path(workdir), nodes, cpus_per_node
        self.procs: list[subprocess.Popen] = []
        self.conf = self.dir / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    # -- munge ------------------------------------------------------------------------------
    def _ensure_munge(self) -> None:
        if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return  # a munged already answers
        run_dir = Path("/run/munge")
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(run_dir, "munge", "munge")
        for d in ("/var/lib/munge", "/var/log/munge"):
            Path(d).mkdir(parents=True, exist_ok=True)
            shutil.chown(d, "munge", "munge")
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            subprocess.run(["mungekey", "--create", "--force"], check=True)
            shutil.chown(key, "munge", "munge")
        proc = subprocess.Popen(["runuser", "-u", "munge", "--", _sbin("munged"), "--foreground"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        for _ in range(100):
            if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("munged did not start")

    # -- slurm ------------------------------------------------------------------------------
    def _write_conf(self) -> None:
        ctld_port, *node_ports = _free_ports(1 + self.nodes)
        host = socket.gethostname().split(".")[0]
        for d in ("state", "spool", "log"):
            (self.dir / d).mkdir(parents=True, exist_ok=True)
        lines = [
            "ClusterName=itselftest", f"SlurmctldHost={host}", f"SlurmctldPort={ctld_port}",
            "AuthType=auth/munge", "CredType=cred/munge", "SlurmUser=root", "SlurmdUser=root",
            "AuthInfo=cred_expire=10",  # a requeued job waits cred_expire before it starts again
            f"StateSaveLocation={self.dir}/state", f"SlurmdSpoolDir={self.dir}/spool/%n",
            f"SlurmctldPidFile={self.dir}/slurmctld.pid", f"SlurmdPidFile={self.dir}/slurmd.%n.pid",
            f"SlurmctldLogFile={self.dir}/log/slurmctld.log", f"SlurmdLogFile={self.dir}/log/slurmd.%n.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "SchedulerType=sched/backfill",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
            "SlurmdParameters=config_overrides", "ReturnToService=2", "JobRequeue=1", "KillWait=5",
            "InactiveLimit=0", "MinJobAge=600", "SlurmdTimeout=60", "MessageTimeout=30",
        ]
        for i, port in enumerate(node_ports, 1):
            lines.append(f"NodeName=n{i} NodeAddr=127.0.0.1 Port={port} CPUs={self.cpus} RealMemory=4000 State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes=n[1-{self.nodes}] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES")
        self.conf.write_text("\n".join(lines) + "\n")

    def _start(self, cmd: list[str], name: str) -> None:
        log = open(self.dir / "log" / f"{name}.stdout", "w")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env))

    def wait_idle(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        out = ""
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True,
                                 env=self.env).stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            if len(states) == self.nodes and all(s == "idle" for s in states.values()):
                return
            time.sleep(0.5)
        raise RuntimeError(f"slurm nodes not idle after {timeout}s: {out!r}\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-2000:]}" for p in sorted((self.dir / "log").glob("*")))

    def __enter__(self) -> dict:
        self._ensure_munge()
        self._write_conf()
        self._start([_sbin("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld")
        time.sleep(1)
        for i in range(1, self.nodes + 1):
            self._start([_sbin("slurmd"), "-D", "-N", f"n{i}", "-f", str(self.conf)], f"slurmd-n{i}")
        self.wait_idle()
        return self.env

    def __exit__(self, *exc) -> None:
        subprocess.run(["scancel", "--full", "-u", "root"], env=self.env, capture_output=True)
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
