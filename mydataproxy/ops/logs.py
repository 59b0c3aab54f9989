"""
The access and error logs: lines are formatted on the reactor thread and
written by a writer thread per log, so a slow or hung log disk (EFS is a
hard NFS mount) never stalls traffic.

L{LogWriter} is the mechanism: lines are gathered and handed, a batch at a
time, through a bounded queue (C{logging.queue_lines}) to the writer
thread, which writes, rotates, gzips and prunes (L{RotatingFile}) and
reopens a file renamed away (SIGUSR1, and a check of the path every few
seconds).  When the queue is full, lines are dropped and counted, never
waited for; a write that fails loses its lines, counted too.  Once a minute
a warning with the counts goes to standard error (journald: the log itself
may be what is failing), and when lines go through again one line says how
many were lost.

The writer thread never calls twisted.logger (which belongs to the reactor
thread): it hands what it has to say to the reactor with C{callFromThread}.
L{LogWriter.stop} waits a bounded time for the writer and says how many
lines it gave up on.

L{AccessLog} formats access records (C{keyvalue}, Apache's C{combined},
or C{json}); L{ErrorLog} is a twisted.logger observer that writes the
daemon's own events to the error log; L{EventLog} writes them as JSON
lines instead, for a worker's supervisor to read back (L{eventFromLine})
and log as its own.
"""

from __future__ import annotations

import json
import queue
import re
import sys
import threading
import time
from typing import Callable, Iterator, Protocol, Union

import txaio
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver, eventAsJSON, eventFromJSON, formatEventAsClassicLogText
from twisted.python.failure import Failure
from zope.interface import implementer

from mydataproxy.config import STDOUT, LoggingSettings
from mydataproxy.ops.audit import GENESIS, HashChain, lastValue
from mydataproxy.ops.logfile import RotatingFile

txaio.use_twisted()
log = txaio.make_logger()

BATCH_LINES = 256
FLUSH_SECONDS = 0.2
# How long stopping waits for the writer (a hung mount must not hang shutdown).
STOP_SECONDS = 2.0
# How often lost lines are reported on standard error.
REPORT_SECONDS = 60.0
# How often the writer checks that the path still names its file.
MOVED_CHECK_SECONDS = 5.0
_STOP = None


class _Reconfigure:
    """A queue item: the writer takes new settings here, between two batches."""

    def __init__(self, settings: LoggingSettings, chained: bool) -> None:
        self.settings = settings
        self.chained = chained

Reactor = Union[IReactorTime, IReactorFromThreads]


class Timing(Protocol):
    """What an access line tells of the upstream exchange (L{mydataproxy.upstream.client.UpstreamTiming})."""

    connect: float | None
    handshake: float | None
    firstByte: float
    tlsVersion: str


class Timestamps:
    """
    ISO 8601 timestamps with milliseconds, in UTC (C{Z}) or local time with
    its offset, of times since the epoch (not before it).
    """

    def __init__(self, local: bool) -> None:
        self.local = local
        self._stamp: tuple[int | None, tuple[str, str]] = (None, ("", ""))

    def __call__(self, now: float | None = None) -> str:
        if now is None:
            now = time.time()
        second = int(now)
        if self._stamp[0] != second:
            if self.local:
                parts = time.localtime(second)
                offset = time.strftime("%z", parts)
                text = time.strftime("%Y-%m-%dT%H:%M:%S", parts), f"{offset[:3]}:{offset[3:]}"
            else:
                text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)), "Z"
            self._stamp = (second, text)
        stamp, zone = self._stamp[1]
        # A table, not a format spec: this runs once per access line.
        return stamp + _MILLISECONDS[int((now - second) * 1000)] + zone


_MILLISECONDS = tuple(f".{n:03d}" for n in range(1000))


