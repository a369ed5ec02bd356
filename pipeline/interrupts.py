"""Ctrl-C and SIGTERM that always stop a run.

Python turns a signal into an exception wherever the main thread happens to be, and some places swallow
it: a KeyboardInterrupt raised inside a weakref or `__del__` callback (tqdm's bar registry, the garbage
collector) is printed as "Exception ignored" and dropped, and some libraries catch it to log and go on.
The run would then carry on and write its folder as if nobody had asked it to stop. So a signal is also
remembered: until the exception reaches the code that cleans up (`delivered`), it is raised again every
`RESEND_S` seconds, and a stage folder is never committed while one is pending (`raise_pending`)."""
from __future__ import annotations

import _thread
import contextlib
import signal
import sys
import threading

RESEND_S = 1.0
_pending: int | None = None  # the signal received in this run; kept after delivery (the exit code)
_delivered = threading.Event()
_lock = threading.Lock()  # a resend is either sent before `delivered` returns or not at all


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that stage folders are cleaned up as for Ctrl-C."""


def _exception(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _resend(signum: int) -> None:
    while not _delivered.wait(RESEND_S):
        with _lock:
            if not _delivered.is_set():
                _thread.interrupt_main(signum)


def _on_signal(signum, frame):
    global _pending
    if _pending is not None and _delivered.is_set():
        return  # a resend queued just before the cleanup code got the interrupt: it is being handled
    if _pending is None:
        _pending = signum
        _delivered.clear()
        threading.Thread(target=_resend, args=(signum,), daemon=True, name="pipeline-interrupt").start()
    raise _exception(_pending)


def delivered() -> None:
    """The interrupt reached the cleanup code: stop raising it again."""
    with _lock:
        _delivered.set()


def pending() -> int | None:
    """The signal received during this run, if any (also after it was delivered)."""
    return _pending


def raise_pending() -> None:
    """Raise the pending interrupt now if a library swallowed it (call before committing a result)."""
    if _pending is not None and not _delivered.is_set():
        raise _exception(_pending)


@contextlib.contextmanager
def interruptible():
    """While a run runs, Ctrl-C and SIGTERM (`kill`, a scheduler's timeout) unwind it the same way."""
    global _pending
    _pending = None
    _delivered.clear()
    try:
        # A SIGINT ignored by whoever started us (`nohup`, a background job) stays ignored.
        caught = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not signal.SIG_IGN]
        previous = {s: signal.signal(s, _on_signal) for s in caught}
    except ValueError:  # not the main thread: leave signals as they are
        yield
        return
    hook = sys.unraisablehook

    def quiet(unraisable):
        # The swallowed interrupt is raised again; Python's "Exception ignored" traceback would only alarm.
        if not (isinstance(unraisable.exc_value, KeyboardInterrupt) and _pending is not None):
            hook(unraisable)

    sys.unraisablehook = quiet
    try:
        yield
    finally:
        delivered()
        sys.unraisablehook = hook
        for s, handler in previous.items():
            signal.signal(s, handler)
