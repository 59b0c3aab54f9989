"""
Requests to origins: a bounded keep-alive connection pool and a lean
HTTP/1.1 client that streams bodies in both directions with back-pressure.

Why not C{twisted.web.client.Agent}: the proxy needs the origin's header
fields in their received order and spelling, the response body relayed as it
arrives without an extra Deferred and protocol layer per chunk, strict
response framing checks, and the upload stream wired to the client socket's
back-pressure.  Agent gives none of these cheaply; this module does only what
a relaying proxy needs and keeps all of it behind L{UpstreamPool} and
L{UpstreamExchange}.
"""

from __future__ import annotations

import enum
import re
from collections import deque
from dataclasses import dataclass
from typing import Protocol as TypingProtocol

import txaio
from OpenSSL import SSL
from twisted.internet import defer, error
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IPushProducer,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from mydataproxy.config import UpstreamSettings
from mydataproxy.connect import connect
from mydataproxy.headers import HeaderList
from mydataproxy.resolver import ResolutionTimeout
from mydataproxy.tls import OriginTLS, TLSCheckFailed, describeHandshakeFailure

txaio.use_twisted()
log = txaio.make_logger()

MAX_RESPONSE_HEAD = 64 * 1024
MAX_CHUNK_LINE = 4096
# Request body bytes held while the origin connection is being set up; past
# this the client socket is paused.
PENDING_BODY_LIMIT = 64 * 1024


