"""Reading files that may come from elsewhere without running code, and writing files that are
never seen half-written. The lowest layer of `itself`: imports nothing of the project."""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path

import torch


class UnsafeCheckpointError(ValueError):
    """A file holds more than tensors and plain values: it is not unpickled."""


def safe_load(path: str | os.PathLike, map_location="cpu", mmap: bool = False):
    """torch.load with weights_only=True (tensors, numbers, strings, containers: never code), with
    an error that says why a file is refused."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(e))
        raise UnsafeCheckpointError(
            f"{path}: refused, it holds more than tensors and plain values"
            f"{f' ({found.group(1)})' if found else ''}; torch.load(weights_only=True) will not unpickle it. "
            "Only load checkpoints written by itself/train.py from a source you trust") from None


def is_torchscript(path: str | os.PathLike) -> bool:
    """A TorchScript archive (OpenAI's released CLIP files are): its code is TorchScript, not pickle."""
    return zipfile.is_zipfile(path) and any(n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist())


def read_weights(path: str | os.PathLike) -> dict:
    """A state dict from a local file, never by unpickling code: safetensors, a TorchScript archive
    through torch.jit, anything else with torch.load(weights_only=True)."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    if is_torchscript(path):
        return torch.jit.load(str(path), map_location="cpu").state_dict()
    return safe_load(path)


def fsync_dir(folder: str | os.PathLike) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write, fsync, rename, fsync the folder: after a crash the file is the old or the new one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
