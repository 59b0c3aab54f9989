"""
The reverse-proxy listener (C{[reverse]}): what Apache hands in, routed to
internal backends by C{[[reverse.routes]]}.

Why not a C{twisted.web} resource tree: C{twisted.web.server.Request}
buffers a whole upload before any resource sees it (in memory, or in a
temporary file past 100 KiB), and C{HTTPChannel}'s hooks for getting in
earlier are private; a proxy must start the backend exchange when the head
is complete and stream the body with back-pressure.  So the reverse
listener runs on the same client connection as the forward one
(L{mydataproxy.server.channel}, our own parser and limits), and its "tree"
is the L{RouteTable}: prefixes, longest first, per virtual host.

Requests pass: the head limits and framing (400, 414, 431, 408) in the
channel; the listener's client allow-list (403) and the shared rate limit
(429); the target checks (400) and the route (404); the route's body limit
(413) and waiting room (503); then a backend (503 when all are down), its
name resolved (502, 504), the connection (502, 504) and the relay.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from mydataproxy.config import RouteBackend, RouteSettings, Settings
from mydataproxy.egress.policy import ClientAccess
from mydataproxy.http.framing import RequestHead
from mydataproxy.http.headers import HeaderList
from mydataproxy.http.target import Destination
from mydataproxy.ops.logs import AccessLog
from mydataproxy.pipeline import RequestPipeline
from mydataproxy.reverse.balancer import BackendGroup, WaitingRoom
from mydataproxy.reverse.request import ReverseRequest
from mydataproxy.reverse.routes import RouteTable
from mydataproxy.server.channel import ProxyChannel, ProxyListener
from mydataproxy.upstream.client import BodyFraming, UpstreamError, UpstreamExchange, UpstreamPool


class ReverseProxy(ProxyListener):
    """Shared state of the reverse listener: its routes, their backends and waiting rooms."""

    section = "reverse"

    def __init__(
        self,
        settings: Settings,
        pipeline: RequestPipeline,
        pool: UpstreamPool,
        accessLog: AccessLog,
        reactor,
    ) -> None:
        reverse = settings.reverse
        super().__init__(settings, pipeline, pool, accessLog, reactor, reverse.client_idle_timeout)
        self.access = ClientAccess(reverse, "reverse")
        self.routes = RouteTable(reverse.routes)
        probe = HealthCheck(pipeline, pool)
        self.groups = {route.name: BackendGroup(route, reactor, probe) for route in reverse.routes}
        self.rooms = {route.name: WaitingRoom(route, reactor) for route in reverse.routes}

    def newRequest(self, channel: ProxyChannel, head: RequestHead) -> ReverseRequest:
        return ReverseRequest(channel, head)

    def startFactory(self) -> None:
        super().startFactory()
        for group in self.groups.values():
            group.start()

    def stopFactory(self) -> None:
        super().stopFactory()
        for group in self.groups.values():
            group.stop()


@implementer(IPushProducer)
class _NoBody:
    """The body producer of a request without one."""

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Verdict:
    """Receives a health check's response: healthy is a 2xx or 3xx."""

    def __init__(self) -> None:
        self.healthy = False
        self.done: defer.Deferred = defer.Deferred()

    def responseStarted(
        self, status: int, reason: bytes, fields: HeaderList, bodyLength: int | None, declaredLength: int | None
    ) -> None:
        self.healthy = 200 <= status < 400

    def responseData(self, data: bytes) -> None:
        pass

    def responseFinished(self) -> None:
        self.done.callback(self.healthy)

    def responseFailed(self, failure: UpstreamError) -> None:
        self.done.callback(False)

    def responseUpgraded(self, reason, fields, connection) -> None:
        connection.transport.abortConnection()
        self.done.callback(False)


class HealthCheck:
    """
    The active health check: C{GET <health_check>} on the backend, through
    the upstream pool (its TLS profiles and keep-alive), within the route's
    connect timeout and at most C{health_interval} for the answer.
    """

    def __init__(self, pipeline: RequestPipeline, pool: UpstreamPool) -> None:
        self.resolver = pipeline.resolver
        self.pool = pool

    def __call__(self, route: RouteSettings, backend: RouteBackend) -> defer.Deferred:
        verdict = _Verdict()

        def resolved(addresses: list[str]) -> defer.Deferred:
            destination = Destination(backend.scheme, backend.host, backend.port, tuple(addresses))
            head = b"GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: mydataproxy-health-check\r\n\r\n" % (
                route.health_check,
                destination.authority,
            )
            exchange = UpstreamExchange(
                self.pool, head, BodyFraming.NONE, method=b"GET", receiver=verdict, bodyProducer=_NoBody(),
                connectTimeout=route.connect_timeout,
                readTimeout=min(route.read_timeout, route.health_interval),
            )
            exchange.start(destination)
            return verdict.done

        known = self.resolver.known(backend.host)
        d = defer.succeed(known) if known is not None else self.resolver.resolve(backend.host)
        d.addCallback(resolved)
        d.addErrback(lambda _: False)
        return d
