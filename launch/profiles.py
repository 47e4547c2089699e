"""Cluster profiles: `cluster_configs/slurm/<name>.yaml`, typed and validated."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path

import cluster_configs
from itself.config import ConfigError, load_yaml, read_config_text
from itself.errors import UserError

PROFILES_DIR = cluster_configs.SLURM


class ProfileError(UserError):
    """A profile is missing or invalid, or the cluster cannot take the job as asked; the message
    names the file and field (exit 2)."""


@dataclasses.dataclass
class SlurmProfile:
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gpus_per_node: int = 0
    tasks_per_node: int | None = None
    cpus_per_task: int | None = None
    mem_gb: float = 0
    time: str = "01:00:00"
    constraint: str | None = None
    exclusive: bool = False
    signal_delay_s: int = 120
    max_requeues: int = 10
    sbatch_args: dict = dataclasses.field(default_factory=dict)
    srun_args: list = dataclasses.field(default_factory=list)
    setup: list = dataclasses.field(default_factory=list)

    @property
    def ranks_per_node(self) -> int:
        """One rank per GPU; on CPU nodes, tasks_per_node (default 1)."""
        return self.gpus_per_node if self.gpus_per_node > 0 else (self.tasks_per_node or 1)

    def minutes(self) -> int:
        return parse_time(self.time)


def parse_time(text) -> int:
    """Slurm time (`MM`, `HH:MM:SS`, `D-HH:MM:SS`) or a number of minutes -> minutes (rounded up)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return max(1, int(text))
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(text).strip())
    if not m:
        raise ProfileError(f"time: cannot read {text!r}; use HH:MM:SS, D-HH:MM:SS or minutes")
    days, a, b, c = m.groups()
    if b is None:  # plain minutes
        seconds = int(a) * 60
    elif c is None:  # MM:SS per Slurm
        seconds = int(a) * 60 + int(b)
    else:
        seconds = int(a) * 3600 + int(b) * 60 + int(c)
    seconds += int(days or 0) * 86400
    return max(1, -(-seconds // 60))


def _check_type(name: str, value, hint, where: str):
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    base = tuple(typing.get_origin(a) or a for a in allowed)  # dict[...] -> dict
    ok = value is None and type(None) in base or isinstance(value, tuple(b for b in base if b is not type(None)))
    if float in base and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if bool not in base and isinstance(value, bool):
        ok = False
    if not ok:
        names = " or ".join("null" if b is type(None) else b.__name__ for b in base)
        raise ProfileError(f"{where}: field {name!r} must be {names}, got {value!r}")


def load_profile(name_or_path: str) -> SlurmProfile:
    """The profile `name` (cluster_configs/slurm/<name>.yaml) or a YAML path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = PROFILES_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")))
        raise ProfileError(f"--profile {name_or_path}: {path} not found; profiles: {known}")
    try:
        values = load_yaml(read_config_text(path, f"--profile {name_or_path}"), str(path)) or {}
    except ConfigError as e:
        raise ProfileError(str(e)) from None
    if not isinstance(values, dict):
        raise ProfileError(f"{path}: expected a mapping of fields")
    hints = typing.get_type_hints(SlurmProfile)
    for key, value in values.items():
        if key not in hints:
            raise ProfileError(f"{path}: unknown field {key!r}; fields: {', '.join(hints)}")
        _check_type(key, value, hints[key], str(path))
    profile = SlurmProfile(**values)
    validate(profile, str(path))
    return profile


SBATCH_KEY = re.compile(r"[a-z][a-z0-9_-]*")  # (submitit writes mail_type as --mail-type)


def validate(p: SlurmProfile, where: str) -> None:
    if p.gpus_per_node < 0:
        raise ProfileError(f"{where}: gpus_per_node must be >= 0, got {p.gpus_per_node}")
    for name in ("tasks_per_node", "cpus_per_task"):
        if getattr(p, name) is not None and getattr(p, name) < 1:
            raise ProfileError(f"{where}: {name} must be >= 1 (or unset), got {getattr(p, name)}")
    for name in ("max_requeues", "signal_delay_s", "mem_gb"):
        value = getattr(p, name)
        if not math.isfinite(value) or value < 0:
            raise ProfileError(f"{where}: {name} must be a number >= 0, got {value}")
    # submitit writes these into the batch script: a line break would start a shell command there.
    lines = {name: getattr(p, name) for name in ("partition", "account", "qos", "constraint", "time")}
    lines.update({f"sbatch_args.{k}": v for k, v in p.sbatch_args.items()})
    lines.update({f"srun_args[{i}]": v for i, v in enumerate(p.srun_args)})
    lines.update({f"setup[{i}]": v for i, v in enumerate(p.setup)})
    for name, value in lines.items():
        check_one_line(value, f"{where}: {name}")
    for key in p.sbatch_args:
        if not SBATCH_KEY.fullmatch(str(key)):
            raise ProfileError(f"{where}: sbatch_args key {key!r} must be an sbatch option name "
                               "(lower-case letters, digits, '-', '_'; e.g. mail-type)")
    try:
        p.minutes()
    except ProfileError as e:
        raise ProfileError(f"{where}: {e}") from None


def check_one_line(value, what: str) -> None:
    """A ProfileError if `value` would not stay on its line of the batch script."""
    if value is not None and any(c in str(value) for c in "\n\r\0"):
        raise ProfileError(f"{what}: must be one line without line breaks or NUL characters, got {value!r}")
