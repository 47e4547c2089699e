"""Reading files that may come from elsewhere without running code or leaving their folder, and
writing files that are never seen half-written. The lowest layer of `itself`: imports nothing of
the project but its error types.

A folder we did not write in this run (an index folder handed to us, a gallery, a dataset, a run
folder) is data, never commands: every path read from it is resolved inside its root
(`resolve_inside`: no URL or command, no absolute path, no `..`, no link leaving the root) and
opened as a bounded regular file (`read_regular`: no FIFO or device, no link at the last step).
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import reprlib
import stat
import tempfile
import zipfile
from pathlib import Path

from shards.validate import printable  # noqa: F401 - (re-exported: the readers' and pages' one import)

from .errors import UserError

# (torch is imported by the loaders that need it: the rest serves processes that never load it)


class UnsafeCheckpointError(ValueError):
    """A file holds more than tensors and plain values: it is not unpickled."""


def safe_load(path: str | os.PathLike, map_location="cpu", mmap: bool = False):
    """torch.load with weights_only=True (tensors, numbers, strings, containers: never code), with
    an error that says why a file is refused."""
    import torch

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
        import torch

        return torch.jit.load(str(path), map_location="cpu").state_dict()
    return safe_load(path)


def fsync_dir(folder: str | os.PathLike) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # (read once, at import: os.umask cannot be read without setting it)


def temp_beside(path: str | os.PathLike) -> Path:
    """A new, empty file with a unique name beside `path` (`.<name>.XXXXXXXX.partial`), created with
    O_EXCL|O_NOFOLLOW: a link planted at a predictable temporary name is never followed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)  # (mkstemp makes 0600; the files we write are as readable as any other)
    finally:
        os.close(fd)
    return Path(tmp)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write a temporary file (unique name, see `temp_beside`), fsync, rename over `path` (a link
    there is replaced, not followed), fsync the folder: after a crash the file is the old or the new one."""
    path = Path(path)
    tmp = temp_beside(path)
    try:
        with open(tmp, "r+b", opener=lambda p, f: os.open(p, f | os.O_NOFOLLOW)) as f:
            f.write(data if isinstance(data, bytes) else data.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def open_append(path: str | os.PathLike, what: str):
    """`path` opened for appending text (created if missing), never through a link planted at its
    name (O_NOFOLLOW) nor on a FIFO or device (which could block or reach anything): UnsafePath
    naming `what` instead. OSError (no permission, a full disk) is the caller's."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO):  # (ENXIO: a FIFO nobody reads)
            raise UnsafePath(f"{what}: {path} is a symbolic link or a FIFO, where a file of ours is expected") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafePath(f"{what}: {path} is not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "a", encoding="utf-8")


# ----------------------------------------------------------------------------------- foreign folders


class UnsafePath(UserError):
    """A path read from a folder we did not write would leave its root, or the file there is not a
    bounded regular file; the message names the file and the entry."""


MAX_ENTRY_CHARS = 4096  # longest relative path accepted from a folder's files (shards.validate's limit)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 6, 6, 80, 80, 40


def shown(value, limit: int = 200) -> str:
    """A value from a foreign file as a message may show it: Python's repr (control characters and
    lone surrogates escaped: nothing reaches a terminal raw), big or deep containers shortened, cut
    to `limit` characters."""
    try:
        text = repr(value) if isinstance(value, str) else _REPR.repr(value)
    except Exception:  # noqa: BLE001 - e.g. an integer too long to print
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 5] + "...'"


def check_relative(relative, what: str) -> str:
    """`relative` normalised (`a/./b` -> `a/b`) when it is a plain relative path, else UnsafePath
    naming `what` (e.g. `index.json: entry vectors`): a URL or a command (`pipe:`, `s3://`, `a::b`),
    an absolute path, a `..` step, a NUL byte, an empty or overlong string, a non-string."""
    if not isinstance(relative, str):
        raise UnsafePath(f"{what}: {shown(relative)} is not a path (a {type(relative).__name__})")
    why = None
    if not relative or len(relative) > MAX_ENTRY_CHARS:
        why = "is empty" if not relative else f"is longer than {MAX_ENTRY_CHARS} characters"
    elif "\x00" in relative:
        why = "holds a NUL byte"
    elif "://" in relative or "::" in relative or relative.startswith("pipe:"):
        why = "is a URL or a command, not a path inside the folder"
    elif relative.startswith("/"):
        why = "is an absolute path, not a path inside the folder"
    elif ".." in relative.split("/"):
        why = "leaves the folder ('..')"
    elif os.path.normpath(relative) == ".":
        why = "names the folder itself, not a file in it"
    if why:
        raise UnsafePath(f"{what}: {shown(relative)} {why}")
    return os.path.normpath(relative)


def resolve_inside(root: str | os.PathLike, relative, what: str, *, links: bool = True) -> Path:
    """The real path of `relative` under `root`, refused (UnsafePath naming `what`) unless it is a
    plain relative path (`check_relative`) that stays under the root's real path. Links inside
    the root are followed when `links` (a gallery's or a dataset's, as the builder allows); with
    links=False any link below the root is refused (folders only we write, e.g. an index folder)."""
    rel = check_relative(relative, what)
    base = os.path.realpath(root)
    if not links:
        step = base
        for part in rel.split("/"):
            step = os.path.join(step, part)
            if os.path.islink(step):
                raise UnsafePath(f"{what}: {shown(relative)}: {step} is a symbolic link; this folder holds none "
                                 "(it was changed by someone else)")
    real = os.path.realpath(os.path.join(base, rel))
    if real != base and os.path.commonpath([real, base]) != base:
        raise UnsafePath(f"{what}: {shown(relative)} leaves {root} through a symbolic link (to {real})")
    return Path(real)


def open_regular(path: str | os.PathLike, what: str, limit: int, follow: bool = False) -> int:
    """A read-only descriptor of the regular file `path` of at most `limit` bytes; UnsafePath naming
    `what` for a link at the last step (unless `follow`: what it points at is checked instead), a
    FIFO, device or folder (opened without blocking, never read) or a larger file. OSError (missing,
    no permission) is the caller's."""
    nofollow = 0 if follow else os.O_NOFOLLOW
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | nofollow | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafePath(f"{what}: {path} is a symbolic link, where a file is expected") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "folder" if stat.S_ISDIR(st.st_mode) else "FIFO" if stat.S_ISFIFO(st.st_mode) else "special file"
            raise UnsafePath(f"{what}: {path} is a {kind}, not a regular file")
        if st.st_size > limit:
            raise UnsafePath(f"{what}: {path} is {st.st_size} bytes, more than the {limit} accepted")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str | os.PathLike, what: str, limit: int, follow: bool = False) -> bytes:
    """The bytes of the regular file `path`, at most `limit` of them (see `open_regular`)."""
    with os.fdopen(open_regular(path, what, limit, follow), "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UnsafePath(f"{what}: {path} holds more than the {limit} bytes accepted")
    return data


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file, read in 4 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
