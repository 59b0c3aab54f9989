"""
One relayed request, whatever the listener: relayed upstream while its body
streams in, finished once the upstream response is relayed.  HTTP/1.1
only: the framing towards the client, Expect, the proxy's own answers and
the access line.  How a request is admitted and where it goes is the
listener's subclass's (L{mydataproxy.forward.request},
L{mydataproxy.reverse.request}).

The channel (L{mydataproxy.server.channel}) owns the connection and feeds
the request; this module does not import it (L{RequestChannel} says what a
request needs of its channel).
"""

from __future__ import annotations

import re
import time
from typing import Protocol

import txaio
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from mydataproxy.config import LimitSettings, Settings
from mydataproxy.http import headers as rules
from mydataproxy.http.framing import RequestHead
from mydataproxy.http.target import Destination, Refusal, Target
from mydataproxy.ops.logs import AccessLog
from mydataproxy.ops.metrics import METRICS, requestMode
from mydataproxy.pipeline import RequestPipeline
from mydataproxy.upstream.client import BodyFraming, UpstreamError, UpstreamExchange, UpstreamPool, UpstreamTiming

txaio.use_twisted()
log = txaio.make_logger()

# Credentials in a request target are never logged.
_USERINFO = re.compile(rb"//[^/?#@]*@")


def displayURI(uri: bytes) -> str:
    """A request target as logs show it: bounded, credentials removed."""
    return _USERINFO.sub(b"//", uri[:1024]).decode("ascii", "replace")


def fieldLines(fields: rules.HeaderList) -> bytes:
    """C{fields} as header lines, each ended by CRLF."""
    if not fields:
        return b""
    return b"\r\n".join([b": ".join(field) for field in fields]) + b"\r\n"


def _first(values: list[bytes] | None) -> str:
    """The first value of a field, as text for the access log ('' if absent)."""
    return values[0].decode("latin-1") if values else ""


class Listener(Protocol):
    """What a request needs of its listener's shared state."""

    section: str
    settings: Settings
    limits: LimitSettings
    pipeline: RequestPipeline
    pool: UpstreamPool
    accessLog: AccessLog
    idleTimeout: float


class ClientWriter(Protocol):
    """Where a response's bytes go (the channel's writer)."""

    def write(self, data: bytes) -> None: ...

    def writeSequence(self, parts: list[bytes]) -> None: ...


class RequestChannel(Protocol):
    """What a request needs of the client connection it arrived on."""

    factory: Listener
    transport: object
    writer: ClientWriter

    @property
    def persistent(self) -> bool: ...

    @property
    def bodyPending(self) -> bool: ...

    @property
    def writesBlocked(self) -> bool: ...

    def clientAddress(self) -> str: ...

    def clientEndpoint(self) -> str: ...

    def localPort(self) -> int: ...

    def clientCertificate(self) -> str: ...

    def pauseReading(self, why: str) -> None: ...

    def resumeReading(self, why: str) -> None: ...

    def closeAfterResponse(self) -> None: ...

    def limitBody(self, limit: int, rule: str) -> None: ...

    def setTimeout(self, period: float | None) -> None: ...

    def requestDone(self, request: ProxiedRequest) -> None: ...


def logRefusal(refusal: Refusal, head: RequestHead, client: str) -> None:
    """The log line of a request the proxy refused, and its count by rule."""
    METRICS.refused(refusal.rule)
    log.info(
        "{status} {method} {uri} from {client}: {reason}{rule}",
        status=refusal.status,
        method=head.method.decode("ascii", "replace"),
        uri=displayURI(head.target),
        client=client,
        reason=refusal.reason,
        rule=f" (refused by {refusal.rule})" if refusal.rule else "",
    )


@implementer(IPushProducer)
class ClientBodyThrottle:
    """
    Pauses reading from the client while the origin can't take more body.

    Unlike the transport itself, C{stopProducing} does not close the client:
    the origin connection going away must still let us answer 502.
    """

    __slots__ = ("_channel",)

    def __init__(self, channel: RequestChannel) -> None:
        self._channel = channel

    def pauseProducing(self) -> None:
        self._channel.pauseReading("body")

    def resumeProducing(self) -> None:
        self._channel.resumeReading("body")

    def stopProducing(self) -> None:
        pass