class LogWriter:
    """
    One log's bounded queue and writer thread.

    @param path: A file to append to, or C{"-"} for standard output.
    @param name: What the log is called in messages (C{access log}).
    @param reactor: Schedules the hand-over of gathered lines and the loss
        reports (C{IReactorTime}), and takes the writer's messages
        (C{IReactorFromThreads}).
    @param chained: Chain the lines with hashes as they are written (the
        tamper-evident access log).
    @ivar dropped: Lines dropped because the writer was not keeping up.
    @ivar lost: Lines the writer could not write (counted by the writer).
    """

    def __init__(
        self, path: str, name: str, reactor: Reactor, settings: LoggingSettings,
        now: Callable[[], float] = time.time, chained: bool = False,
    ) -> None:
        self.path = path
        self.name = name
        self.settings = settings
        self.dropped = 0
        self.lost = 0
        self._reactor = reactor
        # Bounded by lines (queue_lines), counted here: the reactor adds,
        # the writer takes away.
        self._queue: queue.Queue[list[str] | _Reconfigure | None] = queue.Queue()
        self._queuedLines = 0
        self._queuedLock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._batch: list[str] = []
        self._handed = 0
        # Written by the writer thread only, as is lost: lines it is done with.
        self._done = 0
        self._file = None if path == STDOUT else RotatingFile(path, settings, now)
        self._reopen = threading.Event()
        self._flusher = LoopingCall(self.flush)
        self._flusher.clock = reactor
        self._reporter = LoopingCall(self._report)
        self._reporter.clock = reactor
        self._reported = (0, 0)
        self._dropping = False
        self._chained = chained
        self._chain: HashChain | None = None

    def start(self) -> None:
        """Open the file (raising if it can't be) and start the writer."""
        if self._file is not None:
            self._file.open(createDirectory=True)
        if self._chained:
            # Take up the chain where the file we append to left it.
            previous = lastValue(self._file.path) if self._file is not None else None
            self._chain = HashChain(previous or GENESIS)
        self._thread = threading.Thread(target=self._write, name=self.name.replace(" ", "-"), daemon=True)
        self._thread.start()
        self._flusher.start(FLUSH_SECONDS, now=False)
        self._reporter.start(REPORT_SECONDS, now=False)

    def add(self, line: str) -> None:
        """Gather one line (ending in a newline); never blocks."""
        self._batch.append(line)
        if len(self._batch) >= BATCH_LINES:
            self.flush()

    def flush(self) -> None:
        """Hand the lines gathered so far to the writer thread."""
        if not self._batch:
            return
        batch, self._batch = self._batch, []
        with self._queuedLock:
            full = self._queuedLines + len(batch) > self.settings.queue_lines
            if not full:
                self._queuedLines += len(batch)
        if full:
            self.dropped += len(batch)
            if not self._dropping:
                self._dropping = True
                log.warn("{name} {path} is not keeping up: dropping lines", name=self.name, path=self.path)
        else:
            self._queue.put_nowait(batch)
            self._handed += len(batch)
            if self._dropping:
                self._dropping = False
                log.warn(
                    "{name} {path} takes lines again; {dropped} dropped, {lost} not written in all",
                    name=self.name, path=self.path, dropped=self.dropped, lost=self.lost,
                )

    def reopen(self) -> None:
        """Have the writer open the path afresh (SIGUSR1: after an outside rename)."""
        self._reopen.set()

    def reconfigure(self, settings: LoggingSettings, chained: bool = False) -> None:
        """
        Go on with new settings (a reload that keeps the path): rotation,
        retention, the queue's bound and, with C{chained}, the hash chain
        (taken up where the file left it).  The lines gathered before are
        written under the old ones.
        """
        self.flush()
        self.settings = settings
        self._queue.put_nowait(_Reconfigure(settings, chained))

    def _report(self) -> None:
        """Once a minute: say on standard error what was lost since the last report."""
        dropped, lost = self._reported
        if (self.dropped, self.lost) == (dropped, lost):
            return
        self._reported = (self.dropped, self.lost)
        sys.__stderr__.write(
            f"mydataproxy: {self.name} {self.path}: {self.dropped - dropped} lines dropped and "
            f"{self.lost - lost} not written in the last {REPORT_SECONDS:g} s "
            f"({self.dropped} and {self.lost} in all)\n"
        )
        sys.__stderr__.flush()

    def stop(self, timeout: float | None = None) -> None:
        """
        Write what is gathered and queued, then stop the writer; if it is
        not done within C{timeout} seconds (default C{STOP_SECONDS}: a hung
        mount), give up on it and log how many lines were not written.
        """
        if timeout is None:
            timeout = STOP_SECONDS
        for call in (self._flusher, self._reporter):
            if call.running:
                call.stop()
        self.flush()
        self._report()
        thread, self._thread = self._thread, None
        if thread is None:
            return
        deadline = time.monotonic() + timeout
        self._queue.put_nowait(_STOP)
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            log.error(
                "{name} {path}: the writer is stuck; giving up on it after {timeout} s, "
                "{lost} lines not written",
                name=self.name,
                path=self.path,
                timeout=timeout,
                lost=self._handed - self._done + self.lost,
            )
        elif self.lost:
            log.warn("{name} {path}: {lost} lines could not be written", name=self.name, path=self.path, lost=self.lost)

    # The writer thread.

    def _write(self) -> None:
        # A run of failures is reported once when it starts and once when
        # it ends, through the reactor: twisted.logger is not for other threads.
        failing = False
        checked = time.monotonic()
        while True:
            try:
                batch = self._queue.get(timeout=MOVED_CHECK_SECONDS)
            except queue.Empty:
                batch = []
            if batch is _STOP:
                self._close()
                return
            if isinstance(batch, _Reconfigure):
                self._reconfigured(batch)
                continue
            try:
                if self._file is not None:
                    if self._reopen.is_set():
                        self._reopen.clear()
                        self._file.reopen()
                    elif time.monotonic() - checked >= MOVED_CHECK_SECONDS:
                        checked = time.monotonic()
                        self._file.reopenIfMoved()
                if batch:
                    if self._chain is not None:
                        batch = [self._chain.apply(line) for line in batch]
                    data = "".join(batch).encode("utf-8", "replace")
                    if self._file is None:
                        sys.__stdout__.buffer.write(data)
                        sys.__stdout__.buffer.flush()
                    else:
                        self._file.write(data)
            except (OSError, ValueError) as e:
                self.lost += len(batch)
                self._close()
                if not failing:
                    failing = True
                    self._reactor.callFromThread(self._writeFailed, str(e))
            else:
                if failing and batch:
                    failing = False
                    self._reactor.callFromThread(self._writeRecovered)
            self._done += len(batch)
            with self._queuedLock:
                self._queuedLines -= len(batch)

    def _reconfigured(self, change: _Reconfigure) -> None:
        if self._file is not None:
            self._file.settings = change.settings
        if not change.chained:
            self._chain = None
        elif self._chain is None:
            previous = lastValue(self._file.path) if self._file is not None else None
            self._chain = HashChain(previous or GENESIS)

    def _close(self) -> None:
        if self._file is None:
            return
        try:
            self._file.close()
        except OSError:
            pass  # what it still held failed before, and is counted

    def _writeFailed(self, error: str) -> None:
        log.error(
            "{name} {path} write failed: {e}; lines are lost until it works again",
            name=self.name, path=self.path, e=error,
        )

    def _writeRecovered(self) -> None:
        log.warn("{name} {path} is written again ({lost} lines lost in all)", name=self.name, path=self.path, lost=self.lost)


