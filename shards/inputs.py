"""Opening the files of a raw dataset or corpus, which someone else may have made.

- `open_input(path, what, limit)`: a regular file, opened without blocking first (a FIFO in an
  annotation file's place would wait for a writer forever; a device never ends), at most `limit`
  bytes when given.
- `check_found(root, path, what)`: a file found under `--root` (not named by the user) may lie
  outside it only through links of the user's own: another user's link out of the folder would
  have a build as root read (and pack into a dataset its giver can read) files that are not theirs.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from .errors import ConvertError


def open_input(path: str | os.PathLike, what: str, limit: int | None = None,
               root: str | os.PathLike | None = None) -> BinaryIO:
    """The regular file `path` opened for reading (links followed). ConvertError naming `what` for a
    FIFO, device or folder (never read), or a file over `limit` bytes; OSError as the open raises it.
    With `root` (a file found under it), the file opened is checked as `check_found` checks the path,
    and must be the one the path leads to still (the folder's owner may swap links meanwhile)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device"
            raise ConvertError(f"{what} {path} is {kind}, not a regular file: refused unread")
        if limit is not None and st.st_size > limit:
            raise ConvertError(f"{what} {path} is {st.st_size} bytes, more than the {limit} read")
        if root is not None:
            _check_opened(fd, path, root, what)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_regular(path: str | os.PathLike, what: str, root: str | os.PathLike | None = None) -> None:
    """ConvertError unless `path` is a regular file (see `open_input`), for readers that open it by
    name (pyarrow)."""
    open_input(path, what, root=root).close()


def found_under(root: str | os.PathLike, path: str | os.PathLike) -> str | None:
    """`root` when `path` is named under it (a file the build found there), else None."""
    return str(root) if Path(os.path.abspath(path)).is_relative_to(os.path.abspath(root)) else None


def opened_path(fd: int) -> str | None:
    """The path the kernel opened for `fd` (Linux), None where it cannot tell."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def _check_opened(fd: int, path, root, what: str) -> None:
    """ConvertError unless the file open at `fd` lies under `root`, or is where `path` leads now
    through links of the user's own (`check_found`)."""
    opened = opened_path(fd)
    if opened is None:
        return  # (no /proc: the path was checked when the build started)
    real_root = os.path.realpath(root)
    if os.path.commonpath([opened, real_root]) == real_root:
        return
    check_found(root, path, what)
    if os.path.realpath(path) != opened:
        raise ConvertError(f"{what} {path} led to {opened} when opened, not where it leads now: it changed "
                           "while the build read it; refused")


def check_found(root: str | os.PathLike, path: str | os.PathLike, what: str) -> None:
    """ConvertError when `path`, found under `root`, resolves outside it through a link someone
    else made (at the file or at a folder on the way). One's own links are followed."""
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if os.path.commonpath([real, real_root]) == real_root:
        return
    part, me = Path(path), os.geteuid()
    while True:
        try:
            st = os.lstat(part)
        except OSError:
            return  # (gone: the open will say so)
        if stat.S_ISLNK(st.st_mode) and st.st_uid != me:
            raise ConvertError(f"{what} {path} leads out of --root {root} (to {real}) through {part}, a link made by "
                               f"uid {st.st_uid}, not by you: refused (pass the file with --annotations if it is "
                               "yours to read)")
        try:
            if os.path.samefile(part, root) or part.parent == part:
                return
        except OSError:  # (a link of one's own to nothing: the open says what is missing)
            return
        part = part.parent