class ProxiedRequest:
    """
    One relayed request: started (L{start}, the subclass's) when its head is
    complete, relayed while its body streams in, finished once the upstream
    response is relayed.

    A client that stops reading pauses the upstream side (through the
    channel, the producer of all writes to the client) and runs the idle
    timeout.
    """

    __slots__ = (
        "channel", "head", "started", "target", "clientIP", "status", "bytesIn", "bytesOut",
        "upstreamAddress", "rule", "timing", "_exchange", "_bodyComplete", "_responseStarted", "_finished", "_chunked",
        "_heldHead",
    )

    def __init__(self, channel: RequestChannel, head: RequestHead) -> None:
        self.channel = channel
        self.head = head
        self.started = time.monotonic()
        self.target: Target | None = None
        self.clientIP = ""
        self.status = 0
        self.bytesIn = 0
        self.bytesOut = 0
        self.upstreamAddress = ""
        self.rule = ""
        self.timing: UpstreamTiming | None = None
        self._exchange: UpstreamExchange | None = None
        self._bodyComplete = not head.hasBody
        self._responseStarted = False
        self._finished = False
        self._chunked = False
        self._heldHead: bytes | None = None

    @property
    def proxy(self) -> Listener:
        return self.channel.factory

    def start(self) -> None:
        """The head is complete: admit the request and start relaying."""
        raise NotImplementedError

    def responseFields(self, fields: rules.HeaderList) -> rules.HeaderList:
        """The upstream response's fields as relayed to the client (framing excepted)."""
        return rules.relayedResponseFields(fields)

    def failedAt(self) -> str:
        """What a failure's log line adds about where the request was going."""
        return ""

    @property
    def display(self) -> str:
        """The request's target as log lines show it."""
        return self.target.display if self.target else displayURI(self.head.target)

    def _frameBody(self) -> BodyFraming:
        """How the request body goes upstream, from how it came."""
        head = self.head
        if head.chunked:
            return BodyFraming.CHUNKED
        if head.contentLength:
            return BodyFraming.LENGTH
        return BodyFraming.NONE

    def _upstreamHeadBytes(self, target: bytes, fields: rules.HeaderList) -> bytes:
        """
        The request head to send upstream: C{target}, C{fields} (the
        caller's, framing excepted) and the framing from what was parsed.
        """
        head = self.head
        if head.chunked:
            framing = b"Transfer-Encoding: chunked\r\n\r\n"
        elif head.contentLength:
            framing = b"Content-Length: %d\r\n\r\n" % head.contentLength
        else:
            framing = b"\r\n"
        return b"%s %s HTTP/1.1\r\n%s%s" % (head.method, target, fieldLines(fields), framing)

    def _routed(self, destination: Destination, upstreamHead: bytes | None = None) -> None:
        """Send the request to C{destination} (with C{upstreamHead}, when it depends on it)."""
        if self._exchange is None or self._finished:
            return
        self.rule = destination.rule
        head = self.head
        if (
            head.version == b"HTTP/1.1"
            and not self._bodyComplete
            and self.bytesIn == 0
            and (head.values(b"expect") or [b""])[0].lower() == b"100-continue"
        ):
            # The proxy answers Expect itself (the origin never sees it).
            self.channel.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._exchange.start(destination, upstreamHead)

    def _routeFailed(self, failure: Failure) -> None:
        if self._exchange is None or self._finished:
            return
        # The exchange never started: let go of the body it holds back.
        self._exchange.abort()
        if failure.check(Refusal):
            self.refuseFor(failure.value)
            return
        self.responseFailed(self.proxy.pool.describeConnectFailure(self.target.destination, failure))

    # The request body, from the channel.

    def bodyReceived(self, data: bytes) -> None:
        self.bytesIn += len(data)
        if self._exchange is not None:
            self._exchange.writeBody(data)

    def bodyFinished(self) -> None:
        self._bodyComplete = True
        if self._exchange is not None:
            self._exchange.finishBody()

    def bodyRefused(self, refusal: Refusal) -> None:
        """The body broke a framing rule or the body limit: answer and close."""
        logRefusal(refusal, self.head, self.clientIP)
        self.rule = refusal.rule
        self.channel.closeAfterResponse()
        if self._exchange is not None:
            exchange, self._exchange = self._exchange, None
            exchange.abort()
        if self._responseStarted:
            # The head is out; all we can do is cut the response short.
            self.status = self.status or refusal.status
            self.channel.transport.abortConnection()
            return
        self.refuse(refusal.status, refusal.reason)

    # ResponseReceiver: what the origin sends.

    def responseStarted(
        self,
        status: int,
        reason: bytes,
        fields: rules.HeaderList,
        bodyLength: int | None,
        declaredLength: int | None,
    ) -> None:
        # The head keeps the origin's field order and spelling; its framing
        # is ours, from what the upstream parser found.
        self.status = status
        self._responseStarted = True
        self.upstreamAddress = self._exchange.upstreamAddress
        self.timing = self._exchange.timing
        channel = self.channel
        version = self.head.version
        hasBody = not (self.head.method == b"HEAD" or status in (204, 304))
        if channel.bodyPending:
            # The rest of the body will be dropped: this response is the last.
            channel.closeAfterResponse()
        head = [b"%s %d %s\r\n%s" % (version, status, reason, fieldLines(self.responseFields(fields)))]
        if bodyLength is None:
            if version == b"HTTP/1.1":
                self._chunked = True
                head.append(b"Transfer-Encoding: chunked\r\n")
            else:
                channel.closeAfterResponse()  # the end of the body is the close
        elif hasBody:
            head.append(b"Content-Length: %d\r\n" % bodyLength)
        elif declaredLength is not None and status != 204:
            head.append(b"Content-Length: %d\r\n" % declaredLength)
        if not channel.persistent:
            head.append(b"Connection: close\r\n")
        elif version == b"HTTP/1.0":
            head.append(b"Connection: keep-alive\r\n")
        head.append(b"\r\n")
        if bodyLength:
            # Sent with the first body bytes, in one segment: they are
            # nearly always in the same read from the origin.
            self._heldHead = b"".join(head)
        else:
            channel.writer.write(b"".join(head))
        if bodyLength != 0 and channel.writesBlocked:
            self.pauseProducing()

    def responseData(self, data: bytes) -> None:
        if self._finished:
            return
        self.bytesOut += len(data)
        if self._chunked:
            self.channel.writer.writeSequence([b"%x\r\n" % len(data), data, b"\r\n"])
        elif self._heldHead is not None:
            head, self._heldHead = self._heldHead, None
            self.channel.writer.writeSequence([head, data])
        else:
            self.channel.writer.write(data)

    def responseFinished(self) -> None:
        if self._finished:
            return
        if self._chunked:
            self.channel.writer.write(b"0\r\n\r\n")
        self._done()

    def responseFailed(self, failure: UpstreamError) -> None:
        if self._finished:
            return
        if self._exchange is not None:
            self.upstreamAddress = self._exchange.upstreamAddress
        log.warn(
            "{status} {method} {target}: {reason}{where}",
            status=failure.status,
            method=self.head.method.decode("ascii", "replace"),
            target=self.display,
            reason=failure.reason,
            where=self.failedAt(),
        )
        if self._responseStarted:
            # The head is out; all we can do is cut the response short.
            self._finished = True
            self.recordAccess()
            self.channel.transport.abortConnection()
            return
        retry = [(b"Retry-After", b"%d" % failure.retryAfter)] if failure.retryAfter else []
        self.refuse(failure.status, failure.reason, retry)

    # The response body towards the client, paced by the channel.

    def pauseProducing(self) -> None:
        """The client stopped reading: hold the origin."""
        if self._exchange is not None:
            self._exchange.pauseProducing()
        # A client that does not read is idle too.
        self.channel.setTimeout(self.proxy.idleTimeout)

    def resumeProducing(self) -> None:
        self.channel.setTimeout(None)
        if self._exchange is not None:
            self._exchange.resumeProducing()

    # Answers the proxy gives itself.

    def refuseFor(self, refusal: Refusal) -> None:
        """Log C{refusal} and answer it; its rule goes into the access line."""
        logRefusal(refusal, self.head, self.clientIP)
        self.rule = refusal.rule
        self.refuse(refusal.status, refusal.reason, refusal.fields)

    def refuse(self, status: int, reason: str, fields: rules.HeaderList = ()) -> None:
        """Answer C{status} with a plain-text C{reason} (the caller logs why)."""
        body = (reason + "\n").encode("utf-8")
        self._writeOwnResponse(status, body, [(b"Content-Type", b"text/plain; charset=utf-8"), *fields])

    def _writeOwnResponse(self, status: int, body: bytes, fields: rules.HeaderList) -> None:
        channel = self.channel
        if channel.bodyPending:
            # Don't wait for a body nobody will read.
            channel.closeAfterResponse()
        self.status = status
        headOnly = self.head.method == b"HEAD"
        self.bytesOut = 0 if headOnly else len(body)
        channel.writer.write(
            rules.ownResponse(
                self.head.version, status, body, fields, close=not channel.persistent, headOnly=headOnly
            )
        )
        self._done()

    def _done(self) -> None:
        self._finished = True
        self._maybeDone()

    def _maybeDone(self) -> None:
        if not self._finished:
            return
        # The exchange points back at us; let go so no cycle is left for the
        # garbage collector (whose pauses show in tail latency).
        self._exchange = None
        self.channel.requestDone(self)

    def recordAccess(self) -> None:
        """Write this request's access line and count it in the metrics."""
        seconds = time.monotonic() - self.started
        self.proxy.accessLog.record(
            client=self.channel.clientEndpoint(),
            method=self.head.method.decode("ascii", "replace"),
            target=self.display,
            status=self.status,
            bytesIn=self.bytesIn,
            bytesOut=self.bytesOut,
            seconds=seconds,
            upstream=self.upstreamAddress,
            certificate=self.channel.clientCertificate(),
            transaction=_first(self.head.values(b"x-api-tran-id")),
            userAgent=_first(self.head.values(b"user-agent")),
            rule=self.rule,
            timing=self.timing,
        )
        head = self.head
        METRICS.requestFinished(
            requestMode(self.proxy.section, head.method, head.target), head.method, self.status, seconds,
            self.bytesIn, self.bytesOut,
        )

    def clientLost(self) -> None:
        """The client connection is gone."""
        exchange, self._exchange = self._exchange, None
        if exchange is not None:
            exchange.abort()
        if not self._finished:
            self._finished = True
            self.recordAccess()
