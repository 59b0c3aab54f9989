"""
One reverse-proxy request: routed by its path (and Host) to a route of the
listener, let in by the route's waiting room, sent to one of the route's
backends with the prefix replaced, the response's backend references made
public.  An accepted Upgrade turns the connection into a tunnel
(L{UpgradeTunnel}).  The relaying itself is
L{mydataproxy.server.request.ProxiedRequest}'s.

Backends are the operator's own configuration, not client input: they are
reached whatever the egress policy says (which governs the forward side),
at the addresses their names resolve to.
"""

from __future__ import annotations

import time
import typing

import txaio
from twisted.internet import defer
from twisted.internet.interfaces import ISSLTransport, ITCPTransport
from twisted.python.failure import Failure

from mydataproxy.config import RouteSettings
from mydataproxy.ops.metrics import METRICS
from mydataproxy.egress.policy import ClientAccess
from mydataproxy.http import headers as rules
from mydataproxy.http.target import Destination, Refusal
from mydataproxy.reverse.balancer import Backend, BackendGroup, WaitingRoom
from mydataproxy.reverse.rewrite import FORWARDING_FIELDS, ClientSide, clientSide, forwardingFields, publicResponseFields
from mydataproxy.reverse.routes import RouteTable, backendTarget, checkTarget, requestHost
from mydataproxy.server.request import ClientBodyThrottle, Listener, ProxiedRequest, displayURI
from mydataproxy.upstream.client import UpstreamConnection, UpstreamError, UpstreamExchange

txaio.use_twisted()
log = txaio.make_logger()

# Sent again on another backend when the connection attempt failed: nothing
# of the request left us, and these mean the same done twice.
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
# What a 405 for CONNECT lists (RFC 9110 15.5.6): every method goes to a backend.
ALLOWED_METHODS = b"GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, TRACE"


class ReverseListener(Listener, typing.Protocol):
    """What a reverse request needs of its listener beyond any listener's."""

    access: ClientAccess
    routes: RouteTable
    groups: dict[str, BackendGroup]
    rooms: dict[str, WaitingRoom]
    tunnels: set


