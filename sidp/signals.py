"""While sidp works for its caller, SIGTERM means what Ctrl-C means: stop the group, keep what is done.

Python's default for SIGTERM ends the process on the spot, skipping every cleanup; this turns it into
KeyboardInterrupt for the length of a call (only from the main thread, and only where nobody installed
a handler of their own).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    mine = threading.current_thread() is threading.main_thread()
    if not mine or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
