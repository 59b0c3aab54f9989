"""
What an access line tells beyond the basics, from a real proxy: the rule
that allowed or refused the request, and how the upstream exchange went
(connect, TLS handshake, first byte, TLS version).
"""

from __future__ import annotations

import uuid

import requests

from conftest import LOOPBACK


def fields_of(proxy, tag: str) -> dict:
    lines = proxy.wait_access_lines(lambda line: tag in line)
    assert len(lines) == 1, lines
    return lines[0]


def test_a_tls_exchange_reports_its_timings_version_and_rule(proxy, tls_origin):
    tag = uuid.uuid4().hex
    r = requests.get(f"{proxy.url}/echo/{tag}", headers={"x-target-host": tls_origin.url}, timeout=10)
    assert r.status_code == 200, r.text
    line = fields_of(proxy, tag)
    assert "test origins" in line["rule"], line["_line"]
    assert line["tls"].startswith("TLSv1."), line["_line"]
    for key in ("connect_ms", "tls_ms", "ttfb_ms"):
        assert float(line[key]) >= 0, line["_line"]


def test_a_reused_connection_reports_no_connect_or_handshake(proxy, origin):
    tag = uuid.uuid4().hex
    with requests.Session() as session:
        for n in range(2):
            r = session.get(f"{proxy.url}/echo/{tag}/{n}", headers={"x-target-host": origin.url}, timeout=10)
            assert r.status_code == 200
    second = fields_of(proxy, f"{tag}/1")
    assert "ttfb_ms" in second and "tls" not in second, second["_line"]
    assert "connect_ms" not in second and "tls_ms" not in second, "the pooled connection was opened again"


def test_a_refusal_reports_the_rule_that_decided(proxy):
    tag = uuid.uuid4().hex
    r = requests.get(f"{proxy.url}/{tag}", headers={"x-target-host": f"http://{LOOPBACK}:25"}, timeout=10)
    assert r.status_code == 403
    line = fields_of(proxy, tag)
    assert line["rule"] == "forward.http_ports", line["_line"]
    assert "ttfb_ms" not in line
