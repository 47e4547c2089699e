"""A build is a transaction on its output folder: locked, written aside, swapped in whole.

Beside the output folder `<parent>/<name>` a build uses::

    <parent>/.<name>.build-lock                 held (flock) while a build runs; says which one
    <parent>/.<name>.build-<pid>-<8 hex>/       the build in progress: shards, manifest, ...
    <parent>/<name>.rejects.jsonl               rejects of the last build the reject policy refused

1. **Lock.** The lock is taken without waiting: a second build of the same folder (by any name
   that resolves to it) fails at once with `OutputBusy`, naming the build that holds it. The
   kernel drops the lock when its holder dies, however it dies; forked children close their copy
   at once (`os.register_at_fork`), so a conversion worker never keeps it.
2. **Check.** `<name>` must be absent, empty, or hold only what a build writes (split folders of
   shards, manifest, dataset.json, rejects): a folder with other files is refused, never
   replaced. One holding `dataset.json` is replaced only with `overwrite`; one without it is the
   leftover of an earlier build that did not finish and is replaced.
3. **Write aside.** Everything goes into the sibling work folder (same file system). Work folders
   of builds that were killed are removed by the next build of the same folder.
4. **Commit.** Files and folders are fsynced, then the work folder takes the place of `<name>` in
   one atomic `renameat2(RENAME_EXCHANGE)` (a new folder: one `rename`). Where the file system
   cannot exchange, the old folder is first renamed to `.<name>.old-<pid>-<8 hex>`; a build killed
   between the two renames leaves that folder, which the next build puts back. The old dataset
   is removed only after the new one is in place. Until the commit, `<name>` is never touched: a
   build that fails, is refused or is killed leaves the previous dataset byte for byte.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import shutil
import stat
import sys
from pathlib import Path

from . import schema
from .errors import BuildError, OutputBusy
from .locking import FolderLock, LockBusy, LockUnavailable
from .ownership import not_yours

LOCK_SUFFIX = ".build-lock"
FAILED_REJECTS_SUFFIX = ".rejects.jsonl"

def fsync_path(path: Path) -> None:
    """fsync a file or a folder (what a rename makes visible must be on disk first)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder
        pass
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> None:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); OSError(ENOSYS) elsewhere."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        raise OSError(errno.ENOSYS, "renameat2 is not available") from None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(b))


_CANNOT_EXCHANGE = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}


class BuildLock(FolderLock):
    """The lock of a dataset build's output folder (see `shards.locking`)."""

    def acquire(self, what: str) -> None:
        """Take the lock or raise OutputBusy naming its holder. `what` names the locked thing."""
        try:
            super().acquire(what)
        except LockBusy:
            raise OutputBusy(f"{what} is being built by another build ({self.holder()}); wait for it to "
                             f"finish, or choose another --out (lock: {self.path})") from None
        except LockUnavailable as e:
            raise BuildError(f"{e}; choose a writable --out") from None


def _build_owned(folder: Path) -> list[str]:
    """Names in `folder` that a build does not write (empty: the folder is a dataset, whole or not)."""
    ours = {schema.MANIFEST_FILE, schema.DATASET_FILE, schema.REJECTS_FILE}
    ours |= {n + schema.PARTIAL_SUFFIX for n in ours}
    foreign = []
    for entry in sorted(os.listdir(folder)):
        path = folder / entry
        if entry in schema.SPLITS and path.is_dir() and not path.is_symlink():
            shard = re.compile(rf"{entry}-\d{{6}}\.tar({re.escape(schema.PARTIAL_SUFFIX)})?")
            foreign += [f"{entry}/{n}" for n in sorted(os.listdir(path))
                        if not (shard.fullmatch(n) and (path / n).is_file() and not (path / n).is_symlink())]
        elif not (entry in ours and path.is_file() and not path.is_symlink()):
            foreign.append(entry)
    return foreign


_OPEN: set["OutputTransaction"] = set()  # this process's transactions not yet committed or aborted


def abort_open() -> None:
    """Abort this process's transactions not yet committed or aborted (their work folders removed,
    locks released). A command calls it on its way out: a signal can land between a transaction's
    start and the `try` of its caller, where no clean-up of the caller's runs."""
    for txn in list(_OPEN):
        txn.abort()