class AccessLog:
    """
    One access line per request or tunnel, in the configured format.

    @param path: A file, or C{"-"} for standard output.
    """

    def __init__(
        self, path: str, reactor: Reactor, settings: LoggingSettings | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        if settings is None:
            settings = LoggingSettings()
        self.path = path
        self.writer = LogWriter(path, "access log", reactor, settings, now, chained=settings.tamper_evident)
        self._timestamp = Timestamps(settings.time == "local")
        self._format = self._formatFor(settings)

    def _formatFor(self, settings: LoggingSettings):
        return {"keyvalue": self._keyValue, "combined": self._combined, "json": self._json}[settings.format]

    def reconfigure(self, settings: LoggingSettings) -> None:
        """Go on with new settings on the same path: format, time zone, rotation, retention, the chain."""
        self.writer.reconfigure(settings, chained=settings.tamper_evident)
        self._timestamp = Timestamps(settings.time == "local")
        self._format = self._formatFor(settings)

    @property
    def dropped(self) -> int:
        return self.writer.dropped

    @property
    def lost(self) -> int:
        return self.writer.lost

    def start(self) -> None:
        self.writer.start()

    def flush(self) -> None:
        self.writer.flush()

    def reopen(self) -> None:
        self.writer.reopen()

    def stop(self, timeout: float | None = None) -> None:
        self.writer.stop(timeout)

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
        transaction: str = "",
        userAgent: str = "",
        rule: str = "",
        timing: Timing | None = None,
    ) -> None:
        """
        Gather one access line; never blocks.

        @param transaction: The MyData transaction id (C{x-api-tran-id}).
        @param rule: The rule that allowed or refused the request.
        @param timing: How the upstream exchange went (connect, TLS
            handshake, first byte, TLS version).
        """
        self.writer.add(self._format(
            client, method, target, status, bytesIn, bytesOut, seconds, upstream,
            certificate, transaction, userAgent, rule, timing,
        ))

    def _keyValue(
        self, client, method, target, status, bytesIn, bytesOut, seconds, upstream,
        certificate, transaction, userAgent, rule, timing,
    ) -> str:
        # The fields of _extras, in its order, written out: no dict, no loop
        # for the line every request writes.
        line = (
            f"{self._timestamp()} client={client} method={_quoted(method)} target={_quoted(target)} "
            f"status={status} in={bytesIn} out={bytesOut} ms={seconds * 1000:.1f} "
            f"upstream={upstream or '-'}"
        )
        if certificate:
            line += " cert=" + _quoted(certificate)
        if transaction:
            line += " tran_id=" + _quoted(transaction)
        if userAgent:
            line += " ua=" + _quoted(userAgent)
        if rule:
            line += " rule=" + _quoted(rule)
        if timing is not None:
            # Formatted numbers never need quoting.
            if timing.connect is not None:
                line += f" connect_ms={timing.connect * 1000:.1f}"
            if timing.handshake is not None:
                line += f" tls_ms={timing.handshake * 1000:.1f}"
            if timing.firstByte is not None:
                line += f" ttfb_ms={timing.firstByte * 1000:.1f}"
            if timing.tlsVersion:
                line += " tls=" + _quoted(timing.tlsVersion)
        return line + "\n"

    def _combined(
        self, client, method, target, status, bytesIn, bytesOut, seconds, upstream,
        certificate, transaction, userAgent, rule, timing,
    ) -> str:
        # Apache's: host ident user [time] "request" status bytes "referer" "agent".
        host = client.rpartition(":")[0] or client
        stamp = _apacheTime(self._timestamp.local)
        request = _inQuotes(f"{method} {target} HTTP/1.1")
        return f'{host} - - [{stamp}] "{request}" {status} {bytesOut or "-"} "-" "{_inQuotes(userAgent or "-")}"\n'

    def _json(
        self, client, method, target, status, bytesIn, bytesOut, seconds, upstream,
        certificate, transaction, userAgent, rule, timing,
    ) -> str:
        fields: dict[str, object] = {
            "time": self._timestamp(), "client": client, "method": method, "target": target, "status": status,
            "in": bytesIn, "out": bytesOut, "ms": round(seconds * 1000, 1), "upstream": upstream or None,
        }
        fields.update(
            (key, float(value) if key.endswith("_ms") else value)
            for key, value in _extras(certificate, transaction, userAgent, rule, timing)
        )
        # ensure_ascii: every control and line-separator character escaped.
        return json.dumps(fields, ensure_ascii=True, separators=(",", ":")) + "\n"


