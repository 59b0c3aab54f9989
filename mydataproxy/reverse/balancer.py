"""
Several backends per route, and the waiting room in front of them.

L{BackendGroup} picks a backend for each request (round robin or least
connections) among those in rotation.  A backend leaves the rotation when a
connection to it fails (refused, timed out, unresolvable) and comes back
when its active health check passes again, or, without one, after
C{eject_seconds}.  Each change is one log line.

L{WaitingRoom} caps the requests in flight to a route (C{max_concurrent});
past the cap, up to C{queue_size} requests wait in arrival order, each at
most C{queue_timeout} seconds, then get 503 with C{Retry-After}: a legacy
backend sees a sudden peak as a steady stream.

The health check itself (a C{GET} of C{health_check} every
C{health_interval} seconds) is asked of a L{HealthProbe}, given by the
listener, so this module does no I/O of its own.
"""

from __future__ import annotations

import itertools
import typing
from collections import deque

import txaio
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall

from mydataproxy.config import RouteBackend, RouteSettings
from mydataproxy.http.target import Refusal

txaio.use_twisted()
log = txaio.make_logger()


class HealthProbe(typing.Protocol):
    """Asks a backend whether it is well: fires True or False, never fails."""

    def __call__(self, route: RouteSettings, backend: RouteBackend) -> defer.Deferred: ...


class Backend:
    """One backend of a route and what we know of it."""

    __slots__ = ("settings", "active", "down", "downUntil", "why")

    def __init__(self, settings: RouteBackend) -> None:
        self.settings = settings
        self.active = 0
        self.down = False
        self.downUntil = 0.0
        self.why = ""

    @property
    def url(self) -> str:
        return self.settings.url


class BackendGroup:
    """The backends of one route, and which one gets the next request."""

    def __init__(self, route: RouteSettings, clock: IReactorTime, probe: HealthProbe | None = None) -> None:
        self.route = route
        self.clock = clock
        self.backends = [Backend(settings) for settings in route.backends]
        self._turn = itertools.count()
        self._probe = probe
        self._checks: LoopingCall | None = None
        if probe is not None and route.health_check:
            self._checks = LoopingCall(self.checkAll)
            self._checks.clock = clock

    def start(self) -> None:
        """Start the active health checks, if the route has them."""
        if self._checks is not None and not self._checks.running:
            self._checks.start(self.route.health_interval, now=True)

    def stop(self) -> None:
        if self._checks is not None and self._checks.running:
            self._checks.stop()

    def _inRotation(self, backend: Backend, now: float) -> bool:
        if not backend.down:
            return True
        if self._checks is None and now >= backend.downUntil:
            self.markUp(backend, f"eject_seconds ({self.route.eject_seconds:g} s) over")
            return True
        return False

    def choose(self, exclude: typing.Collection[Backend] = ()) -> Backend | None:
        """
        The backend for the next request, not one of C{exclude}; L{None}
        when every other backend is out of rotation.
        """
        now = self.clock.seconds()
        candidates = [b for b in self.backends if b not in exclude and self._inRotation(b, now)]
        if not candidates:
            return None
        if self.route.balance == "least_connections":
            least = min(b.active for b in candidates)
            candidates = [b for b in candidates if b.active == least]
        return candidates[next(self._turn) % len(candidates)]

    def markDown(self, backend: Backend, why: str) -> None:
        """A connection to C{backend} failed: out of rotation for a while."""
        backend.downUntil = self.clock.seconds() + self.route.eject_seconds
        if not backend.down:
            backend.down = True
            backend.why = why
            log.warn(
                "reverse route {route}: backend {backend} down ({why})",
                route=self.route.name, backend=backend.url, why=why,
            )

    def markUp(self, backend: Backend, why: str) -> None:
        if backend.down:
            backend.down = False
            backend.why = ""
            log.info(
                "reverse route {route}: backend {backend} up ({why})",
                route=self.route.name, backend=backend.url, why=why,
            )

    def checkAll(self) -> defer.Deferred:
        """Ask every backend's health check once."""
        path = self.route.health_check.decode("ascii")

        def judged(healthy: bool, backend: Backend) -> None:
            if healthy:
                self.markUp(backend, f"health check {path} passed")
            else:
                self.markDown(backend, f"health check {path} failed")

        checks = []
        for backend in self.backends:
            d = self._probe(self.route, backend.settings)
            d.addCallback(judged, backend)
            checks.append(d)
        return defer.gatherResults(checks, consumeErrors=True)


class _Waiting:
    __slots__ = ("deferred", "timeout")

    def __init__(self, deferred: defer.Deferred, timeout: IDelayedCall) -> None:
        self.deferred = deferred
        self.timeout = timeout


class WaitingRoom:
    """
    At most C{route.max_concurrent} requests in flight (0: no cap); a FIFO
    of at most C{route.queue_size} behind them, each waiting at most
    C{route.queue_timeout} seconds.
    """

    def __init__(self, route: RouteSettings, clock: IReactorTime) -> None:
        self.route = route
        self.clock = clock
        self.inFlight = 0
        self._queue: deque[_Waiting] = deque()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def enter(self) -> defer.Deferred | None:
        """
        Ask to go in: L{None} when admitted now, else a Deferred that fires
        when admitted or fails with a 503 L{Refusal} when the wait is over
        (cancel it to leave the queue).  Whoever was admitted calls
        L{leave} exactly once.

        @raise Refusal: 503 when the queue is full.
        """
        cap = self.route.max_concurrent
        if not cap or (self.inFlight < cap and not self._queue):
            self.inFlight += 1
            return None
        retry = [(b"Retry-After", b"%d" % max(1, round(self.route.queue_timeout)))]
        if len(self._queue) >= self.route.queue_size:
            raise Refusal(
                503, f"route {self.route.name} is busy: waiting room full", f"reverse.routes {self.route.name} queue_size",
                fields=retry,
            )
        waiting: _Waiting

        def cancelled(_: defer.Deferred) -> None:
            self._forget(waiting)

        deferred = defer.Deferred(cancelled)

        def overdue() -> None:
            self._forget(waiting)
            deferred.errback(
                Refusal(
                    503,
                    f"route {self.route.name} is busy: no turn within {self.route.queue_timeout:g} s",
                    f"reverse.routes {self.route.name} queue_timeout",
                    fields=retry,
                )
            )

        waiting = _Waiting(deferred, self.clock.callLater(self.route.queue_timeout, overdue))
        self._queue.append(waiting)
        return deferred

    def _forget(self, waiting: _Waiting) -> None:
        try:
            self._queue.remove(waiting)
        except ValueError:
            return
        if waiting.timeout.active():
            waiting.timeout.cancel()

    def leave(self) -> None:
        """An admitted request is over: the next in line goes in."""
        self.inFlight -= 1
        while self._queue and self.inFlight < self.route.max_concurrent:
            waiting = self._queue.popleft()
            if waiting.timeout.active():
                waiting.timeout.cancel()
            self.inFlight += 1
            waiting.deferred.callback(None)
