"""
Scale-out behind a balancer (issue 11): two MyData Proxy instances, A and B,
behind a real Apache httpd (C{etc/apache/mydataproxy-balancer.conf}:
mod_proxy_balancer in front of the reverse listeners) and behind a real
HAProxy (C{etc/haproxy/mydataproxy.cfg}: mode http in front of the reverse
listeners, mode tcp with the PROXY protocol in front of the forward
listeners), each sample loaded as shipped (tests/apache.py, tests/haproxy.py).

Under a bounded load (per front, keep-alive clients sending fast requests and
clients whose every request waits a second at the origin), one instance is
  - drained (SIGTERM) while slow requests are in flight on it: every
    response is a 200, every request reached the origin once, A served
    requests before and none after, B served the rest, A exits cleanly (and,
    through HAProxy, a CONNECT tunnel on A carries an HTTPS exchange after the
    SIGTERM, and A is marked down by its checks);
  - killed (SIGKILL) while slow requests are in flight on it: only requests
    started before its death fail, at most one per client, and every request
    started after it succeeds on B at once (see C{*_AT_ONCE_SECONDS}).
Besides: each balancer's plain and TLS fronts tell the instances the scheme
and port, and a tunnel through HAProxy and the PROXY protocol listener keeps
the client's half-close.

Which instance carried a request is read at the origin as the request
arrives: on the reverse side each instance's routes lead under its own name
(C{/slow/<tag>} to C{/delay/MS/a/<tag>}, C{/fast/<tag>} to C{/a/<tag>}); on
the forward side every request carries both marker fields C{x-instance-a}
and C{x-instance-b}, and each instance drops the other's (C{header_filter}).
"""

from __future__ import annotations

import hashlib
import re
import signal
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from apache import ApacheProcess, apache_binary, start_balancer
from conftest import (LOOPBACK, OriginProcess, ProxyProcess, RawConnection, build_request, default_config,
                      get_free_port)
from haproxy import HAProxyProcess, Instance, haproxy_binary, start_haproxy
from recording_origin import RecordingOrigin

# twistd ends with the signal that stopped it (Twisted re-raises it after a
# clean shutdown), which systemd counts as a clean exit for SIGTERM.
CLEAN_EXIT = (0, -signal.SIGTERM)
# Per front: clients sending fast requests, and clients whose every request
# waits SLOW_MS at the origin.
FAST_CLIENTS = 4
SLOW_CLIENTS = 2
SLOW_MS = 1000
WARMUP_SECONDS = 0.8
AFTER_SECONDS = 1.2
# "At once": after a kill, no fast request (answered in milliseconds) takes
# longer than this. Apache: a refused connection fails over within the same
# request. HAProxy: likewise (redispatch, and the instance is marked down at
# its first refused connection); a request whose retry comes in the moment
# the dead instance is marked down waits the turn-around of min(timeout
# connect, 1 s) that HAProxy keeps for a backend with one server left. Not at
# once would be waiting for the health checks (fall x inter: 4 s in the
# HAProxy sample, hcfails x hcinterval: 5 s in Apache's).
APACHE_AT_ONCE_SECONDS = 1.0
HAPROXY_AT_ONCE_SECONDS = 1.5


# ---------------------------------------------------------------------------
# The two instances
# ---------------------------------------------------------------------------


class BalancedProxy(ProxyProcess):
    """One instance behind the balancer; C{role} is C{"a"} or C{"b"}."""

    role = ""

    @property
    def ports(self) -> Instance:
        admin = int(self.config["admin"]["listen"].split(":")[1])
        return Instance(self.port, self.reverse_port, admin)

    def metric(self, name: str) -> float:
        """The sum of C{name}'s samples on the admin listener's /metrics."""
        text = requests.get(f"http://{LOOPBACK}:{self.ports.admin_port}/metrics", timeout=5).text
        return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE))


