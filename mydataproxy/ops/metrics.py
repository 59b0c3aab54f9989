"""
The daemon's Prometheus metrics (C{prometheus_client}), defined once in
L{ProxyMetrics} on a registry of its own; L{METRICS} is the process's.

Every label set is bounded, never raw client input: the mode (C{absolute},
C{header}, C{connect}, C{reverse}), the method class (C{safe}, C{unsafe},
C{connect}), the status (the codes in L{_EXACT_STATUSES}, else their class,
C{1xx} .. C{5xx}; C{none} when no answer was written), the destination (the
reverse route, TLS profile or egress rule a destination belongs to, else
C{other}: L{DestinationLabels}), the rule of a refusal (at most
L{MAX_REFUSAL_RULES} distinct, then C{other}), the check a TLS handshake
failed (L{tlsCheck}).

The hot path is cheap: the request families (count, duration, body bytes)
are counted here, in plain floats bound once per (mode, method class,
status), and turned into families only when scraped
(L{ProxyMetrics._collectRequests}); so is the time to an origin's first
byte, per destination.  prometheus_client takes a lock and
checks the child on every C{inc} and C{observe}, five times a request;
no lock is needed here, as the reactor thread is the only one that counts
and the only one that scrapes.  Values that already live elsewhere (open
connections, tunnels, pool connections, queue depths, lines a log dropped,
certificate expiry) are read when scraped, from what the daemon registered
with the C{watch*} methods; scrapes run on the reactor thread
(L{mydataproxy.ops.admin}), so reading the reactor's state is safe.

With workers (L{mydataproxy.workers}) each process keeps its own metrics;
L{parseExposition} reads a worker's exposition back and L{aggregate} sums
the processes' families into one view, by what each family means.
"""

from __future__ import annotations

import itertools
import operator
import os
import platform
import time
from bisect import bisect_left
from importlib.metadata import PackageNotFoundError, version
from typing import Callable, Iterable, Iterator, Protocol, Sized

import twisted
from cryptography import x509
from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from mydataproxy.config import Settings
from mydataproxy.http.hosts import hostMatches
from mydataproxy.http.target import Destination

# Codes shown exactly (the proxy's own answers and the common ones); the
# rest are counted by class.
_EXACT_STATUSES = frozenset(
    {101, 200, 201, 204, 206, 301, 302, 304, 307, 308, 400, 401, 403, 404, 405, 407, 408, 413, 414, 429, 431,
     500, 502, 503, 504}
)
_STATUS_LABELS = tuple(
    "none" if code < 100 else str(code) if code in _EXACT_STATUSES else f"{code // 100}xx" for code in range(600)
)
_METHOD_CLASSES = {b"GET": "safe", b"HEAD": "safe", b"OPTIONS": "safe", b"TRACE": "safe", b"CONNECT": "connect"}

MAX_REFUSAL_RULES = 200

_REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_REQUEST_BOUNDS = (*_REQUEST_BUCKETS, float("inf"))
_REQUEST_LE = tuple(floatToGoString(bound) for bound in _REQUEST_BOUNDS)
_UPSTREAM_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_UPSTREAM_BOUNDS = (*_UPSTREAM_BUCKETS, float("inf"))
_UPSTREAM_LE = tuple(floatToGoString(bound) for bound in _UPSTREAM_BOUNDS)
_FIRST_BYTE = (
    "mydataproxy_upstream_first_byte_seconds",
    "Time from a request head written to an origin to the first byte of its response, by destination",
)
_QUEUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# Whether prometheus_client writes _created samples: its documented switch,
# read as it reads it, so the request families are written as its own would be.
_CREATED = os.environ.get("PROMETHEUS_DISABLE_CREATED_SERIES", "False").lower() not in ("true", "1", "t")
# The request families ProxyMetrics counts itself: family, name, help, labels.
_REQUEST_FAMILIES = (
    (CounterMetricFamily, "mydataproxy_requests", "Requests answered, by mode, method class and status",
     ["mode", "method", "status"]),
    (HistogramMetricFamily, "mydataproxy_request_duration_seconds",
     "Time from a request's head to its access line, by mode", ["mode"]),
    (CounterMetricFamily, "mydataproxy_client_received_bytes", "Body bytes received from clients, by mode", ["mode"]),
    (CounterMetricFamily, "mydataproxy_client_sent_bytes", "Body bytes sent to clients, by mode", ["mode"]),
)

