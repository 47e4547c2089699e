"""Whether a file or folder is the user's own to trust: theirs, and writable by no one else.

A folder that a command resumes from, or writes into, at a name someone else can predict (a
conversion's work folder beside `--out`, a search experiment, a run folder) is trusted only when it
is. The lowest layer: imports nothing of the project.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def not_yours(st: os.stat_result, owner_only: bool = False) -> str | None:
    """Why a file or folder (its lstat or stat) is not the user's own to trust: another owner, or
    (unless `owner_only`) writable by anyone (a link's own mode means nothing); None when it is."""
    me = os.geteuid()
    if st.st_uid != me:
        return f"belongs to uid {st.st_uid}, not to you (uid {me})"
    if not owner_only and st.st_mode & 0o002 and not stat.S_ISLNK(st.st_mode):
        return "is writable by anyone"
    return None


def first_foreign(top: str | os.PathLike) -> tuple[Path, str] | None:
    """The first entry of the tree at `top` that is not yours to trust (`not_yours`), and why: `top`
    itself (a link there must be your own, and what it points at too: it is followed), then
    everything under it, links not followed, stopping at the first. None when every entry is yours,
    or nothing is at `top`."""
    top = Path(top)
    try:
        for st in (os.lstat(top), os.stat(top)):
            if why := not_yours(st):
                return top, why
    except FileNotFoundError:
        return None
    try:
        for folder, dirs, files in os.walk(top):
            for name in (*dirs, *files):
                path = Path(folder, name)
                try:
                    why = not_yours(os.lstat(path))
                except FileNotFoundError:  # (gone since its folder was listed)
                    continue
                if why:
                    return path, why
    except RecursionError:  # (os.walk recurses: a tree thousands of folders deep was made to stop it)
        return top, "holds folders nested too deeply to check"
    return None
