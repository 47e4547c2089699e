"""Python `logging` for every command: one format, a level the user sets, rank-aware.

Library code logs with `logging.getLogger(__name__)`; commands call `setup(level, rank)` once.
Rank 0 logs at the chosen level; the other ranks only warnings and errors, unless all ranks are
asked for (`--log-ranks all`, or ITSELF_LOG_RANKS=all), then every line says its rank. Progress
bars (tqdm) are kept for interactive use and are not log records. A run's train.log is a file
handler on the same loggers (`RunLog`), so it holds what the console showed.
"""

from __future__ import annotations

import logging
import os
import sys

LOGGERS = ("itself", "shards", "launch", "tune")
"""The project's top-level loggers (every module logs under one of them)."""
LEVELS = ("debug", "info", "warning", "error")
FORMAT = "[%(asctime)s] %(rank_prefix)s%(level_prefix)s%(message)s"
DATE_FORMAT = "%H:%M:%S"


class _RankFilter(logging.Filter):
    def __init__(self, rank: int, all_ranks: bool):
        super().__init__()
        self.rank, self.all_ranks = rank, all_ranks

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank_prefix = f"[rank {self.rank}] " if self.all_ranks else ""
        record.level_prefix = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        return self.all_ranks or self.rank == 0 or record.levelno >= logging.WARNING


_handler: logging.Handler | None = None


def setup(level: str | None = None, rank: int = 0, all_ranks: bool | None = None) -> None:
    """Route the project's loggers to stdout (warnings and errors to stderr) at `level`
    (default: ITSELF_LOG_LEVEL, else info). Called again, it replaces the previous setup."""
    global _handler
    level = (level or os.environ.get("ITSELF_LOG_LEVEL") or "info").lower()
    if level not in LEVELS:
        level = "info"
    if all_ranks is None:
        all_ranks = os.environ.get("ITSELF_LOG_RANKS", "").lower() == "all"
    handler = _SplitHandler()
    handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    handler.addFilter(_RankFilter(rank, all_ranks))
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if _handler is not None:
            logger.removeHandler(_handler)
        logger.addHandler(handler)
        logger.setLevel(level.upper())
        logger.propagate = False
    _handler = handler


def reset() -> None:
    """Undo `setup`: the project's loggers propagate to the root logger again (a process that runs
    several commands in turn, such as the test suite, starts each from the same state)."""
    global _handler
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if _handler is not None:
            logger.removeHandler(_handler)
        logger.setLevel(logging.NOTSET)
        logger.propagate = True
    _handler = None


def add_arguments(parser) -> None:
    """The logging options every command takes."""
    parser.add_argument("--log-level", choices=LEVELS, default=None,
                        help="how much to log (default: info, or ITSELF_LOG_LEVEL)")
    parser.add_argument("--log-ranks", choices=("main", "all"), default=None,
                        help="which ranks log below warnings: rank 0 (default) or all, each line marked with its rank")


def setup_from(args, rank: int = 0) -> None:
    """`setup` from the options of `add_arguments`."""
    setup(getattr(args, "log_level", None), rank,
          None if getattr(args, "log_ranks", None) is None else args.log_ranks == "all")


def configured() -> bool:
    return _handler is not None


class _SplitHandler(logging.Handler):
    """Info and below to stdout (the run's story), warnings and errors to stderr (read at once)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging never fails the run (a closed pipe, say)
            self.handleError(record)


def add_file(stream) -> logging.Handler:
    """Also write the project's log records to the open text file `stream` (rank 0's train.log,
    opened by its owner: safeio.open_append); returns the handler to remove, which closes it."""
    handler = _FileStreamHandler(stream)
    handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    handler.addFilter(_RankFilter(0, False))  # (rank 0's file: every level, no rank prefix)
    for name in LOGGERS:
        logging.getLogger(name).addHandler(handler)
    return handler


class _FileStreamHandler(logging.StreamHandler):
    """A StreamHandler that owns its file: closing the handler closes it."""

    def close(self) -> None:
        try:
            self.stream.close()
        finally:
            super().close()


def remove(handler: logging.Handler) -> None:
    for name in LOGGERS:
        logging.getLogger(name).removeHandler(handler)
    handler.close()
