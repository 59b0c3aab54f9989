"""
The adversarial origin corpus (issue 7): the mirror of the client-side
smuggling corpus in C{test_hardening.py}.  A scripted origin
(L{hostile_origin.HostileOrigin}) answers the first request with a framing
trick; a real C{twistd mydataproxy} relays it over real loopback sockets.

For every probe the first client sees either a correct relayed message,
framed by the proxy (exactly one C{Content-Length} or chunked framing, no
origin framing field, C{Connection} or field it lists), or a 502, or a
connection cut before the end of the message: never an ambiguous message.
Then a second client asks the same origin (one connection per destination,
so a reusable connection is reused) and must get its own response and not a
byte meant for the first.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

import pytest

from conftest import LOOPBACK, ProxyLauncher
from hostile_origin import ABRUPT, CLOSE, HOLD, KEEP, RESET, HostileOrigin, Received, Reply

SECOND_BODY = b"second response"
SECOND = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Second: 1\r\n\r\n%s" % (len(SECOND_BODY), SECOND_BODY)
# Bytes no client may ever see: a second response smuggled behind the first.
EVIL = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nX-Evil: 1\r\n\r\nEVIL"


@pytest.fixture(scope="module")
def relay(tmp_path_factory, ca_pem, session_connect_ports, dns_server):
    """A proxy with one origin connection per destination, so keep-alive connections are reused."""
    launcher = ProxyLauncher(tmp_path_factory.mktemp("origin-corpus"), ca_pem, session_connect_ports, dns_server)
    p = launcher(
        forward={"http_ports": ["1024-65535"]},  # the scripted origins listen on ephemeral ports
        upstream={"max_connections_per_destination": 1, "read_timeout": 3.0, "idle_timeout": 30.0},
    )
    yield p
    assert p.alive(), f"the proxy died; output:\n{p.output()[-4000:]}"
    problems = launcher.stop_all()
    assert not problems, problems


# ---------------------------------------------------------------------------
# What the client receives, judged strictly
# ---------------------------------------------------------------------------


@dataclass
class Seen:
    """Everything one client connection received until the proxy closed it."""

    raw: bytes
    reset: bool
    status: int | None = None
    fields: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    complete: bool = False
    rest: bytes = b""
    problem: str = ""

    def values(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.fields if n.lower() == name]


def judge(raw: bytes, reset: bool, method: str = "GET") -> Seen:
    """
    Parse what the proxy sent as one HTTP/1.1 response, noting whether it is
    complete by its own framing and whether that framing is unambiguous.
    """
    seen = Seen(raw, reset)
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        seen.problem = "no complete head" if raw else ""
        return seen
    lines = raw[:end].split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    seen.status = int(parts[1])
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or b"\n" in line or b"\r" in line:
            seen.problem = f"bad field line {line!r}"
            return seen
        seen.fields.append((name, value.strip(b" \t")))
    body = raw[end + 4 :]
    lengths = seen.values(b"content-length")
    codings = seen.values(b"transfer-encoding")
    if lengths and codings:
        seen.problem = "both Content-Length and Transfer-Encoding"
        return seen
    if len(lengths) > 1:
        seen.problem = f"several Content-Length fields {lengths}"
        return seen
    if method == "HEAD" or seen.status in (204, 304):
        seen.complete, seen.rest = True, body
        return seen
    if codings:
        if [c.strip().lower() for c in b",".join(codings).split(b",")] != [b"chunked"]:
            seen.problem = f"transfer-coding {codings}"
            return seen
        out, pos = bytearray(), 0
        while True:
            eol = body.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(body[pos:eol].split(b";")[0], 16)
            pos = eol + 2
            if size == 0:
                trailer_end = body.find(b"\r\n", pos)
                while trailer_end > pos:  # skip trailer fields
                    pos = trailer_end + 2
                    trailer_end = body.find(b"\r\n", pos)
                if trailer_end == pos:
                    seen.complete, seen.rest = True, body[pos + 2 :]
                break
            if len(body) < pos + size + 2:
                out += body[pos:]
                break
            out += body[pos : pos + size]
            pos += size + 2
        seen.body = bytes(out)
        return seen
    if lengths:
        n = int(lengths[0])
        seen.body, seen.rest = body[:n], body[n:]
        seen.complete = len(body) >= n
        return seen
    seen.problem = "no framing: a close-delimited message cannot tell its end from a cut"
    seen.body = body
    return seen


def ask(relay, origin: HostileOrigin, path: str, method: str = "GET", body: bytes | None = None,
        timeout: float = 8.0) -> Seen:
    """One request on its own client connection (Connection: close); all that came back."""
    sock = socket.create_connection((LOOPBACK, relay.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    head = f"{method} {origin.url}{path} HTTP/1.1\r\nHost: {origin.authority}\r\nConnection: close\r\n"
    if body is not None:
        head += f"Content-Length: {len(body)}\r\n"
    sock.sendall(head.encode() + b"\r\n" + (body or b""))
    return receive(sock, method)


def receive(sock: socket.socket, method: str = "GET") -> Seen:
    raw, reset = bytearray(), False
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            raw += data
    except ConnectionResetError:
        reset = True
    finally:
        sock.close()
    return judge(bytes(raw), reset, method)


def assert_relayed(seen: Seen, status: int, body: bytes) -> None:
    """A correct message, framed by the proxy."""
    assert not seen.problem, f"{seen.problem}: {seen.raw[:600]!r}"
    assert seen.status == status, seen.raw[:600]
    assert seen.complete, f"message incomplete: {seen.raw[:600]!r}"
    assert seen.body == body
    assert seen.rest == b"", f"bytes after the message: {seen.rest[:200]!r}"
    lengths = seen.values(b"content-length")
    chunked = seen.values(b"transfer-encoding")
    assert len(lengths) + len(chunked) == 1, f"the proxy must frame the message itself: {seen.fields}"
    if lengths:
        assert lengths == [b"%d" % len(body)]
    assert not any(n.lower() == b"x-evil" for n, _ in seen.fields)


def assert_refused_or_cut(seen: Seen) -> None:
    """A 502 before the head, or a message cut short after it: never a complete message."""
    assert not seen.problem or seen.problem == "no complete head", f"{seen.problem}: {seen.raw[:600]!r}"
    if seen.status == 502:
        assert seen.complete, f"an incomplete 502: {seen.raw[:600]!r}"
        return
    assert not seen.complete, f"a failed response was relayed as complete: {seen.raw[:600]!r}"
    assert b"EVIL" not in seen.raw


def assert_second_client_clean(relay, origin: HostileOrigin, same_connection: bool | None) -> None:
    """
    A second client asks the same origin: it gets its own response, none of
    the first's bytes; C{same_connection} says whether the pooled origin
    connection must (True) or must not (False) have carried it.
    """
    seen = ask(relay, origin, "/second")
    assert_relayed(seen, 200, SECOND_BODY)
    assert b"EVIL" not in seen.raw and b"hello" not in seen.raw
    second = [r for r in origin.received() if r.path == "/second"]
    assert len(second) == 1
    first = [r for r in origin.received() if r.path == "/first"]
    if same_connection is not None:
        assert (second[0].connection == first[0].connection) is same_connection, (first, second)


def scripted(first: Reply):
    """A responder: C{first} for /first, the plain second response otherwise."""

    def respond(request: Received) -> Reply:
        return first if request.path == "/first" else Reply(SECOND)

    return respond


# ---------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------

# Relayed: a correct message, and the origin connection is kept.
RELAYED = {
    "connection-lists-content-length": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: Content-Length\r\n\r\nhello",
    "connection-lists-transfer-encoding": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: Transfer-Encoding\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    ),
    "repeated-identical-content-length": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    "content-length-list": b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello",
    "chunk-extensions-and-trailers": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;a=b\r\nhe\r\n3 ;c\r\nllo\r\n0\r\nX-T: 1\r\n\r\n"
    ),
    "interim-responses-first": (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    ),
}


@pytest.mark.parametrize("name", sorted(RELAYED))
def test_tricky_but_valid_response_is_relayed_and_framed_by_the_proxy(relay, name):
    with HostileOrigin(scripted(Reply(RELAYED[name]))) as origin:
        seen = ask(relay, origin, "/first")
        assert_relayed(seen, 200, b"hello")
        assert not seen.values(b"connection") or all(
            b"content-length" not in v.lower() and b"transfer-encoding" not in v.lower()
            for v in seen.values(b"connection")
        )
        assert_second_client_clean(relay, origin, same_connection=True)


# Refused before the head: a 502 for the client, the origin connection dropped.
REFUSED = {
    "content-length-and-transfer-encoding": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    ),
    "conflicting-content-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 50\r\n\r\nhello" + EVIL,
    "content-length-not-digits": b"HTTP/1.1 200 OK\r\nContent-Length: 5x\r\n\r\nhello",
    "content-length-negative": b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\nhello",
    "content-length-huge": b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\nhello",
    "transfer-encoding-not-chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nhello",
    "transfer-encoding-chunked-twice": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
    "transfer-encoding-in-http-1.0": b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "bare-lf-line-endings": b"HTTP/1.1 200 OK\nContent-Length: 5\n\nhello",
    "bare-lf-in-one-field": b"HTTP/1.1 200 OK\r\nX-A: 1\nContent-Length: 5\r\n\r\nhello",
    "bare-cr-in-one-field": b"HTTP/1.1 200 OK\r\nX-A: 1\rContent-Length: 5\r\n\r\nhello",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX-A: 1\r\n Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    "status-000": b"HTTP/1.1 000 Zero\r\nContent-Length: 5\r\n\r\nhello",
    "status-999": b"HTTP/1.1 999 Nine\r\nContent-Length: 5\r\n\r\nhello",
    "switching-protocols-unasked": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: evil\r\n\r\n" + EVIL,
    "interim-flood": b"HTTP/1.1 100 Continue\r\n\r\n" * 11 + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    "not-http": b"SSH-2.0-OpenSSH_9.6\r\n",
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_ambiguous_response_head_is_502(relay, name):
    with HostileOrigin(scripted(Reply(REFUSED[name], then=HOLD))) as origin:
        started = time.monotonic()
        seen = ask(relay, origin, "/first")
        assert seen.status == 502, seen.raw[:600]
        assert_relayed(seen, 502, seen.body)
        assert b"invalid response" in seen.body
        assert time.monotonic() - started < 2.5, "refused only at the read timeout: the check waited for more"
        assert_second_client_clean(relay, origin, same_connection=False)


# Refused after the head (the body framing is broken): the client's message is cut.
CUT_BODY = {
    "chunk-size-17-hex-digits": b"00000000000000005\r\nhello\r\n0\r\n\r\n",
    "chunk-size-huge": b"10000000000000000000000000000005\r\nhello\r\n0\r\n\r\n",
    "chunk-size-non-hex": b"zz\r\nhello\r\n0\r\n\r\n",
    "chunk-size-negative": b"-5\r\nhello\r\n0\r\n\r\n",
    "chunk-size-0x-prefix": b"0x5\r\nhello\r\n0\r\n\r\n",
    "chunk-size-leading-space": b" 5\r\nhello\r\n0\r\n\r\n",
    "chunk-bare-lf": b"5\nhello\n0\n\n",
    "chunk-data-too-long": b"5\r\nhelloEVIL\r\n0\r\n\r\n",
    "chunk-extension-endless": b"5;" + b"x" * 70000 + b"\r\nhello\r\n0\r\n\r\n",
    "trailer-malformed": b"5\r\nhello\r\n0\r\nBad Trailer Line\r\n\r\n",
    "trailer-flood": b"5\r\nhello\r\n0\r\n" + b"T: 1\r\n" * 200 + b"\r\n",
}


@pytest.mark.parametrize("name", sorted(CUT_BODY))
def test_broken_chunked_body_cuts_the_relayed_message(relay, name):
    response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + CUT_BODY[name]
    with HostileOrigin(scripted(Reply(response, then=HOLD))) as origin:
        seen = ask(relay, origin, "/first")
        assert_refused_or_cut(seen)
        assert_second_client_clean(relay, origin, same_connection=False)


# Cut by the origin after the head: (reply, what the origin does then).
CUT = {
    "content-length-body-cut-by-reset": (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello", RESET),
    "content-length-body-cut-by-close": (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello", CLOSE),
    "chunked-body-cut-by-reset": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", RESET),
    "chunked-body-cut-by-close": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel", CLOSE),
    "close-delimited-body-cut-by-reset": (b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\nhello", RESET),
}


@pytest.mark.parametrize("name", sorted(CUT))
def test_body_cut_by_the_origin_is_never_relayed_as_complete(relay, name):
    response, then = CUT[name]
    with HostileOrigin(scripted(Reply([response, b""], then=then, pause=0.2))) as origin:
        seen = ask(relay, origin, "/first")
        assert seen.status == 200, seen.raw[:300]
        assert_refused_or_cut(seen)
        assert_second_client_clean(relay, origin, same_connection=False)


def test_close_delimited_body_ended_by_a_clean_close_is_relayed(relay):
    """The control for the reset case: FIN ends a close-delimited body."""
    with HostileOrigin(scripted(Reply(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\nhello", then=CLOSE))) as origin:
        assert_relayed(ask(relay, origin, "/first"), 200, b"hello")
        assert_second_client_clean(relay, origin, same_connection=False)


@pytest.fixture
def tls_pair(tls_files):
    return (tls_files.cert_pem, tls_files.key_pem)


@pytest.mark.parametrize(("then", "complete"), [(ABRUPT, False), (CLOSE, True)], ids=["no-close-notify", "close-notify"])
def test_tls_close_delimited_body_needs_close_notify(relay, tls_pair, then, complete):
    """
    Over TLS a close-delimited body ends only with close_notify: an origin
    (or an attacker on the path) that just closes the socket may have cut it.
    """
    response = b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\nhello"
    with HostileOrigin(scripted(Reply([response, b""], then=then, pause=0.2)), tls=tls_pair) as origin:
        sock = socket.create_connection((LOOPBACK, relay.port), timeout=8)
        target = f"https://localhost:{origin.port}"
        sock.sendall(f"GET {target}/first HTTP/1.1\r\nHost: localhost:{origin.port}\r\nConnection: close\r\n\r\n".encode())
        seen = receive(sock)
        if complete:
            assert_relayed(seen, 200, b"hello")
        else:
            assert seen.status == 200, seen.raw[:300]
            assert_refused_or_cut(seen)


def test_one_byte_chunks_are_relayed_correctly_and_quickly(relay):
    body = bytes(range(256)) * 128  # 32 KiB in 32768 chunks of one byte
    chunks = b"".join(b"1\r\n%s\r\n" % body[i : i + 1] for i in range(len(body)))
    response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
    with HostileOrigin(scripted(Reply(response))) as origin:
        started = time.monotonic()
        seen = ask(relay, origin, "/first")
        elapsed = time.monotonic() - started
        assert_relayed(seen, 200, body)
        assert elapsed < 3.0, f"{elapsed:.2f} s to relay 32 KiB of 1-byte chunks"
        assert_second_client_clean(relay, origin, same_connection=True)


@pytest.mark.parametrize("later", [False, True], ids=["same-read", "later-read"])
def test_garbage_after_a_complete_response_reaches_no_client(relay, later):
    first = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    data = [first, EVIL] if later else [first + EVIL]
    with HostileOrigin(scripted(Reply(data, pause=0.1))) as origin:
        assert_relayed(ask(relay, origin, "/first"), 200, b"hello")
        time.sleep(0.3)  # the late bytes arrive while the connection is idle in the pool
        assert_second_client_clean(relay, origin, same_connection=False)


def test_response_before_the_request_body_ended(relay):
    """
    The origin answers 413 after the head, before the body: the client gets
    the 413 without waiting for an idle timeout, the origin connection (with
    half a body on it) is not reused, and nothing of it reaches the next client.
    """
    early = Reply(b"HTTP/1.1 413 Too Large\r\nContent-Length: 8\r\n\r\ntoo big\n" + EVIL, early=True)
    with HostileOrigin(scripted(early)) as origin:
        sock = socket.create_connection((LOOPBACK, relay.port), timeout=8)
        head = (
            f"POST {origin.url}/first HTTP/1.1\r\nHost: {origin.authority}\r\n"
            f"Content-Length: 10000000\r\n\r\n"
        ).encode()
        sock.sendall(head + b"x" * 65536)
        started = time.monotonic()
        sock.settimeout(8)
        raw = bytearray()
        try:
            while b"too big\n" not in raw:
                data = sock.recv(65536)
                if not data:
                    break
                raw += data
        finally:
            sock.close()
        assert time.monotonic() - started < 5
        seen = judge(bytes(raw), False)
        assert seen.status == 413 and seen.body == b"too big\n", raw[:300]
        assert b"EVIL" not in raw
        assert_second_client_clean(relay, origin, same_connection=False)


def test_bodyless_post_on_a_reused_connection_is_sent_once(relay):
    """RFC 9112 9.3.1: the origin read the POST and closed; replaying it could pay twice."""

    def respond(request: Received) -> Reply:
        if request.path == "/pay":
            return Reply(b"", then=CLOSE)
        return Reply(SECOND)

    with HostileOrigin(respond) as origin:
        assert_relayed(ask(relay, origin, "/warm"), 200, SECOND_BODY)
        seen = ask(relay, origin, "/pay", method="POST")
        assert seen.status == 502, seen.raw[:300]
        time.sleep(0.3)
        pays = [r for r in origin.received() if r.path == "/pay"]
        assert len(pays) == 1, f"the POST reached the origin {len(pays)} times"
        assert pays[0].connection == 0, "the POST went over the reused connection"


def test_get_on_a_stale_reused_connection_is_retried_once(relay):
    """The control: a safe request whose reused connection closed unanswered is sent again, once."""
    attempts = []

    def respond(request: Received) -> Reply:
        if request.path == "/stale":
            attempts.append(request)
            if len(attempts) == 1:
                return Reply(b"", then=CLOSE)
        return Reply(SECOND)

    with HostileOrigin(respond) as origin:
        assert_relayed(ask(relay, origin, "/warm"), 200, SECOND_BODY)
        assert_relayed(ask(relay, origin, "/stale"), 200, SECOND_BODY)
        assert [r.connection for r in attempts] == [0, 1]


def test_pipelined_second_response_is_not_given_to_the_next_client(relay):
    """
    An origin that answers one request twice: the extra response stays on
    the connection it came on, which is closed, whatever the timing.
    """
    with HostileOrigin(scripted(Reply([b"HTTP/1.1 204 No Content\r\n\r\n", EVIL], then=KEEP, pause=0.1))) as origin:
        seen = ask(relay, origin, "/first")
        assert seen.status == 204 and seen.complete and seen.rest == b"", seen.raw
        time.sleep(0.3)
        assert_second_client_clean(relay, origin, same_connection=False)
