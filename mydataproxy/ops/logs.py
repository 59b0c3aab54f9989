"""
The access log: one line per request or tunnel, written off the reactor.

Lines are gathered on the reactor thread and handed, a batch at a time,
through a bounded queue to a writer thread, so a slow or hung log disk (EFS
is a hard NFS mount) never stalls traffic; when the queue is full, lines are
dropped and counted rather than blocking.

The writer thread never calls twisted.logger (which belongs to the reactor
thread): it hands what it has to say to the reactor with C{callFromThread},
once per run of failures.  L{AccessLog.stop} waits a bounded time for the
writer and says how many lines it gave up on.
"""

from __future__ import annotations

import queue
import re
import sys
import threading
import time
from typing import TextIO, Union

import txaio
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import LoopingCall

from mydataproxy.config import STDOUT

txaio.use_twisted()
log = txaio.make_logger()

QUEUE_BATCHES = 256
BATCH_LINES = 256
FLUSH_SECONDS = 0.2
# How long stopping waits for the writer (a hung mount must not hang shutdown).
STOP_SECONDS = 2.0
_STOP = None

Reactor = Union[IReactorTime, IReactorFromThreads]


class AccessLog:
    """
    Formats access records and hands them to a writer thread.

    @param path: A file to append to, or C{"-"} for standard output.
    @param reactor: Schedules the periodic hand-over of gathered lines
        (C{IReactorTime}) and takes the writer's messages
        (C{IReactorFromThreads}).
    @ivar dropped: lines dropped because the writer was not keeping up.
    @ivar lost: lines the writer could not write (counted by the writer).
    """

    def __init__(self, path: str, reactor: Reactor) -> None:
        self.path = path
        self.dropped = 0
        self.lost = 0
        self._reactor = reactor
        self._queue: queue.Queue[list[str] | None] = queue.Queue(QUEUE_BATCHES)
        self._thread: threading.Thread | None = None
        self._batch: list[str] = []
        self._handed = 0
        # Written by the writer thread only, as is lost: lines it is done with.
        self._done = 0
        self._flusher = LoopingCall(self.flush)
        self._flusher.clock = reactor
        self._stamp = (0, "")

    def start(self) -> None:
        """Open the file (raising if it can't be) and start the writer."""
        # Under twistd sys.stdout is the log system; the real stdout is fd 1.
        stream = sys.__stdout__ if self.path == STDOUT else open(self.path, "a", encoding="utf-8")
        self._thread = threading.Thread(
            target=self._write, args=(stream,), name="access-log", daemon=True
        )
        self._thread.start()
        self._flusher.start(FLUSH_SECONDS, now=False)

    def flush(self) -> None:
        """Hand the lines gathered so far to the writer thread."""
        if not self._batch:
            return
        batch, self._batch = self._batch, []
        try:
            self._queue.put_nowait(batch)
        except queue.Full:
            self.dropped += len(batch)
            log.warn(
                "access log {path} is not keeping up: {n} lines dropped ({total} in all)",
                path=self.path,
                n=len(batch),
                total=self.dropped,
            )
        else:
            self._handed += len(batch)

    def stop(self, timeout: float | None = None) -> None:
        """
        Write what is gathered and queued, then stop the writer; if it is
        not done within C{timeout} seconds (default C{STOP_SECONDS}: a hung
        mount), give up on it and log how many lines were not written.
        """
        if timeout is None:
            timeout = STOP_SECONDS
        if self._flusher.running:
            self._flusher.stop()
        self.flush()
        thread, self._thread = self._thread, None
        if thread is None:
            return
        deadline = time.monotonic() + timeout
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            pass
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            log.error(
                "access log {path}: the writer is stuck; giving up on it after {timeout} s, "
                "{lost} lines not written",
                path=self.path,
                timeout=timeout,
                lost=self._handed - self._done + self.lost,
            )
        elif self.lost:
            log.warn("access log {path}: {lost} lines could not be written", path=self.path, lost=self.lost)

    def record(
        self,
        client: str,
        method: str,
        target: str,
        status: int,
        bytesIn: int,
        bytesOut: int,
        seconds: float,
        upstream: str,
        certificate: str = "",
    ) -> None:
        """Gather one access line; never blocks."""
        line = (
            f"{self._timestamp()} client={client} method={_quoted(method)} target={_quoted(target)} "
            f"status={status} in={bytesIn} out={bytesOut} ms={seconds * 1000:.1f} "
            f"upstream={upstream or '-'}"
            + (f" cert={_quoted(certificate)}\n" if certificate else "\n")
        )
        self._batch.append(line)
        if len(self._batch) >= BATCH_LINES:
            self.flush()

    def _timestamp(self) -> str:
        now = time.time()
        second = int(now)
        if self._stamp[0] != second:
            self._stamp = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        return f"{self._stamp[1]}.{int((now - second) * 1000):03d}Z"

    def _write(self, stream: TextIO) -> None:
        # The writer thread.  A run of failures is reported once when it
        # starts and once when it ends, through the reactor: twisted.logger
        # is not for other threads.
        failing = False
        while True:
            batch = self._queue.get()
            if batch is _STOP:
                if stream is not sys.__stdout__:
                    try:
                        stream.close()
                    except (OSError, ValueError):
                        pass  # what it still held failed before, and is counted
                return
            try:
                stream.write("".join(batch))
                stream.flush()
            except (OSError, ValueError) as e:
                self.lost += len(batch)
                if not failing:
                    failing = True
                    self._reactor.callFromThread(self._writeFailed, str(e))
            else:
                if failing:
                    failing = False
                    self._reactor.callFromThread(self._writeRecovered)
            self._done += len(batch)

    def _writeFailed(self, error: str) -> None:
        log.error("access log {path} write failed: {e}; lines are lost until it works again", path=self.path, e=error)

    def _writeRecovered(self) -> None:
        log.warn("access log {path} is written again ({lost} lines lost in all)", path=self.path, lost=self.lost)


# Quoted: empty values and those with a space, quote or backslash.  Escaped
# inside the quotes as in JSON: the quote, the backslash and every control
# character (C0, DEL, C1, and the Unicode line and paragraph separators that
# some readers take for line breaks), so no value can end a line or forge
# another field.
_NEEDS_QUOTING = re.compile(r'[\x00-\x20"\\\x7f-\x9f\u2028\u2029]')
_ESCAPED = re.compile(r'["\\\x00-\x1f\x7f-\x9f\u2028\u2029]')
_ESCAPES = {'"': r"\"", "\\": r"\\", "\n": r"\n", "\r": r"\r", "\t": r"\t"}


def _escape(match: re.Match) -> str:
    c = match.group()
    return _ESCAPES.get(c) or f"\\u{ord(c):04x}"


def _quoted(value: str) -> str:
    if value and not _NEEDS_QUOTING.search(value):
        return value
    return '"' + _ESCAPED.sub(_escape, value) + '"'
