"""Ctrl-C that a training never loses.

Python raises KeyboardInterrupt wherever the main thread is when SIGINT arrives. Raised inside a
finaliser (a `__del__` or weakref callback: a checkpoint save frees many objects) it is printed
as "Exception ignored ... Traceback" and dropped, and the run trains on to its end as if nothing
had been asked; C code that clears errors can drop it silently too. Inside `kept()`, every
SIGINT is remembered (it still raises at once, as Python's own handler does), a dropped one is
not printed, and `check()` (called by the training loop at every step) raises it again there.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

_asked = False


def _on_sigint(signum, frame) -> None:
    global _asked
    _asked = True
    raise KeyboardInterrupt


def _quiet_if_interrupt(unraisable, previous) -> None:
    if not isinstance(unraisable.exc_value, KeyboardInterrupt):  # (anything else: as before)
        previous(unraisable)


@contextlib.contextmanager
def kept():
    """Remember Ctrl-C for the duration. Only where SIGINT has Python's own handler, in the main
    thread: a SIGINT the caller ignores or handles stays theirs."""
    global _asked
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    _asked = False
    previous_hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: _quiet_if_interrupt(unraisable, previous_hook)
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.unraisablehook = previous_hook
        _asked = False


def check() -> None:
    """Raise the KeyboardInterrupt of a Ctrl-C that arrived and was dropped where it was raised."""
    if _asked:
        raise KeyboardInterrupt
