"""
Unit tests of name resolution (L{mydataproxy.egress.resolver}) against an
in-process C{twisted.names} server on 127.0.0.1 UDP, with the real reactor
(pytest-twisted).  The resolver is always given that server: no query ever
goes to the system's DNS.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, error, reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.names import dns, server
from twisted.names import error as dnserror

from mydataproxy.config import ResolverSettings
from mydataproxy.egress.resolver import ResolutionTimeout, Resolver


class Authority:
    """A/AAAA answers from a dict; NXDOMAIN for unknown names; logs queries."""

    def __init__(self) -> None:
        self.records: dict[str, tuple[list[str], int, int]] = {}
        self.log: list[tuple[str, str]] = []

    def set(self, name: str, addresses: list[str], ttl: int = 0, aaaaTTL: int | None = None) -> None:
        """Answer C{name}; AAAA records get C{aaaaTTL} if given."""
        self.records[name] = (addresses, ttl, ttl if aaaaTTL is None else aaaaTTL)

    def queries(self, name: str) -> list[str]:
        return [kind for asked, kind in self.log if asked == name]

    def query(self, query: dns.Query, timeout=None):
        name = query.name.name.decode("ascii").lower()
        self.log.append((name, dns.QUERY_TYPES.get(query.type, str(query.type))))
        if name not in self.records:
            return defer.fail(dnserror.DomainError(name))
        addresses, aTTL, aaaaTTL = self.records[name]
        answers = []
        for address in addresses:
            if query.type == dns.A and ":" not in address:
                ttl = aTTL
                payload = dns.Record_A(address, ttl=ttl)
            elif query.type == dns.AAAA and ":" in address:
                ttl = aaaaTTL
                payload = dns.Record_AAAA(address, ttl=ttl)
            else:
                continue
            answers.append(dns.RRHeader(query.name.name, query.type, dns.IN, ttl, payload, auth=True))
        return defer.succeed((answers, [], []))


class Silent(DatagramProtocol):
    """A UDP port that receives queries and never answers them."""

    def __init__(self) -> None:
        self.received = 0

    def datagramReceived(self, data, addr) -> None:
        self.received += 1


def _stop(port) -> None:
    d = port.stopListening()
    if isinstance(d, defer.Deferred):
        pytest_twisted.blockon(d)


@pytest.fixture
def authority():
    auth = Authority()
    factory = server.DNSServerFactory(authorities=[auth])
    factory.noisy = False
    port = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
    auth.port = port.getHost().port
    yield auth
    _stop(port)


@pytest.fixture
def silent():
    protocol = Silent()
    port = reactor.listenUDP(0, protocol, interface="127.0.0.1")
    protocol.port = port.getHost().port
    yield protocol
    _stop(port)


@pytest.fixture
def hostsFile(tmp_path: Path) -> Path:
    path = tmp_path / "hosts"
    path.write_text("127.0.0.1 localhost\n::1 localhost\n")
    return path


class ShiftedClock:
    """The real reactor, except that C{seconds()} can be moved forward."""

    def __init__(self, real) -> None:
        self._real = real
        self.offset = 0.0

    def seconds(self) -> float:
        return self._real.seconds() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds

    def __getattr__(self, name):
        return getattr(self._real, name)


def makeResolver(port: int, hostsFile: Path, clock=None, **settings) -> Resolver:
    values = {"servers": (("127.0.0.1", port),), "hosts_file": str(hostsFile), "timeout": 2.0}
    values.update(settings)
    return Resolver(clock or reactor, ResolverSettings(**values))


LIMIT = 5.0


def bounded(d: defer.Deferred) -> defer.Deferred:
    """C{d}, failing with L{defer.TimeoutError} if it has not fired in LIMIT seconds."""
    return d.addTimeout(LIMIT, reactor)


async def failure(d: defer.Deferred) -> Exception:
    try:
        result = await bounded(d)
    except Exception as e:
        return e
    pytest.fail(f"resolution succeeded with {result!r}")


# ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_ipLiteralIsItsOwnAnswer(authority, hostsFile) -> None:
    r = makeResolver(authority.port, hostsFile)
    assert await bounded(r.resolve("127.0.0.1")) == ["127.0.0.1"]
    assert await bounded(r.resolve("::1")) == ["::1"]
    assert await bounded(r.resolve("fd00:ec2::254")) == ["fd00:ec2::254"]
    assert authority.log == []


@pytest_twisted.ensureDeferred
async def test_hostsFileFirstDNSNotAsked(authority, hostsFile) -> None:
    hostsFile.write_text("127.0.0.7 hosted.test\n::7 v6hosted.test\n")
    authority.set("hosted.test", ["127.0.0.8"], ttl=60)
    authority.set("v6hosted.test", ["127.0.0.8"], ttl=60)
    r = makeResolver(authority.port, hostsFile)
    assert await bounded(r.resolve("hosted.test")) == ["127.0.0.7"]
    assert await bounded(r.resolve("v6hosted.test")) == ["::7"]
    assert authority.queries("hosted.test") == []
    assert authority.queries("v6hosted.test") == []


@pytest_twisted.ensureDeferred
async def test_nameNotInHostsFileAskedOfDNS(authority, hostsFile) -> None:
    hostsFile.write_text("127.0.0.7 hosted.test\n")
    authority.set("dns.test", ["127.0.0.9"])
    r = makeResolver(authority.port, hostsFile)
    assert await bounded(r.resolve("dns.test")) == ["127.0.0.9"]
    assert sorted(authority.queries("dns.test")) == ["A", "AAAA"]


@pytest_twisted.ensureDeferred
async def test_aAndAAAAMerged(authority, hostsFile) -> None:
    authority.set("dual.test", ["127.0.0.9", "::9", "127.0.0.10", "127.0.0.9"], ttl=30)
    r = makeResolver(authority.port, hostsFile)
    assert await bounded(r.resolve("dual.test")) == ["127.0.0.9", "127.0.0.10", "::9"]


@pytest_twisted.ensureDeferred
async def test_onlyAAAA(authority, hostsFile) -> None:
    authority.set("six.test", ["::5"])
    r = makeResolver(authority.port, hostsFile)
    assert await bounded(r.resolve("six.test")) == ["::5"]


@pytest_twisted.ensureDeferred
async def test_ttlCacheHonoured(authority, hostsFile) -> None:
    clock = ShiftedClock(reactor)
    authority.set("cached.test", ["127.0.0.11"], ttl=60)
    r = makeResolver(authority.port, hostsFile, clock)
    assert await bounded(r.resolve("cached.test")) == ["127.0.0.11"]
    authority.set("cached.test", ["127.0.0.12"], ttl=60)
    clock.advance(59)
    assert await bounded(r.resolve("cached.test")) == ["127.0.0.11"]
    assert authority.queries("cached.test").count("A") == 1
    clock.advance(2)
    assert await bounded(r.resolve("cached.test")) == ["127.0.0.12"]
    assert authority.queries("cached.test").count("A") == 2


@pytest_twisted.ensureDeferred
async def test_ttlCappedByMaxTTL(authority, hostsFile) -> None:
    clock = ShiftedClock(reactor)
    authority.set("long.test", ["127.0.0.13"], ttl=86400)
    r = makeResolver(authority.port, hostsFile, clock, max_ttl=10.0)
    assert await bounded(r.resolve("long.test")) == ["127.0.0.13"]
    clock.advance(9)
    await bounded(r.resolve("long.test"))
    assert authority.queries("long.test").count("A") == 1
    clock.advance(2)
    authority.set("long.test", ["127.0.0.14"], ttl=86400)
    assert await bounded(r.resolve("long.test")) == ["127.0.0.14"]
    assert authority.queries("long.test").count("A") == 2


@pytest_twisted.ensureDeferred
async def test_ttlCappedWithRealTime(authority, hostsFile) -> None:
    authority.set("short.test", ["127.0.0.15"], ttl=3600)
    r = makeResolver(authority.port, hostsFile, max_ttl=0.3)
    await bounded(r.resolve("short.test"))
    await bounded(r.resolve("short.test"))
    assert authority.queries("short.test").count("A") == 1
    d = defer.Deferred()
    reactor.callLater(0.4, d.callback, None)
    await d
    await bounded(r.resolve("short.test"))
    assert authority.queries("short.test").count("A") == 2


@pytest_twisted.ensureDeferred
async def test_smallestTTLOfTheAnswerCounts(authority, hostsFile) -> None:
    clock = ShiftedClock(reactor)
    r = makeResolver(authority.port, hostsFile, clock)
    # The A and AAAA answers come with their own TTLs: keep the smaller one.
    authority.set("mixed.test", ["127.0.0.16", "::16"], ttl=100, aaaaTTL=10)
    assert await bounded(r.resolve("mixed.test")) == ["127.0.0.16", "::16"]
    clock.advance(9)
    await bounded(r.resolve("mixed.test"))
    assert authority.queries("mixed.test").count("A") == 1
    clock.advance(2)
    await bounded(r.resolve("mixed.test"))
    assert authority.queries("mixed.test").count("A") == 2


@pytest_twisted.ensureDeferred
async def test_ttlZeroNotCached(authority, hostsFile) -> None:
    authority.set("zero.test", ["127.0.0.17"], ttl=0)
    r = makeResolver(authority.port, hostsFile)
    for _ in range(3):
        assert await bounded(r.resolve("zero.test")) == ["127.0.0.17"]
    assert authority.queries("zero.test").count("A") == 3
    assert authority.queries("zero.test").count("AAAA") == 3


@pytest_twisted.ensureDeferred
async def test_maxTTLZeroCachesNothing(authority, hostsFile) -> None:
    authority.set("nocache.test", ["127.0.0.18"], ttl=3600)
    r = makeResolver(authority.port, hostsFile, max_ttl=0.0)
    await bounded(r.resolve("nocache.test"))
    await bounded(r.resolve("nocache.test"))
    assert authority.queries("nocache.test").count("A") == 2


@pytest_twisted.ensureDeferred
async def test_nxdomainIsDNSLookupError(authority, hostsFile) -> None:
    r = makeResolver(authority.port, hostsFile)
    e = await failure(r.resolve("missing.test"))
    assert isinstance(e, error.DNSLookupError)
    assert not isinstance(e, ResolutionTimeout)
    assert "missing.test" in str(e)


@pytest_twisted.ensureDeferred
async def test_noAddressRecordsIsDNSLookupError(authority, hostsFile) -> None:
    authority.set("empty.test", [])
    r = makeResolver(authority.port, hostsFile)
    e = await failure(r.resolve("empty.test"))
    assert isinstance(e, error.DNSLookupError) and not isinstance(e, ResolutionTimeout)


@pytest_twisted.ensureDeferred
async def test_failureIsNotCached(authority, hostsFile) -> None:
    r = makeResolver(authority.port, hostsFile)
    await failure(r.resolve("later.test"))
    authority.set("later.test", ["127.0.0.19"], ttl=60)
    assert await bounded(r.resolve("later.test")) == ["127.0.0.19"]


@pytest_twisted.ensureDeferred
async def test_noAnswerIsResolutionTimeoutWithinTimeout(silent, hostsFile) -> None:
    r = makeResolver(silent.port, hostsFile, timeout=0.5)
    started = time.monotonic()
    waiting = [r.resolve("slow.test") for _ in range(3)]
    for d in waiting:
        e = await failure(d)
        assert isinstance(e, ResolutionTimeout), repr(e)
        assert isinstance(e, error.DNSLookupError)
    elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 1.5, elapsed
    assert silent.received >= 1
    # The pending lookup was cleared: a new one asks again.
    before = silent.received
    e = await failure(r.resolve("slow.test"))
    assert isinstance(e, ResolutionTimeout)
    assert silent.received > before


@pytest_twisted.ensureDeferred
async def test_concurrentLookupsShareOneQuery(authority, hostsFile) -> None:
    authority.set("shared.test", ["127.0.0.20", "::20"], ttl=0)
    r = makeResolver(authority.port, hostsFile)
    waiting = [r.resolve("shared.test") for _ in range(20)]
    assert not any(d.called for d in waiting), "a DNS lookup must not complete synchronously"
    results = [await bounded(d) for d in waiting]
    assert all(result == ["127.0.0.20", "::20"] for result in results)
    assert sorted(authority.queries("shared.test")) == ["A", "AAAA"]


@pytest_twisted.ensureDeferred
async def test_concurrentFailuresAllReported(authority, hostsFile) -> None:
    r = makeResolver(authority.port, hostsFile)
    waiting = [r.resolve("nothing.test") for _ in range(5)]
    for d in waiting:
        assert isinstance(await failure(d), error.DNSLookupError)
    assert sorted(authority.queries("nothing.test")) == ["A", "AAAA"]


@pytest_twisted.ensureDeferred
async def test_neverUsesTheThreadPoolOrBlockingResolver(authority, hostsFile, monkeypatch) -> None:
    used: list[str] = []

    def forbidden(what):
        def call(*args, **kwargs):
            used.append(what)
            raise AssertionError(f"{what} used during name resolution")

        return call

    monkeypatch.setattr(reactor, "getThreadPool", forbidden("reactor.getThreadPool"))
    monkeypatch.setattr(reactor, "callInThread", forbidden("reactor.callInThread"))
    monkeypatch.setattr(reactor, "resolve", forbidden("reactor.resolve"))
    for name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
        monkeypatch.setattr(socket, name, forbidden(f"socket.{name}"))
    hostsFile.write_text("127.0.0.1 localhost\n127.0.0.30 fromfile.test\n")
    names = [f"n{i}.many.test" for i in range(60)]
    for i, name in enumerate(names):
        authority.set(name, [f"127.0.1.{i}"], ttl=0)
    r = makeResolver(authority.port, hostsFile)
    lookups = [r.resolve(name) for name in names]
    lookups.append(r.resolve("fromfile.test"))
    missing = r.resolve("absent.many.test")
    results = [await bounded(d) for d in lookups]
    assert isinstance(await failure(missing), error.DNSLookupError)
    assert results[:60] == [[f"127.0.1.{i}"] for i in range(60)]
    assert results[60] == ["127.0.0.30"]
    assert used == []
