"""
Unit tests of the metrics (L{mydataproxy.ops.metrics}): what is counted
comes back out of the Prometheus text exposition, parsed with
C{prometheus_client}'s own parser; label sets stay bounded; the request
path (L{mydataproxy.server.request}) and the upstream pool
(L{mydataproxy.upstream.client}) report what happened to them, in memory
and over real loopback sockets (plain and TLS origins).
"""

from __future__ import annotations

import datetime
import re
from pathlib import Path
from typing import Iterable

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, error, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from mydataproxy.config import OriginTLSProfile, Settings, StoreRef, UpstreamSettings, settingsFromMapping
from mydataproxy.egress.resolver import ResolutionTimeout, Resolver
from mydataproxy.forward.listener import ForwardProxy
from mydataproxy.http.target import Destination
from mydataproxy.ops import metrics as metricsModule
from mydataproxy.ops.metrics import METRICS, MAX_REFUSAL_RULES, DestinationLabels, ProxyMetrics, tlsCheck
from mydataproxy.pipeline import RequestPipeline
from mydataproxy.tls.contexts import OriginTLS, TLSCheckFailed
from mydataproxy.upstream.client import BodyFraming, UpstreamError, UpstreamExchange, UpstreamPool

PLAIN_TLS = OriginTLS(OriginTLSProfile(), ())


def samples(metrics: ProxyMetrics) -> dict[tuple[str, tuple], float]:
    """Every sample of the exposition, parsed back: (name, sorted labels) -> value."""
    text = generate_latest(metrics.registry).decode("utf-8")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(metrics: ProxyMetrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, tuple(sorted(labels.items()))))


def settingsFrom(document: dict) -> Settings:
    return settingsFromMapping(document, "<test>", "", Path("."))


# ---------------------------------------------------------------------------
# Counted as it happens
# ---------------------------------------------------------------------------


def test_requestsAreCountedByModeMethodClassAndStatus() -> None:
    m = ProxyMetrics()
    m.requestFinished("absolute", b"GET", 200, 0.02, 0, 100)
    m.requestFinished("absolute", b"HEAD", 200, 0.03, 0, 0)
    m.requestFinished("header", b"POST", 502, 0.5, 10, 20)
    m.requestFinished("header", b"BREW", 418, 0.001, 0, 5)
    m.requestFinished("reverse", b"GET", 0, 1.5, 0, 0)
    m.requestFinished("connect", b"CONNECT", 200, 3.0, 7, 9)
    got = samples(m)
    count = "mydataproxy_requests_total"
    assert got[(count, (("method", "safe"), ("mode", "absolute"), ("status", "200")))] == 2
    assert got[(count, (("method", "unsafe"), ("mode", "header"), ("status", "502")))] == 1
    # An unlisted code is counted by its class; an unknown method is unsafe.
    assert got[(count, (("method", "unsafe"), ("mode", "header"), ("status", "4xx")))] == 1
    assert got[(count, (("method", "safe"), ("mode", "reverse"), ("status", "none")))] == 1
    assert got[(count, (("method", "connect"), ("mode", "connect"), ("status", "200")))] == 1
    assert sum(v for (name, _), v in got.items() if name == count) == 6
    assert got[("mydataproxy_request_duration_seconds_count", (("mode", "absolute"),))] == 2
    assert got[("mydataproxy_request_duration_seconds_sum", (("mode", "absolute"),))] == pytest.approx(0.05)
    assert got[("mydataproxy_request_duration_seconds_bucket", (("le", "0.025"), ("mode", "absolute")))] == 1
    assert got[("mydataproxy_client_received_bytes_total", (("mode", "header"),))] == 10
    assert got[("mydataproxy_client_sent_bytes_total", (("mode", "header"),))] == 25
    assert got[("mydataproxy_client_sent_bytes_total", (("mode", "connect"),))] == 9


def test_modeOfARequestFromItsListenerMethodAndTarget() -> None:
    assert metricsModule.requestMode("forward", b"GET", b"http://h/x") == "absolute"
    assert metricsModule.requestMode("forward", b"GET", b"/v1/accounts") == "header"
    assert metricsModule.requestMode("forward", b"CONNECT", b"h:443") == "connect"
    assert metricsModule.requestMode("reverse", b"GET", b"/api/") == "reverse"
    assert metricsModule.requestMode("reverse", b"CONNECT", b"h:443") == "reverse"


