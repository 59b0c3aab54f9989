"""
Header rules a proxy applies in both directions (RFC 9110 section 7.6).

Hop-by-hop fields describe one connection, not the message, so they are
removed before a message is relayed: the fixed set below, plus every name the
C{Connection} field lists.  Framing (C{Transfer-Encoding} and
C{Content-Length}) is redone by the proxy for each connection, from what
it parsed: it is never copied, so no field list can remove or forge it.
"""

from __future__ import annotations

from typing import Sequence

from twisted.web.http import RESPONSES

from mydataproxy.http.framing import RequestHead

VIA = b"1.1 mydataproxy"

HOP_BY_HOP = frozenset(
    {
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
)

# Fields the proxy writes itself, whatever the message carried: framing
# (Content-Length, Transfer-Encoding) from what it parsed, Host from the
# target; Expect is answered by the proxy (it sends the 100 itself); Via and
# X-Forwarded-For are appended to.  No Connection option and no filter entry
# can touch these.
_REWRITTEN_REQUEST_FIELDS = frozenset({b"host", b"content-length", b"expect", b"via", b"x-forwarded-for"})
# Max-Forwards counts hops for these methods only (RFC 9110 7.6.2).
MAX_FORWARDS_METHODS = (b"OPTIONS", b"TRACE")
_UNRELAYED_RESPONSE_FIELDS = HOP_BY_HOP | {b"content-length", b"transfer-encoding"}

HeaderList = list[tuple[bytes, bytes]]


def connectionTokens(values: Sequence[bytes]) -> frozenset[bytes]:
    """
    The lower-cased option names listed in C{Connection} field values.
    """
    if not values:
        return frozenset()
    return frozenset(
        token.strip().lower()
        for value in values
        for token in value.split(b",")
        if token.strip()
    )


def _appended(existing: Sequence[bytes] | None, value: bytes) -> bytes:
    if existing:
        return b", ".join([*existing, value])
    return value


def via(version: bytes) -> bytes:
    """Our C{Via} entry for a message received with HTTP C{version}."""
    return (version[5:] if version.startswith(b"HTTP/") else b"1.1") + b" mydataproxy"


# The names never relayed as they are, by filter (a config's few filters):
# one set lookup per field instead of four.
_UNRELAYED: dict[frozenset[bytes], frozenset[bytes]] = {}


def _unrelayed(drop: frozenset[bytes]) -> frozenset[bytes]:
    names = _UNRELAYED.get(drop)
    if names is None:
        if len(_UNRELAYED) >= 64:
            _UNRELAYED.clear()
        names = _UNRELAYED[drop] = HOP_BY_HOP | _REWRITTEN_REQUEST_FIELDS | drop
    return names


def _endToEnd(head: RequestHead, drop: frozenset[bytes]) -> HeaderList:
    """
    The client's fields a proxy may relay as they are: not hop-by-hop, not
    listed in C{Connection}, not ones the proxy writes itself, not in C{drop}.
    """
    unrelayed = _unrelayed(drop)
    listed = head.connection
    hopCounted = head.method in MAX_FORWARDS_METHODS
    out: HeaderList = []
    for field in head.fields:
        lower = field[0].lower()
        if lower in unrelayed or lower in listed or (hopCounted and lower == b"max-forwards"):
            continue
        out.append(field)
    return out


def _via(head: RequestHead) -> tuple[bytes, bytes]:
    vias = None if b"via" in head.connection else head.values(b"via")
    return (b"Via", _appended(vias, via(head.version)))


def upstreamRequestFields(
    head: RequestHead, drop: frozenset[bytes], host: bytes, peerAddress: bytes
) -> HeaderList:
    """
    The header fields to send to the origin for a client request, framing
    fields excepted (the caller writes those from what it parsed).

    @param head: The client's request head.
    @param drop: Lower-cased names never forwarded (the configured filter).
    @param host: The value for C{Host} (the target's authority).
    @param peerAddress: The address of the client socket (the hop we
        received the request from), appended to C{X-Forwarded-For}.
    @return: (name, value) pairs in the client's order and spelling,
        repeated fields kept.
    """
    listed = head.connection
    out: HeaderList = [(b"Host", host), *_endToEnd(head, drop)]
    # A field the client declared hop-by-hop or that the filter drops starts afresh.
    forwardedFor = None if b"x-forwarded-for" in drop or b"x-forwarded-for" in listed else head.values(b"x-forwarded-for")
    out.append((b"X-Forwarded-For", _appended(forwardedFor, peerAddress)))
    out.append(_via(head))
    return out


def replacedRequestFields(
    head: RequestHead, drop: frozenset[bytes], host: bytes, added: HeaderList
) -> HeaderList:
    """
    Like L{upstreamRequestFields}, for a proxy that writes the fields in
    C{drop} itself: those the client sent are left out and C{added} (the
    proxy's own) go in their place, before C{Via}.
    """
    return [(b"Host", host), *_endToEnd(head, drop), *added, _via(head)]


def relayedResponseFields(fields: HeaderList) -> HeaderList:
    """
    The origin's response fields to relay to the client: hop-by-hop and
    framing fields removed (the proxy frames the response itself), our
    C{Via} appended to the origin's.
    """
    out: HeaderList = []
    kept: list[bytes] = []
    vias: list[bytes] = []
    connection: list[bytes] = []
    for field in fields:
        lower = field[0].lower()
        if lower in _UNRELAYED_RESPONSE_FIELDS:
            if lower == b"connection":
                connection.append(field[1])
        elif lower == b"via":
            vias.append(field[1])
        else:
            out.append(field)
            kept.append(lower)
    if connection:
        # Names the origin's Connection field lists are hop-by-hop too,
        # wherever they stand.
        listed = connectionTokens(connection)
        if b"via" in listed:
            vias = []
        out = [field for field, lower in zip(out, kept) if lower not in listed]
    out.append((b"Via", _appended(vias, VIA)))
    return out


def ownResponse(
    version: bytes,
    status: int,
    body: bytes,
    fields: HeaderList = (),
    close: bool = False,
    headOnly: bool = False,
) -> bytes:
    """
    A complete response the proxy gives itself, to a request of HTTP
    C{version}; an HTTP/1.0 connection kept open says so.  For a HEAD
    request (C{headOnly}) the body is left out, its length kept.
    """
    phrase = RESPONSES.get(status, b"Error")
    if close:
        connection = b"Connection: close\r\n"
    elif version == b"HTTP/1.0":
        connection = b"Connection: keep-alive\r\n"
    else:
        connection = b""
    return b"".join(
        [
            b"HTTP/1.1 %d %s\r\n" % (status, phrase),
            *(b"%s: %s\r\n" % field for field in fields),
            b"Content-Length: %d\r\n" % len(body),
            connection,
            b"\r\n",
            b"" if headOnly else body,
        ]
    )


def plainResponse(status: int, reason: str, close: bool, fields: HeaderList = ()) -> bytes:
    """A complete plain-text response, for answers the proxy gives itself."""
    body = (reason + "\n").encode("utf-8")
    return ownResponse(b"HTTP/1.1", status, body, [(b"Content-Type", b"text/plain; charset=utf-8"), *fields], close)
