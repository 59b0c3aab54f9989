"""
The forward-proxy listener: a channel that parses requests itself and relays
each to its origin as it streams in; CONNECT requests become tunnels.

Why not C{twisted.web.http.HTTPChannel}: a proxy must start the upstream
exchange as soon as the head is complete, and HTTPChannel hands a request
over only once its body has arrived; the hooks that let us get in earlier
are not a public API, its parser works line by line, forgets how header
names were spelled, and has neither a bound on chunk sizes nor a way to
stop reading a body it refused.  L{ForwardChannel} owns the connection:
heads are parsed in one pass (L{mydataproxy.http.framing}), one request is
handled at a time (pipelined ones wait in the buffer), and a response that
ends before its request body did is followed by a bounded linger, then the
connection closes.

A request passes, in order: the limits on its head (414, 431, 408), its
framing (400), the client allow-list (403), the rate limit (429), target
parsing (400, 403), the port lists (403), the body limit (413), proxy
authentication (407), name resolution (502, 504) and the egress policy on
the resolved addresses (403).
"""

from __future__ import annotations

import re
import time
from dataclasses import replace

import txaio
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol, IPushProducer, ISSLTransport, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from mydataproxy.http import headers as rules
from mydataproxy.egress.auth import ProxyAuthenticator
from mydataproxy.config import LimitSettings, Settings
from mydataproxy.http.framing import BodyDecoder, HeadRefused, RequestHead, parseRequestHead
from mydataproxy.http.headers import plainResponse
from mydataproxy.egress.limits import ConnectionCounter, RateLimiter, RefusedConnection
from mydataproxy.ops.logs import AccessLog
from mydataproxy.egress.policy import ClientAccess, EgressPolicy, Request as PolicyRequest, connectAllowed, httpPortAllowed
from mydataproxy.egress.resolver import Resolver
from mydataproxy.tls.contexts import clientSubject
from mydataproxy.http.target import Mode, Refusal, Target, parseTarget
from mydataproxy.forward.tunnel import Tunnel
from mydataproxy.http.target import Destination
from mydataproxy.upstream.client import BodyFraming, UpstreamError, UpstreamExchange, UpstreamPool

txaio.use_twisted()
log = txaio.make_logger()

# Credentials in a request target are never logged.
_USERINFO = re.compile(rb"//[^/?#@]*@")

# After a response that ended before its request body did: read and drop at
# most this much of the rest, for at most this long, then close.  Closing at
# once would make the kernel answer the unread bytes with a reset, which can
# destroy the response before the client has read it.
LINGER_SECONDS = 2.0
LINGER_BYTES = 1024 * 1024
# A connection we closed that still holds unsent bytes (a client that stopped
# reading) is cut after this long.
CLOSE_SECONDS = 10.0


def _displayURI(uri: bytes) -> str:
    return _USERINFO.sub(b"//", uri[:1024]).decode("ascii", "replace")