class OutputTransaction:
    """Locks `out`, makes a sibling work folder, and swaps it in by `commit` (see the module
    docstring). `abort` (or any failure before `commit`) leaves `out` as it was."""

    def __init__(self, out: str | os.PathLike, overwrite: bool = False):
        given = os.fspath(out)
        if not given or "\x00" in given:
            raise BuildError(f"--out {given!r}: not a usable folder name")
        self.out = Path(os.path.realpath(given))
        if self.out.parent == self.out:
            raise BuildError(f"--out {given}: the file system root cannot be a dataset folder")
        self.parent, self.name = self.out.parent, self.out.name
        try:
            self.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BuildError(f"--out {given}: cannot create {self.parent}: {e.strerror}") from None
        self.lock = BuildLock(self.parent / f".{self.name}{LOCK_SUFFIX}")
        self.work: Path | None = None
        _OPEN.add(self)  # (before anything is made: `abort_open` then removes whatever was)
        try:
            self.lock.acquire(str(self.out))
            self._recover()
            self._check(overwrite)
            self.work = self.parent / f".{self.name}.build-{os.getpid()}-{secrets.token_hex(4)}"
            os.mkdir(self.work)  # (mode from the umask, unlike mkdtemp's 0700: the dataset's own)
        except OSError as e:
            self.abort()
            raise BuildError(f"--out {self.out}: cannot prepare the build beside it: {e.strerror} "
                             f"({e.filename or self.parent})") from None
        except BaseException:
            self.abort()
            raise

    @property
    def failed_rejects(self) -> Path:
        """Where the rejects of a build refused by the reject policy are kept."""
        return self.parent / (self.name + FAILED_REJECTS_SUFFIX)

    def _leftovers(self, kind: str) -> list[Path]:
        """The work (`build`) or replaced (`old`) folders killed builds of this folder left: yours
        alone (one someone else planted at such a name is neither put in place nor removed)."""
        pattern = re.compile(rf"\.{re.escape(self.name)}\.{kind}-\d+-[0-9a-f]{{8}}")
        found = []
        for name in sorted(os.listdir(self.parent)):
            if pattern.fullmatch(name):
                try:
                    st = os.lstat(self.parent / name)
                except FileNotFoundError:  # (gone since the folder was listed)
                    continue
                if stat.S_ISDIR(st.st_mode) and not_yours(st) is None:
                    found.append(self.parent / name)
        return found

    def _recover(self) -> None:
        """Undo what killed builds of this folder left (we hold the lock: none of it is live)."""
        for old in self._leftovers("old"):
            if not os.path.lexists(self.out):  # killed between the two renames of a commit
                os.rename(old, self.out)
                print(f"restored {self.out} from {old.name} (a build was killed while replacing it)",
                      file=sys.stderr)
            else:
                shutil.rmtree(old, ignore_errors=True)
        for work in self._leftovers("build"):
            shutil.rmtree(work, ignore_errors=True)

    def _check(self, overwrite: bool) -> None:
        if not os.path.lexists(self.out):
            return
        if not self.out.is_dir():
            raise BuildError(f"--out {self.out} exists and is not a folder")
        foreign = _build_owned(self.out)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise BuildError(f"--out {self.out} holds files a dataset build does not write ({shown}); a build "
                             "replaces the whole folder, so it will not replace this one: move them away or "
                             "choose another --out")
        if (self.out / schema.DATASET_FILE).exists() and not overwrite:
            raise BuildError(f"{self.out} already holds a built dataset ({self.out / schema.DATASET_FILE}); "
                             "pass --overwrite to rebuild it")

    def commit(self) -> None:
        """Put the work folder in place of `out` (atomically), then remove the old dataset."""
        assert self.work is not None
        for folder in [*(p for p in self.work.iterdir() if p.is_dir()), self.work]:
            fsync_path(folder)
        old = None
        if not os.path.lexists(self.out):
            os.rename(self.work, self.out)
        else:
            try:
                _exchange(self.work, self.out)
                old = self.work
            except OSError as e:
                if e.errno not in _CANNOT_EXCHANGE:
                    raise
                old = self.parent / f".{self.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
                os.rename(self.out, old)
                os.rename(self.work, self.out)
        fsync_path(self.parent)
        self.work = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        if self.failed_rejects.exists():  # from an earlier refused build: no longer about this dataset
            self.failed_rejects.unlink()
        self.lock.release()
        _OPEN.discard(self)

    def keep_rejects(self, path: Path) -> Path:
        """Move a refused build's rejects file beside `out`; returns where it is now."""
        os.replace(path, self.failed_rejects)
        return self.failed_rejects

    def abort(self) -> None:
        """Remove the work folder and release the lock; `out` is untouched. Idempotent."""
        if self.work is not None:
            shutil.rmtree(self.work, ignore_errors=True)
            self.work = None
        self.lock.release()
        _OPEN.discard(self)
