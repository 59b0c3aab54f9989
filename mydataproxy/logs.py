"""
The access log: one line per request or tunnel, written off the reactor.

Lines go through a bounded queue to a writer thread, so a slow or hung log
disk (EFS is a hard NFS mount) never stalls traffic; when the queue is full,
lines are dropped and counted rather than blocking.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from typing import TextIO

import txaio

from mydataproxy.config import STDOUT

txaio.use_twisted()
log = txaio.make_logger()

QUEUE_LINES = 65536
_STOP = None


class AccessLog:
    """
    Formats access records and hands them to a writer thread.

    @param path: A file to append to, or C{"-"} for standard output.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.dropped = 0
        self._queue: queue.Queue[str | None] = queue.Queue(QUEUE_LINES)
        self._thread: threading.Thread | None = None
        self._stamp = (0, "")

    def start(self) -> None:
        """Open the file (raising if it can't be) and start the writer."""
        # Under twistd sys.stdout is the log system; the real stdout is fd 1.
        stream = sys.__stdout__ if self.path == STDOUT else open(self.path, "a", encoding="utf-8")
        self._thread = threading.Thread(
            target=self._write, args=(stream,), name="access-log", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Write what is queued, then stop the writer."""
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
    ) -> None:
        """Queue one access line; never blocks."""
        line = (
            f"{self._timestamp()} client={client} method={method} target={_quoted(target)} "
            f"status={status} in={bytesIn} out={bytesOut} ms={seconds * 1000:.1f} "
            f"upstream={upstream or '-'}\n"
        )
        try:
            self._queue.put_nowait(line)
        except queue.Full:
            self.dropped += 1

    def _timestamp(self) -> str:
        now = time.time()
        second = int(now)
        if self._stamp[0] != second:
            self._stamp = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        return f"{self._stamp[1]}.{int((now - second) * 1000):03d}Z"

    def _write(self, stream: TextIO) -> None:
        while True:
            lines = [self._queue.get()]
            try:
                while len(lines) < 1024:
                    lines.append(self._queue.get_nowait())
            except queue.Empty:
                pass
            stopping = _STOP in lines
            try:
                stream.write("".join(line for line in lines if line is not _STOP))
                stream.flush()
            except (OSError, ValueError) as e:
                log.error("access log {path} write failed: {e}", path=self.path, e=e)
            if stopping:
                if stream is not sys.__stdout__:
                    stream.close()
                return


def _quoted(value: str) -> str:
    if " " in value or '"' in value or not value:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value