class ForwardProxy(Factory):
    """
    Shared state of one forward listener: settings, policies, limits, the
    resolver, the upstream pool and the access log.
    """

    noisy = False

    def __init__(
        self,
        settings: Settings,
        pool: UpstreamPool,
        resolver: Resolver,
        accessLog: AccessLog,
        reactor,
        authenticator: ProxyAuthenticator | None = None,
    ) -> None:
        self.settings = settings
        self.limits = settings.limits
        self.access = ClientAccess(settings.forward)
        self.egress = EgressPolicy(settings.egress)
        self.pool = pool
        self.resolver = resolver
        self.accessLog = accessLog
        self.reactor = reactor
        self.authenticator = authenticator
        self.connections = ConnectionCounter(settings.limits)
        self.rate = RateLimiter(settings.limits, reactor)
        self.tunnels: set[Tunnel] = set()
        self._tunnelSweep = LoopingCall(self._closeIdleTunnels)
        self._tunnelSweep.clock = reactor

    def startFactory(self) -> None:
        self._tunnelSweep.start(min(self.limits.tunnel_idle_timeout / 4, 30.0), now=False)

    def stopFactory(self) -> None:
        if self._tunnelSweep.running:
            self._tunnelSweep.stop()

    def _closeIdleTunnels(self) -> None:
        deadline = self.reactor.seconds() - self.limits.tunnel_idle_timeout
        for tunnel in [t for t in self.tunnels if t.lastActivity < deadline]:
            log.info("closing tunnel to {target}: idle past limits.tunnel_idle_timeout", target=tunnel.display)
            tunnel.close()

    def buildProtocol(self, addr) -> Protocol:
        client = getattr(addr, "host", str(addr))
        refusal = self.connections.admit(client)
        if refusal is not None:
            log.warn("503 connection from {client} refused by {rule}", client=client, rule=refusal)
            self.accessLog.record(
                client=f"{client}:{getattr(addr, 'port', '')}", method="-", target="-", status=503,
                bytesIn=0, bytesOut=0, seconds=0.0, upstream="",
            )
            return RefusedConnection(
                plainResponse(503, "too many connections", close=True, fields=[(b"Retry-After", b"1")])
            )
        channel = ForwardChannel(client)
        channel.factory = self
        return channel

    def admitClient(self, client: str) -> None:
        """
        The checks before any target work: client allow-list and rate.

        @param client: The client's address (see L{ClientAccess.clientAddress}).
        @raise Refusal: When one of them refuses.
        """
        decision = self.access.allowed(client)
        if not decision.allowed:
            raise Refusal(403, "client address not allowed", decision.rule)
        if self.rate.enabled:
            wait = self.rate.retryAfter(client)
            if wait is not None:
                raise Refusal(
                    429, "too many requests", "limits.requests_per_second",
                    fields=[(b"Retry-After", b"%d" % wait)],
                )

    def admit(
        self, credentials: list[bytes] | None, target: Target, certificate: str, client: str
    ) -> defer.Deferred:
        """
        Authenticate, check a CONNECT port, then route: the L{Destination}
        C{target} may use.

        @param certificate: The client certificate's subject ('' if none).
        @param client: The client's address (failed authentications are
            limited per client).
        """

        def authenticated(user: str | None) -> defer.Deferred:
            port = target.destination.port
            if target.mode is Mode.CONNECT:
                decision = connectAllowed(self.settings.forward, port)
                if not decision.allowed:
                    raise Refusal(403, f"CONNECT to port {port} is not allowed", decision.rule)
            return self.route(target, user, certificate)

        if self.authenticator is None:
            return defer.maybeDeferred(authenticated, None)
        return self.authenticator.authenticate(credentials, client).addCallback(authenticated)

    def route(self, target: Target, user: str | None, certificate: str) -> defer.Deferred:
        """
        Resolve C{target}'s host once and let the egress policy pick the
        addresses it may use.

        @return: Deferred firing with the L{Destination} carrying those
            addresses, or failing with a L{Refusal} (403) or a resolution
            error.
        """
        destination = target.destination
        refused = self.egress.refusedByName(
            PolicyRequest(target.mode.value, destination.host, destination.port, user, certificate)
        )
        if refused is not None:
            # Decided without asking DNS: the name of a refused destination
            # never leaves the closed network.
            return defer.fail(Refusal(403, "destination not allowed", refused.rule))
        return self.resolver.resolve(destination.host).addCallback(self.decide, target, user, certificate)

    def decide(self, addresses: list[str], target: Target, user: str | None, certificate: str) -> Destination:
        """
        The L{Destination} for C{target} with the C{addresses} the egress
        policy lets it use.

        @raise Refusal: 403 when it may use none of them.
        """
        destination = target.destination
        request = PolicyRequest(target.mode.value, destination.host, destination.port, user, certificate)
        allowed, decision = self.egress.decide(request, addresses)
        if not allowed:
            raise Refusal(403, "destination not allowed", decision.rule)
        return replace(destination, addresses=tuple(allowed))


class _Reading:
    """What the channel does with the bytes it receives."""

    HEAD = 0  # waiting for (the rest of) a request head
    BODY = 1  # de-framing the current request's body
    WAIT = 2  # the body is complete; the response is on its way
    LINGER = 3  # the response is out; dropping what is left, then closing
    TUNNEL = 4  # raw bytes for a CONNECT tunnel