def _extras(
    certificate: str, transaction: str, userAgent: str, rule: str, timing: Timing | None,
) -> Iterator[tuple[str, str]]:
    """The optional fields of an access line that are present, in their order, as text."""
    for key, value in (("cert", certificate), ("tran_id", transaction), ("ua", userAgent), ("rule", rule)):
        if value:
            yield key, value
    if timing is not None:
        for key, seconds in (("connect_ms", timing.connect), ("tls_ms", timing.handshake),
                             ("ttfb_ms", timing.firstByte)):
            if seconds is not None:
                yield key, f"{seconds * 1000:.1f}"
        if timing.tlsVersion:
            yield "tls", timing.tlsVersion


def _apacheTime(local: bool) -> str:
    now = time.time()
    parts = time.localtime(now) if local else time.gmtime(now)
    return time.strftime("%d/%b/%Y:%H:%M:%S ", parts) + (time.strftime("%z", parts) if local else "+0000")


@implementer(ILogObserver)
class ErrorLog:
    """The daemon's own log events, one line each (tracebacks after), to the error log."""

    def __init__(self, path: str, reactor: Reactor, settings: LoggingSettings, now=time.time) -> None:
        self.path = path
        self.writer = LogWriter(path, "error log", reactor, settings, now)
        self._timestamp = Timestamps(settings.time == "local")

    def start(self) -> None:
        self.writer.start()

    def reopen(self) -> None:
        self.writer.reopen()

    def reconfigure(self, settings: LoggingSettings) -> None:
        """Go on with new settings on the same path (rotation, retention, time zone)."""
        self.writer.reconfigure(settings)
        self._timestamp = Timestamps(settings.time == "local")

    def stop(self, timeout: float | None = None) -> None:
        self.writer.stop(timeout)

    def __call__(self, event: dict) -> None:
        text = formatEventAsClassicLogText(event, formatTime=lambda when: self._timestamp(when))
        if text:
            # Twisted continues a multi-line message on indented lines; every
            # other control character is escaped, as in the access log.
            self.writer.add(_CONTROL.sub(_escape, text))


