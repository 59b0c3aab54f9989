"""
Signal handlers that do their work on the reactor thread, beside the
handler another part (twistd) set before.
"""

from __future__ import annotations

import signal
from typing import Callable


def chainSignal(reactor, number: int, call: Callable[[], object]) -> None:
    """
    On signal C{number}, C{call()} on C{reactor}'s thread; the handler set
    before (twistd's own, e.g. for C{--logfile} on SIGUSR1) still runs.
    """
    previous = signal.getsignal(number)

    def handler(signum, frame) -> None:
        reactor.callFromThread(call)
        if callable(previous):
            previous(signum, frame)

    signal.signal(number, handler)