# What describeHandshakeFailure and OriginTLS.checkPeer say, to the check's name.
_TLS_CHECKS = (
    ("untrusted issuer", "untrusted"),
    ("hostname mismatch", "hostname"),
    ("certificate pin mismatch", "pin"),
    ("subject serialnumber", "serial_number"),
    ("certificate expired", "expired"),
    ("certificate not yet valid", "not_yet_valid"),
    ("tls version not accepted", "version"),
    ("the origin refused the handshake", "refused"),
    ("no certificate presented", "no_certificate"),
    ("certificate could not be checked", "unreadable_certificate"),
    ("certificate verification failed", "verification"),
)


def requestMode(section: str, method: bytes, target: bytes) -> str:
    """
    The mode label of a request to the listener of config section
    C{section}, from its method and raw request target (as
    L{mydataproxy.http.target.parseTarget} tells the forms apart).
    """
    if section == "reverse":
        return "reverse"
    if method == b"CONNECT":
        return "connect"
    return "header" if target[:1] == b"/" else "absolute"


def tlsCheck(what: str) -> str:
    """The name of the check a failed origin handshake failed, from how it was described."""
    text = what.lower()
    for words, check in _TLS_CHECKS:
        if text.startswith(words):
            return check
    return "other"


def buildVersion() -> str:
    """This package's version, from its installed metadata."""
    try:
        return version("mydataproxy")
    except PackageNotFoundError:
        return "unknown"


class _OpenCount(Protocol):
    open: int


class WatchedListener(Protocol):
    """What the metrics read of a listener (L{mydataproxy.server.channel.ProxyListener})."""

    connections: _OpenCount
    tunnels: Sized


class WatchedPool(Protocol):
    """What the metrics read of the upstream pool (L{mydataproxy.upstream.client.UpstreamPool})."""

    openConnections: int
    idleConnections: int
    queued: int
    rejected: int


class WatchedLog(Protocol):
    """What the metrics read of a log (L{mydataproxy.ops.logs.AccessLog}, L{mydataproxy.ops.logs.LogWriter})."""

    dropped: int
    lost: int


class _Count:
    """One series of C{mydataproxy_requests}: its count, and when it was first counted."""

    __slots__ = ("value", "created")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()


class _Timings:
    """One series of a histogram counted here: a count per bucket of C{bounds} (not cumulative), their sum."""

    __slots__ = ("bounds", "buckets", "seconds", "created")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.buckets = [0.0] * len(bounds)
        self.seconds = 0.0
        self.created = time.time()

    def observe(self, seconds: float) -> None:
        # Prometheus' bucket: the first bound not below the value.
        self.buckets[bisect_left(self.bounds, seconds)] += 1
        self.seconds += seconds


class _ModeCounts(_Timings):
    """
    One mode's series: its request durations (over L{_REQUEST_BOUNDS}), the
    body bytes received and sent.
    """

    __slots__ = ("received", "sent")

    def __init__(self) -> None:
        super().__init__(_REQUEST_BOUNDS)
        self.received = self.sent = 0.0


