"""
The admin listener's site (C{[admin] listen}, loopback by default), a
C{twisted.web} resource tree on the proxy's own reactor:

  - C{/healthz}: 200 C{ok} whenever it is asked: a wedged reactor cannot
    answer, which is what the probe is for;
  - C{/readyz}: 200 C{ready} when the readiness callback gives no reasons,
    else 503 with the reasons, one per line (load balancer health checks);
  - C{/metrics}: the registry in the Prometheus text format (OpenMetrics
    when the scraper asks for it); the registry may also come later, from a
    function that gathers it (a supervisor asking its workers);
  - anything else: 404.

Every answer is plain text and never cached.  The site writes no access
line: a probe every few seconds would fill the log.

Why not C{prometheus_client.twisted.MetricsResource}: it renders in the
reactor's thread pool, and the collectors read the reactor's own state
(pools, listeners); rendering here keeps them on the reactor thread.
"""

from __future__ import annotations

from typing import Callable, Iterable, Protocol

import txaio
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

txaio.use_twisted()
log = txaio.make_logger()

Readiness = Callable[[], list[str]]


class Collected(Protocol):
    """What the exposition encoders read: a registry, or anything with its C{collect}."""

    def collect(self) -> Iterable[Metric]: ...


#: Gathers the metrics at each scrape: fires with what to expose.
MetricsSource = Callable[[], "Deferred[Collected]"]


def _plain(request: Request, status: int, body: bytes, contentType: bytes = b"text/plain; charset=utf-8") -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", contentType)
    request.setHeader(b"Cache-Control", b"no-store")
    return body


class _NotFound(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        body = _plain(request, 404, b"not found\n")
        return b"" if request.method == b"HEAD" else body


_NOT_FOUND = _NotFound()


class _Page(Resource):
    """A plain-text answer to GET and HEAD, without children."""

    def getChild(self, path: bytes, request: Request) -> Resource:
        return _NOT_FOUND

    def render_GET(self, request: Request) -> bytes:
        raise NotImplementedError

    def render_HEAD(self, request: Request) -> bytes:
        body = self.render_GET(request)
        request.setHeader(b"Content-Length", b"%d" % len(body))
        return b""


class _Health(_Page):
    def render_GET(self, request: Request) -> bytes:
        return _plain(request, 200, b"ok\n")


class _Ready(_Page):
    def __init__(self, readiness: Readiness) -> None:
        super().__init__()
        self._readiness = readiness

    def render_GET(self, request: Request) -> bytes:
        try:
            reasons = self._readiness()
        except Exception as e:  # noqa: BLE001 - a broken check is a reason not to be ready, never a 500
            log.failure("readiness check failed")
            reasons = [f"readiness check failed: {type(e).__name__}: {e}"]
        if not reasons:
            return _plain(request, 200, b"ready\n")
        return _plain(request, 503, "".join(f"{reason}\n" for reason in reasons).encode("utf-8", "replace"))


class _Metrics(_Page):
    def __init__(self, metrics: CollectorRegistry | MetricsSource) -> None:
        super().__init__()
        self._gather: Callable[[], Collected | Deferred[Collected]] = (
            (lambda: metrics) if isinstance(metrics, CollectorRegistry) else metrics
        )

    def render_GET(self, request: Request) -> int:
        accept = request.getHeader(b"accept")
        encoder, contentType = choose_encoder(accept.decode("latin-1") if accept else "")
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)

        def answer(collected: Collected) -> None:
            if gone:
                return
            body = _plain(request, 200, encoder(collected), contentType.encode("ascii"))
            request.setHeader(b"Content-Length", b"%d" % len(body))
            request.write(body)
            request.finish()

        def failed(failure: Failure) -> None:
            log.failure("gathering the metrics failed", failure=failure)
            if not gone:
                request.write(_plain(request, 500, b"gathering the metrics failed\n"))
                request.finish()

        maybeDeferred(self._gather).addCallback(answer).addErrback(failed)
        return NOT_DONE_YET

    def render_HEAD(self, request: Request) -> int:
        # twisted.web writes no body for HEAD; the headers are GET's.
        return self.render_GET(request)


class _Root(_Page):
    """The named children; 404 for the root itself and anything else."""

    def render(self, request: Request) -> bytes:
        return _NOT_FOUND.render(request)


class AdminSite(Site):
    """A L{Site} that writes no access line and no factory start/stop line."""

    noisy = False
    displayTracebacks = False

    def log(self, request: Request) -> None:
        """Probes are not logged."""


def adminSite(readiness: Readiness, registry: CollectorRegistry | MetricsSource) -> Site:
    """
    The admin site: C{/healthz}, C{/readyz} from C{readiness} (the reasons
    the daemon is not ready; none when it is) and C{/metrics} from
    C{registry}, or from what a L{MetricsSource} gathers at each scrape.
    """
    root = _Root()
    root.putChild(b"healthz", _Health())
    root.putChild(b"readyz", _Ready(readiness))
    root.putChild(b"metrics", _Metrics(registry))
    return AdminSite(root)
