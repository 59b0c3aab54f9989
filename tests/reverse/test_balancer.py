"""
Unit tests of L{mydataproxy.reverse.balancer}: which backend gets the next
request (L{BackendGroup}: round robin, least connections, ejection, health
checks) and the waiting room in front of a route (L{WaitingRoom}), on a
fake clock, with a fake health probe.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import LogEvent, capturedLogs, formatEvent

from mydataproxy.config import RouteBackend, RouteSettings
from mydataproxy.http.target import Refusal
from mydataproxy.reverse.balancer import Backend, BackendGroup, WaitingRoom

A = RouteBackend("http", "10.0.1.1", 8080, b"/")
B = RouteBackend("http", "10.0.1.2", 8080, b"/")
C = RouteBackend("http", "10.0.1.3", 8080, b"/")


def route(*backends: RouteBackend, **settings) -> RouteSettings:
    """Route C{api} on C{/api/} to C{backends} (A, B and C if none)."""
    return RouteSettings("api", b"/api/", backends or (A, B, C), **settings)


@pytest.fixture
def logs() -> Iterator[Sequence[LogEvent]]:
    """The log events emitted while the test runs."""
    with capturedLogs() as events:
        yield events


def lines(events: Sequence[LogEvent]) -> list[str]:
    """The balancer's log lines among C{events}, formatted."""
    formatted = [formatEvent(event) for event in events]
    return [line for line in formatted if line.startswith("reverse route")]


def urls(picks: list[Backend | None]) -> list[str | None]:
    return [None if pick is None else pick.url for pick in picks]


# ---------------------------------------------------------------------------
# Balancing
# ---------------------------------------------------------------------------


def test_roundRobinTakesTurns() -> None:
    group = BackendGroup(route(), Clock())
    assert urls([group.choose() for _ in range(7)]) == [A.url, B.url, C.url, A.url, B.url, C.url, A.url]


def test_roundRobinIgnoresConnectionCounts() -> None:
    group = BackendGroup(route(), Clock())
    group.backends[0].active = 50
    assert urls([group.choose() for _ in range(3)]) == [A.url, B.url, C.url]


def test_leastConnectionsPicksTheLeastBusy() -> None:
    group = BackendGroup(route(balance="least_connections"), Clock())
    a, b, c = group.backends
    a.active, b.active, c.active = 2, 0, 1
    assert group.choose() is b
    b.active = 1
    assert {group.choose().url for _ in range(4)} == {B.url, C.url}, "ties between the least busy take turns"
    c.active = 5
    assert group.choose() is b


def test_leastConnectionsTiesTakeTurns() -> None:
    group = BackendGroup(route(balance="least_connections"), Clock())
    picks = [group.choose() for _ in range(6)]
    assert sorted(urls(picks)) == sorted([A.url, B.url, C.url] * 2)


def test_leastConnectionsSpreadsRequestsThatStayOpen() -> None:
    group = BackendGroup(route(balance="least_connections"), Clock())
    for _ in range(9):
        group.choose().active += 1
    assert [backend.active for backend in group.backends] == [3, 3, 3]


def test_excludedBackendsAreNotChosen() -> None:
    group = BackendGroup(route(), Clock())
    a, b, c = group.backends
    assert {group.choose(exclude=[a]).url for _ in range(6)} == {B.url, C.url}
    assert all(group.choose(exclude=[a, c]) is b for _ in range(3))
    assert group.choose(exclude=[a, b, c]) is None


def test_singleBackendExcludedIsNone() -> None:
    group = BackendGroup(route(A), Clock())
    assert group.choose(exclude=group.backends) is None
    assert group.choose() is group.backends[0]


# ---------------------------------------------------------------------------
# Ejection without health checks
# ---------------------------------------------------------------------------


def test_downBackendIsOutForEjectSecondsThenBack(logs) -> None:
    clock = Clock()
    group = BackendGroup(route(eject_seconds=10.0), clock)
    a, b, c = group.backends
    group.markDown(a, "connection refused")
    assert lines(logs) == ["reverse route api: backend http://10.0.1.1:8080/ down (connection refused)"]
    assert a.down and a.why == "connection refused"
    clock.advance(9.9)
    assert a not in [group.choose() for _ in range(6)]
    clock.advance(0.1)
    assert a in [group.choose() for _ in range(3)]
    assert not a.down
    assert lines(logs)[1:] == ["reverse route api: backend http://10.0.1.1:8080/ up (eject_seconds (10 s) over)"]


def test_anotherFailureWhileDownExtendsTheEjectionAndLogsNothing(logs) -> None:
    clock = Clock()
    group = BackendGroup(route(A, B, eject_seconds=10.0), clock)
    a, b = group.backends
    group.markDown(a, "connection refused")
    clock.advance(5)
    group.markDown(a, "connect timeout")
    clock.advance(6)
    assert all(group.choose() is b for _ in range(4)), "still out: the second failure restarted the clock"
    assert a.why == "connection refused"
    clock.advance(4)
    assert a in [group.choose() for _ in range(2)]
    assert len([line for line in lines(logs) if " down " in line]) == 1


