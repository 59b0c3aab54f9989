"""
Unit tests of the hop-by-hop header rules (L{mydataproxy.http.headers}).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mydataproxy.http.framing import RequestHead
from mydataproxy.http.headers import (
    HOP_BY_HOP,
    VIA,
    connectionTokens,
    plainResponse,
    relayedResponseFields,
    upstreamRequestFields,
)

CLIENT = b"192.0.2.7"
DEFAULT_DROP = frozenset({b"host", b"x-target-host"})


def requestHead(*pairs: tuple[bytes, bytes], method: bytes = b"GET", version: bytes = b"HTTP/1.1") -> RequestHead:
    byName: dict[bytes, list[bytes]] = {}
    for name, value in pairs:
        byName.setdefault(name.lower(), []).append(value)
    return RequestHead(method, b"/", version, list(pairs), byName, None, False)


def upstream(
    *pairs: tuple[bytes, bytes], drop=DEFAULT_DROP, host=b"origin.example", **head
) -> list[tuple[bytes, bytes]]:
    return upstreamRequestFields(requestHead(*pairs, **head), drop, host, CLIENT)


def names(fields) -> list[bytes]:
    return [n.lower() for n, _ in fields]


def values(fields, name: bytes) -> list[bytes]:
    return [v for n, v in fields if n.lower() == name.lower()]


# ---------------------------------------------------------------------------
# connectionTokens
# ---------------------------------------------------------------------------


def test_connectionTokens() -> None:
    assert connectionTokens([b"close"]) == {b"close"}
    assert connectionTokens([b" Keep-Alive , X-Foo,,x-BAR ", b"Upgrade"]) == {
        b"keep-alive",
        b"x-foo",
        b"x-bar",
        b"upgrade",
    }
    assert connectionTokens([]) == frozenset()
    assert connectionTokens([b"", b" , "]) == frozenset()


# ---------------------------------------------------------------------------
# upstreamRequestFields
# ---------------------------------------------------------------------------

REQUEST_HOP_BY_HOP = [
    b"Connection",
    b"Keep-Alive",
    b"Proxy-Connection",
    b"Proxy-Authorization",
    b"TE",
    b"Trailer",
    b"Transfer-Encoding",
    b"Upgrade",
]


@pytest.mark.parametrize("name", REQUEST_HOP_BY_HOP)
@pytest.mark.parametrize("case", [bytes, bytes.lower, bytes.upper])
def test_requestHopByHopFieldRemoved(name: bytes, case) -> None:
    fields = upstream((b"Accept", b"*/*"), (case(name), b"something"), (b"X-After", b"1"))
    assert name.lower() not in names(fields)
    assert fields == [
        (b"Host", b"origin.example"),
        (b"Accept", b"*/*"),
        (b"X-After", b"1"),
        (b"X-Forwarded-For", CLIENT),
        (b"Via", VIA),
    ]


def test_allRequestHopByHopFieldsTogether() -> None:
    pairs = [(n, b"v") for n in REQUEST_HOP_BY_HOP]
    fields = upstream(*pairs, (b"Accept", b"text/html"))
    assert fields == [
        (b"Host", b"origin.example"),
        (b"Accept", b"text/html"),
        (b"X-Forwarded-For", CLIENT),
        (b"Via", VIA),
    ]


def test_hopByHopSetIsTheRFCSet() -> None:
    assert HOP_BY_HOP == {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }


def test_connectionListedNamesRemoved() -> None:
    fields = upstream(
        (b"Connection", b"X-Foo, x-bar ,X-BAZ"),
        (b"X-Foo", b"1"),
        (b"X-Bar", b"2"),
        (b"x-baz", b"3"),
        (b"X-Kept", b"4"),
    )
    assert names(fields) == [b"host", b"x-kept", b"x-forwarded-for", b"via"]


def test_connectionListedNamesFromSeveralConnectionFields() -> None:
    fields = upstream(
        (b"Connection", b"keep-alive"),
        (b"X-One", b"1"),
        (b"connection", b"X-Two"),
        (b"X-Two", b"2"),
        (b"CONNECTION", b"x-three, close"),
        (b"X-Three", b"3"),
        (b"X-Four", b"4"),
    )
    assert names(fields) == [b"host", b"x-one", b"x-four", b"x-forwarded-for", b"via"]


def test_connectionListedNameIsExactNotPrefix() -> None:
    fields = upstream((b"Connection", b"x-a"), (b"X-A", b"1"), (b"X-Ab", b"2"), (b"X-", b"3"))
    assert values(fields, b"x-a") == []
    assert values(fields, b"x-ab") == [b"2"]
    assert values(fields, b"x-") == [b"3"]


def test_configuredFilterExactAndCaseInsensitive() -> None:
    fields = upstream(
        (b"X-A", b"1"),
        (b"x-ab", b"2"),
        (b"X-SECRET-Internal", b"3"),
        (b"X-Secret-Internal-2", b"4"),
        (b"A", b"5"),
        drop=frozenset({b"x-a", b"x-secret-internal", b"host", b"x-target-host"}),
    )
    assert fields == [
        (b"Host", b"origin.example"),
        (b"x-ab", b"2"),
        (b"X-Secret-Internal-2", b"4"),
        (b"A", b"5"),
        (b"X-Forwarded-For", CLIENT),
        (b"Via", VIA),
    ]


def test_xTargetHostDroppedByDefaultFilter() -> None:
    fields = upstream((b"x-target-host", b"https://a.example"), (b"Accept", b"*/*"))
    assert b"x-target-host" not in names(fields)


def test_hostRewrittenAndFirst() -> None:
    fields = upstream((b"Accept", b"*/*"), (b"Host", b"proxy.local:9000"), host=b"[::1]:8080")
    assert fields[0] == (b"Host", b"[::1]:8080")
    assert values(fields, b"host") == [b"[::1]:8080"]


def test_hostRewrittenEvenWithEmptyFilter() -> None:
    fields = upstream((b"Host", b"proxy.local:9000"), drop=frozenset())
    assert values(fields, b"host") == [b"origin.example"]
    assert fields[0] == (b"Host", b"origin.example")


def test_expectDropped() -> None:
    fields = upstream((b"Expect", b"100-continue"), (b"Accept", b"*/*"))
    assert names(fields) == [b"host", b"accept", b"x-forwarded-for", b"via"]


def test_framingFieldsAreNeverCopied() -> None:
    # The caller writes Content-Length or Transfer-Encoding from what it parsed.
    fields = upstream((b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked"), (b"Accept", b"*/*"))
    assert names(fields) == [b"host", b"accept", b"x-forwarded-for", b"via"]


@pytest.mark.parametrize("listed", [b"Content-Length", b"Host", b"host, Content-Length, Transfer-Encoding"])
def test_connectionTokensCannotRemoveHost(listed: bytes) -> None:
    fields = upstream((b"Connection", listed), (b"Host", b"p"), (b"Accept", b"*/*"))
    assert values(fields, b"host") == [b"origin.example"]
    assert values(fields, b"accept") == [b"*/*"]


def test_nameCaseKept() -> None:
    fields = upstream((b"x-api-tran-id", b"A1"), (b"X-MyData-Custom", b"1"))
    assert fields[1:3] == [(b"x-api-tran-id", b"A1"), (b"X-MyData-Custom", b"1")]


@pytest.mark.parametrize("method, kept", [(b"GET", True), (b"POST", True), (b"OPTIONS", False), (b"TRACE", False)])
def test_maxForwardsLeftToTheCallerForOptionsAndTrace(method: bytes, kept: bool) -> None:
    fields = upstream((b"Max-Forwards", b"5"), method=method)
    assert values(fields, b"max-forwards") == ([b"5"] if kept else [])


def test_repeatedFieldsKeptInOrder() -> None:
    fields = upstream(
        (b"Accept", b"a"),
        (b"X-Multi", b"1"),
        (b"Cookie", b"c=1"),
        (b"x-multi", b"2"),
        (b"X-MULTI", b"3"),
    )
    assert values(fields, b"x-multi") == [b"1", b"2", b"3"]
    assert values(fields, b"cookie") == [b"c=1"]
    assert names(fields)[:2] == [b"host", b"accept"]


def test_xForwardedForAppended() -> None:
    assert values(upstream(), b"x-forwarded-for") == [CLIENT]
    fields = upstream((b"X-Forwarded-For", b"203.0.113.1"))
    assert values(fields, b"x-forwarded-for") == [b"203.0.113.1, " + CLIENT]
    fields = upstream((b"X-Forwarded-For", b"203.0.113.1, 10.0.0.1"), (b"x-forwarded-for", b"10.0.0.2"))
    assert values(fields, b"x-forwarded-for") == [b"203.0.113.1, 10.0.0.1, 10.0.0.2, " + CLIENT]


@pytest.mark.parametrize("name", [b"X-Forwarded-For", b"Via"])
def test_connectionListedProxyFieldStartsFresh(name: bytes) -> None:
    fields = upstream((b"Connection", name), (name, b"203.0.113.1"))
    assert values(fields, name) == [CLIENT if name == b"X-Forwarded-For" else VIA]


def test_xForwardedForInFilterStartsFresh() -> None:
    fields = upstream(
        (b"X-Forwarded-For", b"203.0.113.1"), drop=frozenset({b"x-forwarded-for"})
    )
    assert values(fields, b"x-forwarded-for") == [CLIENT]


def test_viaAppended() -> None:
    assert values(upstream(), b"via") == [b"1.1 mydataproxy"]
    assert values(upstream(version=b"HTTP/1.0"), b"via") == [b"1.0 mydataproxy"]
    fields = upstream((b"Via", b"1.0 fred, 1.1 p.example"), (b"via", b"HTTP/1.1 other"))
    assert values(fields, b"via") == [b"1.0 fred, 1.1 p.example, HTTP/1.1 other, 1.1 mydataproxy"]


def test_proxyFieldsAreLastAndSingle() -> None:
    fields = upstream((b"Via", b"1.0 a"), (b"X-Forwarded-For", b"1.1.1.1"), (b"Accept", b"*/*"))
    assert names(fields) == [b"host", b"accept", b"x-forwarded-for", b"via"]


# ---------------------------------------------------------------------------
# relayedResponseFields (the origin's response fields relayed to the client)
# ---------------------------------------------------------------------------


def test_responseHopByHopRemoved() -> None:
    fields = [
        (b"Content-Type", b"text/plain"),
        (b"Connection", b"keep-alive, X-Private"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Proxy-Connection", b"keep-alive"),
        (b"Proxy-Authenticate", b"Basic realm=x"),
        (b"proxy-authenticate", b"Bearer"),
        (b"Proxy-Authorization", b"Basic abc"),
        (b"TE", b"trailers"),
        (b"Trailer", b"X-T"),
        (b"Transfer-Encoding", b"chunked"),
        (b"UPGRADE", b"h2c"),
        (b"x-private", b"secret"),
        (b"X-Privateer", b"kept"),
        (b"Content-Length", b"10"),
    ]
    assert relayedResponseFields(fields) == [
        (b"Content-Type", b"text/plain"),
        (b"X-Privateer", b"kept"),
        (b"Via", VIA),
    ]


def test_responseConnectionListedNamesFromSeveralFields() -> None:
    fields = [
        (b"connection", b"X-A"),
        (b"X-A", b"1"),
        (b"CONNECTION", b"x-b, close"),
        (b"x-B", b"2"),
        (b"X-C", b"3"),
        (b"X-Ab", b"4"),
    ]
    assert relayedResponseFields(fields) == [(b"X-C", b"3"), (b"X-Ab", b"4"), (b"Via", VIA)]


def test_responseConnectionListedNameBeforeConnectionFieldIsRemovedToo() -> None:
    fields = [(b"X-A", b"1"), (b"Date", b"d"), (b"Connection", b"x-a")]
    assert relayedResponseFields(fields) == [(b"Date", b"d"), (b"Via", VIA)]


def test_responseSetCookieRepeatsInOrder() -> None:
    fields = [
        (b"Set-Cookie", b"a=1; Path=/"),
        (b"Content-Type", b"text/html"),
        (b"set-cookie", b"b=2, c=3"),
        (b"SET-COOKIE", b"d=4; Expires=Wed, 21 Oct 2015 07:28:00 GMT"),
    ]
    assert relayedResponseFields(fields) == fields + [(b"Via", VIA)]


def test_responseKeepsOrderAndSpellingAndDoesNotMutateInput() -> None:
    fields = [(b"x-lower", b"1"), (b"X-UPPER", b"2"), (b"Content-Length", b"0")]
    before = list(fields)
    assert relayedResponseFields(fields) == before[:2] + [(b"Via", VIA)]
    assert fields == before


def test_responseFramingFieldsRemoved() -> None:
    # The proxy writes the response's framing itself, from what it parsed.
    fields = [(b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked"), (b"Date", b"d")]
    assert relayedResponseFields(fields) == [(b"Date", b"d"), (b"Via", VIA)]


def test_responseViaAppended() -> None:
    assert relayedResponseFields([]) == [(b"Via", VIA)]
    fields = [(b"Via", b"1.1 cdn"), (b"X-A", b"1"), (b"via", b"1.0 origin-lb")]
    assert relayedResponseFields(fields) == [
        (b"X-A", b"1"),
        (b"Via", b"1.1 cdn, 1.0 origin-lb, 1.1 mydataproxy"),
    ]


# ---------------------------------------------------------------------------
# plainResponse
# ---------------------------------------------------------------------------


def parse(response: bytes) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    head, sep, body = response.partition(b"\r\n\r\n")
    assert sep, response
    statusLine, *lines = head.split(b"\r\n")
    fields = []
    for line in lines:
        name, colon, value = line.partition(b": ")
        assert colon, line
        fields.append((name, value))
    return statusLine, fields, body


@pytest.mark.parametrize(
    "status, phrase",
    [(400, b"Bad Request"), (403, b"Forbidden"), (502, b"Bad Gateway"), (503, b"Service Unavailable")],
)
def test_plainResponseStatusLine(status: int, phrase: bytes) -> None:
    statusLine, _, _ = parse(plainResponse(status, "why", close=False))
    assert statusLine == b"HTTP/1.1 %d %s" % (status, phrase)


def test_plainResponseUnknownStatusHasAPhrase() -> None:
    statusLine, _, _ = parse(plainResponse(599, "x", close=False))
    assert statusLine.startswith(b"HTTP/1.1 599 ")
    assert len(statusLine) > len(b"HTTP/1.1 599 ")


@pytest.mark.parametrize("reason", ["you have to include x-target-host header", "", "caf\u00e9 \u2013 \ud55c\uad6d\uc5b4"])
def test_plainResponseBodyAndLength(reason: str) -> None:
    statusLine, fields, body = parse(plainResponse(403, reason, close=False))
    assert body == (reason + "\n").encode("utf-8")
    assert dict(fields)[b"Content-Length"] == str(len(body)).encode()
    assert dict(fields)[b"Content-Type"] == b"text/plain; charset=utf-8"


def test_plainResponseConnectionCloseOnlyWhenAsked() -> None:
    closing = plainResponse(400, "bad", close=True)
    keeping = plainResponse(400, "bad", close=False)
    assert dict(parse(closing)[1]).get(b"Connection") == b"close"
    assert b"connection" not in [n.lower() for n, _ in parse(keeping)[1]]
    assert closing.replace(b"Connection: close\r\n", b"") == keeping


def _relayedOracle(fields: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The straightforward statement of the rule (the implementation is tuned for speed)."""
    listed = {
        token.strip().lower()
        for name, value in fields
        if name.lower() == b"connection"
        for token in value.split(b",")
        if token.strip()
    }
    dropped = {
        b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization",
        b"te", b"trailer", b"transfer-encoding", b"upgrade", b"content-length",
    }
    kept = [(n, v) for n, v in fields if n.lower() not in dropped and n.lower() not in listed]
    vias = [v for n, v in kept if n.lower() == b"via"]
    return [(n, v) for n, v in kept if n.lower() != b"via"] + [(b"Via", b", ".join([*vias, VIA]))]


_NAMES = st.sampled_from(
    [b"Connection", b"connection", b"Via", b"VIA", b"Keep-Alive", b"Content-Length", b"Transfer-Encoding",
     b"X-A", b"x-a", b"Date", b"Upgrade", b"TE", b"Server"]
)
_VALUES = st.lists(st.sampled_from([b"x-a", b"via", b"Date", b"close", b" keep-alive ", b"1.1 origin", b""]),
                   max_size=3).map(b",".join)


@given(st.lists(st.tuples(_NAMES, _VALUES), max_size=8))
def test_relayedResponseFieldsFollowTheRule(fields: list[tuple[bytes, bytes]]) -> None:
    assert relayedResponseFields(fields) == _relayedOracle(fields)
