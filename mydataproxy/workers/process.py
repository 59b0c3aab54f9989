"""
The supervisor's side of one worker process: spawning it with its file
descriptors (L{mydataproxy.workers.worker} says which is which) and its
channel for the connections handed to it (L{mydataproxy.workers.handoff}),
reading its pipes, asking its private admin socket whether it is ready and
what it counted, and telling how it ended.

Each pipe is split into whole lines (L{LineSplitter}) before anything is
done with them: a worker's access lines reach the log writer one whole line
at a time, and since every worker has pipes of its own, two workers' lines
can never interleave.
"""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path
from typing import Callable

import txaio
from prometheus_client.metrics_core import Metric
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from mydataproxy.ops.logs import LogWriter, eventFromLine
from mydataproxy.ops.metrics import parseExposition
from mydataproxy.workers.handoff import Channel
from mydataproxy.workers.worker import (
    ACCESS_FD,
    EVENTS_FD,
    HANDOFF_FD,
    LIFELINE_FD,
    METRICS_FD,
    OPENMETRICS,
    workerCommand,
)

txaio.use_twisted()
log = txaio.make_logger()

#: The longest line taken from a worker's pipe; longer ones are dropped (counted).
MAX_LINE_BYTES = 1024 * 1024
#: The most of a worker's final metrics that is read.
MAX_METRICS_BYTES = 16 * 1024 * 1024
#: How long a question to a worker's admin socket may take.
PROBE_SECONDS = 2.0
#: How often a worker is asked whether it is ready: while it starts, then once it is.
STARTING_POLL_SECONDS = 0.1
READY_POLL_SECONDS = 1.0

STARTING = "starting"
READY = "ready"
NOT_READY = "not_ready"
RETIRING = "retiring"
ENDED = "ended"


class LineSplitter:
    """
    Whole lines out of a byte stream, each given to C{deliver} with its
    newline.  A partial line is held until its end comes, up to
    C{maxLength} bytes; a longer one is dropped whole and counted in
    L{tooLong}, as is one cut by the end of the stream (L{end}).
    """

    def __init__(self, deliver: Callable[[bytes], None], maxLength: int = MAX_LINE_BYTES) -> None:
        self._deliver = deliver
        self._max = maxLength
        self._partial = b""
        self._skipping = False
        self.tooLong = 0
        self.cut = 0

    def feed(self, data: bytes) -> None:
        *complete, rest = data.split(b"\n")
        for piece in complete:
            if self._skipping:
                self._skipping = False
                continue
            line, self._partial = self._partial + piece, b""
            self._deliver(line + b"\n")
        if self._skipping:
            return
        self._partial += rest
        if len(self._partial) > self._max:
            self._partial = b""
            self._skipping = True
            self.tooLong += 1

    def end(self) -> None:
        """The stream ended: a partial line left is dropped (counted in L{cut})."""
        if self._partial or self._skipping:
            self.cut += 1
        self._partial = b""
        self._skipping = False


class _Fetch(Protocol):
    """One HTTP/1.0 request to a worker's admin site, answered and closed."""

    def __init__(self, target: bytes, accept: bytes) -> None:
        self.request = b"GET " + target + b" HTTP/1.0\r\nHost: worker\r\n"
        if accept:
            self.request += b"Accept: " + accept + b"\r\n"
        self.request += b"\r\n"
        self.received = bytearray()
        self.done: Deferred[tuple[int, bytes]] = Deferred(canceller=self._cancel)

    def _cancel(self, done: Deferred) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    def fail(self, failure: Failure) -> None:
        if not self.done.called:
            self.done.errback(failure)

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if len(self.received) > MAX_METRICS_BYTES:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure) -> None:
        if self.done.called:
            return
        head, separator, body = bytes(self.received).partition(b"\r\n\r\n")
        parts = head.split(b" ", 2)
        if not separator or len(parts) < 2 or not parts[1].isdigit():
            self.done.errback(ValueError("no HTTP response"))
        else:
            self.done.callback((int(parts[1]), body))


class _FetchFactory(Factory):
    noisy = False

    def __init__(self, fetch: _Fetch) -> None:
        self.fetch = fetch

    def buildProtocol(self, addr) -> Protocol:
        return self.fetch


def fetch(reactor, path: str, target: bytes, accept: bytes = b"") -> Deferred[tuple[int, bytes]]:
    """
    Ask the admin site on the UNIX socket C{path} for C{target}: fires with
    the status and body, or fails (refused, not in L{PROBE_SECONDS}).
    """
    request = _Fetch(target, accept)
    connecting = UNIXClientEndpoint(reactor, path, timeout=PROBE_SECONDS).connect(_FetchFactory(request))
    connecting.addErrback(request.fail)
    return request.done.addTimeout(PROBE_SECONDS, reactor)


