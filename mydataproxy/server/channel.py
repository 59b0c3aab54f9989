"""
The client side of a listener: a channel that parses requests itself and
hands each to its request as it streams in; a CONNECT (on a listener that
takes it) or an accepted Upgrade turns the connection into a tunnel.

Why not C{twisted.web.http.HTTPChannel}: a proxy must start the upstream
exchange as soon as the head is complete, and HTTPChannel hands a request
over only once its body has arrived; the hooks that let us get in earlier
are not a public API, its parser works line by line, forgets how header
names were spelled, and has neither a bound on chunk sizes nor a way to
stop reading a body it refused.  L{ProxyChannel} owns the connection:
heads are parsed in one pass (L{mydataproxy.http.framing}), one request is
handled at a time (pipelined ones wait in the buffer), and a response that
ends before its request body did is followed by a bounded linger, then the
connection closes.  What a request or a tunnel becomes is the listener's
business (L{ProxyListener.newRequest}, L{ProxyListener.newTunnel}): the
forward proxy's L{mydataproxy.forward}, the reverse proxy's
L{mydataproxy.reverse}.

The limits on a head (414, 431, 408) and its framing (400) are checked
here, before any request exists.
"""

from __future__ import annotations

import typing

import txaio
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol, IPushProducer, ISSLTransport, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from zope.interface import implementer

from mydataproxy.config import LimitSettings, Settings
from mydataproxy.egress.limits import ConnectionCounter, RefusedConnection
from mydataproxy.http.framing import BodyDecoder, RequestHead, parseRequestHead
from mydataproxy.http.headers import plainResponse
from mydataproxy.http.target import Refusal
from mydataproxy.ops.logs import AccessLog
from mydataproxy.ops.metrics import METRICS
from mydataproxy.pipeline import RequestPipeline
from mydataproxy.server.request import displayURI
from mydataproxy.sockets import DirectWriter, directSocket
from mydataproxy.tls.contexts import clientSubject
from mydataproxy.upstream.client import UpstreamPool

txaio.use_twisted()
log = txaio.make_logger()

# After a response that ended before its request body did: read and drop at
# most this much of the rest, for at most this long, then close.  Closing at
# once would make the kernel answer the unread bytes with a reset, which can
# destroy the response before the client has read it.
LINGER_SECONDS = 2.0
LINGER_BYTES = 1024 * 1024
# A connection we closed that still holds unsent bytes (a client that stopped
# reading) is cut after this long.
CLOSE_SECONDS = 10.0
# A drain closes a connection idle between requests after this long.
DRAIN_GRACE_SECONDS = 2.0


class ProxyListener(Factory):
    """
    Shared state of one listener: its settings, the request pipeline that
    admits its requests, the upstream pool, the access log, the connection
    count and the open tunnels (CONNECT, Upgrade).

    Subclasses say what a request becomes (L{newRequest}) and, if the
    listener takes CONNECT, what a tunnel becomes (L{newTunnel}).

    @ivar section: The config section of this listener (C{forward},
        C{reverse}), for log lines that name a setting.
    @ivar idleTimeout: Seconds a client may stay silent (its section's
        C{client_idle_timeout}).
    """

    noisy = False
    section = ""
    takesConnect = False

    def __init__(
        self,
        settings: Settings,
        pipeline: RequestPipeline,
        pool: UpstreamPool,
        accessLog: AccessLog,
        reactor,
        idleTimeout: float,
    ) -> None:
        self.settings = settings
        self.limits = settings.limits
        self.pipeline = pipeline
        self.pool = pool
        self.accessLog = accessLog
        self.reactor = reactor
        self.idleTimeout = idleTimeout
        self.connections = ConnectionCounter(settings.limits)
        self.channels: set[ProxyChannel] = set()
        self.draining = False
        self.tunnels: set[RelayedTunnel] = set()
        self._tunnelSweep = LoopingCall(self._closeIdleTunnels)
        self._tunnelSweep.clock = reactor

    def newRequest(self, channel: ProxyChannel, head: RequestHead) -> ChannelRequest:
        """The request for C{head}, arrived on C{channel} (not yet started)."""
        raise NotImplementedError

    def newTunnel(self, channel: ProxyChannel, head: RequestHead) -> ClientTunnel:
        """The tunnel for a CONNECT C{head} (when L{takesConnect})."""
        raise NotImplementedError

    def drain(self) -> None:
        """
        Shutting down: idle connections are closed now, the others after
        the response in progress; tunnels run on until they end.
        """
        self.draining = True
        for channel in list(self.channels):
            channel.drain()

    def cutOff(self) -> None:
        """The drain's time is up: drop every connection still open."""
        for channel in list(self.channels):
            channel.cutOff()

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
            METRICS.refused(refusal)
            self.accessLog.record(
                client=f"{client}:{getattr(addr, 'port', '')}", method="-", target="-", status=503,
                bytesIn=0, bytesOut=0, seconds=0.0, upstream="",
            )
            return RefusedConnection(
                plainResponse(503, "too many connections", close=True, fields=[(b"Retry-After", b"1")])
            )
        channel = ProxyChannel(client)
        channel.factory = self
        return channel


