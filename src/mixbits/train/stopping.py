"""Stopping a training run on a signal at a step boundary, so no checkpoint or collective is left half done.

:func:`stop_on_signals` turns SIGTERM into :class:`Stopped`; inside :func:`mixbits.train.fit` the stop waits
for the next step boundary (``stops_deferred`` marks a running fit, ``stop_pending`` is what it checks).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

_STOP: dict = {"signum": None, "depth": 0}  # a pending stop request; how many fit() calls are running


class Stopped(KeyboardInterrupt):
    """Training was stopped by a signal (see :func:`stop_on_signals`); the last checkpoint is intact."""

    def __init__(self, signum: int | None = None):
        self.signum = int(signum if signum is not None else signal.SIGTERM)
        super().__init__(f"stopped by {signal.Signals(self.signum).name}")

    @property
    def exit_code(self) -> int:
        """The shell convention for death by this signal (143 for SIGTERM)."""
        return 128 + self.signum


@contextmanager
def stop_on_signals(signums: Sequence[int] = (signal.SIGTERM,)) -> Iterator[None]:
    """While active, ``signums`` raise :class:`Stopped` instead of killing the process.

    Inside :func:`fit` the stop waits for the next step boundary (under DDP every rank stops at the same
    one, so none is left waiting in a collective); elsewhere, or on a second signal, it is immediate.
    Either way no file is left half-written: checkpoints are replaced atomically. Installs signal
    handlers, which Python allows only in the main thread: elsewhere it changes nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _on_signal) for s in signums}
    _STOP["signum"] = None
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _STOP["signum"] = None


def _on_signal(signum: int, frame) -> None:
    if _STOP["depth"] == 0 or _STOP["signum"] is not None:
        raise Stopped(signum)
    _STOP["signum"] = signum


def stop_pending() -> bool:
    return _STOP["signum"] is not None


def pending_signal() -> int | None:
    """The signal a stop was requested by (None when none is pending)."""
    return _STOP["signum"]


@contextmanager
def stops_deferred() -> Iterator[None]:
    """Mark a running fit(): a signal then only sets the request that the step loop checks."""
    _STOP["depth"] += 1
    try:
        yield
    finally:
        _STOP["depth"] -= 1