@implementer(IHalfCloseableProtocol, IPushProducer)
class ForwardChannel(Protocol, TimeoutMixin):
    """
    One client connection: request heads parsed in one pass, one request
    relayed at a time, CONNECT handed over to a L{Tunnel}.

    The channel is the push producer of everything written to the client:
    while the client does not read, the current response's origin is paused
    and no further request is read or parsed, so a client that pipelines
    without reading cannot make us buffer answers.

    The idle timeout (C{forward.client_idle_timeout}) runs while we wait for
    the client: between requests, during a request body, and while the client
    does not read a response; never while the origin has the turn.
    """

    factory: ForwardProxy

    # Slots keep per-connection memory small for thousands of idle tunnels.
    __slots__ = (
        "tunnel", "client", "_state", "_buffer", "_scanned", "_request", "_decoder",
        "_persistent", "_headDeadline", "_lingerCall", "_closeCall", "_discarded", "_pausedFor",
        "_processing", "_writesBlocked", "_readClosed", "_peer", "_host", "_certificate",
    )

    def __init__(self, client: str) -> None:
        self.tunnel: Tunnel | None = None
        self.client = client
        self._state = _Reading.HEAD
        self._buffer = b""
        self._scanned = 0
        self._request: ForwardRequest | None = None
        self._decoder: BodyDecoder | None = None
        self._persistent = True
        self._headDeadline: IDelayedCall | None = None
        self._lingerCall: IDelayedCall | None = None
        self._closeCall: IDelayedCall | None = None
        self._discarded = 0
        self._pausedFor: set[str] = set()
        self._processing = False
        self._writesBlocked = False
        self._readClosed = False
        self._peer = None
        self._host = None
        self._certificate: str | None = None

    @property
    def limits(self) -> LimitSettings:
        return self.factory.limits

    def callLater(self, seconds: float, f, *args) -> IDelayedCall:
        """Timers run on the listener's reactor (a fake clock in tests)."""
        return self.factory.reactor.callLater(seconds, f, *args)

    # Who is at the other end.

    def getPeer(self):
        if self._peer is None:
            self._peer = self.transport.getPeer()
        return self._peer

    def getHost(self):
        if self._host is None:
            self._host = self.transport.getHost()
        return self._host

    def clientCertificate(self) -> str:
        """The subject of the client's verified TLS certificate, or ''."""
        if self._certificate is None:
            self._certificate = clientSubject(self.transport)
        return self._certificate

    def clientAddress(self) -> str:
        """The socket peer's IP address as text."""
        peer = self.getPeer()
        return getattr(peer, "host", str(peer))

    def clientEndpoint(self) -> str:
        """The socket peer as C{address:port}, for the access log."""
        peer = self.getPeer()
        return f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"

    # Connection life.

    def connectionMade(self) -> None:
        self.setTimeout(self.factory.settings.forward.client_idle_timeout)
        self.transport.registerProducer(self, True)

    def timeoutConnection(self) -> None:
        log.info(
            "closing idle connection from {client} (forward.client_idle_timeout)",
            client=self.clientEndpoint(),
        )
        if self._request is None:
            self.close()
        else:
            # Mid-request: a client that neither sends nor reads gets no
            # flush to wait for.
            self.transport.abortConnection()

    def close(self) -> None:
        """Close once what we wrote is sent, or cut it if the client won't read it."""
        self.transport.loseConnection()
        if self._closeCall is None:
            self._closeCall = self.callLater(CLOSE_SECONDS, self.transport.abortConnection)

    # IPushProducer: the client's side of the writes.

    def pauseProducing(self) -> None:
        """The client is not reading: hold the origin and the next requests."""
        self._writesBlocked = True
        self.pauseReading("writes")
        if self._request is not None:
            self._request.pauseProducing()

    def resumeProducing(self) -> None:
        self._writesBlocked = False
        if self._request is not None:
            self._request.resumeProducing()
        self.resumeReading("writes")
        if self._buffer and self._state == _Reading.HEAD:
            self._process()

    def stopProducing(self) -> None:
        """The connection is going away; L{connectionLost} follows."""

    @property
    def writesBlocked(self) -> bool:
        """Is the client's write buffer full?"""
        return self._writesBlocked

    def pauseReading(self, why: str) -> None:
        """
        Stop reading from the client for reason C{why} (until resumed); a
        client we don't read from is not idle.
        """
        if not self._pausedFor:
            self.transport.pauseProducing()
            self.setTimeout(None)
        self._pausedFor.add(why)

    def resumeReading(self, why: str) -> None:
        """C{why} no longer holds reading back."""
        if why in self._pausedFor:
            self._pausedFor.discard(why)
            if not self._pausedFor:
                self.transport.resumeProducing()
                if self._state in (_Reading.HEAD, _Reading.BODY):
                    self.setTimeout(self.factory.settings.forward.client_idle_timeout)

    # Receiving

    def dataReceived(self, data: bytes) -> None:
        state = self._state
        if state == _Reading.TUNNEL:
            self.tunnel.fromClient(data)
            return
        if state == _Reading.LINGER:
            self._discard(len(data))
            return
        self.resetTimeout()
        if state == _Reading.BODY and not self._buffer:
            self._buffer = data
        else:
            if not self._buffer and state == _Reading.HEAD and self._headDeadline is None:
                self._headDeadline = self.callLater(self.limits.header_timeout, self._headTimedOut)
            self._buffer += data
        self._process()

    def _process(self) -> None:
        """Handle what the buffer holds, as far as the current state allows."""
        if self._processing:
            return  # a request finished from inside the loop; the loop goes on
        self._processing = True
        try:
            while self._buffer:
                state = self._state
                if state == _Reading.HEAD:
                    if self._writesBlocked or not self._readHead():
                        break
                elif state == _Reading.BODY:
                    if not self._readBody():
                        break
                elif state == _Reading.WAIT:
                    if len(self._buffer) > self.limits.max_header_bytes:
                        self.pauseReading("pipelined")
                    break
                elif state == _Reading.LINGER:
                    self._discard(len(self._buffer))
                    self._buffer = b""
                else:
                    data, self._buffer = self._buffer, b""
                    self.tunnel.fromClient(data)
        finally:
            self._processing = False
        if self._readClosed and self._state == _Reading.HEAD and not self._writesBlocked:
            # The client half-closed behind pipelined requests, all answered now.
            self.close()

    def _readHead(self) -> bool:
        """Parse one request head if it is all here; False to wait for more."""
        buffer = self._buffer
        if buffer[:2] == b"\r\n":
            # Blank lines before a request are ignored (RFC 9112 2.2).
            self._buffer = buffer = buffer.lstrip(b"\r\n")
            self._scanned = 0
            if not buffer:
                return False
        end = buffer.find(b"\r\n\r\n", max(0, self._scanned - 3))
        limits = self.limits
        if end < 0:
            bareLF = buffer.find(b"\n\n", max(0, self._scanned - 2)) >= 0
            self._scanned = len(buffer)
            # Room for the method and version around the longest URI.
            if len(buffer) > limits.max_uri_bytes + 64 and buffer.find(b"\r\n", 0, limits.max_uri_bytes + 64) < 0:
                self.refuseHead(HeadRefused(414, "URI too long", "limits.max_uri_bytes"))
            elif len(buffer) > limits.max_header_bytes:
                self.refuseHead(HeadRefused(431, "request header fields too large", "limits.max_header_bytes"))
            elif bareLF:
                self.refuseHead(HeadRefused(400, "bad request: bare LF in request head"))
            return False
        if end + 4 > limits.max_header_bytes:
            self.refuseHead(HeadRefused(431, "request header fields too large", "limits.max_header_bytes"))
            return False
        self._scanned = 0
        self._cancelHeadDeadline()
        try:
            head = parseRequestHead(buffer[:end], limits.max_uri_bytes, limits.max_headers)
        except HeadRefused as refusal:
            self.refuseHead(refusal, buffer[: min(end, 200)].split(b"\r\n", 1)[0])
            return False
        self._buffer = buffer[end + 4 :]
        if head.method == b"CONNECT":
            self._startTunnel(head)
            return True
        self._persistent = head.persistent
        request = ForwardRequest(self, head)
        self._request = request
        if head.hasBody:
            self._decoder = BodyDecoder(head.contentLength, head.chunked, limits.max_body_bytes)
            self._state = _Reading.BODY
        else:
            self._state = _Reading.WAIT
            self.setTimeout(None)
        request.start()
        return True

    def _readBody(self) -> bool:
        """De-frame what is buffered; False to wait for more."""
        request, decoder = self._request, self._decoder
        try:
            pieces, used = decoder.feed(self._buffer)
        except HeadRefused as refusal:
            self._buffer = b""
            request.bodyRefused(refusal)
            return True
        self._buffer = self._buffer[used:] if used < len(self._buffer) else b""
        if pieces:
            # One relay per read, however many chunks it held.
            request.bodyReceived(pieces[0] if len(pieces) == 1 else b"".join(pieces))
        if not decoder.done:
            return False
        if self._state == _Reading.BODY:
            self._decoder = None
            self._state = _Reading.WAIT
            self.setTimeout(None)
            request.bodyFinished()
        return True

    # The current request tells us where it stands.

    @property
    def persistent(self) -> bool:
        """May another request follow the current one on this connection?"""
        return self._persistent

    def closeAfterResponse(self) -> None:
        """The current response is the last on this connection."""
        self._persistent = False

    @property
    def bodyPending(self) -> bool:
        """Is the current request's body still arriving?"""
        return self._state == _Reading.BODY

    def requestDone(self, request: "ForwardRequest") -> None:
        """C{request}'s response is complete: the next one, or close."""
        if request is not self._request:
            return
        self._request = None
        request.recordAccess()
        if self._state == _Reading.BODY:
            self.linger()
            return
        if not self._persistent:
            self.close()
            return
        self._state = _Reading.HEAD
        self.setTimeout(self.factory.settings.forward.client_idle_timeout)
        # Whatever held reading back for this request no longer does.
        self.resumeReading("body")
        self.resumeReading("pipelined")
        if self._buffer:
            self._headDeadline = self.callLater(self.limits.header_timeout, self._headTimedOut)
        self._process()

    def linger(self) -> None:
        """
        After our last response: drop what the client still sends, for a
        bounded time and amount, then close.
        """
        self._state = _Reading.LINGER
        self._decoder = None
        self._persistent = False
        self.setTimeout(None)
        self._pausedFor.clear()
        self.transport.resumeProducing()
        if ITCPTransport.providedBy(self.transport) and not ISSLTransport.providedBy(self.transport):
            # Our FIN after the response tells the client to stop sending
            # (TLS has no half-close).
            self.transport.loseWriteConnection()
        self._lingerCall = self.callLater(LINGER_SECONDS, self._lingerOver)
        self._discard(len(self._buffer))
        self._buffer = b""

    def _discard(self, size: int) -> None:
        self._discarded += size
        if self._discarded > LINGER_BYTES:
            self._lingerOver()

    def _lingerOver(self) -> None:
        if self._lingerCall is not None and self._lingerCall.active():
            self._lingerCall.cancel()
        self._lingerCall = None
        self.close()

    # Refusals of a head.

    def refuseHead(self, refusal: HeadRefused, requestLine: bytes = b"") -> None:
        """Answer a request head we won't read on, log it, and close."""
        log.info(
            "{status} from {client}: {reason}{rule}",
            status=refusal.status,
            client=self.clientAddress(),
            reason=refusal.reason,
            rule=f" ({refusal.rule})" if refusal.rule else "",
        )
        self._cancelHeadDeadline()
        method, _, rest = requestLine.partition(b" ")
        self.factory.accessLog.record(
            client=self.clientEndpoint(),
            method=method[:32].decode("ascii", "replace") or "-",
            target=_displayURI(rest.rpartition(b" ")[0]) or "-",
            status=refusal.status,
            bytesIn=0,
            bytesOut=0,
            seconds=0.0,
            upstream="",
            certificate=self.clientCertificate(),
        )
        self._buffer = b""
        self.transport.write(plainResponse(refusal.status, refusal.reason, close=True))
        self.linger()

    def _cancelHeadDeadline(self) -> None:
        if self._headDeadline is not None:
            if self._headDeadline.active():
                self._headDeadline.cancel()
            self._headDeadline = None

    def _headTimedOut(self) -> None:
        self._headDeadline = None
        self.refuseHead(
            HeadRefused(
                408,
                f"request head not complete within {self.limits.header_timeout:g} s",
                "limits.header_timeout",
            )
        )

    # CONNECT

    def _startTunnel(self, head: RequestHead) -> None:
        """Leave HTTP: from here on the connection's bytes belong to a tunnel."""
        self.setTimeout(None)
        self._state = _Reading.TUNNEL
        # From here the tunnel wires the two sockets' back-pressure itself.
        self.transport.unregisterProducer()
        target: Target | Refusal
        client = self.factory.access.clientAddress(self.clientAddress(), head.values(b"x-forwarded-for"))
        try:
            self.factory.admitClient(client)
            target = parseTarget(head.method, head.target, None)
        except Refusal as refusal:
            logRefusal(refusal, head, client)
            target = refusal
        self.tunnel = Tunnel(self, target, head.values(b"proxy-authorization"), self.factory)
        self.tunnel.start()

    # The client closing.

    def readConnectionLost(self) -> None:
        """The client half-closed: end a tunnel's one direction, or finish HTTP."""
        if self._state == _Reading.LINGER:
            self.close()
        elif self.tunnel is not None:
            self.tunnel.clientReadClosed()
        elif self._state == _Reading.WAIT or (self._state == _Reading.HEAD and self._writesBlocked):
            # Answer the request in progress and those pipelined behind it,
            # then close.
            self._readClosed = True
        else:
            # Idle, lingering, or a request whose body can now never be complete.
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        """Our half-close towards the client completed; nothing to do."""

    def connectionLost(self, reason: Failure) -> None:
        self.setTimeout(None)
        self._cancelHeadDeadline()
        for call in (self._lingerCall, self._closeCall):
            if call is not None and call.active():
                call.cancel()
        self.factory.connections.release(self.client)
        if self.tunnel is not None:
            self.tunnel.clientLost(reason)
        request, self._request = self._request, None
        if request is not None:
            request.clientLost()


