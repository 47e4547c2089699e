"""The project's error types, at the bottom of the import graph so that every layer can raise them.

A `UserError` is a mistake the user can fix (a config value, a missing dataset, a bad flag):
commands print it as `error: ...` and exit 2, without a traceback. Anything else is a runtime
failure (exit 1).
"""

from __future__ import annotations

import sys
from typing import Callable

from shards.errors import error_line


class UserError(ValueError):
    """A mistake in what the user asked for; the message names the field, file or flag and what to do."""


class ConfigError(UserError):
    """A configuration value is invalid; the message names the field and what to do."""


class DataError(UserError, RuntimeError):
    """The data cannot be read as configured; the message names the file, field or flag."""


def exit_code(body: Callable[[], int], failures: tuple[type[Exception], ...] = ()) -> int:
    """A command's exit code: `body()`'s, or 2 for a UserError and 1 for one of the `failures` the
    command expects (a diverged run, a job sbatch refused), each said as `error: ...` on stderr
    without a traceback."""
    try:
        return body()
    except UserError as e:
        print(error_line(e), file=sys.stderr)
        return 2
    except failures as e:
        print(error_line(e), file=sys.stderr)
        return 1
