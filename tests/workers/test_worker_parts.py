"""
The parts the supervisor is built from, without processes: splitting a
worker's pipe into whole lines, summing metric families by what they mean,
a log event's trip through a pipe as JSON, and the admin site answering
/metrics from a source that gathers them later.
"""

from __future__ import annotations

import time

import pytest_twisted
import requests
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.openmetrics.exposition import generate_latest
from twisted.internet import reactor, task, threads
from twisted.logger import LogLevel, eventAsJSON, formatEventAsClassicLogText
from twisted.python.failure import Failure

from conftest import LOOPBACK
from mydataproxy.config import LoggingSettings
from mydataproxy.ops.admin import adminSite
from mydataproxy.ops.logs import EventLog, eventFromLine
from mydataproxy.ops.metrics import aggregate, cumulative, parseExposition
from mydataproxy.workers.process import LineSplitter
from supervised import samples


def test_lines_come_out_whole_whatever_the_pieces() -> None:
    lines: list[bytes] = []
    splitter = LineSplitter(lines.append, maxLength=10)
    for piece in (b"ab", b"c\nde", b"f\n\ng", b"hi\n"):
        splitter.feed(piece)
    assert lines == [b"abc\n", b"def\n", b"\n", b"ghi\n"]
    assert (splitter.tooLong, splitter.cut) == (0, 0)


def test_an_overlong_line_is_dropped_whole_and_counted() -> None:
    lines: list[bytes] = []
    splitter = LineSplitter(lines.append, maxLength=10)
    splitter.feed(b"ok\n" + b"x" * 8)
    splitter.feed(b"x" * 8)
    splitter.feed(b"x" * 30 + b"tail\nnext\n")
    assert lines == [b"ok\n", b"next\n"]
    assert splitter.tooLong == 1


def test_a_line_cut_by_the_end_is_dropped_and_counted() -> None:
    lines: list[bytes] = []
    splitter = LineSplitter(lines.append)
    splitter.feed(b"whole\nhalf")
    splitter.end()
    assert lines == [b"whole\n"] and splitter.cut == 1


def exposition(requests_: int, connections: int, expiry: float, started: float, version: str) -> list:
    registry = CollectorRegistry()
    counter = Counter("demo_requests", "requests", ["status"], registry=registry)
    counter.labels("200").inc(requests_)
    histogram = Histogram("demo_seconds", "durations", buckets=(0.1, 1.0), registry=registry)
    for _ in range(requests_):
        histogram.observe(0.5)
    Gauge("demo_connections", "open", registry=registry).set(connections)
    Gauge("mydataproxy_certificate_expiry_seconds", "expiry", ["subject"], registry=registry).labels("CN=x").set(expiry)
    Gauge("process_start_time_seconds", "start", registry=registry).set(started)
    Info("demo_build", "build", registry=registry).info({"version": version})
    return parseExposition(generate_latest(registry).decode())


def test_families_are_summed_or_combined_by_what_they_mean() -> None:
    one = exposition(3, 2, 100.0, 1000.0, "1")
    two = exposition(4, 5, 90.0, 900.0, "2")
    summed = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in aggregate([one, two]) for s in f.samples}
    assert summed[("demo_requests_total", (("status", "200"),))] == 7
    assert summed[("demo_seconds_bucket", (("le", "1.0"),))] == 7
    assert summed[("demo_seconds_bucket", (("le", "0.1"),))] == 0
    assert summed[("demo_seconds_count", ())] == 7 and summed[("demo_seconds_sum", ())] == 3.5
    assert summed[("demo_connections", ())] == 7
    assert summed[("mydataproxy_certificate_expiry_seconds", (("subject", "CN=x"),))] == 90.0
    assert summed[("process_start_time_seconds", ())] == 900.0
    assert summed[("demo_build_info", (("version", "1"),))] == 1
    assert ("demo_build_info", (("version", "2"),)) not in summed
    created = [v for (name, _), v in summed.items() if name == "demo_requests_created"]
    firsts = [s.value for f in (one + two) for s in f.samples if s.name == "demo_requests_created"]
    assert created == [min(firsts)]


def test_what_an_exited_process_leaves_is_its_counts() -> None:
    kept = {family.name for family in cumulative(exposition(1, 1, 1.0, 1.0, "1"))}
    assert kept == {"demo_requests", "demo_seconds"}


def test_a_log_event_survives_the_pipe(tmp_path) -> None:
    try:
        raise ValueError("deep down")
    except ValueError:
        failure = Failure()
    event = {
        "log_format": "upstream {name} failed", "name": "bank\nline", "log_level": LogLevel.error,
        "log_namespace": "mydataproxy.upstream", "log_time": time.time(), "log_failure": failure,
    }
    sink = EventLog(str(tmp_path / "events"), reactor, LoggingSettings())
    sink.start()
    sink(event)
    sink.stop()
    lines = (tmp_path / "events").read_text().splitlines(keepends=True)
    assert len(lines) == 1 and lines[0].endswith("\n") and lines[0].count("\n") == 1
    back = eventFromLine(lines[0])
    text = formatEventAsClassicLogText(back)
    assert "[mydataproxy.upstream#error] upstream bank" in text
    assert "ValueError: deep down" in text
    assert back["log_level"] is LogLevel.error
    assert eventAsJSON(back)


@pytest_twisted.ensureDeferred
async def test_metrics_can_be_gathered_at_each_scrape() -> None:
    registry = CollectorRegistry()
    Counter("demo_scrapes", "scrapes", registry=registry).inc(3)

    def gather():
        # Answers later, as a supervisor asking its workers does.
        return task.deferLater(reactor, 0.05, lambda: registry)

    port = reactor.listenTCP(0, adminSite(lambda: [], gather), interface=LOOPBACK)
    try:
        url = f"http://{LOOPBACK}:{port.getHost().port}/metrics"
        response = await threads.deferToThread(requests.get, url, timeout=5)
        assert response.status_code == 200
        assert samples(response.text)[("demo_scrapes_total", ())] == 3
        head = await threads.deferToThread(requests.head, url, timeout=5)
        assert head.status_code == 200 and head.content == b""
        assert int(head.headers["Content-Length"]) == len(response.content)
    finally:
        await port.stopListening()