@dataclass(frozen=True, slots=True)
class Destination:
    """
    Where a request goes: the pool key.

    @ivar addresses: The resolved addresses the policy allowed; connections
        are made to these and nothing else.
    """

    scheme: str
    host: str
    port: int
    addresses: tuple[str, ...] = ()

    @property
    def authority(self) -> bytes:
        """The C{Host} field value for this destination."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        if self.port != default:
            host = f"{host}:{self.port}"
        return host.encode("idna") if not host.isascii() else host.encode("ascii")

    def __str__(self) -> str:
        return f"{self.scheme}://{self.authority.decode('ascii')}"


class UpstreamError(Exception):
    """
    A failure talking to an origin, with the status the client should see.

    @ivar status: 502, 503 or 504.
    @ivar reason: A short plain-text explanation for the client and the log.
    @ivar retryable: True if no byte of the request can have been acted on
        (a stale pooled connection closed before it read anything).
    @ivar retryAfter: Seconds for a C{Retry-After} field, if worth sending.
    """

    def __init__(
        self, status: int, reason: str, retryable: bool = False, retryAfter: int | None = None
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.retryable = retryable
        self.retryAfter = retryAfter


class BodyFraming(enum.Enum):
    """How the request body is delimited on the wire to the origin."""

    NONE = "none"
    LENGTH = "length"
    CHUNKED = "chunked"


class ResponseReceiver(TypingProtocol):
    """What an L{UpstreamExchange} reports to (the inbound request)."""

    def responseStarted(
        self, status: int, reason: bytes, headers: HeaderList, bodyLength: int | None
    ) -> None:
        """
        The response head arrived.  C{bodyLength} is the number of body bytes
        that follow (0 for none, as for HEAD, 204 and 304), or L{None} when
        the length is not known in advance (chunked or close-delimited).
        """

    def responseData(self, data: bytes) -> None: ...

    def responseFinished(self) -> None: ...

    def responseFailed(self, failure: UpstreamError) -> None: ...


class _State(enum.Enum):
    IDLE = 0
    HEAD = 1
    LENGTH = 2
    CHUNK_SIZE = 3
    CHUNK_DATA = 4
    CHUNK_END = 5
    TRAILER = 6
    UNTIL_CLOSE = 7
    DONE = 8


_HEX = frozenset(b"0123456789abcdefABCDEF")
# RFC 9112: status-line, then field-name ":" OWS field-value OWS, each line
# ended by CRLF.  Values may hold HTAB, visible ASCII and obs-text but no
# other control byte, so a bare CR or LF, NUL or an obs-fold never matches.
_STATUS_LINE = re.compile(rb"(HTTP/1\.[01]) ([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*))?\r\n")
_FIELD = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[ \t]*(?:[\x21-\x7e\x80-\xff](?:[\t\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?[ \t]*\r\n"
_FIELDS = re.compile(rb"(?:" + _FIELD + rb")*")
_FIELD_PARTS = re.compile(rb"([^:]+):[ \t]*(.*?)[ \t]*\r\n", re.DOTALL)


class InvalidResponse(Exception):
    """The origin sent something that is not a well-formed HTTP/1.1 response."""


def parseResponseHead(head: bytes) -> tuple[bytes, int, bytes, HeaderList]:
    """
    Parse a response head: the status line and fields, each ending in CRLF
    (the blank line that ends the head excluded).

    @return: (version, status, reason, fields), fields in received order
        and spelling.
    @raise InvalidResponse: On anything ambiguous: bare LF or CR, obs-fold,
        invalid names, control bytes.
    """
    status = _STATUS_LINE.match(head)
    if status is None:
        firstLine = head.split(b"\n", 1)[0]
        raise InvalidResponse(f"bad status line {firstLine[:80]!r}")
    start = status.end()
    if _FIELDS.fullmatch(head, start) is None:
        raise InvalidResponse("malformed header section")
    return (
        status.group(1),
        int(status.group(2)),
        status.group(3) or b"",
        _FIELD_PARTS.findall(head, start),
    )


@implementer(IPushProducer, IHandshakeListener)
class UpstreamConnection(Protocol):
    """
    One HTTP/1.1 connection to an origin, carrying one exchange at a time.

    The connection parses responses and reports to its current exchange; the
    exchange decides whether the connection goes back to the pool.
    """

    def __init__(self, destination: Destination, pool: "UpstreamPool") -> None:
        self.destination = destination
        self.pool = pool
        self.exchange: "UpstreamExchange | None" = None
        self.reused = False
        self.reusable = True
        self.peer = ""
        self._state = _State.IDLE
        self._buffer = b""
        self._remaining = 0
        self._headOnly = False
        self._receivedAny = False
        self._idleCall: IDelayedCall | None = None
        self.idleSince = 0.0
        self.evicted = False
        self.ready: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        address = self.transport.getPeer()
        self.peer = f"{getattr(address, 'host', address)}:{getattr(address, 'port', '')}"
        if ITCPTransport.providedBy(self.transport):
            # A body written after the head must not wait for a delayed ACK.
            self.transport.setTcpNoDelay(True)
        self.ready.callback(self)

    def handshakeCompleted(self) -> None:
        """TLS is up: apply our own checks before any request byte is sent."""
        problem = self.pool.originTLS.checkPeer(self.destination.host, self.transport.getHandle())
        if problem is not None:
            self.transport.failVerification(Failure(TLSCheckFailed(problem)))

    # Sending

    def sendHead(self, exchange: "UpstreamExchange", head: bytes, headOnly: bool) -> None:
        """Start an exchange by writing its request head."""
        self.exchange = exchange
        self._state = _State.HEAD
        self._headOnly = headOnly
        self._receivedAny = False
        self.transport.write(head)

    # Receiving

    def dataReceived(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            # Nothing may arrive on an idle connection; it can't be trusted.
            self.reusable = False
            self.transport.loseConnection()
            return
        self._receivedAny = True
        exchange.activity()
        state = self._state
        # Fast path: the common large-body case, delivered without copying.
        if state is _State.LENGTH and not self._buffer and len(data) < self._remaining:
            self._remaining -= len(data)
            exchange.bodyReceived(data)
            return
        if state is _State.UNTIL_CLOSE:
            exchange.bodyReceived(data)
            return
        self._buffer += data
        try:
            self._parse()
        except InvalidResponse as e:
            self.reusable = False
            self.exchange = None
            exchange.connectionFailed(
                UpstreamError(502, f"invalid response from {self.destination}: {e}")
            )
            self.transport.abortConnection()

    def _parse(self) -> None:
        while self._buffer and self.exchange is not None:
            state = self._state
            if state is _State.HEAD:
                end = self._buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._buffer) > MAX_RESPONSE_HEAD:
                        raise InvalidResponse("response head too large")
                    return
                head, self._buffer = self._buffer[: end + 2], self._buffer[end + 4 :]
                self._headReceived(*parseResponseHead(head))
            elif state is _State.LENGTH:
                if self._deliverCounted():
                    self._finished()
            elif state is _State.CHUNK_SIZE:
                line = self._line()
                if line is None:
                    return
                size = line.split(b";", 1)[0].strip(b" \t")
                if not size or len(size) > 16 or not _HEX.issuperset(size):
                    raise InvalidResponse(f"bad chunk size {size[:20]!r}")
                self._remaining = int(size, 16)
                self._state = _State.CHUNK_DATA if self._remaining else _State.TRAILER
            elif state is _State.CHUNK_DATA:
                if self._deliverCounted():
                    self._state = _State.CHUNK_END
            elif state is _State.CHUNK_END:
                if not b"\r\n".startswith(self._buffer[:2]):
                    raise InvalidResponse("chunk not followed by CRLF")
                if len(self._buffer) < 2:
                    return
                if self._buffer[:2] != b"\r\n":
                    raise InvalidResponse("chunk not followed by CRLF")
                self._buffer = self._buffer[2:]
                self._state = _State.CHUNK_SIZE
            elif state is _State.TRAILER:
                line = self._line()
                if line is None:
                    return
                if not line:
                    self._finished()
            elif state is _State.UNTIL_CLOSE:
                data, self._buffer = self._buffer, b""
                self.exchange.bodyReceived(data)
            else:
                raise InvalidResponse("data after the end of the response")

    def _deliverCounted(self) -> bool:
        """Relay up to C{_remaining} buffered body bytes; True when all came."""
        body, self._buffer = self._buffer[: self._remaining], self._buffer[self._remaining :]
        self._remaining -= len(body)
        self.exchange.bodyReceived(body)
        return not self._remaining

    def _line(self) -> bytes | None:
        end = self._buffer.find(b"\r\n")
        if end < 0:
            if len(self._buffer) > MAX_CHUNK_LINE:
                raise InvalidResponse("chunk line too long")
            return None
        if end > MAX_CHUNK_LINE:
            raise InvalidResponse("chunk line too long")
        line, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
        if b"\n" in line or b"\r" in line:
            raise InvalidResponse("bare CR or LF in chunk framing")
        return line

    def _headReceived(
        self, version: bytes, status: int, reason: bytes, fields: HeaderList
    ) -> None:
        if 100 <= status < 200:
            if status == 101:
                raise InvalidResponse("unexpected 101 Switching Protocols")
            return  # interim response: the final one follows
        lengths: set[bytes] = set()
        codings: list[bytes] = []
        closing = version == b"HTTP/1.0"
        for name, value in fields:
            lower = name.lower()
            if lower == b"content-length":
                lengths.update(v.strip() for v in value.split(b","))
            elif lower == b"transfer-encoding":
                codings.extend(c.strip().lower() for c in value.split(b","))
            elif lower == b"connection":
                tokens = {t.strip().lower() for t in value.split(b",")}
                closing = b"close" in tokens or (closing and b"keep-alive" not in tokens)
        if closing:
            self.reusable = False
        hasBody = not (self._headOnly or status in (204, 304))
        if codings and lengths:
            raise InvalidResponse("both Content-Length and Transfer-Encoding")
        bodyLength: int | None = 0
        if not hasBody:
            self._state = _State.DONE
        elif codings:
            if codings != [b"chunked"]:
                raise InvalidResponse(f"unsupported transfer-coding {b', '.join(codings)!r}")
            self._state = _State.CHUNK_SIZE
            bodyLength = None
        elif lengths:
            if len(lengths) != 1 or not next(iter(lengths)).isdigit():
                raise InvalidResponse("invalid or conflicting Content-Length")
            self._remaining = bodyLength = int(next(iter(lengths)))
            self._state = _State.LENGTH if self._remaining else _State.DONE
        else:
            self.reusable = False
            self._state = _State.UNTIL_CLOSE
            bodyLength = None
        self.exchange.headReceived(status, reason, fields, bodyLength)
        if self._state is _State.DONE:
            self._finished()

    def _finished(self) -> None:
        exchange, self.exchange = self.exchange, None
        self._state = _State.IDLE
        if self._buffer:
            # Bytes beyond the end of the response: the origin is confused.
            self.reusable = False
            self._buffer = b""
        exchange.responseComplete()

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:
        self.reusable = False
        if self._idleCall is not None and self._idleCall.active():
            self._idleCall.cancel()
        self.pool.connectionClosed(self)
        exchange, self.exchange = self.exchange, None
        if exchange is None:
            return
        if self._state is _State.UNTIL_CLOSE:
            exchange.responseComplete()
        else:
            exchange.connectionFailed(self._describeLoss(reason))

    def _describeLoss(self, reason: Failure) -> UpstreamError:
        where = f"{self.destination.host}:{self.destination.port}"
        if reason.check(SSL.Error, TLSCheckFailed):
            what = describeHandshakeFailure(self.transport, reason)
            return UpstreamError(502, f"TLS with {where} failed: {what}")
        if self._receivedAny:
            return UpstreamError(502, f"connection to {where} lost mid-response")
        retryable = self.reused and self._state is _State.HEAD
        if reason.check(error.ConnectionDone):
            return UpstreamError(502, f"{where} closed the connection without a response", retryable)
        return UpstreamError(502, f"connection to {where} reset without a response", retryable)

    # Pool life

    def idleFor(self, clock: IReactorTime, seconds: float) -> None:
        """Park in the pool; close after C{seconds} unused."""
        self.idleSince = clock.seconds()
        self._idleCall = clock.callLater(seconds, self.transport.loseConnection)

    def takenFromPool(self) -> None:
        self.reused = True
        if self._idleCall is not None and self._idleCall.active():
            self._idleCall.cancel()
        self._idleCall = None

    # IPushProducer, for the response body towards a slow client.

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.reusable = False
        self.transport.abortConnection()


@implementer(IPushProducer)
class UpstreamExchange:
    """
    One request relayed to an origin and its response relayed back.

    The caller writes the request body with L{writeBody} and L{finishBody};
    the response arrives at the L{ResponseReceiver}.  The exchange is itself
    the push producer of the response body: register it with the client side
    so a slow client pauses reading from the origin.

    @param bodyProducer: Pauses and resumes the client's request body; it is
        paused while the origin cannot take more.
    """

    def __init__(
        self,
        pool: "UpstreamPool",
        head: bytes,
        framing: BodyFraming,
        headOnly: bool,
        receiver: ResponseReceiver,
        bodyProducer: IPushProducer,
    ) -> None:
        self.pool = pool
        self.destination: Destination | None = None
        self.upstreamAddress = ""
        self._head = head
        self._framing = framing
        self._headOnly = headOnly
        self._receiver = receiver
        self._bodyProducer = bodyProducer
        self._connection: UpstreamConnection | None = None
        self._pendingBody: list[bytes] = []
        self._pendingSize = 0
        self._bodyPaused = False
        self._bodyRegistered = False
        self._bodyDone = framing is BodyFraming.NONE
        self._responseDone = False
        self._readPaused = False
        self._ended = False
        self._retried = False
        self._timeoutCall: IDelayedCall | None = None

    def start(self, destination: Destination) -> None:
        """
        Acquire a connection to C{destination} and send the request.  Body
        written before this is held (pausing the client past a bound).
        """
        self.destination = destination
        d = self.pool.acquire(destination)
        d.addCallbacks(self._connected, self._acquireFailed)

    def _acquireFailed(self, failure: Failure) -> None:
        if not self._ended:
            self._fail(self.pool.describeConnectFailure(self.destination, failure))

    def _connected(self, connection: UpstreamConnection) -> None:
        if self._ended:
            self.pool.release(connection)
            return
        self._connection = connection
        self.upstreamAddress = connection.peer
        connection.sendHead(self, self._head, self._headOnly)
        self._flushPending()
        if self._bodyDone:
            self._armTimeout()
        else:
            connection.transport.registerProducer(self._bodyProducer, True)
            self._bodyRegistered = True
        if self._bodyPaused:
            self._bodyPaused = False
            self._bodyProducer.resumeProducing()

    def _flushPending(self) -> None:
        if self._pendingBody:
            self._connection.transport.writeSequence(self._pendingBody)
            self._pendingBody = []
            self._pendingSize = 0

    # Request body, from the client side.

    def writeBody(self, data: bytes) -> None:
        """Relay a piece of the request body (already de-framed)."""
        if self._ended or self._responseDone or not data:
            return
        if self._framing is BodyFraming.CHUNKED:
            pieces = [b"%x\r\n" % len(data), data, b"\r\n"]
        else:
            pieces = [data]
        if self._connection is None:
            self._pendingBody.extend(pieces)
            self._pendingSize += len(data)
            if self._pendingSize > PENDING_BODY_LIMIT and not self._bodyPaused:
                self._bodyPaused = True
                self._bodyProducer.pauseProducing()
        else:
            self._connection.transport.writeSequence(pieces)

    def finishBody(self) -> None:
        """The request body is complete."""
        if self._bodyDone:
            return
        self._bodyDone = True
        if self._framing is BodyFraming.CHUNKED and not self._responseDone:
            if self._connection is None:
                self._pendingBody.append(b"0\r\n\r\n")
            else:
                self._connection.transport.write(b"0\r\n\r\n")
        if self._connection is not None:
            self._unregisterBody()
            if self._responseDone:
                self._releaseConnection()
            elif self._timeoutCall is None and not self._readPaused:
                # The origin has the whole request: from now on its silence
                # is its own (a slow upload is the client's doing).
                self._armTimeout()

    # Response, from the connection.

    def activity(self) -> None:
        if self._timeoutCall is not None:
            self._timeoutCall.reset(self.pool.settings.read_timeout)

    def headReceived(
        self, status: int, reason: bytes, fields: HeaderList, bodyLength: int | None
    ) -> None:
        self._receiver.responseStarted(status, reason, fields, bodyLength)

    def bodyReceived(self, data: bytes) -> None:
        self._receiver.responseData(data)

    def responseComplete(self) -> None:
        self._cancelTimeout()
        self._responseDone = True
        if self._bodyDone:
            self._releaseConnection()
        elif self._connection is not None:
            # The origin answered before taking the whole body; the rest of
            # the body has nowhere to go, so this connection can't be reused.
            self._connection.reusable = False
            self._unregisterBody()
            self._releaseConnection()
        self._ended = True
        self._receiver.responseFinished()

    def connectionFailed(self, failure: UpstreamError) -> None:
        self._cancelTimeout()
        self._bodyRegistered = False  # a lost transport drops its producer itself
        self._connection = None
        if failure.retryable and not self._retried and self._framing is BodyFraming.NONE:
            self._retried = True
            log.debug("retrying {dest} on a new connection: {why}", dest=self.destination, why=failure.reason)
            self.pool.acquire(self.destination, fresh=True).addCallbacks(
                self._connected, self._acquireFailed
            )
            return
        self._fail(failure)

    def _fail(self, failure: UpstreamError) -> None:
        if self._ended:
            return
        self._ended = True
        self._cancelTimeout()
        self._receiver.responseFailed(failure)

    def _unregisterBody(self) -> None:
        if self._bodyRegistered and self._connection is not None:
            self._connection.transport.unregisterProducer()
        self._bodyRegistered = False

    def _releaseConnection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if self._readPaused:
            connection.resumeProducing()
        self.pool.release(connection)

    def abort(self) -> None:
        """
        Give up: the client went away, or the request was refused before it
        started.  An origin connection in mid-use is dropped; a client body
        held back is let go, to be read and discarded.
        """
        if self._bodyPaused:
            self._bodyPaused = False
            self._bodyProducer.resumeProducing()
        self._pendingBody = []
        if self._ended and self._connection is None:
            return
        self._ended = True
        self._cancelTimeout()
        self._unregisterBody()
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.exchange = None
            connection.reusable = False
            connection.transport.abortConnection()

    # Timeouts

    def _armTimeout(self) -> None:
        self._timeoutCall = self.pool.clock.callLater(
            self.pool.settings.read_timeout, self._timedOut
        )

    def _cancelTimeout(self) -> None:
        if self._timeoutCall is not None and self._timeoutCall.active():
            self._timeoutCall.cancel()
        self._timeoutCall = None

    def _timedOut(self) -> None:
        self._timeoutCall = None
        seconds = self.pool.settings.read_timeout
        connection, self._connection = self._connection, None
        self._fail(
            UpstreamError(
                504,
                f"{self.destination.host}:{self.destination.port} sent nothing for {seconds:g} s"
                " (upstream.read_timeout)",
            )
        )
        if connection is not None:
            connection.exchange = None
            connection.transport.abortConnection()

    # IPushProducer: the response body towards the client.

    def pauseProducing(self) -> None:
        if self._connection is not None and not self._readPaused:
            self._readPaused = True
            # A paused read is the client's doing, not the origin's.
            self._cancelTimeout()
            self._connection.pauseProducing()

    def resumeProducing(self) -> None:
        if self._connection is not None and self._readPaused:
            self._readPaused = False
            self._armTimeout()
            self._connection.resumeProducing()

    def stopProducing(self) -> None:
        self.abort()


class _Waiter:
    __slots__ = ("destination", "deferred", "timeout", "fresh")

    def __init__(self, destination: Destination, deferred: defer.Deferred, fresh: bool) -> None:
        self.destination = destination
        self.deferred = deferred
        self.fresh = fresh
        self.timeout: IDelayedCall | None = None


class UpstreamPool:
    """
    Keep-alive connections to origins, bounded per destination and in total.

    A request that finds no idle connection and no room to open one waits
    (FIFO) up to C{pool_wait_timeout}, then fails with 503.
    """

    def __init__(self, reactor, settings: UpstreamSettings, originTLS: OriginTLS) -> None:
        self.reactor = reactor
        self.clock: IReactorTime = reactor
        self.settings = settings
        self.originTLS = originTLS
        self._idle: dict[Destination, list[UpstreamConnection]] = {}
        self._open: dict[Destination, int] = {}
        self._total = 0
        self._waiters: deque[_Waiter] = deque()
        self.rejected = 0

    @property
    def openConnections(self) -> int:
        """Connections open or being opened."""
        return self._total

    @property
    def queued(self) -> int:
        """Requests waiting for a connection."""
        return len(self._waiters)

    def acquire(self, destination: Destination, fresh: bool = False) -> defer.Deferred:
        """
        A connection to C{destination}: an idle pooled one unless C{fresh},
        else a new one when the bounds allow.

        @return: Deferred firing with an L{UpstreamConnection}, or failing
            with the connection error or an L{UpstreamError} (503).
        """
        if not fresh:
            connection = self._takeIdle(destination)
            if connection is not None:
                return defer.succeed(connection)
        if self._hasRoom(destination) or self._evictIdleFor(destination):
            return self._connect(destination)
        if sum(w.destination == destination for w in self._waiters) >= self.settings.queue_per_destination:
            self.rejected += 1
            return defer.fail(
                UpstreamError(503, f"too many requests waiting for {destination}", retryAfter=1)
            )
        waiter = _Waiter(destination, defer.Deferred(), fresh)
        waiter.timeout = self.clock.callLater(
            self.settings.pool_wait_timeout, self._waitTimedOut, waiter
        )
        self._waiters.append(waiter)
        return waiter.deferred

    def _takeIdle(self, destination: Destination) -> UpstreamConnection | None:
        idle = self._idle.get(destination)
        while idle:
            connection = idle.pop()
            if connection.reusable:
                connection.takenFromPool()
                return connection
        return None

    def _hasRoom(self, destination: Destination) -> bool:
        return (
            self._total < self.settings.max_connections_total
            and self._open.get(destination, 0) < self.settings.max_connections_per_destination
        )

    def _evictIdleFor(self, destination: Destination) -> bool:
        """
        At the total bound, close the longest-idle connection to another
        destination to make room, rather than make this request wait for it.
        """
        if self._open.get(destination, 0) >= self.settings.max_connections_per_destination:
            return False
        oldest: UpstreamConnection | None = None
        for connections in self._idle.values():
            if connections and (oldest is None or connections[0].idleSince < oldest.idleSince):
                oldest = connections[0]
        if oldest is None:
            return False
        self._idle[oldest.destination].remove(oldest)
        oldest.evicted = True
        self._forget(oldest.destination, serveWaiters=False)
        oldest.transport.loseConnection()
        return True

    def _connect(self, destination: Destination) -> defer.Deferred:
        self._open[destination] = self._open.get(destination, 0) + 1
        self._total += 1
        tls = self.originTLS.creatorFor(destination.host) if destination.scheme == "https" else None
        d = connect(
            self.reactor,
            list(destination.addresses),
            destination.port,
            self.settings.connect_timeout,
            UpstreamConnection(destination, self),
            tls,
        )

        def failed(failure: Failure) -> Failure:
            self._forget(destination)
            return failure

        d.addErrback(failed)
        return d

    def describeConnectFailure(self, destination: Destination, failure: Failure) -> UpstreamError:
        """Turn a connect failure into what the client should be told."""
        where = f"{destination.host}:{destination.port}"
        if failure.check(UpstreamError):
            return failure.value
        if failure.check(ResolutionTimeout):
            return UpstreamError(504, f"resolving {destination.host} timed out (resolver.timeout)")
        if failure.check(error.DNSLookupError):
            return UpstreamError(502, f"cannot resolve host {destination.host}")
        if failure.check(error.ConnectionRefusedError):
            return UpstreamError(502, f"connection refused by {where}")
        if failure.check(error.TimeoutError, defer.CancelledError):
            return UpstreamError(504, f"connecting to {where} timed out (upstream.connect_timeout)")
        log.warn("connect to {where} failed: {f}", where=where, f=failure.getErrorMessage())
        return UpstreamError(502, f"cannot connect to {where}: {failure.getErrorMessage()}")

    def release(self, connection: UpstreamConnection) -> None:
        """Return a connection whose exchange is over."""
        if not connection.reusable or not connection.transport.connected:
            connection.transport.loseConnection()
            return
        for waiter in self._waiters:
            if waiter.destination == connection.destination and not waiter.fresh:
                self._waiters.remove(waiter)
                waiter.timeout.cancel()
                connection.takenFromPool()
                waiter.deferred.callback(connection)
                return
        connection.idleFor(self.clock, self.settings.idle_timeout)
        self._idle.setdefault(connection.destination, []).append(connection)

    def connectionClosed(self, connection: UpstreamConnection) -> None:
        """A pooled connection's socket closed."""
        if connection.evicted:
            return  # already accounted for when it was evicted
        idle = self._idle.get(connection.destination)
        if idle and connection in idle:
            idle.remove(connection)
        self._forget(connection.destination)

    def _forget(self, destination: Destination, serveWaiters: bool = True) -> None:
        count = self._open.get(destination, 0) - 1
        if count > 0:
            self._open[destination] = count
        else:
            self._open.pop(destination, None)
            if not self._idle.get(destination):
                self._idle.pop(destination, None)
        self._total -= 1
        if not serveWaiters:
            return
        for waiter in self._waiters:
            if self._hasRoom(waiter.destination):
                self._waiters.remove(waiter)
                waiter.timeout.cancel()
                self._connect(waiter.destination).chainDeferred(waiter.deferred)
                return

    def _waitTimedOut(self, waiter: _Waiter) -> None:
        self._waiters.remove(waiter)
        self.rejected += 1
        seconds = self.settings.pool_wait_timeout
        waiter.deferred.errback(
            UpstreamError(
                503,
                f"no upstream connection to {waiter.destination} free within {seconds:g} s",
                retryAfter=max(1, round(seconds)),
            )
        )

    def closeIdle(self) -> None:
        """Close every idle connection (at shutdown)."""
        for connections in list(self._idle.values()):
            for connection in list(connections):
                connection.transport.loseConnection()
