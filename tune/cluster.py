"""The Ray cluster a search runs on: `--address` checked before Ray is asked (its client waits
minutes for a head that is not there), Ray started or joined, and whether a trial fits a node."""

from __future__ import annotations

import os
import socket

from itself.config import ConfigError
from tune.settings import SearchSettings
from tune.trial import worker_env

ADDRESS_TIMEOUT_S = 10


class RayUnavailable(RuntimeError):
    """Ray could not start on this machine (exit 1)."""


def check_address(address: str | None, timeout_s: float = ADDRESS_TIMEOUT_S) -> None:
    """A ConfigError unless something answers at --address HOST:PORT within `timeout_s`; `auto`
    and no address are Ray's to resolve."""
    if not address or address == "auto":
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"--address: expected HOST:PORT (the Ray head's GCS address, e.g. 10.0.0.1:6379) or auto, "
                          f"got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        why = "no answer" if isinstance(e, socket.timeout) else (e.strerror or str(e))
        raise ConfigError(f"no Ray cluster answers at {address} within {timeout_s:g} s ({why}); start one with "
                          f"`ray start --head --port {port}` on {host} (cluster_configs/ray/start_ray_slurm.sh in a "
                          "SLURM allocation), or leave --address out to run on this machine") from None


def local_cpus(s: SearchSettings) -> int:
    """CPUs of a Ray started here: this machine's, or as many as one trial asks for (its seeds then
    share the cores) so that a trial can always start."""
    return max(os.cpu_count() or 1, s.largest_demand()["CPU"])


def connect(address: str | None, s: SearchSettings) -> None:
    """Join the Ray cluster at `address`, or start one here: a ConfigError when what answers at
    `address` is no Ray head, RayUnavailable when Ray cannot start here."""
    # Every checkpointed report saves the experiment's state (what lets a killed driver resume with
    # its trials' last evaluations); Tune warns about it as if it were a mistake.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's reporter: the one that is silent at verbose=0 (the newer one still prints a banner and
    # a TensorBoard command for Ray's session folder). tune.progress.Progress reports instead.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import ray

    try:
        ray.init(address=address, num_cpus=None if address else local_cpus(s), include_dashboard=False,
                 log_to_driver=False, configure_logging=False, runtime_env={"env_vars": worker_env()})
    except (ConnectionError, RuntimeError) as e:  # (something answered at --address, but not a Ray head)
        last = str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__
        if address:
            raise ConfigError(f"no Ray cluster answers at {address}: {last}") from None
        raise RayUnavailable(f"Ray did not start here: {last}") from None


def check_fits(s: SearchSettings) -> None:
    """A ConfigError unless some node of the Ray cluster can hold a trial (Tune would wait forever)."""
    import ray

    demand = s.largest_demand()
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    if not any(all(node.get(k, 0) >= v for k, v in demand.items()) for node in nodes):
        have = ", ".join(f"{node.get('CPU', 0):g} CPU / {node.get('GPU', 0):g} GPU" for node in nodes)
        raise ConfigError(f"a trial needs {demand['CPU']} CPU(s) and {demand['GPU']} GPU(s) on one node (seeds x "
                          f"--cpus-per-trial / --gpus-per-trial), but the Ray cluster's nodes have {have}")
