"""
The outcome of the last configuration load, in a small JSON file beside
twistd's pidfile (C{twistd.pid.reload}), so that C{mydataproxy reload} can
tell the operator whether the SIGHUP it sent took, and why not.

The daemon writes it at start and after every reload attempt; a file is
replaced by rename, so a reader never sees half of one.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import txaio

txaio.use_twisted()
log = txaio.make_logger()


@dataclass(frozen=True)
class ReloadStatus:
    """
    @ivar pid: The daemon's process id.
    @ivar generation: The configuration in force: 1 for the start-up one,
        one more for each reload that took.
    @ivar attempt: Loads tried, the start-up one included: it grows with
        every SIGHUP, whether the reload took or not.
    @ivar ok: Whether the last attempt took.
    @ivar message: What the log said about it (on failure, the error:
        file, line, key and problem).
    @ivar time: When it was written (seconds since the epoch).
    """

    pid: int
    generation: int
    attempt: int
    ok: bool
    message: str
    time: float


def statusPath(pidfile: str) -> str:
    """Where the daemon whose pidfile is C{pidfile} writes its status."""
    return f"{pidfile}.reload"


def writeStatus(path: str | None, *, generation: int, attempt: int, ok: bool, message: str) -> None:
    """
    Replace the status at C{path} (nothing without one).  A failure to
    write it is logged: the reload itself stands.
    """
    if path is None:
        return
    status = ReloadStatus(os.getpid(), generation, attempt, ok, message, time.time())
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        Path(temporary).write_text(json.dumps(asdict(status)) + "\n", encoding="utf-8")
        os.replace(temporary, path)
    except OSError as e:
        log.warn("cannot write the reload status {path}: {e}", path=path, e=e.strerror)


def readStatus(path: str) -> ReloadStatus | None:
    """The status at C{path}, or L{None} if there is none (or it is not one)."""
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
        return ReloadStatus(**values)
    except (OSError, ValueError, TypeError):
        return None


def reportFailure(
    path: str | None, failure, *, generation: int, attempt: int, expected: tuple[type[BaseException], ...]
) -> str:
    """
    Log a reload that did not take and write its status: the error's own
    words for the C{expected} kinds (a located config error, a port taken),
    the traceback too for anything else (a bug).

    @param failure: A L{twisted.python.failure.Failure}.
    @return: The message (C{reload failed, still on generation N: ...}).
    """
    if failure.check(*expected):
        error = str(failure.value)
    else:
        log.failure("reload failed", failure)
        error = f"{type(failure.value).__name__}: {failure.value}"
    message = f"reload failed, still on generation {generation}: {error}"
    log.error("{message}", message=message)
    writeStatus(path, generation=generation, attempt=attempt, ok=False, message=message)
    return message