class RelayedTunnel(typing.Protocol):
    """What a listener needs of its open tunnels (to close idle ones)."""

    lastActivity: float

    @property
    def display(self) -> str: ...

    def close(self) -> None: ...


class ClientTunnel(RelayedTunnel, typing.Protocol):
    """What a channel needs of the tunnel it hands its connection to."""

    def start(self) -> None: ...

    def fromClient(self, data: bytes) -> None: ...

    def clientReadClosed(self) -> None: ...

    def clientLost(self, reason: Failure) -> None: ...


class ChannelRequest(typing.Protocol):
    """What a channel needs of the request it carries."""

    rule: str  # the access line's: a cut-off at shutdown says so

    def start(self) -> None: ...

    def bodyReceived(self, data: bytes) -> None: ...

    def bodyFinished(self) -> None: ...

    def bodyRefused(self, refusal: Refusal) -> None: ...

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...

    def recordAccess(self) -> None: ...

    def clientLost(self) -> None: ...


class _Reading:
    """What the channel does with the bytes it receives."""

    HEAD = 0  # waiting for (the rest of) a request head
    BODY = 1  # de-framing the current request's body
    WAIT = 2  # the body is complete; the response is on its way
    LINGER = 3  # the response is out; dropping what is left, then closing
    TUNNEL = 4  # raw bytes for a CONNECT tunnel


class IdleTimer:
    """
    A connection's idle timeout, cheap to stop and restart: counting
    restarts on every request, so rather than cancel and schedule a timer
    each time (a heap operation and an object per request), one timer stays
    pending and, when it fires while counting restarted since, waits the
    rest.  C{expired} is called once the count reaches C{period}.
    """

    __slots__ = ("_clock", "_expired", "_period", "_since", "_call")

    def __init__(self, clock, expired: typing.Callable[[], None]) -> None:
        self._clock = clock
        self._expired = expired
        self._period: float | None = None
        self._since = 0.0
        self._call: IDelayedCall | None = None

    def start(self, period: float | None) -> None:
        """Count C{period} seconds from now (L{None}: stop counting)."""
        self._period = period
        if period is None:
            return
        self._since = self._clock.seconds()
        if self._call is None:
            self._call = self._clock.callLater(period, self._fired)
        elif self._call.getTime() > self._since + period:
            # A shorter period than the pending timer's: fire sooner.
            self._call.reset(period)

    def restart(self) -> None:
        """Activity: count from now again, if counting."""
        if self._period is not None:
            self._since = self._clock.seconds()

    def cancel(self) -> None:
        """Stop for good (the connection is gone, or is a tunnel now)."""
        self._period = None
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None

    def _fired(self) -> None:
        self._call = None
        if self._period is None:
            return
        rest = self._since + self._period - self._clock.seconds()
        if rest > 0:
            self._call = self._clock.callLater(rest, self._fired)
        else:
            self._period = None
            self._expired()


