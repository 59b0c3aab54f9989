"""
Property-based fuzzing (hypothesis) of the origin response parser,
L{mydataproxy.upstream.UpstreamConnection}, driven through an in-memory
transport: valid responses of every framing, split at random points, parse
to exactly what was encoded; any bytes at all, split two different ways, give
the same outcome; nothing raises out of C{dataReceived} or
C{connectionLost}; every failure is a 502.
"""

from __future__ import annotations

from datetime import timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from mydataproxy.http.target import Destination
from mydataproxy.upstream.client import MAX_CHUNK_LINE, MAX_RESPONSE_HEAD, UpstreamConnection, UpstreamError

FUZZ = settings(
    max_examples=300,
    deadline=timedelta(seconds=2),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

ORIGIN = Destination("http", "127.0.0.1", 8080, ("127.0.0.1",))
TOKEN_CHARS = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
FRAMING_NAMES = {b"content-length", b"transfer-encoding", b"connection"}


class Events:
    """Stands in for an UpstreamExchange: what the connection reported."""

    def __init__(self) -> None:
        self.head: tuple | None = None
        self.body = bytearray()
        self.outcome: str | None = None
        self.failure: UpstreamError | None = None

    def headReceived(self, status, reason, fields, bodyLength, declaredLength) -> None:
        assert self.head is None, "a second head for one exchange"
        self.head = (status, reason, list(fields), bodyLength, declaredLength)

    def bodyReceived(self, data: bytes) -> None:
        assert self.head is not None and self.outcome is None
        self.body += data

    def responseComplete(self) -> None:
        assert self.outcome is None
        self.outcome = "complete"

    def connectionFailed(self, failure: UpstreamError) -> None:
        assert self.outcome is None
        self.outcome = "failed"
        self.failure = failure


class _Pool:
    def connectionClosed(self, connection) -> None:
        pass


def run(wire: bytes, cuts: list[int], method: bytes = b"GET") -> tuple[Events, bool]:
    """Feed C{wire} in pieces cut at C{cuts}, then a clean close; the events and reusability."""
    connection = UpstreamConnection(ORIGIN, _Pool())
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 8080))
    connection.makeConnection(transport)
    events = Events()
    connection.sendHead(events, b"GET / HTTP/1.1\r\n\r\n", method == b"HEAD")
    start = 0
    for cut in sorted(set(c for c in cuts if 0 < c < len(wire))) + [len(wire)]:
        if transport.disconnecting:
            break  # an aborted connection reads nothing more
        connection.dataReceived(wire[start:cut])
        start = cut
    reusable = connection.reusable and not transport.disconnecting
    connection.connectionLost(Failure(ConnectionDone()))
    return events, reusable


def outcome(events: Events) -> tuple:
    """What must not depend on how the bytes were split."""
    if events.outcome == "failed":
        assert events.failure.status == 502, events.failure.reason
        return ("failed", events.head)
    return (events.outcome, events.head, bytes(events.body))


# ---------------------------------------------------------------------------
# Valid responses
# ---------------------------------------------------------------------------

tokens = st.lists(st.sampled_from(list(TOKEN_CHARS)), min_size=1, max_size=10).map(bytes)
values = st.one_of(
    st.just(b""),
    st.lists(st.integers(0x21, 0x7E), min_size=1, max_size=20).map(bytes),
    st.lists(st.sampled_from(list(b"ab \t\x80\xff")), max_size=10).map(lambda v: b"x" + bytes(v) + b"y"),
)


@st.composite
def responses(draw) -> tuple[bytes, bytes, tuple, bytes, int]:
    """
    (wire, method, expected head event, expected body, where the encoded
    body starts) of one valid response.
    """
    method = draw(st.sampled_from([b"GET", b"GET", b"GET", b"HEAD"]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
    status = draw(st.integers(200, 599))
    reason = draw(st.sampled_from([b"OK", b"", b"Not Found", b"r\xe9ason"]))
    fields = [
        (name, value)
        for name, value in draw(st.lists(st.tuples(tokens, values), max_size=4))
        if name.lower() not in FRAMING_NAMES
    ]
    body = draw(st.binary(min_size=draw(st.sampled_from([0, 1, 1])), max_size=200))
    framing = draw(st.sampled_from(["length", "length-list", "chunked", "chunked", "close"]))
    if framing == "chunked" and version == b"HTTP/1.0":
        framing = "length"
    wire = [b"%s 100 Continue\r\n\r\n" % version] * draw(st.integers(0, 2))
    noBody = method == b"HEAD" or status in (204, 304)
    declared: int | None = None
    encoded = b""
    if framing in ("length", "length-list"):
        declared = len(body)
        value = b"%d" % declared if framing == "length" else b"%d, %d" % (declared, declared)
        fields.insert(draw(st.integers(0, len(fields))), (b"Content-Length", value))
        encoded = body
        bodyLength: int | None = declared
    elif framing == "chunked":
        fields.insert(draw(st.integers(0, len(fields))), (b"Transfer-Encoding", b"chunked"))
        cuts = sorted(draw(st.sets(st.integers(1, max(1, len(body) - 1)), max_size=8))) if body else []
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)]) if body[a:b]]
        for piece in pieces:
            size = draw(st.sampled_from([b"%x", b"%X", b"00%x"])) % len(piece)
            extension = draw(st.sampled_from([b"", b";a=b", b" ;x", b';q="v"']))
            encoded += size + extension + b"\r\n" + piece + b"\r\n"
        trailers = draw(st.lists(st.tuples(tokens, values), max_size=2))
        encoded += b"0\r\n" + b"".join(b"%s: %s\r\n" % t for t in trailers) + b"\r\n"
        bodyLength = None
    else:
        encoded = body
        bodyLength = None
    if noBody:
        encoded, body, bodyLength = b"", b"", 0
    wire.append(b"%s %d %s\r\n" % (version, status, reason))
    wire.extend(b"%s: %s\r\n" % field for field in fields)
    wire.append(b"\r\n" + encoded)
    parsed = [(n, v.strip(b" \t")) for n, v in fields]
    wire = b"".join(wire)
    return wire, method, (status, reason, parsed, bodyLength, declared), body, len(wire) - len(encoded)