def test_refusalsByRuleStayBounded() -> None:
    m = ProxyMetrics()
    m.refused("forward.connect_ports")
    m.refused("forward.connect_ports")
    m.refused("")
    for i in range(MAX_REFUSAL_RULES + 5):
        m.refused(f"egress.rules[{i}]")
    got = samples(m)
    refusals = {labels[0][1]: v for (name, labels), v in got.items() if name == "mydataproxy_refusals_total"}
    assert refusals["forward.connect_ports"] == 2
    assert refusals["none"] == 1
    assert len(refusals) == MAX_REFUSAL_RULES + 1  # the first 200 rules, then "other"
    assert refusals["other"] == 7
    # A rule counted before the cap keeps its own series.
    m.refused("forward.connect_ports")
    assert value(m, "mydataproxy_refusals_total", rule="forward.connect_ports") == 3


def test_queueWaitsAreObservedPerQueue() -> None:
    m = ProxyMetrics()
    m.observeQueueWait("api", 0.2)
    m.observeQueueWait("api", 0.3)
    m.observeQueueWait("legacy", 4.0)
    assert value(m, "mydataproxy_queue_wait_seconds_count", queue="api") == 2
    assert value(m, "mydataproxy_queue_wait_seconds_sum", queue="api") == pytest.approx(0.5)
    assert value(m, "mydataproxy_queue_wait_seconds_bucket", queue="legacy", le="2.5") == 0
    assert value(m, "mydataproxy_queue_wait_seconds_bucket", queue="legacy", le="5.0") == 1


def test_buildInfoAndProcessMetrics() -> None:
    got = samples(ProxyMetrics())
    [(labels, one)] = [(dict(labels), v) for (name, labels), v in got.items() if name == "mydataproxy_build_info"]
    assert one == 1
    assert labels["version"] == metricsModule.buildVersion() != "unknown"
    assert set(labels) == {"version", "python", "twisted"}
    assert got[("process_start_time_seconds", ())] > 0


def test_registriesAreIndependent() -> None:
    a, b = ProxyMetrics(), ProxyMetrics()
    a.requestFinished("reverse", b"GET", 200, 0.1, 0, 0)
    assert value(a, "mydataproxy_requests_total", mode="reverse", method="safe", status="200") == 1
    assert value(b, "mydataproxy_requests_total", mode="reverse", method="safe", status="200") is None


# ---------------------------------------------------------------------------
# Read when scraped
# ---------------------------------------------------------------------------


class Counted:
    def __init__(self, open: int) -> None:
        self.open = open


class Listener:
    def __init__(self, connections: int, tunnels: int) -> None:
        self.connections = Counted(connections)
        self.tunnels = set(range(tunnels))


class Pool:
    openConnections = 7
    idleConnections = 3
    queued = 2
    rejected = 11


class Log:
    dropped = 40
    lost = 2


def certificate(commonName: str, notAfter: datetime.datetime) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, commonName)])
    return (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(notAfter - datetime.timedelta(days=365)).not_valid_after(notAfter)
        .sign(key, hashes.SHA256())
    )


def test_liveValuesAreReadWhenScraped() -> None:
    now = datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)
    m = ProxyMetrics(now=now.timestamp)
    forward = Listener(connections=5, tunnels=2)
    m.watchListener("forward", forward)
    m.watchListener("reverse", Listener(connections=1, tunnels=0))
    m.watchPool(Pool())
    depth = [4]
    m.watchQueue("route api", lambda: depth[0])
    m.watchLog("access", Log())
    m.setCertificates("forward.tls", [
        certificate("proxy.example", now + datetime.timedelta(days=10)),
        certificate("old.example", now - datetime.timedelta(seconds=60)),
    ])
    got = samples(m)
    assert got[("mydataproxy_client_connections", (("listener", "forward"),))] == 5
    assert got[("mydataproxy_client_connections", (("listener", "reverse"),))] == 1
    assert got[("mydataproxy_tunnels", (("listener", "forward"),))] == 2
    assert got[("mydataproxy_upstream_pool_connections", (("state", "in_use"),))] == 4
    assert got[("mydataproxy_upstream_pool_connections", (("state", "idle"),))] == 3
    assert got[("mydataproxy_upstream_pool_rejected_total", ())] == 11
    assert got[("mydataproxy_queue_depth", (("queue", "upstream pool"),))] == 2
    assert got[("mydataproxy_queue_depth", (("queue", "route api"),))] == 4
    assert got[("mydataproxy_log_lines_dropped_total", (("log", "access"), ("why", "dropped")))] == 40
    assert got[("mydataproxy_log_lines_dropped_total", (("log", "access"), ("why", "lost")))] == 2
    expiry = "mydataproxy_certificate_expiry_seconds"
    assert got[(expiry, (("store", "forward.tls"), ("subject", "CN=proxy.example")))] == 10 * 86400
    assert got[(expiry, (("store", "forward.tls"), ("subject", "CN=old.example")))] == -60
    # Values move between scrapes; a store reported again replaces its certificates.
    forward.connections.open = 6
    depth[0] = 0
    m.setCertificates("forward.tls", [certificate("new.example", now + datetime.timedelta(days=90))])
    got = samples(m)
    assert got[("mydataproxy_client_connections", (("listener", "forward"),))] == 6
    assert got[("mydataproxy_queue_depth", (("queue", "route api"),))] == 0
    assert [labels for (name, labels) in got if name == expiry] == [(("store", "forward.tls"), ("subject", "CN=new.example"))]


