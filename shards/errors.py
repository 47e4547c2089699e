"""The builder's errors, and what the command's exit code is for each.

- `BuildError` (and its subclasses): the build cannot be done as asked: a bad argument, an
  unusable input, an output folder that is taken or holds other files, or data refused by the
  reject policy. `python -m shards build` prints `error: <message>` and exits 2; nothing is written
  (a previous dataset in `--out` is left as it was).
- `BuildFailed` and OSError: the build was under way and failed (an I/O error, a worker process
  that died). Exit 1; a previous dataset in `--out` is left as it was.
"""

from __future__ import annotations

from .validate import printable


def error_line(message) -> str:
    """`error: <message>` as a command prints it: control characters escaped (a message quotes
    file names and values from folders someone else made: a newline or a terminal escape there
    must not print a line of its own, or move the cursor)."""
    return "error: " + printable(str(message), 20000)


class BuildError(RuntimeError):
    """The build cannot be done as asked; the message says what is wrong and what to do (exit 2)."""


class ConvertError(BuildError):
    """The raw dataset cannot be converted at all (missing or malformed annotation file)."""


class OutputBusy(BuildError):
    """Another build holds the lock of the same output folder."""


class RejectsError(BuildError):
    """Records were rejected beyond what the build allows (`--strict`, nothing written, or most
    records rejected for one reason): no dataset was written. `info` is the summary of the build
    that was refused (what dataset.json would have said)."""

    def __init__(self, message: str, info: dict):
        super().__init__(message)
        self.info = info


StrictError = RejectsError  # the name before the reject policy grew past --strict


class BuildFailed(RuntimeError):
    """The build failed while running, not because of what was asked (exit 1)."""


class Interrupted(BaseException):
    """SIGTERM reached the command: raised in the main thread so that the build cleans up."""