splits = st.lists(st.integers(0, 400), max_size=12)


@FUZZ
@given(responses(), splits)
def test_valid_response_parses_as_encoded_whatever_the_split(response, cuts) -> None:
    wire, method, head, body, _ = response
    for pieces in (cuts, list(range(len(wire)))):
        events, _ = run(wire, pieces, method)
        assert events.outcome == "complete", events.failure and events.failure.reason
        assert events.head == head
        assert bytes(events.body) == body


@FUZZ
@given(responses(), splits, st.binary(min_size=1, max_size=40))
def test_bytes_after_a_complete_response_are_never_delivered(response, cuts, extra) -> None:
    wire, method, head, body, _ = response
    if head[3] is None and (b"Transfer-Encoding", b"chunked") not in head[2]:
        return  # close-delimited: extra bytes are body
    events, reusable = run(wire + extra, cuts, method)
    assert events.outcome == "complete" and bytes(events.body) == body
    assert not reusable, "a connection that sent more than its response must not be reused"


# ---------------------------------------------------------------------------
# Any bytes
# ---------------------------------------------------------------------------

INTERESTING = [b"\r\n", b"\n", b"\r", b"\r\n\r\n", b" ", b"\t", b":", b";", b"0", b"f", b"\x00", b"\xff",
               b"-", b"x", b"Content-Length: 3\r\n", b"Transfer-Encoding: chunked\r\n", b"HTTP/1.1 200 OK\r\n"]


@st.composite
def mutated(draw) -> tuple[bytes, bytes]:
    """A valid response with a few bytes inserted, replaced or deleted; sometimes plain noise."""
    if draw(st.integers(0, 5)) == 0:
        return draw(st.binary(max_size=300)), b"GET"
    wire, method, _, _, bodyStart = draw(responses())
    for _ in range(draw(st.sampled_from([1, 1, 2, 4]))):
        # Mostly at a framing byte (CR, LF, colon, semicolon), where
        # mutations matter most, often in the body's framing.
        where = draw(st.sampled_from(["anywhere", "framing", "body framing"]))
        start = bodyStart if where == "body framing" else 0
        framing = [i for i, byte in enumerate(wire) if byte in b"\r\n:;" and i >= start]
        if framing and where != "anywhere":
            at = draw(st.sampled_from(framing))
        else:
            at = draw(st.integers(0, len(wire)))
        action = draw(st.sampled_from(["insert", "replace", "delete"]))
        piece = draw(st.one_of(st.sampled_from(INTERESTING), st.binary(min_size=1, max_size=4)))
        if action == "insert":
            wire = wire[:at] + piece + wire[at:]
        elif action == "replace":
            wire = wire[:at] + piece + wire[at + len(piece):]
        else:
            wire = wire[:at] + wire[at + len(piece):]
    return wire, method


@settings(FUZZ, max_examples=600)
@given(mutated(), splits)
def test_any_bytes_give_the_same_outcome_whatever_the_split(response, cuts) -> None:
    wire, method = response
    whole, _ = run(wire, [], method)
    assert whole.outcome in ("complete", "failed")
    split, _ = run(wire, cuts, method)
    assert outcome(split) == outcome(whole)
    bytewise, _ = run(wire, list(range(len(wire))), method)
    assert outcome(bytewise) == outcome(whole)


@settings(max_examples=30, deadline=timedelta(seconds=5))
@given(st.sampled_from([b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;"]),
       st.integers(1, 200_000), st.sampled_from([1, 7, 4096]))
def test_endless_heads_and_lines_are_refused_within_their_bound(prefix, size, step) -> None:
    wire = prefix + b"x" * size
    events, _ = run(wire, list(range(0, len(wire), max(step, len(wire) // 50))))
    assert events.outcome == "failed" and events.failure.status == 502
    limit = MAX_RESPONSE_HEAD if prefix.endswith(b"OK\r\n") else MAX_CHUNK_LINE
    if size > limit:
        assert "too large" in events.failure.reason or "too long" in events.failure.reason