def test_aSubjectTwiceInAStoreReportsTheFirstToExpire() -> None:
    now = datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)
    m = ProxyMetrics(now=now.timestamp)
    m.setCertificates("upstream.tls", [
        certificate("ca.example", now + datetime.timedelta(days=900)),
        certificate("ca.example", now + datetime.timedelta(days=30)),
    ])
    assert value(m, "mydataproxy_certificate_expiry_seconds", store="upstream.tls", subject="CN=ca.example") == 30 * 86400


# ---------------------------------------------------------------------------
# Bounded destination labels and TLS checks
# ---------------------------------------------------------------------------


def test_destinationLabelsNameOnlyWhatIsConfigured() -> None:
    labels = DestinationLabels(settingsFrom({
        "reverse": {"routes": [
            {"name": "api", "prefix": "/api/", "backends": ["http://10.0.1.10:8080/gw/", "https://10.0.1.11/gw/"]},
        ]},
        "egress": {"rules": [{"name": "banks", "action": "allow", "hosts": ["*.bank.example"]},
                             {"name": "lan", "action": "allow", "networks": ["10.0.0.0/8"]}]},
        "upstream": {"tls": {"profiles": [{"name": "mydata", "hosts": ["api.bank.example"]}]}},
    }))
    assert labels(Destination("http", "10.0.1.10", 8080)) == "api"
    assert labels(Destination("https", "10.0.1.11", 443)) == "api"
    assert labels(Destination("http", "10.0.1.10", 8081)) == "other"  # not the backend's port
    assert labels(Destination("https", "api.bank.example", 443)) == "upstream.tls.profiles[0] mydata"
    # The TLS profile applies to https only; plain http falls to the rule.
    assert labels(Destination("http", "api.bank.example", 80)) == "egress.rules[0] banks"
    assert labels(Destination("https", "www.bank.example", 443)) == "egress.rules[0] banks"
    # Rules by network only, and anything the client made up: "other".
    assert labels(Destination("http", "10.9.9.9", 80, ("10.9.9.9",))) == "other"
    assert labels(Destination("https", "attacker-chosen-name.example", 443)) == "other"


@pytest.mark.parametrize(
    "what, check",
    [
        ("untrusted issuer (self-signed certificate)", "untrusted"),
        ("hostname mismatch", "hostname"),
        ("certificate pin mismatch (AB:CD is not pinned)", "pin"),
        ("subject serialNumber is not 1234567890", "serial_number"),
        ("certificate expired", "expired"),
        ("certificate not yet valid", "not_yet_valid"),
        ("TLS version not accepted", "version"),
        ("the origin refused the handshake (client certificate required or rejected?)", "refused"),
        ("no certificate presented", "no_certificate"),
        ("certificate could not be checked (ValueError: x)", "unreadable_certificate"),
        ("certificate verification failed (X509 error 7)", "verification"),
        ("something new from openssl", "other"),
    ],
)
def test_tlsFailuresAreNamedByTheirCheck(what: str, check: str) -> None:
    assert tlsCheck(what) == check


# ---------------------------------------------------------------------------
# The upstream pool reports, in memory
# ---------------------------------------------------------------------------


