"""One writer per folder: an exclusive, non-waiting lock that dies with its holder.

`FolderLock(path)` locks a small file with `flock`: the kernel drops the lock when the process
that holds it ends, however it ends (SIGKILL included), so there is never a stale lock to remove
by hand. The file records who holds it (pid, host, start time, command), so a second writer is
refused at once with a message naming the first. Forked children close their copy of the lock at
once (`os.register_at_fork`): a worker process never keeps a folder locked after its parent died.

Used for dataset builds (`shards.transaction`), training run directories, index folders, report
folders and search experiments. The lowest layer: imports nothing of the project.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path

_HELD_FDS: set[int] = set()  # lock fds of this process, closed in forked children


def _close_held_in_child() -> None:
    for fd in list(_HELD_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_in_child)


class LockBusy(RuntimeError):
    """Another process holds the lock; the message names it."""


class LockUnavailable(RuntimeError):
    """The lock file cannot be created or locked (a read-only folder, no permission)."""


def command_line() -> str:
    """This process's command line, as a user would type it again."""
    argv = list(sys.argv)
    for module in ("shards", "itself.retrieve"):
        if argv and argv[0].endswith(os.path.join(*module.split("."), "__main__.py")):
            argv[0:1] = ["python", "-m", module]
    return shlex.join(argv)


class FolderLock:
    """An exclusive, non-waiting lock on the file `path`, which records who holds it.

    `acquire(what, advice)` takes it or raises `LockBusy("<what> is in use by pid P on HOST, started
    T: COMMAND; <advice> (lock: PATH)")`. `release()` removes the file while still holding it, so
    the next holder creates a fresh one. Usable as a context manager once acquired."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.fd: int | None = None

    def acquire(self, what: str, advice: str = "wait for it to finish") -> "FolderLock":
        import fcntl

        while True:
            try:  # (O_NOFOLLOW: a link planted at the lock's name is never followed)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
            except OSError as e:
                raise LockUnavailable(f"{what}: cannot create the lock {self.path}: {e.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise LockBusy(f"{what} is in use by another process ({self.holder()}); {advice} "
                               f"(lock: {self.path})") from None
            except OSError as e:
                os.close(fd)
                raise LockUnavailable(f"{what}: cannot lock {self.path}: {e.strerror}") from None
            # The file we locked must still be the one at the path: a holder finishing removes it.
            try:
                same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        _HELD_FDS.add(fd)
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command_line()[:500]}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(holder) + "\n").encode())
        return self

    def holder(self) -> str:
        """Who holds the lock, from what it wrote there."""
        try:
            with open(self.path, "rb", opener=lambda p, f: os.open(p, f | os.O_NOFOLLOW)) as f:
                h = json.loads(f.read(4096).decode(errors="replace"))
            return f"pid {h['pid']} on {h['host']}, started {h['started']}: {h['command']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "it has not written its details yet"

    @property
    def held(self) -> bool:
        return self.fd is not None

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still held: the next holder creates a fresh file
        except OSError:
            pass
        _HELD_FDS.discard(self.fd)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
