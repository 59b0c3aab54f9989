"""
The forward-proxy listener: an C{HTTPChannel} whose requests are relayed to
origins as they stream in, and whose CONNECT requests become tunnels.

C{HTTPChannel} hands a request to its C{Request} only after the whole body
has arrived.  A proxy must start the upstream exchange as soon as the head is
complete, so L{ForwardChannel} tells its current request the request line as
soon as it is parsed, and L{ForwardRequest} starts relaying in C{gotLength}
(called when the head is complete), streams the body from
C{handleContentChunk}, and treats C{requestReceived} as "body complete".
"""

from __future__ import annotations

import time

import txaio
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.iweb import INonQueuedRequestFactory
from zope.interface import implementer, provider

from mydataproxy import headers as rules
from mydataproxy.headers import plainResponse
from mydataproxy.config import Settings
from mydataproxy.logs import AccessLog
from mydataproxy.policy import ForwardPolicy
from mydataproxy.target import Mode, Refusal, Target, parseTarget
from mydataproxy.tunnel import Tunnel
from mydataproxy.upstream import BodyFraming, UpstreamError, UpstreamExchange, UpstreamPool

txaio.use_twisted()
log = txaio.make_logger()

_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_CTL = bytes(range(0x20)).replace(b"\t", b"") + b"\x7f"


def requestLineProblem(line: bytes) -> str | None:
    """What is wrong with a request line (RFC 9112 3), or L{None}."""
    parts = line.split(b" ")
    if len(parts) != 3:
        return "malformed request line"
    method, target, version = parts
    if not method or not _TOKEN.issuperset(method):
        return "invalid method"
    if not target or any(c < 0x21 or c > 0x7E for c in target):
        return "invalid request target"
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        return "unsupported HTTP version"
    return None


def headerProblem(line: bytes) -> str | None:
    """What is wrong with one header field line, or L{None}."""
    name, colon, value = line.partition(b":")
    if not colon or not name or not _TOKEN.issuperset(name):
        return "invalid header field name"
    if value.translate(None, _CTL) != value:
        return "control character in header field value"
    return None


class ForwardProxy(Factory):
    """
    Shared state of one forward listener: settings, policy, the upstream
    pool and the access log.
    """

    noisy = False

    def __init__(self, settings: Settings, pool: UpstreamPool, accessLog: AccessLog, reactor) -> None:
        self.settings = settings
        self.policy = ForwardPolicy(settings.forward)
        self.pool = pool
        self.accessLog = accessLog
        self.reactor = reactor

    def buildProtocol(self, addr) -> "ForwardChannel":
        channel = ForwardChannel()
        channel.factory = self
        channel.timeOut = self.settings.forward.client_idle_timeout
        return channel

    def log(self, request: "ForwardRequest") -> None:
        """C{Request.finish} calls this: write the access line."""
        request.recordAccess()


