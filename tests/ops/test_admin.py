"""
The admin site (L{mydataproxy.ops.admin}) over real HTTP: a listening
L{adminSite} on a loopback port of the test's reactor, asked with
C{requests} from a thread (so the reactor keeps turning); and the daemon's
C{[admin]} listener, whose C{/metrics} must count the requests the test
sent through the forward proxy.
"""

from __future__ import annotations

import time

import pytest
import pytest_twisted
import requests
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.logger import globalLogPublisher

from conftest import LOOPBACK, get_free_port, wait_for_port
from mydataproxy.ops.admin import adminSite
from mydataproxy.ops.metrics import ProxyMetrics


def parse(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.fixture
def admin():
    """A running admin site: (base URL, the readiness reasons it reports, its metrics)."""
    reasons: list[str] = []
    metrics = ProxyMetrics()
    port = reactor.listenTCP(0, adminSite(lambda: list(reasons), metrics.registry), interface=LOOPBACK)
    yield f"http://{LOOPBACK}:{port.getHost().port}", reasons, metrics
    pytest_twisted.blockon(port.stopListening())


def get(url: str, method: str = "GET", **kw) -> Deferred:
    """A request from a thread, so the reactor serving it keeps turning: fires with the response."""
    return threads.deferToThread(requests.request, method, url, timeout=5, **kw)


@pytest_twisted.ensureDeferred
async def test_healthzAnswersWhileTheReactorTurns(admin) -> None:
    base, _, _ = admin
    response = await get(base + "/healthz")
    assert (response.status_code, response.text) == (200, "ok\n")
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert response.headers["Cache-Control"] == "no-store"
    head = await get(base + "/healthz", "HEAD")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["Content-Length"] == "3"


@pytest_twisted.ensureDeferred
async def test_aWedgedReactorCannotAnswerHealthz(admin) -> None:
    base, _, _ = admin

    def probe(timeout: float) -> int | str:
        try:
            return requests.get(base + "/healthz", timeout=timeout).status_code
        except requests.exceptions.Timeout:
            return "timed out"

    # The reactor sleeps for a second, from just after the probe starts.
    reactor.callLater(0.05, time.sleep, 1.0)
    assert await threads.deferToThread(lambda: (time.sleep(0.2), probe(0.4))[1]) == "timed out"
    assert await threads.deferToThread(probe, 5.0) == 200


@pytest_twisted.ensureDeferred
async def test_readyzFlipsWithTheReasons(admin) -> None:
    base, reasons, _ = admin
    ready = await get(base + "/readyz")
    assert (ready.status_code, ready.text) == (200, "ready\n")
    reasons.extend(["listener reverse is not bound", "draining"])
    response = await get(base + "/readyz")
    assert response.status_code == 503
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert response.text.splitlines() == ["listener reverse is not bound", "draining"]
    reasons.clear()
    assert (await get(base + "/readyz")).status_code == 200


@pytest_twisted.ensureDeferred
async def test_aFailingReadinessCheckIsNotReady() -> None:
    def broken() -> list[str]:
        raise RuntimeError("boom")

    port = reactor.listenTCP(0, adminSite(broken, ProxyMetrics().registry), interface=LOOPBACK)
    try:
        response = await get(f"http://{LOOPBACK}:{port.getHost().port}/readyz")
    finally:
        await port.stopListening()
    assert response.status_code == 503
    assert response.text == "readiness check failed: RuntimeError: boom\n"


@pytest_twisted.ensureDeferred
async def test_metricsExposeWhatWasCounted(admin) -> None:
    base, _, metrics = admin
    for status in (200, 200, 502):
        metrics.requestFinished("absolute", b"GET", status, 0.01, 0, 10)
    metrics.requestFinished("reverse", b"POST", 201, 0.2, 100, 0)
    metrics.refused("forward.connect_ports")
    response = await get(base + "/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    got = parse(response.text)
    count = "mydataproxy_requests_total"
    assert got[(count, (("method", "safe"), ("mode", "absolute"), ("status", "200")))] == 2
    assert got[(count, (("method", "safe"), ("mode", "absolute"), ("status", "502")))] == 1
    assert got[(count, (("method", "unsafe"), ("mode", "reverse"), ("status", "201")))] == 1
    assert got[("mydataproxy_request_duration_seconds_count", (("mode", "absolute"),))] == 3
    assert got[("mydataproxy_client_sent_bytes_total", (("mode", "absolute"),))] == 30
    assert got[("mydataproxy_refusals_total", (("rule", "forward.connect_ports"),))] == 1
    # A scraper that asks for OpenMetrics gets it.
    open_metrics = await get(base + "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert open_metrics.headers["Content-Type"].startswith("application/openmetrics-text")
    assert open_metrics.text.endswith("# EOF\n")


@pytest.mark.parametrize("path", ["/", "/health", "/healthz/", "/healthz/x", "/metrics/x", "/readyz.txt", "/favicon.ico"])
@pytest_twisted.ensureDeferred
async def test_anythingElseIs404(admin, path: str) -> None:
    base, _, _ = admin
    assert (await get(base + path)).status_code == 404


@pytest_twisted.ensureDeferred
async def test_probesWriteNoLogLines(admin) -> None:
    base, _, _ = admin
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        for path in ("/healthz", "/readyz", "/metrics", "/nothing"):
            await get(base + path)
        await get(base + "/healthz", "HEAD")
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert events == []


# ---------------------------------------------------------------------------
# The daemon's [admin] listener
# ---------------------------------------------------------------------------


def test_theDaemonsMetricsCountTheRequestsSentThroughIt(proxy_factory, origin) -> None:
    admin_port = get_free_port()
    p = proxy_factory(admin={"listen": f"tcp:{admin_port}:interface={LOOPBACK}"})
    assert wait_for_port(admin_port, 10.0, p.proc), f"admin port never opened; output:\n{p.output()}"
    admin = f"http://{LOOPBACK}:{admin_port}"
    assert requests.get(admin + "/healthz", timeout=5).text == "ok\n"
    assert requests.get(admin + "/readyz", timeout=5).status_code == 200

    through = {"http": p.url}
    with requests.Session() as session:
        session.trust_env = False
        for _ in range(3):
            assert session.get(origin.url + "/echo", proxies=through, timeout=10).status_code == 200
        assert session.post(origin.url + "/sha256", data=b"x" * 1000, proxies=through, timeout=10).status_code == 200
        for _ in range(2):
            response = session.get(p.url + "/echo", headers={"x-target-host": origin.url}, timeout=10)
            assert response.status_code == 200
        assert session.get(p.url + "/echo", timeout=10).status_code == 403  # no x-target-host
        assert session.get(origin.url + "/status/502", proxies=through, timeout=10).status_code == 502
    assert len(p.wait_access_lines(lambda line: "/echo" in line or "/sha256" in line or "/status" in line, 8)) == 8

    got = parse(requests.get(admin + "/metrics", timeout=5).text)
    count = "mydataproxy_requests_total"
    requests_counted = {labels: v for (name, labels), v in got.items() if name == count}
    assert requests_counted == {
        (("method", "safe"), ("mode", "absolute"), ("status", "200")): 3,
        (("method", "unsafe"), ("mode", "absolute"), ("status", "200")): 1,
        (("method", "safe"), ("mode", "absolute"), ("status", "502")): 1,
        (("method", "safe"), ("mode", "header"), ("status", "200")): 2,
        (("method", "safe"), ("mode", "header"), ("status", "403")): 1,
    }
    assert got[("mydataproxy_request_duration_seconds_count", (("mode", "absolute"),))] == 5
    assert got[("mydataproxy_client_received_bytes_total", (("mode", "absolute"),))] == 1000
    # Seven requests reached the origin; the 403 never left the proxy.
    assert got[("mydataproxy_upstream_first_byte_seconds_count", (("destination", "other"),))] == 7
    assert got[("mydataproxy_upstream_connect_seconds_count", (("destination", "other"),))] >= 1
    [version] = [dict(labels)["version"] for (name, labels) in got if name == "mydataproxy_build_info"]
    assert version and version != "unknown"
    assert ("mydataproxy_client_connections", (("listener", "forward"),)) in got
    # The admin listener is not a way through the proxy.
    assert requests.get(admin + "/echo", headers={"x-target-host": origin.url}, timeout=5).status_code == 404