def start_instance(workdir: Path, role: str, origin: RecordingOrigin, ca_pem: Path, connect_ports, dns) -> BalancedProxy:
    """Instance C{role} (its route to the origin's C{/role/}, dropping the other's marker field)."""
    other = "b" if role == "a" else "a"
    for _attempt in range(3):  # a free port may be taken in between
        forward, reverse, admin = get_free_port(), get_free_port(), get_free_port()
        config = default_config(
            forward, workdir / "access.log", connect_ports, dns,
            forward={"listen": f"haproxy:tcp:{forward}:interface={LOOPBACK}",
                     "header_filter": ["x-target-host", f"x-instance-{other}"]},
            reverse={"listen": f"tcp:{reverse}:interface={LOOPBACK}", "trusted_proxies": ["127.0.0.1/32"],
                     "routes": [{"prefix": "/slow/", "name": "slow", "backends": [f"{origin.url}/delay/{SLOW_MS}/{role}/"]},
                                {"prefix": "/fast/", "name": "fast", "backends": [f"{origin.url}/{role}/"]}]},
            admin={"listen": f"tcp:{admin}:interface={LOOPBACK}"},
            daemon={"shutdown_timeout": 10.0},
        )
        try:
            instance = BalancedProxy(workdir, config, {"SSL_CERT_FILE": str(ca_pem)})
        except RuntimeError as e:
            if "Address already in use" in str(e) or "CannotListen" in str(e):
                continue
            raise
        instance.role = role
        return instance
    raise RuntimeError(f"instance {role}: no free ports in three attempts")


@pytest.fixture
def recording() -> Iterator[RecordingOrigin]:
    """The origin behind both instances (C{origin} is the session's own)."""
    origin = RecordingOrigin()
    yield origin
    origin.close()


@pytest.fixture
def pair(tmp_path, recording, ca_pem, session_connect_ports, dns_server) -> Iterator[tuple[BalancedProxy, BalancedProxy]]:
    """Instances A and B; stopped after the test (an instance still running must stop cleanly)."""
    started = []
    try:
        for role in ("a", "b"):
            started.append(start_instance(tmp_path / role, role, recording, ca_pem, session_connect_ports, dns_server))
        yield started[0], started[1]
    finally:
        codes = {each.role: each.stop() for each in started}
    assert None not in codes.values(), f"an instance ignored SIGTERM for 10 s: {codes}"


# ---------------------------------------------------------------------------
# The load
# ---------------------------------------------------------------------------


@dataclass
class Record:
    """One request of the load, as its client saw it."""

    front: str
    tag: str
    slow: bool
    started: float
    ended: float = 0.0
    status: int | None = None
    error: str = ""


@dataclass(frozen=True)
class Front:
    """How a client reaches the instances through the balancer."""

    name: str
    # (session, tag, slow) -> the response to one request.
    request: Callable[[requests.Session, str, bool], requests.Response]


def reverse_front(port: int) -> Front:
    """
    Requests to the balancer's HTTP front on C{port}, routed by the
    instances' reverse listeners: C{/slow/<tag>} reaches the origin as
    C{/delay/SLOW_MS/<role>/<tag>}, C{/fast/<tag>} as C{/<role>/<tag>}.
    """
    return Front("reverse", lambda session, tag, slow: session.get(
        f"http://{LOOPBACK}:{port}/{'slow' if slow else 'fast'}/{tag}", timeout=15))


def forward_front(port: int, origin: RecordingOrigin) -> Front:
    """
    The balancer on C{port} as the clients' HTTP proxy, to the origin
    (absolute-form): C{/delay/SLOW_MS/<tag>} or C{/fast/<tag>}, with both
    marker fields.
    """
    proxies = {"http": f"http://{LOOPBACK}:{port}"}
    markers = {"x-instance-a": "1", "x-instance-b": "1"}
    return Front("forward", lambda session, tag, slow: session.get(
        f"{origin.url}/{f'delay/{SLOW_MS}' if slow else 'fast'}/{tag}", proxies=proxies, headers=markers,
        timeout=15))


class Load:
    """
    C{FAST_CLIENTS} and C{SLOW_CLIENTS} client threads per front, each a
    C{requests} session (keep-alive, no retries) sending requests one after
    the other until L{stop}; every request is a L{Record}.
    """

    def __init__(self, fronts: list[Front]) -> None:
        self.records: list[Record] = []
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(front, f"{front.name}-{kind}{n}", kind == "slow"),
                                         daemon=True)
                        for front in fronts for kind, count in (("fast", FAST_CLIENTS), ("slow", SLOW_CLIENTS))
                        for n in range(count)]
        for thread in self.threads:
            thread.start()

    @property
    def clients(self) -> int:
        return len(self.threads)

    def _client(self, front: Front, name: str, slow: bool) -> None:
        session = requests.Session()
        session.trust_env = False
        if slow:
            # A new connection each time, so that the balancer places each
            # slow request anew (through mode tcp a connection stays with
            # the instance it was given).
            session.headers["Connection"] = "close"
        seq = 0
        while not self._stop.is_set():
            seq += 1
            tag = f"{name}-{seq}"
            record = Record(front.name, tag, slow, time.monotonic())
            with self.lock:
                self.records.append(record)
            try:
                response = front.request(session, tag, slow)
                record.status = response.status_code
            except requests.RequestException as e:
                record.error = f"{type(e).__name__}: {e}"
            record.ended = time.monotonic()
        session.close()

    def stop(self) -> list[Record]:
        """Stop after the requests in flight; every record."""
        self._stop.set()
        for thread in self.threads:
            thread.join(20)
        assert not any(t.is_alive() for t in self.threads), "a client is still waiting after 20 s"
        return list(self.records)

    def in_flight(self) -> list[Record]:
        with self.lock:
            return [r for r in self.records if not r.ended]