def logRefusal(refusal: Refusal, head: RequestHead, client: str) -> None:
    """The log line of a request the proxy refused."""
    log.info(
        "{status} {method} {uri} from {client}: {reason}{rule}",
        status=refusal.status,
        method=head.method.decode("ascii", "replace"),
        uri=_displayURI(head.target),
        client=client,
        reason=refusal.reason,
        rule=f" (refused by {refusal.rule})" if refusal.rule else "",
    )


@implementer(IPushProducer)
class _ClientBodyThrottle:
    """
    Pauses reading from the client while the origin can't take more body.

    Unlike the transport itself, C{stopProducing} does not close the client:
    the origin connection going away must still let us answer 502.
    """

    __slots__ = ("_channel",)

    def __init__(self, channel: ForwardChannel) -> None:
        self._channel = channel

    def pauseProducing(self) -> None:
        self._channel.pauseReading("body")

    def resumeProducing(self) -> None:
        self._channel.resumeReading("body")

    def stopProducing(self) -> None:
        pass


# Never reflected by a TRACE the proxy answers itself.
_SECRET_FIELDS = frozenset({b"authorization", b"proxy-authorization", b"cookie"})


class ForwardRequest:
    """
    One proxied request: admitted when its head is complete, relayed while
    its body streams in, finished once the origin's response is relayed.

    A client that stops reading pauses the origin (through the channel, the
    producer of all writes to the client) and runs the idle timeout.
    """

    __slots__ = (
        "channel", "head", "started", "target", "clientIP", "status", "bytesIn", "bytesOut",
        "upstreamAddress", "_exchange", "_bodyComplete", "_responseStarted", "_finished", "_chunked",
    )

    def __init__(self, channel: ForwardChannel, head: RequestHead) -> None:
        self.channel = channel
        self.head = head
        self.started = time.monotonic()
        self.target: Target | None = None
        self.clientIP = ""
        self.status = 0
        self.bytesIn = 0
        self.bytesOut = 0
        self.upstreamAddress = ""
        self._exchange: UpstreamExchange | None = None
        self._bodyComplete = not head.hasBody
        self._responseStarted = False
        self._finished = False
        self._chunked = False

    @property
    def proxy(self) -> ForwardProxy:
        return self.channel.factory

    # Admission

    def start(self) -> None:
        """The head is complete: admit the request and start relaying."""
        proxy = self.proxy
        head = self.head
        limit = proxy.limits.max_body_bytes
        self.clientIP = proxy.access.clientAddress(self.channel.clientAddress(), head.values(b"x-forwarded-for"))
        try:
            proxy.admitClient(self.clientIP)
            self.target = parseTarget(head.method, head.target, head.values(b"x-target-host"))
            if self.target.mode is not Mode.CONNECT:
                port = self.target.destination.port
                decision = httpPortAllowed(proxy.settings.forward, port)
                if not decision.allowed:
                    raise Refusal(403, f"port {port} is not allowed (cross-protocol request)", decision.rule)
            if limit and head.contentLength is not None and head.contentLength > limit:
                raise Refusal(413, "request body too large", "limits.max_body_bytes")
            maxForwards = self._maxForwards()
        except Refusal as refusal:
            logRefusal(refusal, head, self.clientIP)
            self.refuse(refusal.status, refusal.reason, refusal.fields)
            return
        if maxForwards == 0:
            self._answerAsFinalRecipient()
            return
        if head.chunked:
            framing = BodyFraming.CHUNKED
        elif head.contentLength:
            framing = BodyFraming.LENGTH
        else:
            framing = BodyFraming.NONE
        self._exchange = UpstreamExchange(
            proxy.pool,
            self._upstreamHead(framing, maxForwards),
            framing,
            method=head.method,
            receiver=self,
            bodyProducer=_ClientBodyThrottle(self.channel),
        )
        known = proxy.resolver.known(self.target.destination.host)
        if known is not None and proxy.authenticator is None:
            # The common case, decided on the spot: no Deferred round trip.
            try:
                destination = proxy.decide(known, self.target, None, self.channel.clientCertificate())
            except Refusal as refusal:
                self._routeFailed(Failure(refusal))
            else:
                self._routed(destination)
            return
        d = proxy.admit(
            head.values(b"proxy-authorization"), self.target, self.channel.clientCertificate(), self.clientIP
        )
        d.addCallback(self._routed)
        d.addErrback(self._routeFailed)

    def _maxForwards(self) -> int | None:
        """
        The C{Max-Forwards} value of an OPTIONS or TRACE request (RFC 9110
        7.6.2), or L{None}.
        """
        values = self.head.values(b"max-forwards")
        if values is None or self.head.method not in rules.MAX_FORWARDS_METHODS:
            return None
        if len(values) != 1 or not values[0].isdigit() or not values[0].isascii():
            raise Refusal(400, "invalid Max-Forwards")
        return int(values[0])

    def _answerAsFinalRecipient(self) -> None:
        """OPTIONS or TRACE with C{Max-Forwards: 0}: the proxy answers."""
        head = self.head
        if head.method == b"TRACE":
            lines = [b"%s %s %s" % (head.method, head.target, head.version)]
            lines.extend(b"%s: %s" % field for field in head.fields if field[0].lower() not in _SECRET_FIELDS)
            body = b"\r\n".join(lines) + b"\r\n\r\n"
            contentType = b"message/http"
        else:
            body = b""
            contentType = b"text/plain; charset=utf-8"
        self._writeOwnResponse(200, body, [(b"Content-Type", contentType)])

    def _routed(self, destination: Destination) -> None:
        if self._exchange is None or self._finished:
            return
        head = self.head
        if (
            head.version == b"HTTP/1.1"
            and not self._bodyComplete
            and self.bytesIn == 0
            and (head.values(b"expect") or [b""])[0].lower() == b"100-continue"
        ):
            # The proxy answers Expect itself (the origin never sees it).
            self.channel.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._exchange.start(destination)

    def _routeFailed(self, failure: Failure) -> None:
        if self._exchange is None or self._finished:
            return
        # The exchange never started: let go of the body it holds back.
        self._exchange.abort()
        if failure.check(Refusal):
            logRefusal(failure.value, self.head, self.clientIP)
            self.refuse(failure.value.status, failure.value.reason, failure.value.fields)
            return
        self.responseFailed(self.proxy.pool.describeConnectFailure(self.target.destination, failure))

    def _upstreamHead(self, framing: BodyFraming, maxForwards: int | None) -> bytes:
        head = self.head
        fields = rules.upstreamRequestFields(
            head,
            self.proxy.settings.forward.header_filter,
            self.target.destination.authority,
            self.channel.clientAddress().encode("ascii"),
        )
        lines = [b"%s %s HTTP/1.1\r\n" % (head.method, self.target.path)]
        lines.extend(b"%s: %s\r\n" % field for field in fields)
        if maxForwards is not None:
            lines.append(b"Max-Forwards: %d\r\n" % max(0, maxForwards - 1))
        if framing is BodyFraming.CHUNKED:
            lines.append(b"Transfer-Encoding: chunked\r\n")
        elif framing is BodyFraming.LENGTH:
            lines.append(b"Content-Length: %d\r\n" % head.contentLength)
        lines.append(b"\r\n")
        return b"".join(lines)

    # The request body, from the channel.

    def bodyReceived(self, data: bytes) -> None:
        self.bytesIn += len(data)
        if self._exchange is not None:
            self._exchange.writeBody(data)

    def bodyFinished(self) -> None:
        self._bodyComplete = True
        if self._exchange is not None:
            self._exchange.finishBody()

    def bodyRefused(self, refusal: HeadRefused) -> None:
        """The body broke a framing rule or the body limit: answer and close."""
        logRefusal(Refusal(refusal.status, refusal.reason, refusal.rule), self.head, self.clientIP)
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
        channel = self.channel
        version = self.head.version
        hasBody = not (self.head.method == b"HEAD" or status in (204, 304))
        if channel.bodyPending:
            # The rest of the body will be dropped: this response is the last.
            channel.closeAfterResponse()
        head = [b"%s %d %s\r\n" % (version, status, reason)]
        head.extend(b"%s: %s\r\n" % field for field in rules.relayedResponseFields(fields))
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
        channel.transport.writeSequence(head)
        if bodyLength != 0 and channel.writesBlocked:
            self.pauseProducing()

    def responseData(self, data: bytes) -> None:
        if self._finished:
            return
        self.bytesOut += len(data)
        if self._chunked:
            self.channel.transport.writeSequence((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            self.channel.transport.write(data)

    def responseFinished(self) -> None:
        if self._finished:
            return
        if self._chunked:
            self.channel.transport.write(b"0\r\n\r\n")
        self._done()

    def responseFailed(self, failure: UpstreamError) -> None:
        if self._finished:
            return
        if self._exchange is not None:
            self.upstreamAddress = self._exchange.upstreamAddress
        log.warn(
            "{status} {method} {target}: {reason}",
            status=failure.status,
            method=self.head.method.decode("ascii", "replace"),
            target=self.target.display,
            reason=failure.reason,
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
        self.channel.setTimeout(self.proxy.settings.forward.client_idle_timeout)

    def resumeProducing(self) -> None:
        self.channel.setTimeout(None)
        if self._exchange is not None:
            self._exchange.resumeProducing()

    # Answers the proxy gives itself.

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
        channel.transport.write(
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
        """Write this request's access line."""
        self.proxy.accessLog.record(
            client=self.channel.clientEndpoint(),
            method=self.head.method.decode("ascii", "replace"),
            target=self.target.display if self.target else _displayURI(self.head.target),
            status=self.status,
            bytesIn=self.bytesIn,
            bytesOut=self.bytesOut,
            seconds=time.monotonic() - self.started,
            upstream=self.upstreamAddress,
            certificate=self.channel.clientCertificate(),
        )

    def clientLost(self) -> None:
        """The client connection is gone."""
        exchange, self._exchange = self._exchange, None
        if exchange is not None:
            exchange.abort()
        if not self._finished:
            self._finished = True
            self.recordAccess()
