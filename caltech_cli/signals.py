"""Signals that must let a block clean up after itself."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM raises ``SystemExit(143)`` in the block, so its clean-up runs (the default action
    kills the process where it stands, leaving partial files); only in the main thread, where
    Python handles signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:  # None: a handler set outside Python, which cannot be put back; the default is
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