def describeEnd(reason: Failure) -> str:
    """How a process ended, in words (C{exit status 78}, C{killed by signal 9})."""
    value = reason.value
    if isinstance(value, ProcessDone):
        return "exit status 0"
    number = getattr(value, "signal", None)
    if number is not None:
        return f"killed by signal {number} ({signal.Signals(number).name})"
    return f"exit status {getattr(value, 'exitCode', '?')}"


class WorkerProcess(ProcessProtocol):
    """
    One worker process, from its spawn to its end.

    @param accessWriter: Where its access lines go (its generation's writer).
    @param onEnded: Called with this worker and how it ended, once.
    @param onServing: Called when it may take more connections: it became
        L{serving}, or its channel, full, can take more.
    @ivar state: L{STARTING} until its C{/readyz} first answers 200, then
        L{READY} or L{NOT_READY} as it answers; L{RETIRING} once told to
        stop; L{ENDED}.
    @ivar channel: Where the connections handed to it go, from its spawn.
    @ivar unread: The connections handed to it that it never read, taken
        back from its channel as it ended (by listener name), for another.
    @ivar reasons: Why it is not ready, as it last said.
    @ivar snapshot: Its metric families as last scraped (or, once ended,
        as it wrote them at exit).
    @ivar lastError: The last error (or worse) it logged, for the
        supervisor's account of a failed start.
    @ivar told: Whether it was told to stop (its exit is expected).
    """

    def __init__(
        self, reactor, index: int, generation: int, serial: int, directory: Path, accessWriter: LogWriter,
        onEnded: Callable[[WorkerProcess, Failure], None], onServing: Callable[[], None],
    ) -> None:
        self.reactor = reactor
        self.index = index
        self.generation = generation
        self.serial = serial
        self.socketPath = str(directory / f"worker-{serial}.sock")
        self.accessWriter = accessWriter
        self.onEnded = onEnded
        self.onServing = onServing
        self.channel: Channel | None = None
        self.unread: list[tuple[bytes, socket.socket]] = []
        self.answering = False
        self.state = STARTING
        self.reasons: list[str] = ["starting"]
        self.pid: int | None = None
        self.started = reactor.seconds()
        self.snapshot: list[Metric] = []
        self.lastError = ""
        self.ending = ""
        self.told = False
        self._final = bytearray()
        self._access = LineSplitter(self._accessLine)
        self._events = LineSplitter(self._eventLine)
        self._readyWaiters: list[Deferred[None]] = []
        self._endWaiters: list[Deferred[None]] = []
        self._poll = None

    @property
    def name(self) -> str:
        return f"worker {self.index} (pid {self.pid}, generation {self.generation})"

    @property
    def running(self) -> bool:
        return self.state != ENDED

    @property
    def serving(self) -> bool:
        """
        Whether connections may be handed to it: it has answered its last
        C{/readyz} (even 503: with expired certificates every worker says
        so, and a single process serves on too) and has not been told to stop.
        """
        return self.state in (READY, NOT_READY) and self.answering

    @property
    def malformed(self) -> dict[str, int]:
        """Lines of its pipes dropped (too long, or cut by its end), by log: C{access}, C{error}."""
        return {name: each.tooLong + each.cut for name, each in (("access", self._access), ("error", self._events))}

    def spawn(self, configPath: str | None, digest: str | None, listeners: dict[str, str]) -> None:
        """
        Start the process, to serve the connections of C{listeners} (their
        listening addresses by name, as
        L{mydataproxy.workers.handoff.describeAddress} writes them).

        @raise OSError: If it cannot be started.
        """
        self.channel = Channel(self.reactor, self.onServing)
        childFDs: dict[int, int | str] = {
            LIFELINE_FD: "w", 1: 1, 2: 2, ACCESS_FD: "r", EVENTS_FD: "r", METRICS_FD: "r",
            HANDOFF_FD: self.channel.childFD,
        }
        argv = workerCommand(configPath, digest, self.index, self.generation, self.socketPath, listeners)
        try:
            process = self.reactor.spawnProcess(self, argv[0], argv, env=dict(os.environ), childFDs=childFDs)
        except OSError:
            self.channel.close()
            raise
        self.pid = process.pid
        self._schedulePoll(STARTING_POLL_SECONDS)

    # Readiness and metrics, over the private admin socket

    def whenReady(self) -> Deferred[None]:
        """Fires when it first says it is ready; fails if it ends before."""
        if self.state in (READY, NOT_READY):
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        if self.state == ENDED:
            waiter.errback(RuntimeError(self._endedBeforeReady()))
        else:
            self._readyWaiters.append(waiter)
        return waiter

    def whenEnded(self) -> Deferred[None]:
        """Fires once the process has exited and its pipes are read to their end."""
        waiter: Deferred[None] = Deferred()
        if self.state == ENDED:
            waiter.callback(None)
        else:
            self._endWaiters.append(waiter)
        return waiter

    def _endedBeforeReady(self) -> str:
        said = f": {self.lastError}" if self.lastError else ""
        return f"{self.name} ended ({self.ending}) before it was ready{said}"

    def _schedulePoll(self, seconds: float) -> None:
        if self.state in (RETIRING, ENDED):
            return
        self._poll = self.reactor.callLater(seconds, self._ask)

    def _ask(self) -> None:
        self._poll = None
        fetch(self.reactor, self.socketPath, b"/readyz").addCallbacks(self._answered, self._unanswered)

    def _answered(self, answer: tuple[int, bytes]) -> None:
        status, body = answer
        if self.state in (RETIRING, ENDED):
            return
        first = self.state == STARTING
        before, self.answering = self.serving, True
        if status == 200:
            self.state, self.reasons = READY, []
        else:
            self.state = NOT_READY
            self.reasons = body.decode("utf-8", "replace").splitlines() or [f"/readyz answered {status}"]
        if first:
            log.info("{name} is serving", name=self.name)
            waiters, self._readyWaiters = self._readyWaiters, []
            for waiter in waiters:
                if not waiter.called:  # a waiter may have given up (cancelled)
                    waiter.callback(None)
        if not before:
            self.onServing()
        self._schedulePoll(READY_POLL_SECONDS)

    def _unanswered(self, failure: Failure) -> None:
        self.answering = False
        if self.state == STARTING:
            self._schedulePoll(STARTING_POLL_SECONDS)
        elif self.state not in (RETIRING, ENDED):
            self.state, self.reasons = NOT_READY, [f"its admin socket does not answer: {failure.getErrorMessage()}"]
            self._schedulePoll(READY_POLL_SECONDS)

    def scrape(self) -> Deferred[list[Metric]]:
        """
        Its metric families now; what it last gave if it does not answer
        (a total never goes back because one scrape failed).
        """
        if self.state == ENDED:
            return succeed(self.snapshot)

        def parsed(answer: tuple[int, bytes]) -> list[Metric]:
            status, body = answer
            if status == 200:
                self.snapshot = parseExposition(body.decode("utf-8"))
            return self.snapshot

        asking = fetch(self.reactor, self.socketPath, b"/metrics", OPENMETRICS.encode("ascii"))
        return asking.addCallback(parsed).addErrback(lambda _: self.snapshot)

    # Signals

    def retire(self) -> None:
        """Have it drain and exit (SIGTERM); it is not restarted."""
        if self.state == ENDED:
            return
        self.told = True
        self.state = RETIRING
        if self._poll is not None and self._poll.active():
            self._poll.cancel()
        self.signal(signal.SIGTERM)

    def signal(self, number: int) -> None:
        """Send it signal C{number}, if it still runs."""
        if self.transport is None or self.state == ENDED:
            return
        try:
            self.transport.signalProcess(number)
        except (ProcessExitedAlready, OSError):
            pass

    # Its pipes

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == ACCESS_FD:
            self._access.feed(data)
        elif childFD == EVENTS_FD:
            self._events.feed(data)
        elif childFD == METRICS_FD and len(self._final) < MAX_METRICS_BYTES:
            self._final += data

    def childConnectionLost(self, childFD: int) -> None:
        if childFD == ACCESS_FD:
            self._access.end()
        elif childFD == EVENTS_FD:
            self._events.end()

    def _accessLine(self, line: bytes) -> None:
        self.accessWriter.add(line.decode("utf-8", "replace"))

    def _eventLine(self, line: bytes) -> None:
        try:
            event = eventFromLine(line.decode("utf-8", "replace"))
        except ValueError:
            log.warn("{name} wrote a log line that is not an event: {line!r}", name=self.name, line=line[:200])
            return
        level = event.get("log_level")
        event["log_system"] = f"{event.get('log_namespace', '-')}#{getattr(level, 'name', '-')} worker {self.index}"
        if isinstance(level, LogLevel) and level >= LogLevel.error:
            self.lastError = formatEvent(event)
        globalLogPublisher(event)

    def processEnded(self, reason: Failure) -> None:
        self.state = ENDED
        if self.channel is not None:
            self.unread = self.channel.takeBack()
            self.channel.close()
        self.ending = describeEnd(reason)
        if self._poll is not None and self._poll.active():
            self._poll.cancel()
        try:
            os.unlink(self.socketPath)
        except FileNotFoundError:
            pass
        if self._final:
            try:
                self.snapshot = parseExposition(self._final.decode("utf-8"))
            except ValueError:
                log.warn("{name}: its final metrics could not be read", name=self.name)
        waiters, self._readyWaiters = self._readyWaiters, []
        for waiter in waiters:
            if not waiter.called:
                waiter.errback(RuntimeError(self._endedBeforeReady()))
        self.onEnded(self, reason)
        ended, self._endWaiters = self._endWaiters, []
        for waiter in ended:
            waiter.callback(None)