class ReverseRequest(ProxiedRequest):
    """A request to the reverse listener."""

    __slots__ = (
        "route", "side", "backend", "_counted", "_tried", "_lastFailure", "_admitted", "_waiting", "_rest",
        "_upgrade",
    )

    def __init__(self, channel, head) -> None:
        super().__init__(channel, head)
        self.route: RouteSettings | None = None
        self.side: ClientSide | None = None
        self.backend: Backend | None = None
        self._counted = False
        self._tried: list[Backend] = []
        self._lastFailure: UpstreamError | None = None
        self._admitted = False
        self._waiting: defer.Deferred | None = None
        self._rest = b""
        self._upgrade: bytes | None = None

    @property
    def proxy(self) -> ReverseListener:
        return self.channel.factory

    @property
    def display(self) -> str:
        """The public URL asked for (the path alone before the client side is known)."""
        path = displayURI(self.head.target)
        if self.side is None or not self.side.host:
            return path
        return self.side.origin.decode("ascii", "replace") + path

    # Admission

    def start(self) -> None:
        proxy = self.proxy
        head = self.head
        peer = self.channel.clientAddress()
        self.clientIP = proxy.access.clientAddress(peer, head.values(b"x-forwarded-for"))
        try:
            proxy.pipeline.admitClient(self.clientIP, proxy.access)
            if head.method == b"CONNECT":
                raise Refusal(
                    405, "CONNECT is not served by the reverse proxy", fields=[(b"Allow", ALLOWED_METHODS)]
                )
            checkTarget(head.target)
            hosts = head.values(b"host")
            if hosts is not None and len(hosts) != 1:
                raise Refusal(400, "bad request: more than one Host")
            if hosts is None and head.version == b"HTTP/1.1":
                raise Refusal(400, "bad request: no Host")
            host = hosts[0] if hosts else None
            self.route, self._rest = proxy.routes.match(requestHost(host), head.target)
            route = self.route
            limit = route.max_body_bytes
            if limit:
                rule = f"reverse.routes {route.name} max_body_bytes"
                if head.contentLength is not None and head.contentLength > limit:
                    raise Refusal(413, "request body too large", rule)
                self.channel.limitBody(limit, rule)
            self.side = clientSide(
                self.clientIP,
                proxy.access.trusts(peer),
                host,
                head.values(b"x-forwarded-host"),
                head.values(b"x-forwarded-proto"),
                head.values(b"x-forwarded-port"),
                b"https" if ISSLTransport.providedBy(self.channel.transport) else b"http",
                self.channel.localPort(),
            )
            upgrade = head.values(b"upgrade")
            if (
                upgrade
                and upgrade[0].lower() == b"websocket"
                and b"upgrade" in head.connection
                and route.websocket
                and not head.hasBody
            ):
                # Only websockets: an h2c upgrade would carry requests past every check here.
                self._upgrade = upgrade[0]
            waiting = proxy.rooms[route.name].enter()
        except Refusal as refusal:
            self.refuseFor(refusal)
            return
        self._exchange = self._newExchange()
        if waiting is None:
            self._admitted = True
            self._send()
            return
        self._waiting = waiting
        # An error inside _admittedNow must reach _routeFailed too.
        waiting.addCallback(self._admittedNow).addErrback(self._routeFailed)

    def _admittedNow(self, _: None) -> None:
        self._waiting = None
        self._admitted = True
        METRICS.observeQueueWait(f"route {self.route.name}", time.monotonic() - self.started)
        if self._finished:
            self._leave()
            return
        self._send()

    def _newExchange(self) -> UpstreamExchange:
        route = self.route
        return UpstreamExchange(
            self.proxy.pool,
            b"",
            self._frameBody(),
            method=self.head.method,
            receiver=self,
            bodyProducer=ClientBodyThrottle(self.channel),
            connectTimeout=route.connect_timeout,
            readTimeout=route.read_timeout,
            upgrading=self._upgrade is not None,
            timeoutSettings=(
                f"reverse.routes {route.name} connect_timeout",
                f"reverse.routes {route.name} read_timeout",
            ),
        )

    def _send(self) -> None:
        """Pick a backend, resolve it, send the request."""
        group = self.proxy.groups[self.route.name]
        backend = group.choose(self._tried)
        if backend is None:
            if self._tried:
                self.responseFailed(self._lastFailure)
                return
            refusal = Refusal(
                503, f"every backend of route {self.route.name} is down", f"reverse.routes {self.route.name}",
                fields=[(b"Retry-After", b"%d" % max(1, round(self.route.eject_seconds)))],
            )
            self._routeFailed(Failure(refusal))
            return
        self._tried.append(backend)
        self.backend = backend
        backend.active += 1
        self._counted = True
        settings = backend.settings
        resolver = self.proxy.pipeline.resolver
        known = resolver.known(settings.host)
        if known is not None:
            self._resolved(known, backend)
            return
        d = resolver.resolve(settings.host)
        d.addCallback(self._resolved, backend)
        d.addErrback(self._backendFailed, backend)

    def _resolved(self, addresses: list[str], backend: Backend) -> None:
        if self._exchange is None or self._finished:
            return
        settings = backend.settings
        destination = Destination(settings.scheme, settings.host, settings.port, tuple(addresses))
        self._routed(destination, self._upstreamHead(destination))

    def _backendFailed(self, failure: Failure, backend: Backend) -> None:
        """The backend's name did not resolve: like a refused connection."""
        if self._exchange is None or self._finished:
            return
        settings = backend.settings
        destination = Destination(settings.scheme, settings.host, settings.port)
        error = self.proxy.pool.describeConnectFailure(destination, failure)
        self.responseFailed(UpstreamError(error.status, error.reason, unsent=True))

    def _upstreamHead(self, destination: Destination) -> bytes:
        head, route = self.head, self.route
        host = head.values(b"host")[0] if route.preserve_host and head.values(b"host") else destination.authority
        fields = rules.replacedRequestFields(head, FORWARDING_FIELDS, host, forwardingFields(self.side))
        target = backendTarget(self.backend.settings, route.prefix, self._rest)
        if self._upgrade is not None:
            # An upgrade request has no body (checked in start): no framing fields.
            fields += [(b"Connection", b"Upgrade"), (b"Upgrade", self._upgrade)]
        return self._upstreamHeadBytes(target, fields)

    # What the backend sends

    def responseFields(self, fields: rules.HeaderList) -> rules.HeaderList:
        return publicResponseFields(rules.relayedResponseFields(fields), self.route, self.side)

    def responseFailed(self, failure: UpstreamError) -> None:
        if self._finished:
            return
        backend = self.backend
        if failure.unsent and backend is not None:
            self._backendDone()
            if failure.status in (502, 504):
                self.proxy.groups[self.route.name].markDown(backend, failure.reason)
            if self._mayRetry():
                log.info(
                    "reverse route {route}: {method} retried on another backend after {backend}: {why}",
                    route=self.route.name, method=self.head.method.decode("ascii", "replace"),
                    backend=backend.url, why=failure.reason,
                )
                self._lastFailure = failure
                self._exchange = self._newExchange()
                self._send()
                return
        super().responseFailed(UpstreamError(failure.status, failure.reason, retryAfter=failure.retryAfter))

    def failedAt(self) -> str:
        route = self.route.name if self.route else "-"
        backend = self.backend.url if self.backend else "-"
        return f" (reverse route {route}, backend {backend})"

    def _mayRetry(self) -> bool:
        return (
            len(self._tried) == 1
            and len(self.route.backends) > 1
            and self.head.method in IDEMPOTENT_METHODS
            and not self.head.hasBody
        )

    def responseUpgraded(self, reason: bytes, fields: rules.HeaderList, connection: UpstreamConnection) -> None:
        self.status = 101
        self.upstreamAddress = connection.peer
        head = [b"HTTP/1.1 101 %s\r\n" % reason]
        head.extend(b"%s: %s\r\n" % field for field in self.responseFields(fields))
        head.append(b"Connection: Upgrade\r\nUpgrade: %s\r\n\r\n" % self._upgrade)
        self.channel.writer.writeSequence(head)
        tunnel = UpgradeTunnel(self, connection)
        connection.relayTo(tunnel)
        self._finished = True
        self._exchange = None
        self.channel.upgrade(self, tunnel)

    # Bookkeeping

    def _backendDone(self) -> None:
        if self._counted:
            self._counted = False
            self.backend.active -= 1

    def _leave(self) -> None:
        if self._admitted:
            self._admitted = False
            self.proxy.rooms[self.route.name].leave()

    def _maybeDone(self) -> None:
        if self._finished:
            self.release()
        super()._maybeDone()

    def release(self) -> None:
        """Give back the backend connection slot and the waiting-room turn (once)."""
        self._backendDone()
        self._leave()
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.cancel()

    def clientLost(self) -> None:
        super().clientLost()
        self.release()