def test_allBackendsDownIsNone() -> None:
    clock = Clock()
    group = BackendGroup(route(eject_seconds=3.0), clock)
    for backend in group.backends:
        group.markDown(backend, "connection refused")
    assert group.choose() is None
    clock.advance(3)
    assert group.choose() is not None


def test_markUpOfABackendInRotationLogsNothing(logs) -> None:
    group = BackendGroup(route(), Clock())
    group.markUp(group.backends[0], "health check /health passed")
    assert lines(logs) == []


# ---------------------------------------------------------------------------
# Active health checks
# ---------------------------------------------------------------------------


class Probe:
    """A health probe whose answers the test gives: C{calls} are (backend URL, Deferred)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, defer.Deferred]] = []

    def __call__(self, route: RouteSettings, backend: RouteBackend) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.calls.append((backend.url, d))
        return d

    def answer(self, **verdicts: bool) -> None:
        """Fire the pending checks of the backends named by their last octet (C{a1=True})."""
        for url, d in self.calls:
            key = "a" + url.split(":")[1].rsplit(".", 1)[1]
            if key in verdicts and not d.called:
                d.callback(verdicts[key])


def checked(clock: Clock, probe: Probe, **settings) -> BackendGroup:
    settings.setdefault("health_check", b"/health")
    settings.setdefault("health_interval", 5.0)
    group = BackendGroup(route(A, B, **settings), clock, probe)
    group.start()
    return group


def test_healthChecksStartAtOnceAndRepeat() -> None:
    clock, probe = Clock(), Probe()
    group = checked(clock, probe)
    assert [url for url, _ in probe.calls] == [A.url, B.url]
    probe.answer(a1=True, a2=True)
    clock.advance(4.9)
    assert len(probe.calls) == 2
    clock.advance(0.1)
    assert [url for url, _ in probe.calls[2:]] == [A.url, B.url]
    group.stop()
    probe.answer(a1=True, a2=True)
    clock.advance(50)
    assert len(probe.calls) == 4, "stop() ends the checks"


def test_failedHealthCheckTakesTheBackendOutUntilOnePasses(logs) -> None:
    clock, probe = Clock(), Probe()
    group = checked(clock, probe, eject_seconds=1.0)
    a, b = group.backends
    probe.answer(a1=False, a2=True)
    assert lines(logs) == ["reverse route api: backend http://10.0.1.1:8080/ down (health check /health failed)"]
    for _ in range(3):
        clock.advance(5)
        probe.answer(a1=False, a2=True)
        assert all(group.choose() is b for _ in range(3)), "eject_seconds does not bring back a failing backend"
    clock.advance(5)
    probe.answer(a1=True, a2=True)
    assert a in [group.choose() for _ in range(2)]
    assert lines(logs)[1:] == ["reverse route api: backend http://10.0.1.1:8080/ up (health check /health passed)"]


def test_passiveEjectionWithHealthChecksWaitsForAPass(logs) -> None:
    clock, probe = Clock(), Probe()
    group = checked(clock, probe, eject_seconds=2.0)
    a, b = group.backends
    probe.answer(a1=True, a2=True)
    group.markDown(a, "connection refused")
    clock.advance(3)
    assert all(group.choose() is b for _ in range(3)), "back only when its health check passes"
    clock.advance(2)
    probe.answer(a1=True, a2=True)
    assert a in [group.choose() for _ in range(2)]
    assert lines(logs) == [
        "reverse route api: backend http://10.0.1.1:8080/ down (connection refused)",
        "reverse route api: backend http://10.0.1.1:8080/ up (health check /health passed)",
    ]


def test_passingChecksOfHealthyBackendsLogNothing(logs) -> None:
    clock, probe = Clock(), Probe()
    checked(clock, probe)
    for _ in range(3):
        probe.answer(a1=True, a2=True)
        clock.advance(5)
    assert lines(logs) == []


def test_everyBackendFailingItsCheckLeavesNone() -> None:
    clock, probe = Clock(), Probe()
    group = checked(clock, probe)
    probe.answer(a1=False, a2=False)
    assert group.choose() is None


def test_noHealthCheckWithoutAPathOrAProbe() -> None:
    clock, probe = Clock(), Probe()
    BackendGroup(route(A, B), clock, probe).start()
    BackendGroup(route(A, B, health_check=b"/health"), clock).start()
    clock.advance(100)
    assert probe.calls == []
    assert clock.getDelayedCalls() == []


# ---------------------------------------------------------------------------
# WaitingRoom
# ---------------------------------------------------------------------------


def room(clock: Clock | None = None, **settings) -> WaitingRoom:
    settings.setdefault("max_concurrent", 2)
    return WaitingRoom(route(A, **settings), clock or Clock())


def outcomes(d: defer.Deferred) -> list:
    """What C{d} fires with, as it happens (failures as their value)."""
    seen: list = []
    d.addCallbacks(seen.append, lambda failure: seen.append(failure.value))
    return seen


def test_noCapAdmitsEveryone() -> None:
    waiting = room(max_concurrent=0)
    assert all(waiting.enter() is None for _ in range(1000))
    assert waiting.waiting == 0


def test_capAdmitsUpToItThenQueues() -> None:
    waiting = room()
    assert waiting.enter() is None
    assert waiting.enter() is None
    third = waiting.enter()
    assert isinstance(third, defer.Deferred) and not third.called
    assert (waiting.inFlight, waiting.waiting) == (2, 1)


def test_queueIsFirstInFirstOut() -> None:
    waiting = room()
    waiting.enter(), waiting.enter()
    queued = [outcomes(waiting.enter()) for _ in range(3)]
    waiting.leave()
    assert queued == [[None], [], []]
    waiting.leave()
    assert queued == [[None], [None], []]
    assert (waiting.inFlight, waiting.waiting) == (2, 1)
    waiting.leave()
    assert queued == [[None], [None], [None]]
    waiting.leave(), waiting.leave()
    assert (waiting.inFlight, waiting.waiting) == (0, 0)


def test_newcomersQueueBehindThoseWaiting() -> None:
    waiting = room(max_concurrent=1)
    waiting.enter()
    first = outcomes(waiting.enter())
    waiting.leave()
    second = waiting.enter()
    assert first == [None] and second is not None, "no overtaking the queue"


def test_fullQueueIs503WithRetryAfter() -> None:
    waiting = room(queue_size=2, queue_timeout=7.0)
    waiting.enter(), waiting.enter(), waiting.enter(), waiting.enter()
    with pytest.raises(Refusal) as info:
        waiting.enter()
    error = info.value
    assert (error.status, error.reason, error.rule) == (
        503, "route api is busy: waiting room full", "reverse.routes api queue_size",
    )
    assert error.fields == [(b"Retry-After", b"7")]
    assert (waiting.inFlight, waiting.waiting) == (2, 2)


def test_noQueueIs503AtOnceAtTheCap() -> None:
    waiting = room(max_concurrent=1, queue_size=0)
    waiting.enter()
    with pytest.raises(Refusal) as info:
        waiting.enter()
    assert info.value.status == 503


def test_waitPastQueueTimeoutIs503WithRetryAfter() -> None:
    clock = Clock()
    waiting = room(clock, queue_timeout=10.0)
    waiting.enter(), waiting.enter()
    seen = outcomes(waiting.enter())
    clock.advance(9.99)
    assert seen == []
    clock.advance(0.01)
    [error] = seen
    assert isinstance(error, Refusal)
    assert (error.status, error.reason, error.rule) == (
        503, "route api is busy: no turn within 10 s", "reverse.routes api queue_timeout",
    )
    assert error.fields == [(b"Retry-After", b"10")]
    assert waiting.waiting == 0
    waiting.leave()
    assert (waiting.inFlight, waiting.waiting) == (1, 0), "a timed-out request is never admitted"


@pytest.mark.parametrize("timeout, retry", [(0.2, b"1"), (1.4, b"1"), (2.6, b"3"), (30.0, b"30")])
def test_retryAfterIsTheQueueTimeoutInWholeSecondsAtLeastOne(timeout: float, retry: bytes) -> None:
    clock = Clock()
    waiting = room(clock, max_concurrent=1, queue_timeout=timeout)
    waiting.enter()
    seen = outcomes(waiting.enter())
    clock.advance(timeout)
    assert seen[0].fields == [(b"Retry-After", retry)]


def test_cancelledWaitLeavesTheQueue() -> None:
    clock = Clock()
    waiting = room(clock)
    waiting.enter(), waiting.enter()
    cancelled = waiting.enter()
    cancelled.addErrback(lambda failure: failure.trap(defer.CancelledError))
    after = outcomes(waiting.enter())
    cancelled.cancel()
    assert waiting.waiting == 1
    assert len(clock.getDelayedCalls()) == 1, "the cancelled wait's timeout is cancelled too"
    waiting.leave()
    assert after == [None]
    assert (waiting.inFlight, waiting.waiting) == (2, 0)
    assert clock.getDelayedCalls() == [], "an admitted request's timeout is cancelled"


def test_leaveAdmitsTheNextAndKeepsTheCount() -> None:
    clock = Clock()
    waiting = room(clock, max_concurrent=1)
    assert waiting.enter() is None
    seen = outcomes(waiting.enter())
    waiting.leave()
    assert seen == [None]
    assert waiting.inFlight == 1
    clock.advance(100)
    assert seen == [None], "an admitted request does not time out later"
    waiting.leave()
    assert waiting.inFlight == 0
    assert waiting.enter() is None


def test_admittedRequestThatLeavesAtOnceAdmitsTheNext() -> None:
    """A request that ended while it waited leaves as soon as it is admitted."""
    waiting = room(max_concurrent=1)
    waiting.enter()
    first = waiting.enter()
    second = outcomes(waiting.enter())
    first.addCallback(lambda _: waiting.leave())
    waiting.leave()
    assert second == [None]
    assert (waiting.inFlight, waiting.waiting) == (1, 0)