class Receiver:
    def __init__(self) -> None:
        self.done: defer.Deferred = defer.Deferred()
        self.status = 0
        self.failure: UpstreamError | None = None

    def responseStarted(self, status, reason, fields, bodyLength, declaredLength) -> None:
        self.status = status

    def responseData(self, data: bytes) -> None:
        pass

    def responseFinished(self) -> None:
        self.done.callback(self.status)

    def responseFailed(self, failure: UpstreamError) -> None:
        self.failure = failure
        self.done.callback(failure.status)


class Body:
    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


ROUTED = settingsFrom({"reverse": {"routes": [{"name": "api", "prefix": "/api/", "backends": ["http://127.0.0.1:8001/"]}]}})


def memoryExchange(m: ProxyMetrics) -> tuple[MemoryReactorClock, UpstreamPool, Receiver]:
    clock = MemoryReactorClock()
    pool = UpstreamPool(clock, UpstreamSettings(), PLAIN_TLS, m.upstream(ROUTED))
    receiver = Receiver()
    exchange = UpstreamExchange(pool, b"GET / HTTP/1.1\r\nHost: b\r\n\r\n", BodyFraming.NONE, b"GET", receiver, Body())
    exchange.start(Destination("http", "127.0.0.1", 8001, ("127.0.0.1",)))
    return clock, pool, receiver


def connectInMemory(clock: MemoryReactorClock):
    protocol = clock.tcpClients[-1][2].buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 8001))
    protocol.makeConnection(transport)
    return protocol


def test_connectAndFirstByteAreTimedPerDestination() -> None:
    m = ProxyMetrics()
    clock, pool, receiver = memoryExchange(m)
    clock.advance(0.25)
    protocol = connectInMemory(clock)
    assert pool.idleConnections == 0 and pool.openConnections == 1
    clock.advance(0.5)
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-")
    clock.advance(2.0)  # the rest of the head and the body are not the first byte
    protocol.dataReceived(b"Length: 2\r\n\r\nok")
    assert receiver.done.called
    assert pool.idleConnections == 1
    assert value(m, "mydataproxy_upstream_connect_seconds_count", destination="api") == 1
    assert value(m, "mydataproxy_upstream_connect_seconds_sum", destination="api") == 0.25
    assert value(m, "mydataproxy_upstream_first_byte_seconds_count", destination="api") == 1
    assert value(m, "mydataproxy_upstream_first_byte_seconds_sum", destination="api") == 0.5
    assert value(m, "mydataproxy_upstream_tls_handshake_seconds_count", destination="api") == 0


def test_aTLSCheckFailureIsCountedByCheck() -> None:
    m = ProxyMetrics()
    clock, pool, receiver = memoryExchange(m)
    protocol = connectInMemory(clock)
    protocol.connectionLost(Failure(TLSCheckFailed("certificate pin mismatch (AB:CD is not pinned)")))
    assert receiver.failure is not None and receiver.failure.status == 502
    assert value(m, "mydataproxy_upstream_tls_failures_total", destination="api", check="pin") == 1


def test_dnsFailuresAreCountedByKind() -> None:
    m = ProxyMetrics()
    pool = UpstreamPool(MemoryReactorClock(), UpstreamSettings(), PLAIN_TLS, m.upstream(Settings()))
    where = Destination("http", "nowhere.example", 80)
    assert pool.describeConnectFailure(where, Failure(error.DNSLookupError("nowhere.example"))).status == 502
    assert pool.describeConnectFailure(where, Failure(ResolutionTimeout("nowhere.example"))).status == 504
    assert pool.describeConnectFailure(where, Failure(error.ConnectionRefusedError())).status == 502
    assert value(m, "mydataproxy_dns_failures_total", kind="not_found") == 1
    assert value(m, "mydataproxy_dns_failures_total", kind="timeout") == 1


# ---------------------------------------------------------------------------
# The upstream pool reports, over real loopback sockets
# ---------------------------------------------------------------------------


def realPool(m: ProxyMetrics, ca_pem: Path) -> tuple[UpstreamPool, str]:
    profile = "upstream.tls.profiles[0] local"
    settings = settingsFrom({"upstream": {"tls": {"profiles": [{"name": "local", "hosts": ["127.0.0.1"]}]}}})
    assert settings.upstream.tls_profiles[0].name == profile
    tls = OriginTLS(OriginTLSProfile(trust_store=StoreRef(str(ca_pem))), (
        OriginTLSProfile(name=profile, hosts=("127.0.0.1",), trust_store=StoreRef(str(ca_pem))),
    ))
    return UpstreamPool(reactor, UpstreamSettings(), tls, m.upstream(settings)), profile


