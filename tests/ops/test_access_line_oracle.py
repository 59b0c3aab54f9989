"""
The access line (L{mydataproxy.ops.logs.AccessLog}) is written, byte for
byte, as the straightforward implementation it replaced wrote it: that one
is kept here as the oracle, and every format is checked against it for any
input.  The timestamp, the only field that depends on when the line is
written, is compared apart (L{mydataproxy.ops.logs.Timestamps} against the
oracle's, at given times).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from mydataproxy.config import LoggingSettings
from mydataproxy.ops import logs

# The oracle: the access line before the hot path was made cheap.

_NEEDS_QUOTING = re.compile(r'[\x00-\x20"\\\x7f-\x9f\u2028\u2029]')
_ESCAPED = re.compile(r'["\\\x00-\x1f\x7f-\x9f\u2028\u2029]')
_ESCAPES = {'"': r"\"", "\\": r"\\", "\n": r"\n", "\r": r"\r", "\t": r"\t"}


def _escape(match: re.Match) -> str:
    c = match.group()
    return _ESCAPES.get(c) or f"\\u{ord(c):04x}"


def _quoted(value: str) -> str:
    if value and not _NEEDS_QUOTING.search(value):
        return value
    return '"' + _ESCAPED.sub(_escape, value) + '"'


def _inQuotes(value: str) -> str:
    return _ESCAPED.sub(_escape, value)


def oracleStamp(local: bool, now: float) -> str:
    second = int(now)
    if local:
        parts = time.localtime(second)
        offset = time.strftime("%z", parts)
        stamp, zone = time.strftime("%Y-%m-%dT%H:%M:%S", parts), f"{offset[:3]}:{offset[3:]}"
    else:
        stamp, zone = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)), "Z"
    return f"{stamp}.{int((now - second) * 1000):03d}{zone}"


def oracleLine(
    format: str, client, method, target, status, bytesIn, bytesOut, seconds, upstream,
    certificate="", transaction="", userAgent="", rule="", timing=None,
) -> str:
    """The line as it was written, with C{STAMP} for its time."""
    extra: dict[str, str] = {}
    for key, value in (("cert", certificate), ("tran_id", transaction), ("ua", userAgent), ("rule", rule)):
        if value:
            extra[key] = value
    if timing is not None:
        for key, value in (("connect_ms", timing.connect), ("tls_ms", timing.handshake),
                           ("ttfb_ms", timing.firstByte)):
            if value is not None:
                extra[key] = f"{value * 1000:.1f}"
        if timing.tlsVersion:
            extra["tls"] = timing.tlsVersion
    if format == "keyvalue":
        line = (
            f"STAMP client={client} method={_quoted(method)} target={_quoted(target)} "
            f"status={status} in={bytesIn} out={bytesOut} ms={seconds * 1000:.1f} "
            f"upstream={upstream or '-'}"
        )
        for key, value in extra.items():
            line += f" {key}={_quoted(value)}"
        return line + "\n"
    if format == "combined":
        host = client.rpartition(":")[0] or client
        request = _inQuotes(f"{method} {target} HTTP/1.1")
        return f'{host} - - [STAMP] "{request}" {status} {bytesOut or "-"} "-" "{_inQuotes(userAgent or "-")}"\n'
    fields: dict[str, object] = {
        "time": "STAMP", "client": client, "method": method, "target": target, "status": status,
        "in": bytesIn, "out": bytesOut, "ms": round(seconds * 1000, 1), "upstream": upstream or None,
    }
    fields.update((key, float(value) if key.endswith("_ms") else value) for key, value in extra.items())
    return json.dumps(fields, ensure_ascii=True, separators=(",", ":")) + "\n"


# What is checked.

_STAMPS = {
    "keyvalue": re.compile(r"^[^ ]+"),
    "combined": re.compile(r"(?<= - - \[)[^\]]+"),
    "json": re.compile(r'(?<=^\{"time":")[^"]+'),
}


@dataclass
class Timing:
    connect: float | None
    handshake: float | None
    firstByte: float | None
    tlsVersion: str


class Lines:
    """Stands in for an access log's writer: keeps the lines."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, line: str) -> None:
        self.lines.append(line)


def lineFor(format: str, fields: dict) -> str:
    log = logs.AccessLog("-", Clock(), LoggingSettings(format=format))
    log.writer = Lines()
    log.record(**fields)
    [line] = log.writer.lines
    stamped = _STAMPS[format].subn("STAMP", line, count=1)
    assert stamped[1] == 1, line
    return stamped[0]


# Values that hit every rule of the quoting and escaping, mixed with any text.
_TRICKY = st.text(alphabet=st.sampled_from(
    ' "\\=\t\n\r\x00\x1f\x7f\x80\x9f\xa0\xad\u2028\u2029\u200b\u3000\ufeff\U0001f600\ud800aZ9.-:/[]'
))
_TEXT = st.one_of(_TRICKY, st.text(), st.text(alphabet=st.characters(exclude_categories=())))
_SECONDS = st.one_of(st.none(), st.floats(), st.floats(min_value=0, max_value=100))
_TIMING = st.one_of(st.none(), st.builds(Timing, _SECONDS, _SECONDS, _SECONDS, _TEXT))
_RECORDS = st.fixed_dictionaries(
    {
        "client": _TEXT, "method": _TEXT, "target": _TEXT, "status": st.integers(), "bytesIn": st.integers(),
        "bytesOut": st.integers(), "seconds": st.floats(), "upstream": _TEXT,
    },
    optional={
        "certificate": _TEXT, "transaction": _TEXT, "userAgent": _TEXT, "rule": _TEXT, "timing": _TIMING,
    },
)


# The format is drawn, not parametrized: pytest-twisted runs a parametrized
# @given test once only.
@settings(max_examples=600)
@given(format=st.sampled_from(sorted(_STAMPS)), fields=_RECORDS)
def test_theLineIsTheOraclesForAnyInput(format: str, fields: dict) -> None:
    assert lineFor(format, fields) == oracleLine(format, **fields)


def test_theLineOfASmallForwardedGetIsTheOracles() -> None:
    fields = dict(
        client="127.0.0.1:51292", method="GET", target="http://127.0.0.1:19400/small", status=200,
        bytesIn=0, bytesOut=100, seconds=0.0057, upstream="127.0.0.1:19400",
        rule="egress.rules[0] bench-origins", timing=Timing(None, None, 0.0056, ""),
    )
    for format in _STAMPS:
        assert lineFor(format, fields) == oracleLine(format, **fields)
    assert lineFor("keyvalue", fields) == (
        "STAMP client=127.0.0.1:51292 method=GET target=http://127.0.0.1:19400/small status=200 in=0 out=100 "
        'ms=5.7 upstream=127.0.0.1:19400 rule="egress.rules[0] bench-origins" ttfb_ms=5.6\n'
    )


@pytest.mark.parametrize("local", [False, True])
def test_timestampsAreTheOracles(local: bool, seoul) -> None:
    @given(st.lists(st.floats(min_value=1.0, max_value=4e9), min_size=1, max_size=20))
    def check(times: list[float]) -> None:
        stamps = logs.Timestamps(local)
        # In order and out of it: a cached second must never leak into another.
        for now in [*times, *sorted(times)]:
            assert stamps(now) == oracleStamp(local, now)

    check()


def test_theEpochsFirstSecondIsStampedToo() -> None:
    # The oracle cached "second 0" as already formatted (empty) from the start.
    assert logs.Timestamps(False)(0.25) == "1970-01-01T00:00:00.250Z"
