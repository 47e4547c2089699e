"""Checks on a folder a command is about to create, made before any work and creating nothing:
the run folders of itself/train.py, SLURM job folders (launch/), search experiments (tune/)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import ConfigError


def check_can_create(folder: str | os.PathLike, what: str) -> None:
    """A ConfigError naming `what` (the flag or field) unless `folder` is a folder, or can be made
    one: it, or the nearest existing folder it would be created in, must be a folder this process
    can create folders in (tried with a folder made and removed at once)."""
    folder = Path(folder)
    existing = folder
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == folder else f"cannot be created: {existing} is a file"
        raise ConfigError(f"{what}: {folder} {where}, not a folder; choose a folder")
    try:
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".itself-write-test-"))
    except OSError as e:
        made = "" if existing == folder else f" (where {folder} would be created)"
        raise ConfigError(f"{what}: cannot create folders in {existing}{made}: {e.strerror or e}; choose a "
                          "writable folder (on a cluster, one every node sees)") from None


class Folder:
    """A folder whose files one class names (`RunDir`'s kind: a SLURM job's `JobDir`, a search's
    `ExperimentDir` ...): its path, and `file(name)` for a file in it."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    def file(self, name: str) -> Path:
        return self.path / name