def fetch(pool: UpstreamPool, scheme: str, port: int) -> defer.Deferred:
    receiver = Receiver()
    exchange = UpstreamExchange(
        pool, b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", BodyFraming.NONE, b"GET", receiver, Body()
    )
    exchange.start(Destination(scheme, "127.0.0.1", port, ("127.0.0.1",)))
    return receiver.done


@pytest_twisted.ensureDeferred
async def test_realTLSOriginsAreTimedAndTheirFailuresNamed(ca_pem, origin, tls_origin, wrong_name_tls_origin) -> None:
    m = ProxyMetrics()
    pool, profile = realPool(m, ca_pem)
    try:
        assert await fetch(pool, "https", tls_origin.port) == 200
        assert await fetch(pool, "https", tls_origin.port) == 200  # pooled: no new connect or handshake
        assert await fetch(pool, "http", origin.port) == 200
        assert await fetch(pool, "https", wrong_name_tls_origin.port) == 502
    finally:
        pool.closeIdle()
    got = samples(m)
    assert got[("mydataproxy_upstream_connect_seconds_count", (("destination", profile),))] == 2
    assert got[("mydataproxy_upstream_tls_handshake_seconds_count", (("destination", profile),))] == 2
    assert 0 < got[("mydataproxy_upstream_tls_handshake_seconds_sum", (("destination", profile),))] < 5
    assert got[("mydataproxy_upstream_first_byte_seconds_count", (("destination", profile),))] == 2
    # Plain http to the same host is not the TLS profile's: no rule names it.
    assert got[("mydataproxy_upstream_first_byte_seconds_count", (("destination", "other"),))] == 1
    assert got[("mydataproxy_upstream_tls_failures_total", (("check", "hostname"), ("destination", profile)))] == 1


# ---------------------------------------------------------------------------
# The request path counts into the daemon's metrics
# ---------------------------------------------------------------------------


class AccessRecorder:
    def __init__(self) -> None:
        self.records: list[dict] = []

    def record(self, **kw) -> None:
        self.records.append(kw)


def forwardChannel():
    clock = MemoryReactorClock()
    settings = Settings()
    pipeline = RequestPipeline(settings, Resolver(clock, settings.resolver), None, clock)
    access = AccessRecorder()
    proxy = ForwardProxy(settings, pipeline, UpstreamPool(clock, settings.upstream, PLAIN_TLS), access, clock)
    channel = proxy.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
    channel.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555)))
    return channel, access


def test_everyAccessLineOfTheRequestPathIsCounted() -> None:
    def daemon(**labels: str) -> float:
        return METRICS.registry.get_sample_value("mydataproxy_requests_total", labels) or 0

    header = dict(mode="header", method="safe", status="403")
    absolute = dict(mode="absolute", method="unsafe", status="403")
    before = daemon(**header), daemon(**absolute)
    channel, access = forwardChannel()
    channel.dataReceived(b"GET /v1/accounts HTTP/1.1\r\nHost: p\r\n\r\n")  # no x-target-host
    channel.dataReceived(b"POST http://h.example:25/ HTTP/1.1\r\nHost: h.example\r\nContent-Length: 0\r\n\r\n")
    assert [r["status"] for r in access.records] == [403, 403]
    assert (daemon(**header), daemon(**absolute)) == (before[0] + 1, before[1] + 1)


# ---------------------------------------------------------------------------
# The request families, counted by ProxyMetrics itself, read as
# prometheus_client's own Counter and Histogram would write them
# ---------------------------------------------------------------------------

_REQUEST_FAMILY_NAMES = (
    "mydataproxy_requests", "mydataproxy_request_duration_seconds",
    "mydataproxy_client_received_bytes", "mydataproxy_client_sent_bytes",
)