class ProxyMetrics:
    """
    The proxy's metrics, on C{registry} (a new one if not given): build one
    per test, L{METRICS} for the daemon.
    """

    def __init__(self, registry: CollectorRegistry | None = None, now: Callable[[], float] = time.time) -> None:
        self.registry = registry = registry if registry is not None else CollectorRegistry()
        self._now = now
        self._requestSeries: dict[tuple[str, str, int], tuple[_Count, _ModeCounts]] = {}
        self._requestCounts: dict[tuple[str, str, str], _Count] = {}
        self._modeCounts: dict[str, _ModeCounts] = {}
        registry.register(_Collector(self._collectRequests, _requestFamilies))
        self.connectSeconds = Histogram(
            "mydataproxy_upstream_connect_seconds", "Time to open a TCP connection to an origin, by destination",
            ["destination"], buckets=_UPSTREAM_BUCKETS, registry=registry,
        )
        self.handshakeSeconds = Histogram(
            "mydataproxy_upstream_tls_handshake_seconds", "Time of the TLS handshake with an origin, by destination",
            ["destination"], buckets=_UPSTREAM_BUCKETS, registry=registry,
        )
        # Observed once per exchange: counted like the request families.
        self._firstBytes: dict[str, _Timings] = {}
        registry.register(_Collector(self._collectFirstBytes, self._firstByteFamilies))
        self.tlsFailures = Counter(
            "mydataproxy_upstream_tls_failures", "Failed TLS handshakes with origins, by destination and check",
            ["destination", "check"], registry=registry,
        )
        self.dnsFailures = Counter(
            "mydataproxy_dns_failures", "Names that did not resolve (not_found) or not in time (timeout)",
            ["kind"], registry=registry,
        )
        self.refusals = Counter(
            "mydataproxy_refusals", "Requests and connections the proxy refused, by the rule that decided",
            ["rule"], registry=registry,
        )
        self.queueWaitSeconds = Histogram(
            "mydataproxy_queue_wait_seconds", "Time spent waiting for a turn, by queue", ["queue"],
            buckets=_QUEUE_BUCKETS, registry=registry,
        )
        Info("mydataproxy_build", "The running version", registry=registry).info(
            {"version": buildVersion(), "python": platform.python_version(), "twisted": twisted.__version__}
        )
        ProcessCollector(registry=registry)
        self._queueChildren: dict[str, object] = {}
        self._refusalChildren: dict[str, object] = {}
        self._listeners: dict[str, WatchedListener] = {}
        self._pool: WatchedPool | None = None
        self._queues: dict[str, Callable[[], int]] = {}
        self._logs: dict[str, WatchedLog] = {}
        self._certificates: dict[str, dict[str, float]] = {}
        registry.register(_Collector(self._collect))

    # Counted as it happens

    def requestFinished(
        self, mode: str, method: bytes, status: int, seconds: float, bytesIn: int, bytesOut: int
    ) -> None:
        """
        Count a request whose access line is written.

        @param mode: From L{requestMode}.
        @param status: The status answered, 0 if none.
        @param seconds: Not NaN (a difference of monotonic times).
        """
        key = (mode, _METHOD_CLASSES.get(method, "unsafe"), status)
        series = self._requestSeries.get(key)
        if series is None:
            series = self._bindRequest(key)
        count, counts = series
        count.value += 1
        counts.observe(seconds)
        counts.received += bytesIn
        counts.sent += bytesOut

    def _bindRequest(self, key: tuple[str, str, int]) -> tuple[_Count, _ModeCounts]:
        mode, methodClass, status = key
        label = _STATUS_LABELS[status] if 0 <= status < 600 else "none"
        series = self._requestSeries[key] = (
            self._requestCounts.setdefault((mode, methodClass, label), _Count()),
            self._modeCounts.setdefault(mode, _ModeCounts()),
        )
        return series

    def refused(self, rule: str) -> None:
        """Count a refusal by C{rule} (the setting named by a L{mydataproxy.http.target.Refusal})."""
        child = self._refusalChildren.get(rule)
        if child is None:
            if len(self._refusalChildren) >= MAX_REFUSAL_RULES:
                child = self.refusals.labels("other")
            else:
                child = self._refusalChildren[rule] = self.refusals.labels(rule or "none")
        child.inc()

    def observeQueueWait(self, queue: str, seconds: float) -> None:
        """A request waited C{seconds} in C{queue} (a configured name, e.g. a route's) for its turn."""
        child = self._queueChildren.get(queue)
        if child is None:
            child = self._queueChildren[queue] = self.queueWaitSeconds.labels(queue)
        child.observe(seconds)

    def upstream(self, settings: Settings) -> UpstreamMetrics:
        """The observer of an upstream pool for the destinations of C{settings}."""
        return UpstreamMetrics(self, DestinationLabels(settings))

    # Read when scraped

    def watchListener(self, name: str, listener: WatchedListener) -> None:
        """Report C{listener}'s open client connections and tunnels as listener C{name}."""
        self._listeners[name] = listener

    def watchPool(self, pool: WatchedPool) -> None:
        """Report C{pool}'s connections in use and idle, its waiters and its refusals."""
        self._pool = pool

    def watchQueue(self, queue: str, depth: Callable[[], int]) -> None:
        """Report C{depth()}, the requests waiting in C{queue}."""
        self._queues[queue] = depth

    def watchLog(self, name: str, log: WatchedLog) -> None:
        """Report the lines C{log} dropped (queue full) and lost (write failed)."""
        self._logs[name] = log

    def setCertificates(self, store: str, certificates: Iterable[x509.Certificate]) -> None:
        """
        Report the seconds to expiry of C{certificates}, those of C{store}
        (replacing what was reported for it); per subject, the one that
        expires first.
        """
        expiries: dict[str, float] = {}
        for certificate in certificates:
            subject = certificate.subject.rfc4514_string()
            notAfter = certificate.not_valid_after_utc.timestamp()
            expiries[subject] = min(notAfter, expiries.get(subject, notAfter))
        self._certificates[store] = expiries

    def _collectRequests(self) -> Iterator[Metric]:
        requests, duration, received, sent = _requestFamilies()
        for labels, count in self._requestCounts.items():
            requests.add_metric(labels, count.value, count.created if _CREATED else None)
        for mode, counts in self._modeCounts.items():
            created = counts.created if _CREATED else None
            duration.add_metric([mode], list(zip(_REQUEST_LE, itertools.accumulate(counts.buckets))), counts.seconds)
            if _CREATED:
                duration.samples.append(Sample(duration.name + "_created", {"mode": mode}, created))
            received.add_metric([mode], counts.received, created)
            sent.add_metric([mode], counts.sent, created)
        yield requests
        yield duration
        yield received
        yield sent

    def firstByte(self, label: str, seconds: float) -> None:
        """An origin of destination C{label} sent its first response byte C{seconds} after the request head."""
        timings = self._firstBytes.get(label)
        if timings is None:
            timings = self._firstBytes[label] = _Timings(_UPSTREAM_BOUNDS)
        timings.observe(seconds)

    def _firstByteFamilies(self) -> list[Metric]:
        return [HistogramMetricFamily(*_FIRST_BYTE, labels=["destination"])]

    def _collectFirstBytes(self) -> Iterator[Metric]:
        [family] = self._firstByteFamilies()
        for label, timings in self._firstBytes.items():
            family.add_metric([label], list(zip(_UPSTREAM_LE, itertools.accumulate(timings.buckets))), timings.seconds)
            if _CREATED:
                family.samples.append(Sample(family.name + "_created", {"destination": label}, timings.created))
        yield family

    def _collect(self) -> Iterator[Metric]:
        connections = GaugeMetricFamily(
            "mydataproxy_client_connections", "Client connections open, by listener", labels=["listener"]
        )
        tunnels = GaugeMetricFamily(
            "mydataproxy_tunnels", "Tunnels open (CONNECT, websocket), by listener", labels=["listener"]
        )
        for name, listener in self._listeners.items():
            connections.add_metric([name], listener.connections.open)
            tunnels.add_metric([name], len(listener.tunnels))
        yield connections
        yield tunnels
        queues = GaugeMetricFamily("mydataproxy_queue_depth", "Requests waiting for a turn, by queue", labels=["queue"])
        pool = self._pool
        if pool is not None:
            idle = pool.idleConnections
            family = GaugeMetricFamily(
                "mydataproxy_upstream_pool_connections", "Upstream connections, in use (or opening) and idle",
                labels=["state"],
            )
            family.add_metric(["in_use"], pool.openConnections - idle)
            family.add_metric(["idle"], idle)
            yield family
            yield CounterMetricFamily(
                "mydataproxy_upstream_pool_rejected", "Requests refused a connection (503): too many waiting, or none free in time",
                value=pool.rejected,
            )
            queues.add_metric(["upstream pool"], pool.queued)
        for name, depth in self._queues.items():
            queues.add_metric([name], depth())
        yield queues
        dropped = CounterMetricFamily(
            "mydataproxy_log_lines_dropped",
            "Log lines not written: the queue was full (dropped) or the write failed (lost)",
            labels=["log", "why"],
        )
        for name, watched in self._logs.items():
            dropped.add_metric([name, "dropped"], watched.dropped)
            dropped.add_metric([name, "lost"], watched.lost)
        yield dropped
        expiry = GaugeMetricFamily(
            "mydataproxy_certificate_expiry_seconds",
            "Seconds until a certificate expires (negative: expired), by store and subject",
            labels=["store", "subject"],
        )
        now = self._now()
        for store, expiries in self._certificates.items():
            for subject, notAfter in expiries.items():
                expiry.add_metric([store, subject], notAfter - now)
        yield expiry


