"""
The forward-proxy listener: an C{HTTPChannel} whose requests are relayed to
origins as they stream in, and whose CONNECT requests become tunnels.

C{HTTPChannel} hands a request to its C{Request} only after the whole body
has arrived.  A proxy must start the upstream exchange as soon as the head is
complete, so L{ForwardChannel} tells its current request the request line as
soon as it is parsed, and L{ForwardRequest} starts relaying in C{gotLength}
(called when the head is complete), streams the body from
C{handleContentChunk}, and treats C{requestReceived} as "body complete".

A request passes, in order: the limits on its head (414, 431, 408), its
framing (400), the client allow-list (403), the rate limit (429), target
parsing (400, 403), the body limit (413), proxy authentication (407), the
CONNECT port list (403), name resolution (502, 504) and the egress policy on
the resolved addresses (403).
"""

from __future__ import annotations

import re
import time
from dataclasses import replace

import txaio
from twisted.internet import defer, threads
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.iweb import INonQueuedRequestFactory
from zope.interface import implementer, provider

from mydataproxy import headers as rules
from mydataproxy.auth import Htpasswd, challenge, parseBasic
from mydataproxy.config import LimitSettings, Settings
from mydataproxy.framing import BodyFramingCheck, headerProblem, requestLineProblem
from mydataproxy.headers import plainResponse
from mydataproxy.limits import ConnectionCounter, RateLimiter
from mydataproxy.logs import AccessLog
from mydataproxy.policy import ClientAccess, EgressPolicy, Request as PolicyRequest, connectAllowed
from mydataproxy.resolver import Resolver
from mydataproxy.tls import clientSubject
from mydataproxy.target import Mode, Refusal, Target, parseTarget
from mydataproxy.tunnel import Tunnel
from mydataproxy.upstream import BodyFraming, Destination, UpstreamError, UpstreamExchange, UpstreamPool

txaio.use_twisted()
log = txaio.make_logger()

# Credentials in a request target are never logged.
_USERINFO = re.compile(rb"//[^/?#@]*@")


class RefusedConnection(Protocol):
    """Answers a connection beyond the limits with one response, then closes."""

    def __init__(self, response: bytes) -> None:
        self.response = response

    def connectionMade(self) -> None:
        self.transport.write(self.response)
        self.transport.loseConnection()


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
        htpasswd: Htpasswd | None = None,
    ) -> None:
        self.settings = settings
        self.limits = settings.limits
        self.access = ClientAccess(settings.forward)
        self.egress = EgressPolicy(settings.egress)
        self.pool = pool
        self.resolver = resolver
        self.accessLog = accessLog
        self.reactor = reactor
        self.htpasswd = htpasswd
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
            return RefusedConnection(
                plainResponse(503, "too many connections", close=True, fields=[(b"Retry-After", b"1")])
            )
        channel = ForwardChannel(client)
        channel.factory = self
        channel.timeOut = self.settings.forward.client_idle_timeout
        return channel

    def log(self, request: "ForwardRequest") -> None:
        """C{Request.finish} calls this: write the access line."""
        request.recordAccess()

    def authenticate(self, credentials: list[bytes] | None) -> defer.Deferred:
        """
        The user a request's C{Proxy-Authorization} proves (L{None} when
        authentication is off).  A password not recently verified is checked
        in a thread: bcrypt takes long enough to stall the reactor.

        @return: Deferred firing with the user, or failing with a 407
            L{Refusal}.
        """
        htpasswd = self.htpasswd
        if htpasswd is None:
            return defer.succeed(None)
        parsed = parseBasic(credentials[0]) if credentials else None
        if parsed is None:
            return defer.fail(self._authenticationRequired())
        if htpasswd.recentlyVerified(*parsed):
            return defer.succeed(parsed[0])

        def checked(valid: bool) -> str:
            if not valid:
                raise self._authenticationRequired()
            return parsed[0]

        return threads.deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), htpasswd.verify, *parsed
        ).addCallback(checked)

    def _authenticationRequired(self) -> Refusal:
        return Refusal(
            407,
            "proxy authentication required",
            "forward.auth_file",
            fields=[(b"Proxy-Authenticate", challenge(self.settings.forward.auth_realm))],
        )

    def admit(self, credentials: list[bytes] | None, target: Target, certificate: str) -> defer.Deferred:
        """
        Authenticate, check a CONNECT port, then route: the L{Destination}
        C{target} may use.

        @param certificate: The client certificate's subject ('' if none).
        """

        def authenticated(user: str | None) -> defer.Deferred:
            port = target.destination.port
            if target.mode is Mode.CONNECT:
                decision = connectAllowed(self.settings.forward, port)
                if not decision.allowed:
                    raise Refusal(403, f"CONNECT to port {port} is not allowed", decision.rule)
            return self.route(target, user, certificate)

        return self.authenticate(credentials).addCallback(authenticated)

    def route(self, target: Target, user: str | None, certificate: str) -> defer.Deferred:
        """
        Resolve C{target}'s host once and let the egress policy pick the
        addresses it may use.

        @return: Deferred firing with the L{Destination} carrying those
            addresses, or failing with a L{Refusal} (403) or a resolution
            error.
        """
        return self.resolver.resolve(target.destination.host).addCallback(
            self.decide, target, user, certificate
        )

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


