"""Stop requests: SIGTERM and SIGUSR1 ask the run to stop after the current
generation.  The handler only records the request; the trainer carries it in
the generation's Allgather, so every rank stops after the same generation even
when only some ranks were signalled.  `es-mpi train` installs the handlers
first thing, so a signal that lands while the model loads is kept, not fatal.
"""
from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_stop_requests: list[int] = []


def _on_stop_signal(signum, frame) -> None:
    _stop_requests.append(signum)


def catch_stop_signals() -> dict:
    """Install the stop handlers (main thread only; elsewhere a no-op).
    Returns the previous handlers, for restore_signals()."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, _on_stop_signal) for s in STOP_SIGNALS}


def restore_signals(previous: dict) -> None:
    for s, h in previous.items():
        signal.signal(s, h if h is not None else signal.SIG_DFL)


def ignore_stop_signals() -> None:
    """After a stop: the process is about to exit 75, and a repeated stop signal
    must not kill it while it winds down (Python resets its own handlers to the
    default, which terminates, while it finalizes; an ignored signal stays ignored)."""
    if threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)


def stop_requested() -> bool:
    return bool(_stop_requests)


def clear_stop() -> None:
    _stop_requests.clear()