def carrier(entry: dict) -> str:
    """Which instance (C{"a"} or C{"b"}) carried the request the origin recorded as C{entry}."""
    names = {n.lower() for n, _ in entry["headers"]}
    marks = [role for role in "ab" if f"x-instance-{role}" in names]
    if not marks:  # the reverse side: the route's base path names the instance
        marks = [entry["target"].split("/")[-2]]
    assert len(marks) == 1 and marks[0] in "ab", f"the origin cannot tell who carried {entry['target']}: {entry['headers']}"
    return marks[0]


def tag_of(entry: dict) -> str:
    return entry["target"].rsplit("/", 1)[1]


def carriers(origin: RecordingOrigin) -> dict[str, list[str]]:
    """For each tag, the instances that brought it to the origin, in arrival order."""
    seen: dict[str, list[str]] = {}
    for entry in origin.requests_since(0):
        seen.setdefault(tag_of(entry), []).append(carrier(entry))
    return seen


def wait_slow_in_flight(load: Load, origin: RecordingOrigin, role: str, fronts: set[str], timeout: float = 6.0) -> list[Record]:
    """
    Wait until, for each of C{fronts}, a slow request has reached the origin
    through instance C{role} and is still unanswered; those records.
    """
    deadline = time.monotonic() + timeout
    while True:
        at_origin = {tag_of(e) for e in origin.requests_since(0) if carrier(e) == role}
        held = [r for r in load.in_flight() if r.slow and r.tag in at_origin]
        if {r.front for r in held} >= fronts:
            return held
        assert time.monotonic() < deadline, f"no slow request in flight through {role} on each of {fronts}"
        time.sleep(0.01)


def summary(records: list[Record]) -> str:
    failed = [r for r in records if r.status != 200]
    return f"{len(records)} requests, {len(failed)} failed: " + "; ".join(
        f"{r.tag} {r.status or r.error}" for r in failed[:10])


# ---------------------------------------------------------------------------
# The scenarios, for any balancer
# ---------------------------------------------------------------------------


def drain_under_load(fronts: list[Front], a: BalancedProxy, origin: RecordingOrigin,
                     draining: Callable[[], None] = lambda: None) -> tuple[list[Record], float]:
    """
    SIGTERM to A while slow requests are in flight on it (one per front at
    least), then C{draining()}; the load runs on until AFTER_SECONDS after A
    exited. Asserts that A exits cleanly; returns the records and the time
    of the signal.
    """
    load = Load(fronts)
    try:
        time.sleep(WARMUP_SECONDS)
        wait_slow_in_flight(load, origin, "a", {f.name for f in fronts})
        signalled = time.monotonic()
        a.proc.send_signal(signal.SIGTERM)
        draining()
        code = a.proc.wait(15)
        assert code in CLEAN_EXIT, f"the drained instance exited with {code}:\n{a.output()[-3000:]}"
        time.sleep(AFTER_SECONDS)
    finally:
        records = load.stop()
    return records, signalled


def assert_drained_without_failures(records: list[Record], signalled: float, origin: RecordingOrigin,
                                    fronts: list[Front]) -> None:
    assert all(r.status == 200 for r in records), summary(records)
    seen = carriers(origin)
    for r in records:
        assert len(seen.get(r.tag, [])) == 1, f"{r.tag} reached the origin {seen.get(r.tag)} times"
    for front in fronts:
        mine = [r for r in records if r.front == front.name]
        by_a = [r for r in mine if seen[r.tag] == ["a"]]
        assert any(r.ended < signalled for r in by_a), f"{front.name}: A served nothing before the drain"
        assert any(r.slow and r.started < signalled < r.ended for r in by_a), (
            f"{front.name}: no slow request of A's was in flight at the SIGTERM")
        # Half a second for the signal to reach A's reactor.
        late = [r.tag for r in by_a if r.started > signalled + 0.5]
        assert not late, f"{front.name}: requests started after the drain reached A: {late}"
        by_b_after = [r for r in mine if r.started > signalled and seen[r.tag] == ["b"]]
        assert len(by_b_after) >= FAST_CLIENTS, f"{front.name}: B served {len(by_b_after)} requests after the drain"


