"""
CONNECT tunnels: raw bytes both ways between the client and the origin.

Back-pressure is transport to transport: each side's socket is registered as
the producer of the other's, so a full send buffer on one side stops reading
on the other.  Half-close is honoured: an EOF from one side becomes a
write-shutdown towards the other, and the tunnel ends when both directions
have ended (or either side drops).

Who may go where (authentication, the CONNECT port list, the egress rules,
DNS, the guard) is asked of the listener's
L{mydataproxy.pipeline.RequestPipeline}; the tunnel connects to the
addresses it admitted and nothing else.  L{TunnelChannel} and
L{TunnelListener} say what a tunnel needs of the connection it took over and
of its listener (this module does not import the channel).
"""

from __future__ import annotations

import time
import typing

import txaio
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol, ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from mydataproxy.config import Settings
from mydataproxy.egress.connect import connect
from mydataproxy.http.headers import HeaderList, plainResponse
from mydataproxy.http.target import Refusal, Target
from mydataproxy.ops.logs import AccessLog
from mydataproxy.ops.metrics import METRICS
from mydataproxy.pipeline import RequestPipeline
from mydataproxy.upstream.client import UpstreamPool

txaio.use_twisted()
log = txaio.make_logger()

ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
# Client bytes held while the origin connection is being made (a client may
# send its TLS ClientHello right behind the CONNECT); past this the client
# socket is paused.
PENDING_LIMIT = 64 * 1024


class TunnelListener(typing.Protocol):
    """What a tunnel needs of its listener's shared state."""

    settings: Settings
    pipeline: RequestPipeline
    pool: UpstreamPool
    accessLog: AccessLog
    reactor: object
    tunnels: set[Tunnel]


class TunnelChannel(typing.Protocol):
    """What a tunnel needs of the client connection it took over."""

    transport: object

    def clientAddress(self) -> str: ...

    def clientCertificate(self) -> str: ...

    def linger(self) -> None: ...


@implementer(IHalfCloseableProtocol)
class TunnelOrigin(Protocol):
    """The origin side of a tunnel."""

    def __init__(self, tunnel: "Tunnel") -> None:
        self.tunnel = tunnel
        self.ready: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.ready.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.tunnel.fromOrigin(data)

    def readConnectionLost(self) -> None:
        self.tunnel.originReadClosed()

    def writeConnectionLost(self) -> None:
        """Our half-close towards the origin completed; nothing to do."""

    def connectionLost(self, reason: Failure) -> None:
        self.tunnel.originLost(reason)