class UpgradeTunnel:
    """
    The raw two-way relay after a 101: the client's connection and the
    backend's, each the producer of the other's writes (back-pressure).
    Half-close is honoured both ways (TLS to the client has none: its end
    is a close); the tunnel ends when both directions have, or either side
    drops.
    """

    __slots__ = (
        "request", "origin", "client", "lastActivity", "bytesIn", "bytesOut", "started", "_clientEOF", "_originEOF",
    )

    def __init__(self, request: ReverseRequest, origin: UpstreamConnection) -> None:
        self.request = request
        self.origin = origin.transport
        self.client = request.channel.transport
        self.started = time.monotonic()
        self.lastActivity = request.proxy.reactor.seconds()
        self.bytesIn = 0
        self.bytesOut = 0
        self._clientEOF = False
        self._originEOF = False

    @property
    def display(self) -> str:
        return self.request.display

    def start(self) -> None:
        self.request.proxy.tunnels.add(self)
        self.origin.registerProducer(self.client, True)
        self.client.registerProducer(self.origin, True)
        self.origin.resumeProducing()

    def close(self) -> None:
        self.client.loseConnection()
        self.origin.loseConnection()

    def fromClient(self, data: bytes) -> None:
        self.bytesIn += len(data)
        self.lastActivity = self.request.proxy.reactor.seconds()
        self.origin.write(data)

    def clientReadClosed(self) -> None:
        self._clientEOF = True
        self.origin.unregisterProducer()
        if ITCPTransport.providedBy(self.origin) and not ISSLTransport.providedBy(self.origin):
            self.origin.loseWriteConnection()
        else:
            self.origin.loseConnection()
        self._closeIfBothEnded()

    def clientLost(self, reason: Failure) -> None:
        proxy = self.request.proxy
        proxy.tunnels.discard(self)
        self.origin.unregisterProducer()
        self.origin.loseConnection()
        request = self.request
        request.bytesIn += self.bytesIn
        request.bytesOut += self.bytesOut
        request.recordAccess()
        request.release()

    def fromOrigin(self, data: bytes) -> None:
        self.bytesOut += len(data)
        self.lastActivity = self.request.proxy.reactor.seconds()
        self.client.write(data)

    def originReadClosed(self) -> None:
        self._originEOF = True
        self.client.unregisterProducer()
        if ISSLTransport.providedBy(self.client):
            self.client.loseConnection()
            return
        self.client.loseWriteConnection()
        self._closeIfBothEnded()

    def originLost(self, reason: Failure) -> None:
        self.client.unregisterProducer()
        self.client.loseConnection()

    def _closeIfBothEnded(self) -> None:
        if self._clientEOF and self._originEOF:
            self.client.loseConnection()
            self.origin.loseConnection()