def kill_under_load(fronts: list[Front], a: BalancedProxy, origin: RecordingOrigin) -> tuple[list[Record], float, int]:
    """
    SIGKILL to A while slow requests are in flight on it; the load runs on
    AFTER_SECONDS after its death. Returns the records, the time A was
    reaped (dead: every socket of it closed) and the number of clients.
    """
    load = Load(fronts)
    try:
        time.sleep(WARMUP_SECONDS)
        wait_slow_in_flight(load, origin, "a", {f.name for f in fronts})
        a.proc.kill()
        a.proc.wait(5)
        dead = time.monotonic()
        time.sleep(AFTER_SECONDS)
    finally:
        records = load.stop()
    return records, dead, load.clients


def assert_only_in_flight_failed(records: list[Record], dead: float, clients: int, origin: RecordingOrigin,
                                 at_once: float) -> None:
    failed = [r for r in records if r.status != 200]
    assert all(r.started < dead for r in failed), f"requests started after the kill failed: {summary(records)}"
    assert len(failed) <= clients, f"more failures than requests in flight: {summary(records)}"
    after = [r for r in records if r.started > dead]
    assert len(after) >= clients, f"too few requests after the kill: {len(after)}"
    seen = carriers(origin)
    assert all(seen[r.tag] == ["b"] for r in after), "a request started after the kill reached A"
    slowest = max((r for r in after if not r.slow), key=lambda r: r.ended - r.started)
    assert slowest.ended - slowest.started < at_once, (
        f"{slowest.tag}, started {slowest.started - dead:.3f} s after the kill, took {slowest.ended - slowest.started:.2f} s")


def assert_fronts_say_the_scheme(http_port: int, https_port: int, origin: RecordingOrigin, ca_pem: Path) -> None:
    """
    One request through each public front (plain and TLS) of a balancer: the
    origin learns the scheme and port the client used (X-Forwarded-Proto,
    X-Forwarded-Port, written by the balancer, believed by the instance).
    """
    session = requests.Session()
    session.trust_env = False
    for scheme, port in (("http", http_port), ("https", https_port)):
        response = session.get(f"{scheme}://{LOOPBACK}:{port}/fast/scheme-{scheme}", verify=str(ca_pem), timeout=10)
        assert response.status_code == 200, response.text
        (entry,) = [e for e in origin.requests_since(0) if e["target"].endswith(f"/scheme-{scheme}")]
        fields = {n.lower(): v for n, v in entry["headers"]}
        assert (fields.get("x-forwarded-proto"), fields.get("x-forwarded-port")) == (scheme, str(port)), entry["headers"]


# ---------------------------------------------------------------------------
# Apache mod_proxy_balancer
# ---------------------------------------------------------------------------


@pytest.fixture
def apache(pair, tls_files, tmp_path) -> Iterator[ApacheProcess]:
    apache_binary()
    a, b = pair
    front = start_balancer(tmp_path / "apache", [a.reverse_port, b.reverse_port], tls_files)
    yield front
    assert front.stop() is not None, f"apache2 ignored SIGTERM for 15 s:\n{front.logs()}"


def test_apache_drain_fails_no_request(apache, pair, recording) -> None:
    a, _ = pair
    fronts = [reverse_front(apache.http_port)]
    records, signalled = drain_under_load(fronts, a, recording)
    print(f"apache drain: {summary(records)}")
    assert_drained_without_failures(records, signalled, recording, fronts)


def test_apache_kill_fails_only_what_was_in_flight(apache, pair, recording) -> None:
    a, _ = pair
    records, dead, clients = kill_under_load([reverse_front(apache.http_port)], a, recording)
    print(f"apache kill: {summary(records)}")
    assert_only_in_flight_failed(records, dead, clients, recording, APACHE_AT_ONCE_SECONDS)


def test_apache_fronts_say_the_scheme(apache, recording, ca_pem) -> None:
    assert_fronts_say_the_scheme(apache.http_port, apache.https_port, recording, ca_pem)