def _requestFamilies() -> list[Metric]:
    """The request families, without samples yet."""
    return [family(name, text, labels=labels) for family, name, text, labels in _REQUEST_FAMILIES]


class _Collector:
    """
    A collector of families L{ProxyMetrics} makes when scraped; C{describe}
    names those the registry keeps the names of (as it does its own metrics').
    """

    def __init__(
        self, collect: Callable[[], Iterable[Metric]], describe: Callable[[], Iterable[Metric]] = lambda: (),
    ) -> None:
        self.collect = collect
        self.describe = describe


class DestinationLabels:
    """
    The destination label of an origin: the reverse route whose backend it
    is, else (https) the TLS profile whose C{hosts} match it, else the
    egress rule whose C{hosts} match it, else C{other}.  Only configured
    names come out.
    """

    def __init__(self, settings: Settings) -> None:
        self._backends: dict[tuple[str, str, int], str] = {}
        for route in settings.reverse.routes if settings.reverse is not None else ():
            for backend in route.backends:
                self._backends.setdefault((backend.scheme, backend.host, backend.port), route.name)
        self._profiles = tuple((p.hosts, p.name) for p in settings.upstream.tls_profiles if p.hosts)
        self._rules = tuple((r.hosts, r.name) for r in settings.egress.rules if r.hosts)

    def __call__(self, destination: Destination) -> str:
        host = destination.host
        route = self._backends.get((destination.scheme, host, destination.port))
        if route is not None:
            return route
        if destination.scheme == "https":
            for hosts, name in self._profiles:
                if hostMatches(hosts, host):
                    return name
        for hosts, name in self._rules:
            if hostMatches(hosts, host):
                return name
        return "other"