@implementer(ILogObserver)
class EventLog:
    """
    The daemon's own log events, each as one JSON line (twisted.logger's
    C{eventAsJSON}, which escapes every control character), through a
    writer thread: how a worker hands its events to its supervisor over a
    pipe without its reactor ever waiting on it.
    """

    def __init__(self, path: str, reactor: Reactor, settings: LoggingSettings) -> None:
        self.path = path
        self.writer = LogWriter(path, "event log", reactor, settings)

    def start(self) -> None:
        self.writer.start()

    def stop(self, timeout: float | None = None) -> None:
        self.writer.stop(timeout)

    def __call__(self, event: dict) -> None:
        failure = event.get("log_failure")
        if failure is not None:
            # A failure does not survive JSON (its exception is not
            # persisted): its traceback is sent as text.
            event = {**event, "log_failure": failure.getTraceback()}
        self.writer.add(eventAsJSON(event) + "\n")


class ForwardedTraceback(Exception):
    """The traceback of a failure logged in another process (L{EventLog}), as text."""


def eventFromLine(line: str) -> dict:
    """
    An event written by L{EventLog}, ready to be published again; its
    failure, if any, is a L{ForwardedTraceback} carrying the text.

    @raise ValueError: If C{line} is not one.
    """
    event = eventFromJSON(line)
    if not isinstance(event, dict):
        raise ValueError("not a log event")
    traceback = event.get("log_failure")
    if isinstance(traceback, str):
        event["log_failure"] = Failure(ForwardedTraceback(traceback))
    return event


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
    # Most values are printable: they hold no control or separator character
    # (isprintable, in C) and, without a quote or a backslash, need no escape.
    if value.isprintable() and '"' not in value and "\\" not in value:
        if value and " " not in value:
            return value
        return '"' + value + '"'
    if value and not _NEEDS_QUOTING.search(value):
        return value
    return '"' + _ESCAPED.sub(_escape, value) + '"'


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def _inQuotes(value: str) -> str:
    """A value for inside quotes (combined format): quote, backslash and controls escaped."""
    return _ESCAPED.sub(_escape, value)