# ---------------------------------------------------------------------------
# HAProxy
# ---------------------------------------------------------------------------


@pytest.fixture
def haproxy(pair, tls_files, tmp_path) -> Iterator[HAProxyProcess]:
    haproxy_binary()
    a, b = pair
    front = start_haproxy(tmp_path / "haproxy", (a.ports, b.ports), tls_files)
    yield front
    assert front.stop() is not None, f"haproxy ignored SIGTERM for 10 s:\n{front.output()}"


def haproxy_fronts(haproxy: HAProxyProcess, origin: RecordingOrigin) -> list[Front]:
    return [reverse_front(haproxy.reverse_port), forward_front(haproxy.forward_port, origin)]


def tunnel_on_a(haproxy: HAProxyProcess, a: BalancedProxy, tls_origin: OriginProcess, ca_pem: Path) -> RawConnection:
    """
    An HTTPS exchange's tunnel (CONNECT, then TLS to C{tls_origin}) through
    the balancer's forward front, carried by instance A: tunnels are opened
    until one lands on A (the others are closed).
    """
    for _attempt in range(4):
        before = a.metric("mydataproxy_tunnels")
        tunnel = RawConnection(haproxy.forward_port, timeout=10)
        tunnel.send(build_request("CONNECT", tls_origin.authority, [("Host", tls_origin.authority)]))
        assert tunnel.read_response("CONNECT").status == 200
        if a.metric("mydataproxy_tunnels") > before:
            tunnel.sock = ssl.create_default_context(cafile=str(ca_pem)).wrap_socket(tunnel.sock, server_hostname=LOOPBACK)
            return tunnel
        tunnel.close()
    raise AssertionError("four tunnels through the balancer, none on A")


def echo(tunnel: RawConnection, origin: OriginProcess, query: str) -> str:
    """One request to the origin's /echo through C{tunnel}; the URI it saw."""
    tunnel.send(build_request("GET", f"/echo?{query}", [("Host", origin.authority)]))
    response = tunnel.read_response()
    assert response.status == 200, response
    return response.json()["uri"]


def test_haproxy_drain_fails_no_request(haproxy, pair, recording, tls_origin, ca_pem) -> None:
    a, _ = pair
    fronts = haproxy_fronts(haproxy, recording)
    tunnel = tunnel_on_a(haproxy, a, tls_origin, ca_pem)
    assert echo(tunnel, tls_origin, "before") == "/echo?before"
    answers = []

    def use_tunnel() -> None:
        # After the SIGTERM: the tunnel carries on, then its client ends it.
        time.sleep(0.2)
        answers.append(echo(tunnel, tls_origin, "during"))
        tunnel.close()

    records, signalled = drain_under_load(fronts, a, recording, use_tunnel)
    print(f"haproxy drain: {summary(records)}")
    assert_drained_without_failures(records, signalled, recording, fronts)
    assert answers == ["/echo?during"], "the tunnel did not live through the drain"
    for backend in ("mydataproxy_reverse", "mydataproxy_forward"):
        events = haproxy.server_events(backend)
        assert any(f"{backend}/mdp1 is DOWN" in e for e in events), f"{backend}: A never marked down: {events}"


def test_haproxy_connect_keeps_half_close(haproxy, tcp_origin) -> None:
    """
    A tunnel through the balancer to the PROXY protocol listener: the
    client's half-close reaches the origin, and the origin's answer comes
    back.
    """
    tunnel = RawConnection(haproxy.forward_port, timeout=10)
    tunnel.send(build_request("CONNECT", tcp_origin.authority, [("Host", tcp_origin.authority)]))
    assert tunnel.read_response("CONNECT").status == 200
    tunnel.send(b"x" * 1000)
    tunnel.shutdown_write()
    assert tunnel.read_until(b"\n") == f"1000 {hashlib.sha256(b'x' * 1000).hexdigest()}\n".encode()


def test_haproxy_kill_fails_only_what_was_in_flight(haproxy, pair, recording) -> None:
    a, _ = pair
    records, dead, clients = kill_under_load(haproxy_fronts(haproxy, recording), a, recording)
    print(f"haproxy kill: {summary(records)}")
    assert_only_in_flight_failed(records, dead, clients, recording, HAPROXY_AT_ONCE_SECONDS)


def test_haproxy_fronts_say_the_scheme(haproxy, recording, ca_pem) -> None:
    assert_fronts_say_the_scheme(haproxy.reverse_port, haproxy.tls_port, recording, ca_pem)