class Tunnel:
    """
    One CONNECT tunnel, from the 200 to the last byte.

    @param target: Where to connect, or the L{Refusal} to answer with.
    """

    # Thousands may sit idle at once: no per-instance dict.
    __slots__ = (
        "channel", "client", "target", "credentials", "proxy", "started", "lastActivity", "status",
        "bytesIn", "bytesOut", "upstreamAddress", "_origin", "_pending", "_pendingSize",
        "_clientEOF", "_originEOF", "_over",
    )

    def __init__(
        self,
        channel: TunnelChannel,
        target: Target | Refusal,
        credentials: list[bytes] | None,
        proxy: TunnelListener,
    ) -> None:
        self.channel = channel
        self.client = channel.transport
        self.target = target
        self.credentials = credentials
        self.proxy = proxy
        self.started = time.monotonic()
        self.lastActivity = proxy.reactor.seconds()
        self.status = 200
        self.bytesIn = 0
        self.bytesOut = 0
        self.upstreamAddress = ""
        self._origin: TunnelOrigin | None = None
        self._pending: list[bytes] = []
        self._pendingSize = 0
        self._clientEOF = False
        self._originEOF = False
        self._over = False

    @property
    def display(self) -> str:
        return self.target.display if isinstance(self.target, Target) else "-"

    def start(self) -> None:
        if isinstance(self.target, Refusal):
            self._refuse(self.target.status, self.target.reason, self.target.fields)
            return
        self.proxy.tunnels.add(self)
        reactor = self.proxy.reactor
        credentials, self.credentials = self.credentials, None
        d = self.proxy.pipeline.admit(
            credentials, self.target, self.channel.clientCertificate(), self.channel.clientAddress()
        )
        d.addCallback(
            lambda destination: connect(
                reactor,
                list(destination.addresses),
                destination.port,
                self.proxy.settings.upstream.connect_timeout,
                TunnelOrigin(self),
            )
        )
        # An error inside _connected must reach _connectFailed too.
        d.addCallback(self._connected)
        d.addErrback(self._connectFailed)

    def _refuse(self, status: int, reason: str, fields: HeaderList = ()) -> None:
        self.status = status
        self.client.write(plainResponse(status, reason, close=True, fields=fields))
        # Bytes the client sent behind its CONNECT must not turn into a reset
        # that destroys the answer.
        self.channel.linger()

    def _connectFailed(self, failure: Failure) -> None:
        if self._over:
            return
        if failure.check(Refusal):
            refusal = failure.value
            METRICS.refused(refusal.rule)
            log.info(
                "{status} CONNECT {target}: {reason} (refused by {rule})",
                status=refusal.status,
                target=self.display,
                reason=refusal.reason,
                rule=refusal.rule,
            )
            self._refuse(refusal.status, refusal.reason, refusal.fields)
            return
        error = self.proxy.pool.describeConnectFailure(self.target.destination, failure)
        log.warn("{status} CONNECT {target}: {reason}", status=error.status, target=self.display, reason=error.reason)
        self._refuse(error.status, error.reason)

    def close(self) -> None:
        """End the tunnel now (idle too long, or shutting down)."""
        self.client.unregisterProducer()
        self.client.loseConnection()

    def _connected(self, origin: TunnelOrigin) -> None:
        if self._over:
            origin.transport.loseConnection()
            return
        self._origin = origin
        origin.ready = None  # fired; don't keep the Deferred (it refers back to origin)
        peer = origin.transport.getPeer()
        self.upstreamAddress = f"{peer.host}:{peer.port}"
        self.client.write(ESTABLISHED)
        if self._pending:
            origin.transport.writeSequence(self._pending)
            self._pending = []
        if self._clientEOF:
            origin.transport.loseWriteConnection()
        else:
            origin.transport.registerProducer(self.client, True)
        self.client.registerProducer(origin.transport, True)
        if self._pendingSize > PENDING_LIMIT:
            self.client.resumeProducing()
        self._pendingSize = 0

    # Client to origin

    def fromClient(self, data: bytes) -> None:
        self.bytesIn += len(data)
        self.lastActivity = self.proxy.reactor.seconds()
        if self._origin is not None:
            self._origin.transport.write(data)
            return
        self._pending.append(data)
        self._pendingSize += len(data)
        if self._pendingSize > PENDING_LIMIT:
            self.client.pauseProducing()

    def clientReadClosed(self) -> None:
        self._clientEOF = True
        if self._origin is None:
            if isinstance(self.target, Refusal):
                self.client.loseConnection()
            return
        self._origin.transport.unregisterProducer()
        self._origin.transport.loseWriteConnection()
        self._closeIfBothEnded()

    def clientLost(self, reason: Failure) -> None:
        self._over = True
        self.proxy.tunnels.discard(self)
        if self._origin is not None:
            self._origin.transport.unregisterProducer()
            self._origin.transport.loseConnection()
        peer = self.client.getPeer()
        self.proxy.accessLog.record(
            client=f"{peer.host}:{peer.port}",
            method="CONNECT",
            target=self.display,
            status=self.status,
            bytesIn=self.bytesIn,
            bytesOut=self.bytesOut,
            seconds=time.monotonic() - self.started,
            upstream=self.upstreamAddress,
            certificate=self.channel.clientCertificate(),
        )
        METRICS.requestFinished(
            "connect", b"CONNECT", self.status, time.monotonic() - self.started, self.bytesIn, self.bytesOut
        )

    # Origin to client

    def fromOrigin(self, data: bytes) -> None:
        self.bytesOut += len(data)
        self.lastActivity = self.proxy.reactor.seconds()
        self.client.write(data)

    def originReadClosed(self) -> None:
        self._originEOF = True
        self.client.unregisterProducer()
        if ISSLTransport.providedBy(self.client):
            # TLS to the client has no half-close: end it with close_notify.
            self.client.loseConnection()
            return
        self.client.loseWriteConnection()
        self._closeIfBothEnded()

    def originLost(self, reason: Failure) -> None:
        if not self._over:
            self.client.unregisterProducer()
            self.client.loseConnection()

    def _closeIfBothEnded(self) -> None:
        if self._clientEOF and self._originEOF:
            self.client.loseConnection()