class UpstreamMetrics:
    """
    What an upstream pool reports (L{mydataproxy.upstream.client.UpstreamObserver}),
    counted on L{ProxyMetrics}.
    """

    def __init__(self, metrics: ProxyMetrics, labels: DestinationLabels) -> None:
        self._metrics = metrics
        self.destinationLabel = labels
        self._timings: dict[str, tuple] = {}
        self._dns = {kind: metrics.dnsFailures.labels(kind) for kind in ("not_found", "timeout")}

    def _children(self, label: str) -> tuple:
        children = self._timings.get(label)
        if children is None:
            metrics = self._metrics
            children = self._timings[label] = (
                metrics.connectSeconds.labels(label),
                metrics.handshakeSeconds.labels(label),
            )
        return children

    def connected(self, label: str, seconds: float) -> None:
        """A TCP connection to an origin of C{label} took C{seconds}."""
        self._children(label)[0].observe(seconds)

    def handshaken(self, label: str, seconds: float) -> None:
        """A TLS handshake with an origin of C{label} took C{seconds}."""
        self._children(label)[1].observe(seconds)

    def firstByte(self, label: str, seconds: float) -> None:
        """The first response byte from an origin of C{label} came C{seconds} after the request head."""
        self._metrics.firstByte(label, seconds)

    def tlsFailed(self, label: str, what: str) -> None:
        """A TLS handshake with an origin of C{label} failed, as C{what} says."""
        self._metrics.tlsFailures.labels(label, tlsCheck(what)).inc()

    def dnsFailed(self, timedOut: bool) -> None:
        """A name did not resolve (in time, if C{timedOut})."""
        self._dns["timeout" if timedOut else "not_found"].inc()