@implementer(IHalfCloseableProtocol, IPushProducer)
class ProxyChannel(Protocol):
    """
    One client connection: request heads parsed in one pass, one request
    relayed at a time; a CONNECT or an accepted Upgrade hands the connection
    over to a tunnel.

    The channel is the push producer of everything written to the client:
    while the client does not read, the current response's origin is paused
    and no further request is read or parsed, so a client that pipelines
    without reading cannot make us buffer answers.

    The idle timeout (the section's C{client_idle_timeout}) runs while we wait for
    the client: between requests, during a request body, and while the client
    does not read a response; never while the origin has the turn.
    """

    factory: ProxyListener

    # Slots keep per-connection memory small for thousands of idle tunnels.
    __slots__ = (
        "tunnel", "client", "_state", "_buffer", "_scanned", "_request", "_decoder",
        "_persistent", "_headDeadline", "_lingerCall", "_closeCall", "_discarded", "_pausedFor",
        "_processing", "_writesBlocked", "_readClosed", "_peer", "_localPort", "_certificate",
        "_graceCall", "_producing", "_idleTimer", "writer", "_endpoint",
    )

    def __init__(self, client: str) -> None:
        self.tunnel: ClientTunnel | None = None
        self.client = client
        self._state = _Reading.HEAD
        self._buffer = b""
        self._scanned = 0
        self._request: ChannelRequest | None = None
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
        self._endpoint: str | None = None
        self._localPort: int | None = None
        self._certificate: str | None = None
        self._graceCall: IDelayedCall | None = None
        # Whether we are the transport's producer (until a tunnel or a close).
        self._producing = False
        self._idleTimer: IdleTimer | None = None
        #: What writes to the client go through (set once connected).
        self.writer: DirectWriter | None = None

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

    def localPort(self) -> int:
        """The port the client connected to (asked of the socket once)."""
        if self._localPort is None:
            self._localPort = getattr(self.transport.getHost(), "port", 0)
        return self._localPort

    def clientCertificate(self) -> str:
        """The subject of the client's verified TLS certificate, or ''."""
        if self._certificate is None:
            self._certificate = clientSubject(self.transport)
        return self._certificate

    def clientAddress(self) -> str:
        """The socket peer's IP address as text (the address it was accepted from)."""
        return self.client

    def clientEndpoint(self) -> str:
        """The socket peer as C{address:port}, for the access log (worked out once)."""
        if self._endpoint is None:
            peer = self.getPeer()
            self._endpoint = f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"
        return self._endpoint

    def setTimeout(self, period: float | None) -> None:
        """Count C{period} seconds of client silence from now (L{None}: don't)."""
        if self._idleTimer is not None:  # none once a tunnel
            self._idleTimer.start(period)

    # Connection life.

    def connectionMade(self) -> None:
        self.factory.channels.add(self)
        self._idleTimer = IdleTimer(self.factory.reactor, self.timeoutConnection)
        self.setTimeout(self.factory.idleTimeout)
        transport = self.transport
        self.writer = DirectWriter(transport, directSocket(transport))
        transport.registerProducer(self, True)
        self._producing = True
        if self.factory.draining:
            self._persistent = False

    def drain(self) -> None:
        """
        The listener is draining: no more keep-alive.  A connection busy
        with a request closes after its response; one idle between requests
        gets L{DRAIN_GRACE_SECONDS} more, its next request answered
        with C{Connection: close}: its client may have that request on the
        way already (or be about to send the first one on a connection it
        just opened), and would see a close now as a failed request.
        """
        self._persistent = False
        if self._idle() and self._graceCall is None:
            self._graceCall = self.callLater(DRAIN_GRACE_SECONDS, self._closeIfStillIdle)

    def _idle(self) -> bool:
        return self._request is None and self.tunnel is None and self._state == _Reading.HEAD and not self._buffer

    def _closeIfStillIdle(self) -> None:
        self._graceCall = None
        if self._idle():
            self.close()

    def cutOff(self) -> None:
        """The drain is over: drop the connection, saying why in the access line."""
        if self._request is not None:
            self._request.rule = "daemon.shutdown_timeout"
        self.transport.abortConnection()

    def timeoutConnection(self) -> None:
        log.info(
            "closing idle connection from {client} ({section}.client_idle_timeout)",
            client=self.clientEndpoint(),
            section=self.factory.section,
        )
        if self._request is None:
            self.close()
        else:
            # Mid-request: a client that neither sends nor reads gets no
            # flush to wait for.
            self.transport.abortConnection()

    def close(self) -> None:
        """Close once what we wrote is sent, or cut it if the client won't read it."""
        if self._closeCall is None:
            if self._producing:
                # Twisted's TLS transport holds a close back while a producer
                # is registered: without this, every close on a TLS listener
                # waited for the abort below.
                self._producing = False
                self.transport.unregisterProducer()
            self._closeCall = self.callLater(CLOSE_SECONDS, self.transport.abortConnection)
        self.transport.loseConnection()

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
                    self.setTimeout(self.factory.idleTimeout)

    # Receiving

    def dataReceived(self, data: bytes) -> None:
        state = self._state
        if state == _Reading.TUNNEL:
            self.tunnel.fromClient(data)
            return
        if state == _Reading.LINGER:
            self._discard(len(data))
            return
        self._idleTimer.restart()
        if state == _Reading.BODY and not self._buffer:
            self._buffer = data
        else:
            self._buffer += data
        self._process()
        self._armHeadDeadline()

    def _armHeadDeadline(self) -> None:
        """
        A head has begun and is not complete: it has C{limits.header_timeout}
        from now.  (Armed once the buffer is parsed, so that a head that came
        whole, the common case, costs no timer.)
        """
        if self._state == _Reading.HEAD and self._buffer and self._headDeadline is None:
            self._headDeadline = self.callLater(self.limits.header_timeout, self._headTimedOut)

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
                self.refuseHead(Refusal(414, "URI too long", "limits.max_uri_bytes"))
            elif len(buffer) > limits.max_header_bytes:
                self.refuseHead(Refusal(431, "request header fields too large", "limits.max_header_bytes"))
            elif bareLF:
                self.refuseHead(Refusal(400, "bad request: bare LF in request head"))
            return False
        if end + 4 > limits.max_header_bytes:
            self.refuseHead(Refusal(431, "request header fields too large", "limits.max_header_bytes"))
            return False
        self._scanned = 0
        self._cancelHeadDeadline()
        try:
            head = parseRequestHead(buffer[:end], limits.max_uri_bytes, limits.max_headers)
        except Refusal as refusal:
            self.refuseHead(refusal, buffer[: min(end, 200)].split(b"\r\n", 1)[0])
            return False
        self._buffer = buffer[end + 4 :]
        if head.method == b"CONNECT" and self.factory.takesConnect:
            self._startTunnel(head)
            return True
        # A drain may have ruled out keep-alive before this head came.
        self._persistent = self._persistent and head.persistent
        request = self.factory.newRequest(self, head)
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
        except Refusal as refusal:
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

    def limitBody(self, limit: int, rule: str) -> None:
        """The current request's body may hold at most C{limit} bytes (setting C{rule})."""
        if self._decoder is not None:
            self._decoder.narrow(limit, rule)

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

    def requestDone(self, request: ChannelRequest) -> None:
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
        self.setTimeout(self.factory.idleTimeout)
        # Whatever held reading back for this request no longer does.
        self.resumeReading("body")
        self.resumeReading("pipelined")
        self._process()
        self._armHeadDeadline()

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

    def refuseHead(self, refusal: Refusal, requestLine: bytes = b"") -> None:
        """Answer a request head we won't read on, log it, and close."""
        log.info(
            "{status} from {client}: {reason}{rule}",
            status=refusal.status,
            client=self.clientAddress(),
            reason=refusal.reason,
            rule=f" ({refusal.rule})" if refusal.rule else "",
        )
        self._cancelHeadDeadline()
        METRICS.refused(refusal.rule)
        method, _, rest = requestLine.partition(b" ")
        self.factory.accessLog.record(
            client=self.clientEndpoint(),
            method=method[:32].decode("ascii", "replace") or "-",
            target=displayURI(rest.rpartition(b" ")[0]) or "-",
            status=refusal.status,
            bytesIn=0,
            bytesOut=0,
            seconds=0.0,
            upstream="",
            certificate=self.clientCertificate(),
        )
        self._buffer = b""
        self.writer.write(plainResponse(refusal.status, refusal.reason, close=True))
        self.linger()

    def _cancelHeadDeadline(self) -> None:
        if self._headDeadline is not None:
            if self._headDeadline.active():
                self._headDeadline.cancel()
            self._headDeadline = None

    def _headTimedOut(self) -> None:
        self._headDeadline = None
        self.refuseHead(
            Refusal(
                408,
                f"request head not complete within {self.limits.header_timeout:g} s",
                "limits.header_timeout",
            )
        )

    # Tunnels

    def _startTunnel(self, head: RequestHead) -> None:
        """Leave HTTP for a CONNECT: from here on the connection's bytes belong to a tunnel."""
        self._becomeTunnel()
        self.tunnel = self.factory.newTunnel(self, head)
        self.tunnel.start()

    def upgrade(self, request: ChannelRequest, tunnel: ClientTunnel) -> None:
        """
        C{request}'s response switched protocols (its head is written):
        the connection's bytes, those already received included, belong to
        C{tunnel} from now on.  C{tunnel} writes the request's access line
        when it ends.
        """
        if request is not self._request:
            return
        self._request = None
        self._decoder = None
        self._becomeTunnel()
        self._pausedFor.clear()
        self.transport.resumeProducing()
        self.tunnel = tunnel
        tunnel.start()
        if self._buffer:
            data, self._buffer = self._buffer, b""
            tunnel.fromClient(data)

    def _becomeTunnel(self) -> None:
        # The listener's sweep times tunnels out, and a tunnel writes through
        # the transport: neither the idle timer nor the writer is kept for
        # each of thousands of idle tunnels.
        self._idleTimer.cancel()
        self._idleTimer = None
        self.writer = None
        self._state = _Reading.TUNNEL
        # From here the tunnel wires the two sockets' back-pressure itself.
        self._producing = False
        self.transport.unregisterProducer()

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
        self.factory.channels.discard(self)
        if self._idleTimer is not None:
            self._idleTimer.cancel()
        self._cancelHeadDeadline()
        for call in (self._lingerCall, self._closeCall, self._graceCall):
            if call is not None and call.active():
                call.cancel()
        self.factory.connections.release(self.client)
        if self.tunnel is not None:
            self.tunnel.clientLost(reason)
        request, self._request = self._request, None
        if request is not None:
            request.clientLost()