class _HeadState:
    """Where the current request head stands (limits, framing, deadline)."""

    __slots__ = ("awaitingRequestLine", "bytes", "fields", "framing", "deadline")

    def __init__(self) -> None:
        self.awaitingRequestLine = True
        self.bytes = 0
        self.fields = 0
        self.framing: BodyFramingCheck | None = None
        self.deadline: IDelayedCall | None = None


class _Link:
    """Who is at the other end: the admitted client, and cached addresses."""

    __slots__ = ("client", "peer", "host", "certificate")

    def __init__(self, client: str) -> None:
        self.client = client
        self.peer = None
        self.host = None
        self.certificate: str | None = None


@implementer(IHalfCloseableProtocol)
class ForwardChannel(http.HTTPChannel):
    """
    An C{HTTPChannel} that streams requests to origins, turns CONNECT
    requests into tunnels, and enforces the head limits with a reason.
    """

    factory: ForwardProxy

    def __init__(self, client: str) -> None:
        super().__init__()
        self.tunnel: Tunnel | None = None
        self._head = _HeadState()
        self._link = _Link(client)

    # Our per-connection state lives in two slotted objects, and settings are
    # read through the factory: past 30 attributes an instance's dict stops
    # sharing its keys with other instances and costs a kilobyte more, which
    # matters for thousands of idle tunnels.

    @property
    def limits(self) -> LimitSettings:
        return self.factory.limits

    # Ours run first and answer with a reason; HTTPChannel's stay as a
    # backstop.  Lines longer than MAX_LENGTH go to lineLengthExceeded.

    @property
    def MAX_LENGTH(self) -> int:
        return self.factory.limits.max_header_bytes

    @property
    def totalHeadersSize(self) -> int:
        return self.factory.limits.max_header_bytes

    @property
    def maxHeaders(self) -> int:
        return self.factory.limits.max_headers

    def getPeer(self):
        # Asked for by every request; the answer never changes.
        if self._link.peer is None:
            self._link.peer = self.transport.getPeer()
        return self._link.peer

    def getHost(self):
        if self._link.host is None:
            self._link.host = self.transport.getHost()
        return self._link.host

    def clientCertificate(self) -> str:
        """The subject of the client's verified TLS certificate, or ''."""
        if self._link.certificate is None:
            self._link.certificate = clientSubject(self.transport)
        return self._link.certificate

    def clientAddress(self) -> str:
        """The socket peer's IP address as text."""
        peer = self.getPeer()
        return getattr(peer, "host", str(peer))

    def refuseHead(self, status: int, reason: str, rule: str = "") -> None:
        """Answer a request whose head we won't read, log it, and close."""
        log.info(
            "{status} from {client}: {reason}{rule}",
            status=status,
            client=self.clientAddress(),
            reason=reason,
            rule=f" ({rule})" if rule else "",
        )
        self._cancelHeadDeadline()
        if self.requests:
            self.requests[-1].setResponseCode(status)  # for its access line
        self.transport.write(plainResponse(status, reason, close=True))
        self.loseConnection()

    # The request head, line by line.

    def lineReceived(self, line: bytes) -> None:
        if self._head.awaitingRequestLine:
            if not line:
                return  # blank lines before a request are ignored (RFC 9112 2.2)
            self._head.bytes, self._head.fields = len(line) + 2, 0
            parts = line.split(b" ")
            if len(parts) == 3 and len(parts[1]) > self.limits.max_uri_bytes:
                self.refuseHead(414, "URI too long", "limits.max_uri_bytes")
                return
            problem = requestLineProblem(line)
            if problem:
                self.refuseHead(400, f"bad request: {problem}")
                return
            super().lineReceived(line)
            if self.requests and not self.transport.disconnecting:
                self._head.awaitingRequestLine = False
                method, uri, version = parts
                self._head.framing = BodyFramingCheck(version)
                self.requests[-1].requestLineReceived(method, uri, version)
            return
        self._head.bytes += len(line) + 2
        if self._head.bytes > self.limits.max_header_bytes:
            self.refuseHead(431, "request header fields too large", "limits.max_header_bytes")
            return
        if line[:1] in (b" ", b"\t"):
            self.refuseHead(400, "bad request: obsolete line folding in header")
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._head.awaitingRequestLine:
            self.refuseHead(414, "URI too long", "limits.max_uri_bytes")
        else:
            self.refuseHead(431, "request header fields too large", "limits.max_header_bytes")

    def headerReceived(self, line: bytes) -> bool:
        self._head.fields += 1
        if self._head.fields > self.limits.max_headers:
            self.refuseHead(431, "too many request header fields", "limits.max_headers")
            return False
        problem = headerProblem(line)
        if problem is None:
            name, _, value = line.partition(b":")
            problem = self._head.framing.problem(name, value)
        if problem:
            self.refuseHead(400, f"bad request: {problem}")
            return False
        return super().headerReceived(line)

    def allHeadersReceived(self) -> None:
        self._cancelHeadDeadline()
        request = self.requests[-1]
        if request.method == b"CONNECT":
            del self.requests[-1]
            self.startTunnel(request)
            return
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        if self.tunnel is not None:
            return  # a CONNECT head has no content; what follows is the tunnel's
        self._head.awaitingRequestLine = True
        super().allContentReceived()

    # The deadline for a whole request head (slowloris).

    def timeoutConnection(self) -> None:
        peer = self.getPeer()
        log.info(
            "closing idle connection from {host}:{port} (forward.client_idle_timeout)",
            host=getattr(peer, "host", peer),
            port=getattr(peer, "port", ""),
        )
        super().timeoutConnection()

    def _armHeadDeadline(self) -> None:
        self._head.deadline = self.callLater(self.limits.header_timeout, self._headTimedOut)

    def _cancelHeadDeadline(self) -> None:
        if self._head.deadline is not None:
            if self._head.deadline.active():
                self._head.deadline.cancel()
            self._head.deadline = None

    def _headTimedOut(self) -> None:
        self._head.deadline = None
        self.refuseHead(
            408,
            f"request head not complete within {self.limits.header_timeout:g} s",
            "limits.header_timeout",
        )

    # CONNECT

    def startTunnel(self, request: "ForwardRequest") -> None:
        """Leave HTTP: from here on the connection's bytes belong to a tunnel."""
        self._head.framing = None
        self.setTimeout(None)
        self.setRawMode()
        self.transport.unregisterProducer()
        self.tunnel = Tunnel(self, request.tunnelTarget(), request.credentials(), self.factory)
        self.tunnel.start()

    def dataReceived(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.fromClient(data)
            return
        if self._head.deadline is None and not self.requests:
            self._armHeadDeadline()  # the first bytes of a new request head
        super().dataReceived(data)

    def rawDataReceived(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.fromClient(data)
            return
        super().rawDataReceived(data)
        if self.transport.disconnecting and self.requests and not self.requests[-1].bodyComplete:
            # HTTPChannel's chunk decoder refused the body with a bare 400.
            self.requests[-1].setResponseCode(400)
            log.info("400 from {client}: malformed chunked request body", client=self.clientAddress())

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
        self._cancelHeadDeadline()
        self.factory.connections.release(self._link.client)
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
        self.clientIP = ""
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

    def _admitClient(self) -> None:
        """
        The checks before any target work: client allow-list and rate.

        @raise Refusal: When one of them refuses.
        """
        proxy = self.proxy
        self.clientIP = proxy.access.clientAddress(
            self.channel.clientAddress(), self.requestHeaders.getRawHeaders(b"x-forwarded-for")
        )
        decision = proxy.access.allowed(self.clientIP)
        if not decision.allowed:
            raise Refusal(403, "client address not allowed", decision.rule)
        if proxy.rate.enabled:
            wait = proxy.rate.retryAfter(self.clientIP)
            if wait is not None:
                raise Refusal(
                    429, "too many requests", "limits.requests_per_second",
                    fields=[(b"Retry-After", b"%d" % wait)],
                )

    def credentials(self) -> list[bytes] | None:
        """The C{Proxy-Authorization} values sent."""
        return self.requestHeaders.getRawHeaders(b"proxy-authorization")

    def tunnelTarget(self) -> Target | Refusal:
        """For CONNECT: where to, or why not (authentication comes next)."""
        try:
            self._admitClient()
            return parseTarget(self.method, self.uri, None)
        except Refusal as refusal:
            self._logRefusal(refusal)
            return refusal

    def _logRefusal(self, refusal: Refusal) -> None:
        log.info(
            "{status} {method} {uri} from {client}: {reason}{rule}",
            status=refusal.status,
            method=self.method.decode("ascii", "replace"),
            uri=_USERINFO.sub(b"//", self.uri).decode("ascii", "replace"),
            client=self.clientIP or self.channel.clientAddress(),
            reason=refusal.reason,
            rule=f" (refused by {refusal.rule})" if refusal.rule else "",
        )

    # Called by HTTPChannel as the request streams in.

    def gotLength(self, length: int | None) -> None:
        """The head is complete: route the request and start relaying."""
        self._hasBody = length != 0
        proxy = self.proxy
        limit = proxy.limits.max_body_bytes
        try:
            self._admitClient()
            self.target = parseTarget(
                self.method, self.uri, self.requestHeaders.getRawHeaders(b"x-target-host")
            )
            if limit and length is not None and length > limit:
                raise Refusal(413, "request body too large", "limits.max_body_bytes")
        except Refusal as refusal:
            self._logRefusal(refusal)
            self.refuse(refusal.status, refusal.reason, refusal.fields)
            return
        if length is None:
            framing = BodyFraming.CHUNKED
        elif length:
            framing = BodyFraming.LENGTH
        else:
            framing = BodyFraming.NONE
        self._exchange = UpstreamExchange(
            self.proxy.pool,
            self._upstreamHead(framing),
            framing,
            headOnly=self.method == b"HEAD",
            receiver=self,
            bodyProducer=_ClientBodyThrottle(self.transport),
        )
        known = proxy.resolver.known(self.target.destination.host)
        if known is not None and proxy.htpasswd is None:
            # The common case, decided on the spot: no Deferred round trip.
            try:
                destination = proxy.decide(known, self.target, None, self.channel.clientCertificate())
            except Refusal as refusal:
                self._routeFailed(Failure(refusal))
            else:
                self._routed(destination)
            return
        proxy.admit(self.credentials(), self.target, self.channel.clientCertificate()).addCallbacks(
            self._routed, self._routeFailed
        )

    def _routed(self, destination: Destination) -> None:
        if self._exchange is not None and not self._clientGone:
            self._exchange.start(destination)

    def _routeFailed(self, failure: Failure) -> None:
        if self._exchange is None or self._clientGone:
            return
        if failure.check(Refusal):
            self._logRefusal(failure.value)
            self._exchange.abort()
            self.refuse(failure.value.status, failure.value.reason, failure.value.fields)
            return
        self.responseFailed(self.proxy.pool.describeConnectFailure(self.target.destination, failure))

    def _upstreamHead(self, framing: BodyFraming) -> bytes:
        fields = rules.upstreamRequestHeaders(
            self.requestHeaders,
            self.proxy.settings.forward.header_filter,
            self.target.destination.authority,
            self.clientIP.encode("ascii"),
        )
        lines = [b"%s %s HTTP/1.1\r\n" % (self.method, self.target.path)]
        lines.extend(b"%s: %s\r\n" % field for field in fields)
        if framing is BodyFraming.CHUNKED:
            lines.append(b"Transfer-Encoding: chunked\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    def handleContentChunk(self, data: bytes) -> None:
        self.bytesIn += len(data)
        limit = self.proxy.limits.max_body_bytes
        if limit and self.bytesIn > limit and self._exchange is not None:
            # A chunked body outgrew the limit: stop relaying, say so if we still can.
            refusal = Refusal(413, "request body too large", "limits.max_body_bytes")
            self._logRefusal(refusal)
            exchange, self._exchange = self._exchange, None
            exchange.abort()
            if self.startedWriting:
                self.channel.transport.abortConnection()
            else:
                self.refuse(refusal.status, refusal.reason)
            return
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
        retry = [(b"Retry-After", b"%d" % failure.retryAfter)] if failure.retryAfter else []
        self.refuse(failure.status, failure.reason, retry)

    # Answers the proxy gives itself.

    def refuse(self, status: int, reason: str, fields: rules.HeaderList = ()) -> None:
        """Answer C{status} with a plain-text C{reason} (the caller logs why)."""
        body = (reason + "\n").encode("utf-8")
        self.setResponseCode(status)
        self.responseHeaders.setRawHeaders(b"Content-Type", [b"text/plain; charset=utf-8"])
        self.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
        for name, value in fields:
            self.responseHeaders.addRawHeader(name, value)
        if self._hasBody and not self._bodyComplete:
            # Don't wait for a body nobody will read before closing, and
            # don't invite it with a 100 Continue.
            self.channel.persistent = False
            self.responseHeaders.setRawHeaders(b"Connection", [b"close"])
            self.requestHeaders.removeHeader(b"expect")
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
            target=self.target.display if self.target else _USERINFO.sub(b"//", self.uri).decode("ascii", "replace"),
            status=self.code,
            bytesIn=self.bytesIn,
            bytesOut=self.sentLength,
            seconds=time.monotonic() - self.started,
            upstream=self.upstreamAddress,
            certificate=self.channel.clientCertificate(),
        )

    def connectionLost(self, reason: Failure) -> None:
        self._clientGone = True
        if self._exchange is not None:
            self._exchange.abort()
        if not self.finished:
            self.recordAccess()
        # Last: Request.connectionLost lets go of the channel.
        super().connectionLost(reason)


# Set here, not per instance: ForwardRequest is defined after the channel.
ForwardChannel.requestFactory = ForwardRequest
