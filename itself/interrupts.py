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

_active = False  # a kept() holds SIGINT (the outermost one; a nested one leaves it be)
_asked = False  # a Ctrl-C arrived while it did


def _on_sigint(signum, frame) -> None:
    global _asked
    _asked = True
    raise KeyboardInterrupt


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def kept():
    """Remember Ctrl-C for the duration. Only where SIGINT has Python's own handler, in the main
    thread: a SIGINT the caller ignores or handles stays theirs."""
    global _active, _asked
    if _active or not _in_main_thread() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    previous_hook = sys.unraisablehook

    def quiet_if_interrupt(unraisable) -> None:
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):  # (anything else: as before)
            previous_hook(unraisable)

    try:
        _active, _asked = True, False
        sys.unraisablehook = quiet_if_interrupt
        signal.signal(signal.SIGINT, _on_sigint)
        yield
    finally:
        # (SIGINT held while putting things back: a second Ctrl-C here cannot leave our handler
        # installed; it is delivered, to Python's handler, once they are back)
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            if signal.getsignal(signal.SIGINT) is _on_sigint:  # (one installed meanwhile stays)
                signal.signal(signal.SIGINT, signal.default_int_handler)
            if sys.unraisablehook is quiet_if_interrupt:
                sys.unraisablehook = previous_hook
            _active, _asked = False, False
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def check() -> None:
    """Raise the KeyboardInterrupt of a Ctrl-C that arrived and was dropped where it was raised."""
    if _asked and _in_main_thread():  # (only our handler sets it, only while a kept() holds SIGINT)
        raise KeyboardInterrupt