# The buckets the request durations always had.
_REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class OracleRequests:
    """
    The request families as they were kept before: prometheus_client's
    children, bound once per key (the labels as the module makes them).
    """

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "mydataproxy_requests", "Requests answered, by mode, method class and status",
            ["mode", "method", "status"], registry=registry,
        )
        self.requestSeconds = Histogram(
            "mydataproxy_request_duration_seconds", "Time from a request's head to its access line, by mode",
            ["mode"], buckets=_REQUEST_BUCKETS, registry=registry,
        )
        self.receivedBytes = Counter(
            "mydataproxy_client_received_bytes", "Body bytes received from clients, by mode", ["mode"], registry=registry
        )
        self.sentBytes = Counter(
            "mydataproxy_client_sent_bytes", "Body bytes sent to clients, by mode", ["mode"], registry=registry
        )
        self._children: dict[tuple[str, str, int], tuple] = {}

    def requestFinished(self, mode: str, method: bytes, status: int, seconds: float, bytesIn: int, bytesOut: int) -> None:
        methodClass = metricsModule._METHOD_CLASSES.get(method, "unsafe")
        key = (mode, methodClass, status)
        children = self._children.get(key)
        if children is None:
            label = metricsModule._STATUS_LABELS[status] if 0 <= status < 600 else "none"
            children = self._children[key] = (
                self.requests.labels(mode, methodClass, label),
                self.requestSeconds.labels(mode),
                self.receivedBytes.labels(mode),
                self.sentBytes.labels(mode),
            )
        count, duration, received, sent = children
        count.inc()
        duration.observe(seconds)
        if bytesIn:
            received.inc(bytesIn)
        if bytesOut:
            sent.inc(bytesOut)


class Families:
    """A registry's stand-in for the exposition encoders: the given families."""

    def __init__(self, families: list) -> None:
        self.families = families

    def collect(self) -> list:
        return self.families


def requestExpositions(registry: CollectorRegistry, names: Iterable[str] = _REQUEST_FAMILY_NAMES) -> tuple[str, str]:
    """The families C{names} (the request families) in the text and the OpenMetrics formats, every C{_created} time as C{T}."""
    families = Families([f for f in registry.collect() if f.name in names])
    texts = generate_latest(families).decode(), openmetrics.generate_latest(families).decode()
    return tuple(re.sub(r"^(\S+_created(?:\{[^}]*\})?) \S+$", r"\1 T", text, flags=re.MULTILINE) for text in texts)


_TRAFFIC = st.lists(st.tuples(
    st.sampled_from(["absolute", "header", "connect", "reverse"]),
    st.sampled_from([b"GET", b"HEAD", b"POST", b"CONNECT", b"OPTIONS", b"BREW", b""]),
    st.one_of(st.sampled_from([0, 200, 418, 499, 502, 600]), st.integers(-5, 1000)),
    st.one_of(st.sampled_from(_REQUEST_BUCKETS), st.floats(min_value=0, max_value=300)),
    st.integers(0, 2**40),
    st.integers(0, 2**40),
), max_size=40)


@given(_TRAFFIC)
def test_requestFamiliesAreWrittenAsPrometheusClientWroteThem(traffic: list[tuple]) -> None:
    m, oracle = ProxyMetrics(), OracleRequests()
    for request in traffic:
        m.requestFinished(*request)
        oracle.requestFinished(*request)
    assert requestExpositions(m.registry) == requestExpositions(oracle.registry)


def test_requestFamiliesKeepTheirNamesInTheRegistry() -> None:
    m = ProxyMetrics()
    with pytest.raises(ValueError):
        Counter("mydataproxy_requests", "a second one", registry=m.registry)
    with pytest.raises(ValueError):
        Histogram("mydataproxy_request_duration_seconds", "a second one", registry=m.registry)


_UPSTREAM_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@given(st.lists(st.tuples(
    st.sampled_from(["other", "api", "bank.example"]),
    st.one_of(st.sampled_from(_UPSTREAM_BUCKETS), st.floats(min_value=0, max_value=300)),
), max_size=40))
def test_firstByteTimesAreWrittenAsPrometheusClientWroteThem(observations: list[tuple[str, float]]) -> None:
    m, registry = ProxyMetrics(), CollectorRegistry()
    oracle = Histogram(
        "mydataproxy_upstream_first_byte_seconds",
        "Time from a request head written to an origin to the first byte of its response, by destination",
        ["destination"], buckets=_UPSTREAM_BUCKETS, registry=registry,
    )
    for label, seconds in observations:
        m.firstByte(label, seconds)
        oracle.labels(label).observe(seconds)
    names = {"mydataproxy_upstream_first_byte_seconds"}
    assert requestExpositions(m.registry, names) == requestExpositions(registry, names)