@implementer(IHalfCloseableProtocol)
class ForwardChannel(http.HTTPChannel):
    """
    An C{HTTPChannel} that streams requests to origins and turns CONNECT
    requests into tunnels.
    """

    factory: ForwardProxy

    def __init__(self) -> None:
        super().__init__()
        self.requestFactory = ForwardRequest
        self.tunnel: Tunnel | None = None
        self._awaitingRequestLine = True
        self._peer = None
        self._host = None

    def getPeer(self):
        # Asked for by every request; the answer never changes.
        if self._peer is None:
            self._peer = self.transport.getPeer()
        return self._peer

    def getHost(self):
        if self._host is None:
            self._host = self.transport.getHost()
        return self._host

    def clientAddress(self) -> str:
        """The client's IP address as text."""
        peer = self.getPeer()
        return getattr(peer, "host", str(peer))

    def badRequest(self, reason: str) -> None:
        """Answer 400 with C{reason}, log it, and close the connection."""
        log.info("400 from {client}: {reason}", client=self.clientAddress(), reason=reason)
        self.transport.write(plainResponse(400, f"bad request: {reason}", close=True))
        self.loseConnection()

    def lineReceived(self, line: bytes) -> None:
        if self._awaitingRequestLine and line:
            problem = requestLineProblem(line)
            if problem:
                self.badRequest(problem)
                return
            super().lineReceived(line)
            if self.requests and not self.transport.disconnecting:
                self._awaitingRequestLine = False
                method, uri, version = line.split(b" ")
                self.requests[-1].requestLineReceived(method, uri, version)
            return
        if line[:1] in (b" ", b"\t"):
            self.badRequest("obsolete line folding in header")
            return
        super().lineReceived(line)

    def headerReceived(self, line: bytes) -> bool:
        problem = headerProblem(line)
        if problem:
            self.badRequest(problem)
            return False
        return super().headerReceived(line)

    def allHeadersReceived(self) -> None:
        request = self.requests[-1]
        if request.method == b"CONNECT":
            del self.requests[-1]
            self.startTunnel(request)
            return
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        if self.tunnel is not None:
            return  # a CONNECT head has no content; what follows is the tunnel's
        self._awaitingRequestLine = True
        super().allContentReceived()

    # CONNECT

    def startTunnel(self, request: "ForwardRequest") -> None:
        """Leave HTTP: from here on the connection's bytes belong to a tunnel."""
        self.setTimeout(None)
        self.setRawMode()
        self.transport.unregisterProducer()
        self.tunnel = Tunnel(self, request.tunnelTarget(), self.factory)
        self.tunnel.start()

    def dataReceived(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.fromClient(data)
        else:
            super().dataReceived(data)

    def rawDataReceived(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.fromClient(data)
        else:
            super().rawDataReceived(data)

    def readConnectionLost(self) -> None:
        """The client half-closed: end a tunnel's one direction, or finish HTTP."""
        if self.tunnel is not None:
            self.tunnel.clientReadClosed()
        elif self.requests and self.requests[0].bodyComplete:
            # Answer the request in progress, then close.
            self.persistent = False
        else:
            # Idle, or a request whose body can now never be complete.
            self.loseConnection()

    def writeConnectionLost(self) -> None:
        """Our half-close towards the client completed; nothing to do."""

    def connectionLost(self, reason: Failure) -> None:
        if self.tunnel is not None:
            self.tunnel.clientLost(reason)
        super().connectionLost(reason)


@implementer(IPushProducer)
class _ClientBodyThrottle:
    """
    Pauses the client socket while the origin can't take more request body.

    Unlike the transport itself, C{stopProducing} does not close the client:
    the origin connection going away must still let us answer 502.
    """

    def __init__(self, transport) -> None:
        self._transport = transport

    def pauseProducing(self) -> None:
        self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._transport.resumeProducing()

    def stopProducing(self) -> None:
        pass


@provider(INonQueuedRequestFactory)
class ForwardRequest(http.Request):
    """
    One proxied request.  Relaying starts when the head is complete; the
    response is finished once both the origin's response and the client's
    body are complete.
    """

    channel: ForwardChannel

    def __init__(self, channel: ForwardChannel) -> None:
        super().__init__(channel)
        self.started = time.monotonic()
        self.target: Target | None = None
        self.bytesIn = 0
        self.upstreamAddress = ""
        self._exchange: UpstreamExchange | None = None
        self._hasBody = False
        self._bodyComplete = False
        self._responseComplete = False
        self._clientGone = False

    @property
    def bodyComplete(self) -> bool:
        """Has the whole request body arrived?"""
        return self._bodyComplete

    def requestLineReceived(self, method: bytes, uri: bytes, version: bytes) -> None:
        """The channel parsed our request line (before any header)."""
        self.method, self.uri, self.clientproto = method, uri, version
        self.path = uri

    @property
    def proxy(self) -> ForwardProxy:
        return self.channel.factory

    def tunnelTarget(self) -> Target | Refusal:
        """For CONNECT: where to, or why not."""
        try:
            self._checkClient()
            target = parseTarget(self.method, self.uri, None)
            decision = self.proxy.policy.connectAllowed(target.destination.port)
            if not decision.allowed:
                raise Refusal(
                    403, f"CONNECT to port {target.destination.port} is not allowed", decision.rule
                )
            return target
        except Refusal as refusal:
            self._logRefusal(refusal)
            return refusal

    def _checkClient(self) -> None:
        decision = self.proxy.policy.clientAllowed(self.channel.clientAddress())
        if not decision.allowed:
            raise Refusal(403, "client address not allowed", decision.rule)

    def _logRefusal(self, refusal: Refusal) -> None:
        log.info(
            "{status} {method} {uri} from {client}: {reason}{rule}",
            status=refusal.status,
            method=self.method.decode("ascii", "replace"),
            uri=self.uri.decode("ascii", "replace"),
            client=self.channel.clientAddress(),
            reason=refusal.reason,
            rule=f" (refused by {refusal.rule})" if refusal.rule else "",
        )

    # Called by HTTPChannel as the request streams in.

    def gotLength(self, length: int | None) -> None:
        """The head is complete: route the request and start relaying."""
        self._hasBody = length != 0
        try:
            self._checkClient()
            self.target = parseTarget(
                self.method, self.uri, self.requestHeaders.getRawHeaders(b"x-target-host")
            )
        except Refusal as refusal:
            self._logRefusal(refusal)
            self.refuse(refusal.status, refusal.reason)
            return
        if length is None:
            framing = BodyFraming.CHUNKED
        elif length:
            framing = BodyFraming.LENGTH
        else:
            framing = BodyFraming.NONE
        self._exchange = UpstreamExchange(
            self.proxy.pool,
            self.target.destination,
            self._upstreamHead(framing),
            framing,
            headOnly=self.method == b"HEAD",
            receiver=self,
            bodyProducer=_ClientBodyThrottle(self.transport),
        )
        self._exchange.start()

    def _upstreamHead(self, framing: BodyFraming) -> bytes:
        fields = rules.upstreamRequestHeaders(
            self.requestHeaders,
            self.proxy.settings.forward.header_filter,
            self.target.destination.authority,
            self.channel.clientAddress().encode("ascii"),
        )
        lines = [b"%s %s HTTP/1.1\r\n" % (self.method, self.target.path)]
        lines.extend(b"%s: %s\r\n" % field for field in fields)
        if framing is BodyFraming.CHUNKED:
            lines.append(b"Transfer-Encoding: chunked\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    def handleContentChunk(self, data: bytes) -> None:
        self.bytesIn += len(data)
        if self._exchange is not None:
            self._exchange.writeBody(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        """HTTPChannel's "all content received": the body is complete."""
        self._bodyComplete = True
        if self._exchange is not None:
            self._exchange.finishBody()
        self._maybeFinish()

    # ResponseReceiver: what the origin sends.

    def responseStarted(
        self, status: int, reason: bytes, fields: rules.HeaderList, bodyLength: int | None
    ) -> None:
        # The head is written here rather than through Request.write and a
        # Headers object: it keeps the origin's field order and spelling and
        # costs a third as much on the per-request path.
        self.code, self.code_message = status, reason
        self.upstreamAddress = self._exchange.upstreamAddress
        self.chunked = bodyLength is None and self.clientproto == b"HTTP/1.1"
        head = [b"%s %d %s\r\n" % (self.clientproto, status, reason)]
        head.extend(b"%s: %s\r\n" % field for field in rules.relayedResponseFields(fields))
        if self.chunked:
            head.append(b"Transfer-Encoding: chunked\r\n")
        if not self.channel.persistent and self.clientproto == b"HTTP/1.1":
            head.append(b"Connection: close\r\n")
        head.append(b"\r\n")
        self.startedWriting = 1
        self.channel.writeSequence(head)
        if bodyLength != 0:
            self.registerProducer(self._exchange, True)

    def responseData(self, data: bytes) -> None:
        if self._clientGone:
            return
        self.sentLength += len(data)
        if self.chunked:
            self.channel.writeSequence((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            self.channel.write(data)

    def responseFinished(self) -> None:
        if self.producer is not None:
            self.unregisterProducer()
        self._responseComplete = True
        self._maybeFinish()

    def responseFailed(self, failure: UpstreamError) -> None:
        self.upstreamAddress = self._exchange.upstreamAddress
        if self.producer is not None:
            self.unregisterProducer()
        log.warn(
            "{status} {method} {target}: {reason}",
            status=failure.status,
            method=self.method.decode("ascii", "replace"),
            target=self.target.display,
            reason=failure.reason,
        )
        if self.startedWriting:
            # The head is out; all we can do is cut the response short.
            self.channel.transport.abortConnection()
            return
        self.refuse(failure.status, failure.reason)

    # Answers the proxy gives itself.

    def refuse(self, status: int, reason: str) -> None:
        """Answer C{status} with a plain-text C{reason} (the caller logs why)."""
        body = (reason + "\n").encode("utf-8")
        self.setResponseCode(status)
        self.responseHeaders.setRawHeaders(b"Content-Type", [b"text/plain; charset=utf-8"])
        self.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
        if self._hasBody and not self._bodyComplete:
            # Don't wait for a body nobody will read before closing.
            self.channel.persistent = False
            self.responseHeaders.setRawHeaders(b"Connection", [b"close"])
        self.write(body)
        self._responseComplete = True
        self._maybeFinish()

    def _maybeFinish(self) -> None:
        if self._bodyComplete and self._responseComplete and not self.finished and not self._clientGone:
            self.finish()
            # The exchange points back at us; let go so no cycle is left for
            # the garbage collector (whose pauses show in tail latency).
            self._exchange = None

    def recordAccess(self) -> None:
        """Write this request's access line."""
        peer = self.client
        self.proxy.accessLog.record(
            client=f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}",
            method=self.method.decode("ascii", "replace"),
            target=self.target.display if self.target else self.uri.decode("ascii", "replace"),
            status=self.code,
            bytesIn=self.bytesIn,
            bytesOut=self.sentLength,
            seconds=time.monotonic() - self.started,
            upstream=self.upstreamAddress,
        )

    def connectionLost(self, reason: Failure) -> None:
        self._clientGone = True
        if self._exchange is not None:
            self._exchange.abort()
        if not self.finished:
            self.recordAccess()
        # Last: Request.connectionLost lets go of the channel.
        super().connectionLost(reason)
