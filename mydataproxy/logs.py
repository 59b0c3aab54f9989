"""
The access log: one line per request or tunnel, written off the reactor.

Lines are gathered on the reactor thread and handed, a batch at a time,
through a bounded queue to a writer thread, so a slow or hung log disk (EFS
is a hard NFS mount) never stalls traffic; when the queue is full, lines are
dropped and counted rather than blocking.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from typing import TextIO

import txaio
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from mydataproxy.config import STDOUT

txaio.use_twisted()
log = txaio.make_logger()

QUEUE_BATCHES = 256
BATCH_LINES = 256
FLUSH_SECONDS = 0.2
_STOP = None


class AccessLog:
    """
    Formats access records and hands them to a writer thread.

    @param path: A file to append to, or C{"-"} for standard output.
    @param clock: Schedules the periodic hand-over of gathered lines.
    """

    def __init__(self, path: str, clock: IReactorTime) -> None:
        self.path = path
        self.dropped = 0
        self._queue: queue.Queue[list[str] | None] = queue.Queue(QUEUE_BATCHES)
        self._thread: threading.Thread | None = None
        self._batch: list[str] = []
        self._flusher = LoopingCall(self.flush)
        self._flusher.clock = clock
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

    def stop(self) -> None:
        """Write what is gathered and queued, then stop the writer."""
        if self._flusher.running:
            self._flusher.stop()
        self.flush()
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout=5)
            self._thread = None

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
            f"{self._timestamp()} client={client} method={method} target={_quoted(target)} "
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
        while True:
            batch = self._queue.get()
            if batch is _STOP:
                if stream is not sys.__stdout__:
                    stream.close()
                return
            try:
                stream.write("".join(batch))
                stream.flush()
            except (OSError, ValueError) as e:
                log.error("access log {path} write failed: {e}", path=self.path, e=e)


def _quoted(value: str) -> str:
    if " " in value or '"' in value or not value:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value