#: The daemon's metrics.
METRICS = ProxyMetrics()


# Gauges that are the same fact in every process, not a part of a total:
# combined, never summed (a certificate's expiry: the soonest one).
_GAUGE_COMBINATIONS: dict[str, Callable[[float, float], float]] = {
    "mydataproxy_certificate_expiry_seconds": min,
    "process_start_time_seconds": min,
    "process_max_fds": min,
}
# Families whose samples only grow while a process lives (what its last
# exposition adds to the total once it has exited).
_CUMULATIVE_TYPES = frozenset({"counter", "histogram", "summary"})


# Families that state facts rather than amounts: the first process's stand.
_FACT_TYPES = frozenset({"info", "stateset", "unknown"})


def _combination(family: Metric, sample: str) -> Callable[[float, float], float]:
    if sample.endswith("_created"):
        return min
    if family.type == "gauge":
        return _GAUGE_COMBINATIONS.get(family.name, operator.add)
    return operator.add


def parseExposition(text: str) -> list[Metric]:
    """
    The families of an OpenMetrics text exposition (a worker's C{/metrics}
    asked for C{application/openmetrics-text}).

    @raise ValueError: If C{text} is not one.
    """
    return list(text_string_to_metric_families(text))


def cumulative(families: Iterable[Metric]) -> list[Metric]:
    """The counters, histograms and summaries of C{families}: what stays counted after a process exits."""
    return [family for family in families if family.type in _CUMULATIVE_TYPES]


def aggregate(expositions: Iterable[Iterable[Metric]]) -> list[Metric]:
    """
    One view of several processes' metric families, sample by sample (same
    name, same labels): counters, histograms (buckets, sums, counts),
    summaries and additive gauges (connections, queue depths, memory)
    summed; a C{_created} sample the earliest; the gauges of
    L{_GAUGE_COMBINATIONS} combined as said there; info, stateset and
    unknown families as the first process that has them says.  A family
    whose type differs from the first one seen under its name is left out.
    """
    merged: dict[str, tuple[Metric, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
    for families in expositions:
        for family in families:
            seen = family.name in merged
            kept, values = merged.setdefault(family.name, (family, {}))
            if family.type != kept.type or (seen and kept.type in _FACT_TYPES):
                continue
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key in values:
                    values[key] = _combination(kept, sample.name)(values[key], sample.value)
                else:
                    values[key] = sample.value
    result = []
    for name, (kept, values) in merged.items():
        family = Metric(name, kept.documentation, kept.type, kept.unit)
        for (sample, labels), value in values.items():
            family.add_sample(sample, dict(labels), value)
        result.append(family)
    return result
