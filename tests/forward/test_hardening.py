"""
Integration tests for the proxy's hardening: strict request framing (an
adversarial smuggling corpus over raw sockets), limits and timeouts, and
proxy authentication.  A real C{twistd mydataproxy} process, real sockets.

The smuggling probes go to L{RecordingOrigin}, an origin living in this test
process that keeps every request head, body and raw byte it receives, so a
test can say exactly which requests reached it.  Every refusal is checked for
its status code and for the proxy's log line naming the reason or rule.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import select
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import bcrypt
import pytest
import requests

from conftest import (
    LOOPBACK,
    LogWatch,
    ConnectionClosed,
    ProxyLauncher,
    RawConnection,
    Response,
    assert_short_text_error,
    build_request,
    open_tunnel,
    require_tool,
)


def tag() -> str:
    return uuid.uuid4().hex[:12]


# ---------------------------------------------------------------------------
# A recording origin
# ---------------------------------------------------------------------------


class RecordingOrigin:
    """
    A small HTTP/1.1 origin in a thread that records every request it
    receives (head, body, whether the body completed) and every raw byte,
    and answers each complete request with C{200} and a JSON summary.

    Its parser is lenient on purpose (heads end at the first CRLFCRLF, any
    Transfer-Encoding means chunked): whatever a proxy lets through is
    recorded rather than refused.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.connections: list[dict] = []
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((LOOPBACK, 0))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def authority(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.authority}"

    # -- observation ----------------------------------------------------------

    def mark(self) -> tuple[int, int]:
        with self.lock:
            return len(self.requests), len(self.connections)

    def requests_since(self, mark: tuple[int, int]) -> list[dict]:
        with self.lock:
            return [dict(r) for r in self.requests[mark[0]:]]

    def all_raw(self) -> bytes:
        with self.lock:
            return b"".join(bytes(c["raw"]) for c in self.connections)

    def close(self) -> None:
        self.listener.close()
        with self.lock:
            for s in self._sockets:
                try:
                    s.close()
                except OSError:
                    pass

    # -- serving --------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            conn = {"raw": bytearray(), "closed": False}
            with self.lock:
                self._sockets.append(sock)
                self.connections.append(conn)
            threading.Thread(target=self._serve, args=(sock, conn), daemon=True).start()

    def _serve(self, sock: socket.socket, conn: dict) -> None:
        buf = bytearray()

        def fill() -> None:
            data = sock.recv(65536)
            if not data:
                raise EOFError
            with self.lock:
                conn["raw"] += data
            buf.extend(data)

        def line() -> bytes:
            while b"\r\n" not in buf:
                fill()
            i = buf.index(b"\r\n")
            out = bytes(buf[:i])
            del buf[: i + 2]
            return out

        def exact(n: int) -> bytes:
            while len(buf) < n:
                fill()
            out = bytes(buf[:n])
            del buf[:n]
            return out

        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    fill()
                i = buf.index(b"\r\n\r\n")
                head = bytes(buf[:i])
                del buf[: i + 4]
                lines = head.split(b"\r\n")
                parts = lines[0].split(b" ")
                headers = []
                for field in lines[1:]:
                    name, _, value = field.partition(b":")
                    headers.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
                entry = {
                    "method": parts[0].decode("latin-1"),
                    "target": (parts[1] if len(parts) > 1 else b"").decode("latin-1"),
                    "request_line": lines[0].decode("latin-1"),
                    "headers": headers,
                    "body": b"",
                    "complete": False,
                }
                with self.lock:
                    self.requests.append(entry)
                lower = {n.lower(): v for n, v in headers}
                body = bytearray()
                if "transfer-encoding" in lower:
                    while True:
                        size = int(line().split(b";")[0].strip(), 16)
                        if size == 0:
                            while line():
                                pass
                            break
                        body += exact(size)
                        if exact(2) != b"\r\n":
                            raise EOFError
                elif "content-length" in lower:
                    body += exact(int(lower["content-length"]))
                with self.lock:
                    entry["body"] = bytes(body)
                    entry["complete"] = True
                answer = json.dumps({"target": entry["target"], "body_length": len(body)}).encode()
                sock.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer)
                )
        except (EOFError, OSError, ValueError):
            pass
        finally:
            with self.lock:
                conn["closed"] = True
            try:
                sock.close()
            except OSError:
                pass


@pytest.fixture(scope="module")
def recorder():
    r = RecordingOrigin()
    yield r
    r.close()


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


class SourcedConnection(RawConnection):
    """A L{RawConnection} from a chosen loopback source address (another "client")."""

    def __init__(self, port: int, source: str, timeout: float = 10.0):
        self.sock = socket.create_connection((LOOPBACK, port), timeout=timeout, source_address=(source, 0))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.eof = False


def read_all_responses(c: RawConnection) -> tuple[list[Response], bool]:
    """
    Read responses until the proxy closes the connection; return them and
    whether the connection ended with EOF (as opposed to a timeout).
    """
    out: list[Response] = []
    while True:
        try:
            out.append(c.read_response())
        except ConnectionClosed:
            return out, True
        except ConnectionResetError:
            return out, True
        except socket.timeout:
            return out, False
        if c.eof:
            return out, True


def get(port: int, url: str, headers=(), source: str | None = None, timeout: float = 10.0) -> Response:
    conn = SourcedConnection(port, source, timeout) if source else RawConnection(port, timeout=timeout)
    with conn as c:
        host = url.split("/")[2]
        c.send(build_request("GET", url, [("Host", host), *headers]))
        return c.read_response()


def access_lines_for(proxy, client_port: int, timeout: float = 3.0) -> list[str]:
    """The access log lines of the client connection from C{client_port}."""
    needle = f"client={LOOPBACK}:{client_port} "
    deadline = time.monotonic() + timeout
    while True:
        lines = [l for l in proxy.access_lines() if needle in l]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


@pytest.fixture(scope="module")
def module_launcher(tmp_path_factory, ca_pem, session_connect_ports, dns_server):
    launcher = ProxyLauncher(tmp_path_factory.mktemp("hardening"), ca_pem, session_connect_ports, dns_server)
    yield launcher
    problems = launcher.stop_all()
    assert not problems, problems


LIMITS = {
    "header_timeout": 1.0,
    "max_header_bytes": 2048,
    "max_headers": 12,
    "max_uri_bytes": 256,
    "max_body_bytes": 1000,
    "tunnel_idle_timeout": 1.0,
}


@pytest.fixture(scope="module")
def limited(module_launcher):
    """A proxy with small limits and timeouts (see L{LIMITS})."""
    p = module_launcher(
        limits=LIMITS,
        forward={"client_idle_timeout": 2.5},
        upstream={"connect_timeout": 1.0, "read_timeout": 1.0},
    )
    yield p
    assert p.alive(), f"the limited proxy died; output:\n{p.output()[-4000:]}"


# ---------------------------------------------------------------------------
# The smuggling corpus
# ---------------------------------------------------------------------------

# {T}: absolute URL of the recording origin, {H}: its authority, {S}: the
# path of a smuggled request (unique per probe).
SMUGGLED = b"GET {S} HTTP/1.1\r\nHost: {H}\r\n\r\n"


def head(*fields: bytes, method: bytes = b"POST", path: bytes = b"/probe", version: bytes = b"HTTP/1.1") -> bytes:
    lines = [method + b" {T}" + path + b" " + version, b"Host: {H}", *fields]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


BOTH = r"both Content-Length and Transfer-Encoding"
REPEATED_TE = r"repeated Transfer-Encoding"
UNSUPPORTED_TE = r"unsupported transfer-coding"
REPEATED_CL = r"repeated Content-Length"
INVALID_CL = r"invalid Content-Length"
BAD_NAME = r"invalid header field name"
CTL_VALUE = r"control character in header field value"
OBS_FOLD = r"obsolete line folding"
TE_HTTP10 = r"Transfer-Encoding in an HTTP/1\.0 request"
BAD_CHUNKED = (
    r"bad request: (invalid chunk size|chunk size too large|malformed chunk size line"
    r"|chunk line too long|chunk not followed by CRLF)"
)
TE = b"Transfer-Encoding: chunked"

# (id, bytes, reason in the log line)
HEAD_PROBES = [
    # CL.TE and TE.CL
    ("cl-te", head(b"Content-Length: 4", TE) + b"0\r\n\r\n" + SMUGGLED, BOTH),
    ("te-cl", head(TE, b"Content-Length: 3") + chunk(SMUGGLED) + b"0\r\n\r\n", BOTH),
    ("cl-te-lowercase", head(b"content-length: 4", b"transfer-encoding: chunked") + b"0\r\n\r\n" + SMUGGLED, BOTH),
    ("cl-zero-te", head(b"Content-Length: 0", TE) + chunk(SMUGGLED) + b"0\r\n\r\n", BOTH),
    # TE.TE: obfuscated or repeated transfer-codings
    ("te-te-obfuscated", head(TE, b"Transfer-Encoding: cow") + b"0\r\n\r\n" + SMUGGLED, REPEATED_TE),
    ("te-te-same", head(TE, TE) + b"0\r\n\r\n" + SMUGGLED, REPEATED_TE),
    ("te-te-case", head(TE, b"transfer-encoding: identity") + b"0\r\n\r\n" + SMUGGLED, REPEATED_TE),
    ("te-list-chunked-chunked", head(b"Transfer-Encoding: chunked, chunked") + b"0\r\n\r\n" + SMUGGLED, UNSUPPORTED_TE),
    ("te-xchunked-with-cl", head(b"Content-Length: 4", b"Transfer-Encoding: xchunked") + b"0\r\n\r\n" + SMUGGLED, UNSUPPORTED_TE),
    ("te-identity-with-cl", head(b"Transfer-Encoding: identity", b"Content-Length: 4") + b"0\r\n\r\n" + SMUGGLED, UNSUPPORTED_TE),
    ("te-identity-alone", head(b"Transfer-Encoding: identity") + SMUGGLED, UNSUPPORTED_TE),
    ("te-quoted", head(b'Transfer-Encoding: "chunked"') + b"0\r\n\r\n" + SMUGGLED, UNSUPPORTED_TE),
    ("te-identity-chunked", head(b"Transfer-Encoding: identity, chunked") + b"0\r\n\r\n" + SMUGGLED, UNSUPPORTED_TE),
    ("te-chunked-identity", head(b"Transfer-Encoding: chunked, identity") + b"0\r\n\r\n" + SMUGGLED, UNSUPPORTED_TE),
    ("te-gzip-chunked", head(b"Transfer-Encoding: gzip, chunked") + b"0\r\n\r\n" + SMUGGLED, UNSUPPORTED_TE),
    ("te-empty", head(b"Transfer-Encoding: ", b"Content-Length: 4") + b"0\r\n\r\n" + SMUGGLED, UNSUPPORTED_TE),
    ("te-space-before-colon", head(b"Transfer-Encoding : chunked", b"Content-Length: 4") + b"0\r\n\r\n" + SMUGGLED, BAD_NAME),
    ("te-name-nul", head(b"Transfer-Encoding\x00: chunked") + b"0\r\n\r\n" + SMUGGLED, BAD_NAME),
    ("te-name-high-byte", head(b"Transfer-Encoding\xff: chunked") + b"0\r\n\r\n" + SMUGGLED, BAD_NAME),
    ("te-vertical-tab", head(b"Transfer-Encoding:\x0bchunked", b"Content-Length: 4") + b"0\r\n\r\n" + SMUGGLED, CTL_VALUE),
    ("te-form-feed", head(b"Transfer-Encoding: chunked\x0c") + b"0\r\n\r\n" + SMUGGLED, CTL_VALUE),
    ("te-nul-value", head(b"Transfer-Encoding: chunked\x00") + b"0\r\n\r\n" + SMUGGLED, CTL_VALUE),
    ("te-http10", head(TE, version=b"HTTP/1.0") + b"0\r\n\r\n" + SMUGGLED, TE_HTTP10),
    ("te-http10-with-cl", head(b"Content-Length: 4", TE, version=b"HTTP/1.0") + b"0\r\n\r\n" + SMUGGLED, TE_HTTP10),
    # obs-fold
    ("obs-fold-te-value", head(b"Transfer-Encoding:", b" chunked", b"Content-Length: 4") + b"0\r\n\r\n" + SMUGGLED, OBS_FOLD),
    ("obs-fold-hides-te", head(b"X-Foo: bar", b" Transfer-Encoding: chunked") + b"0\r\n\r\n" + SMUGGLED, OBS_FOLD),
    ("obs-fold-tab", head(b"X-Foo: bar", b"\tTransfer-Encoding: chunked") + b"0\r\n\r\n" + SMUGGLED, OBS_FOLD),
    ("obs-fold-cl-value", head(b"Content-Length:", b" 4") + b"0\r\n\r\n" + SMUGGLED, OBS_FOLD),
    # double / non-numeric Content-Length
    ("cl-cl-different", head(b"Content-Length: 0", b"Content-Length: 40") + SMUGGLED, REPEATED_CL),
    ("cl-cl-same", head(b"Content-Length: 5", b"Content-Length: 5") + b"hello" + SMUGGLED, REPEATED_CL),
    ("cl-cl-case", head(b"Content-Length: 5", b"content-length: 5") + b"hello" + SMUGGLED, REPEATED_CL),
    ("cl-list", head(b"Content-Length: 5, 5") + b"hello" + SMUGGLED, INVALID_CL),
    ("cl-plus", head(b"Content-Length: +5") + b"hello" + SMUGGLED, INVALID_CL),
    ("cl-negative", head(b"Content-Length: -1") + SMUGGLED, INVALID_CL),
    ("cl-hex", head(b"Content-Length: 0x5") + b"hello" + SMUGGLED, INVALID_CL),
    ("cl-suffix", head(b"Content-Length: 5a") + b"hello" + SMUGGLED, INVALID_CL),
    ("cl-empty", head(b"Content-Length: ") + SMUGGLED, INVALID_CL),
    ("cl-inner-space", head(b"Content-Length: 1 0") + SMUGGLED, INVALID_CL),
    ("cl-unicode-digit", head(b"Content-Length: \xd9\xa5") + SMUGGLED, INVALID_CL),
    ("cl-space-before-colon", head(b"Content-Length : 5") + b"hello" + SMUGGLED, BAD_NAME),
    ("cl-vertical-tab", head(b"Content-Length:\x0b5") + b"hello" + SMUGGLED, CTL_VALUE),
    # bare LF, bare CR, NUL and other control bytes
    ("bare-lf-in-header", head(b"X-Foo: bar\nTransfer-Encoding: chunked", b"Content-Length: 4") + b"0\r\n\r\n" + SMUGGLED, CTL_VALUE),
    ("bare-cr-in-header", head(b"X-Foo: bar\rTransfer-Encoding: chunked", b"Content-Length: 4") + b"0\r\n\r\n" + SMUGGLED, CTL_VALUE),
    ("bare-lf-line-ends", b"GET {T}/a HTTP/1.1\r\nHost: {H}\nX-A: 1\n\n" + SMUGGLED, CTL_VALUE),
    ("bare-lf-request-line", b"GET {T}/a HTTP/1.1\nHost: {H}\n\r\n" + SMUGGLED, r"malformed request line"),
    ("bare-cr-request-line", b"GET {T}/a HTTP/1.1\rHost: {H}\r\n\r\n" + SMUGGLED, r"malformed request line"),
    ("nul-in-target", b"GET {T}/a\x00b HTTP/1.1\r\nHost: {H}\r\n\r\n" + SMUGGLED, r"invalid request target"),
    ("nul-in-name", head(b"X-A\x00B: 1") + SMUGGLED, BAD_NAME),
    ("nul-in-value", head(b"X-A: 1\x002") + SMUGGLED, CTL_VALUE),
    ("soh-in-value", head(b"X-A: 1\x012") + SMUGGLED, CTL_VALUE),
    ("esc-in-value", head(b"X-A: \x1b[31m") + SMUGGLED, CTL_VALUE),
    ("del-in-value", head(b"X-A: 1\x7f") + SMUGGLED, CTL_VALUE),
    ("del-in-name", head(b"X-A\x7f: 1") + SMUGGLED, BAD_NAME),
    ("header-without-colon", head(b"X-A 1") + SMUGGLED, BAD_NAME),
    ("empty-header-name", head(b": 1") + SMUGGLED, BAD_NAME),
]

CHUNK_PROBES = [
    ("chunk-size-suffix", b"5x\r\nhello\r\n0\r\n\r\n"),
    ("chunk-size-0x", b"0x5\r\nhello\r\n0\r\n\r\n"),
    ("chunk-size-plus", b"+5\r\nhello\r\n0\r\n\r\n"),
    ("chunk-size-minus", b"-5\r\nhello\r\n0\r\n\r\n"),
    ("chunk-size-leading-space", b" 5\r\nhello\r\n0\r\n\r\n"),
    ("chunk-size-empty", b"\r\nhello\r\n0\r\n\r\n"),
    ("chunk-size-bare-lf", b"5\nhello\r\n0\r\n\r\n"),
    ("chunk-size-not-hex", b"g\r\nhello\r\n0\r\n\r\n"),
    ("chunk-data-overruns-size", b"3\r\nhello\r\n0\r\n\r\n"),
    ("chunk-missing-crlf", b"5\r\nhello0\r\n\r\n"),
    ("chunk-ext-oversized", b"5;" + b"x" * 4096 + b"\r\nhello\r\n0\r\n\r\n"),
    ("chunk-ext-oversized-value", b"5;name=" + b"v" * 1100 + b"\r\nhello\r\n0\r\n\r\n"),
    ("chunk-ext-nul", b"5;a=\x00\r\nhello\r\n0\r\n\r\n"),
    ("chunk-ext-bare-lf", b"5;a\nb\r\nhello\r\n0\r\n\r\n"),
]


def fill(raw: bytes, origin: RecordingOrigin, smuggled: str) -> bytes:
    return (
        raw.replace(b"{T}", origin.url.encode())
        .replace(b"{H}", origin.authority.encode())
        .replace(b"{S}", smuggled.encode())
    )


def run_probe(proxy, origin: RecordingOrigin, raw: bytes) -> tuple[list[Response], bool]:
    with RawConnection(proxy.port, timeout=5) as c:
        c.send(raw)
        return read_all_responses(c)


def assert_nothing_smuggled(origin: RecordingOrigin, mark, marker: str, expected_targets=()) -> list[dict]:
    time.sleep(0.15)  # let anything the proxy might still forward arrive
    seen = origin.requests_since(mark)
    targets = [r["target"] for r in seen]
    assert targets == list(expected_targets), (
        f"the origin received {targets}, expected exactly {list(expected_targets)}"
    )
    assert marker.encode() not in origin.all_raw(), "the smuggled request's bytes reached the origin"
    return seen


@pytest.mark.parametrize("raw,reason", [pytest.param(r, why, id=i) for i, r, why in HEAD_PROBES])
def test_smuggling_probe_refused_and_nothing_forwarded(proxy, recorder, raw, reason):
    marker = f"/smuggled-{tag()}"
    watch = LogWatch(proxy)
    mark = recorder.mark()
    responses, eof = run_probe(proxy, recorder, fill(raw, recorder, marker))
    assert [r.status for r in responses] == [400], [(r.status, r.body[:100]) for r in responses]
    assert eof, "the proxy must close the connection after a framing error"
    assert_short_text_error(responses[0], 400)
    watch.wait(rf"400 from 127\.0\.0\.1: bad request: {reason}")
    assert_nothing_smuggled(recorder, mark, marker)


@pytest.mark.parametrize("body", [pytest.param(b, id=i) for i, b in CHUNK_PROBES])
def test_invalid_chunked_body_refused_and_nothing_forwarded(proxy, recorder, body):
    marker = f"/smuggled-{tag()}"
    watch = LogWatch(proxy)
    mark = recorder.mark()
    raw = fill(head(TE, path=b"/chunked-probe") + body + SMUGGLED, recorder, marker)
    responses, eof = run_probe(proxy, recorder, raw)
    assert [r.status for r in responses] == [400], [(r.status, r.body[:100]) for r in responses]
    assert eof, "the proxy must close the connection after a framing error"
    watch.wait(rf"400 POST \S+ from 127\.0\.0\.1: {BAD_CHUNKED}")
    # Head and bad body in one segment: refused before any upstream exchange.
    assert_nothing_smuggled(recorder, mark, marker)


def test_whole_corpus_against_the_twisted_origin(proxy, fresh_origin):
    """
    The same probes aimed at the harness's origin (tests/origin.py): every
    one answered 400 by the proxy, and its /stats show that not a single
    request or connection reached it.
    """
    smuggled = f"/smuggled-{tag()}"
    fake = type("Target", (), {"url": fresh_origin.url, "authority": fresh_origin.authority})
    probes = [(i, raw) for i, raw, _ in HEAD_PROBES]
    probes += [(i, head(TE, path=b"/chunked-probe") + body + SMUGGLED) for i, body in CHUNK_PROBES]
    statuses = {}
    for ident, raw in probes:
        with RawConnection(proxy.port, timeout=5) as c:
            c.send(fill(raw, fake, smuggled))
            responses, _ = read_all_responses(c)
        statuses[ident] = [r.status for r in responses]
    assert {i: s for i, s in statuses.items() if s != [400]} == {}
    time.sleep(0.3)
    stats = fresh_origin.stats()
    assert stats["requests"] == 0 and stats["connections"] == 0, stats


@pytest.mark.parametrize(
    "trailer",
    [
        pytest.param(b"X-Trailer: a\x00b", id="nul-in-value"),
        pytest.param(b"X-Trailer: a\nInjected: 1", id="bare-lf"),
        pytest.param(b"no colon at all", id="no-colon"),
        pytest.param(b" folded: line", id="obs-fold"),
    ],
)
def test_malformed_trailer_field_is_refused_and_never_relayed(proxy, recorder, trailer):
    """
    Trailer fields are read and dropped, never relayed; a malformed one
    (control bytes, bare LF, no colon, obs-fold) is a 400, and the origin,
    which already has the streamed head and body, never gets a complete
    request.
    """
    mark = recorder.mark()
    raw = fill(head(TE, b"Connection: close", path=b"/trailer-probe"), recorder, "") + b"5\r\nhello\r\n0\r\n" + trailer + b"\r\n\r\n"
    responses, eof = run_probe(proxy, recorder, raw)
    time.sleep(0.15)
    assert trailer not in recorder.all_raw(), "a trailer reached the origin"
    assert b"Injected" not in recorder.all_raw()
    assert [r.status for r in responses] == [400], [(r.status, r.body[:100]) for r in responses]
    assert eof
    assert not any(r["complete"] for r in recorder.requests_since(mark))


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"5x\r\nhello\r\n0\r\n\r\n", id="bad-size"),
        pytest.param(b"3\r\nhello\r\n0\r\n\r\n", id="overrun"),
        pytest.param(b"5;" + b"x" * 4096 + b"\r\nhello\r\n0\r\n\r\n", id="oversized-extension"),
    ],
)
def test_chunked_body_going_bad_after_head_was_relayed(proxy, recorder, body):
    """
    A streaming proxy relays a head before it has seen the body.  When the
    body then turns out malformed, the origin must get neither the bytes
    after the error nor a complete request, and the origin connection must
    not go back to the pool half-written.
    """
    marker = f"/smuggled-{tag()}"
    watch = LogWatch(proxy)
    mark = recorder.mark()
    with RawConnection(proxy.port, timeout=5) as c:
        c.send(fill(head(TE, path=b"/streamed"), recorder, marker))
        deadline = time.monotonic() + 5
        while not recorder.requests_since(mark) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [r["target"] for r in recorder.requests_since(mark)] == ["/streamed"]
        c.send(fill(body + SMUGGLED, recorder, marker))
        responses, eof = read_all_responses(c)
    assert [r.status for r in responses] == [400]
    assert eof
    watch.wait(rf"400 POST \S+ from 127\.0\.0\.1: {BAD_CHUNKED}")
    seen = assert_nothing_smuggled(recorder, mark, marker, ["/streamed"])
    assert not seen[0]["complete"], "the origin received a complete request although its body was malformed"
    # The half-sent upstream connection is closed, never reused for the next request.
    follow = recorder.mark()
    for i in range(3):
        resp = get(proxy.port, f"{recorder.url}/after-{i}")
        assert resp.status == 200, (resp.status, resp.body[:200])
    assert [r["target"] for r in recorder.requests_since(follow)] == [f"/after-{i}" for i in range(3)]
    assert all(r["complete"] for r in recorder.requests_since(follow))


@pytest.mark.parametrize(
    "second,reason",
    [
        pytest.param(head(b"Content-Length: 4", TE) + b"0\r\n\r\n" + SMUGGLED, BOTH, id="cl-te"),
        pytest.param(head(b"X: y", b" Transfer-Encoding: chunked") + SMUGGLED, OBS_FOLD, id="obs-fold"),
        pytest.param(head(b"Content-Length: 1", b"Content-Length: 2") + SMUGGLED, REPEATED_CL, id="double-cl"),
        pytest.param(head(b"X-A: 1\x00") + SMUGGLED, CTL_VALUE, id="nul"),
    ],
)
def test_valid_request_then_probe_on_one_connection(proxy, recorder, second, reason):
    """Only the legitimate first request (its body intact) reaches the origin."""
    marker = f"/smuggled-{tag()}"
    watch = LogWatch(proxy)
    mark = recorder.mark()
    first = fill(head(TE, path=b"/legit") + chunk(b"hello ") + chunk(b"world") + b"0\r\n\r\n", recorder, marker)
    responses, eof = run_probe(proxy, recorder, first + fill(second, recorder, marker))
    assert [r.status for r in responses] == [200, 400], [(r.status, r.body[:100]) for r in responses]
    assert responses[0].json() == {"target": "/legit", "body_length": 11}
    assert eof
    watch.wait(rf"400 from 127\.0\.0\.1: bad request: {reason}")
    seen = assert_nothing_smuggled(recorder, mark, marker, ["/legit"])
    assert seen[0]["body"] == b"hello world" and seen[0]["complete"]


def test_controls_well_formed_messages_pass(proxy, recorder):
    """
    Controls for the corpus: the same shapes, well formed, are relayed, and
    a request-looking body stays a body.
    """
    marker = f"/smuggled-{tag()}"
    mark = recorder.mark()
    smuggled = fill(SMUGGLED, recorder, marker)
    raw = (
        fill(head(b"Transfer-Encoding: Chunked", path=b"/c1"), recorder, marker)  # coding names are case-insensitive
        + b"5;name=value;flag\r\nhello\r\n0\r\nX-Trailer: ok\r\n\r\n"
        + fill(head(b"Content-Length:  %d " % len(smuggled), path=b"/c2"), recorder, marker)  # OWS
        + smuggled
        + b"\r\n"  # one empty line before a request line is tolerated
        + fill(head(b"X-Tab:\tvalue\twith tab", method=b"GET", path=b"/c3"), recorder, marker)
    )
    with RawConnection(proxy.port, timeout=5) as c:
        c.send(raw)
        statuses = [c.read_response().status for _ in range(3)]
    assert statuses == [200, 200, 200]
    time.sleep(0.1)
    seen = recorder.requests_since(mark)
    assert [r["target"] for r in seen] == ["/c1", "/c2", "/c3"]
    assert seen[0]["body"] == b"hello"
    assert seen[1]["body"] == smuggled, "a body that looks like a request must stay a body"
    assert not any(marker in r["target"] for r in seen)


def test_more_than_one_empty_line_before_request_is_logged(proxy, recorder):
    """
    RFC 9112 2.2 asks servers to ignore at least one empty line before a
    request line; the proxy ignores one.  Whatever it does with more, a
    refusal must be logged with its reason, like every other 400.
    """
    watch = LogWatch(proxy)
    mark = recorder.mark()
    raw = b"\r\n\r\n" + fill(head(method=b"GET", path=b"/two-empty-lines"), recorder, "")
    responses, eof = run_probe(proxy, recorder, raw)
    statuses = [r.status for r in responses]
    if statuses == [200]:
        assert [r["target"] for r in recorder.requests_since(mark)] == ["/two-empty-lines"]
        return
    assert statuses == [400], statuses
    time.sleep(0.2)
    assert recorder.requests_since(mark) == []
    watch.wait(r"400 from 127\.0\.0\.1", timeout=2)


@pytest.mark.parametrize(
    "kind",
    ["framing-400", "chunked-400", "header-bytes-431", "head-deadline-408"],
)
def test_access_log_records_the_status_sent(limited, recorder, kind):
    """An access log line must never claim a status other than the one the client got."""
    raws = {
        "framing-400": head(b"Content-Length: 1", b"Content-Length: 1") + b"x",
        "chunked-400": head(TE) + b"zz\r\n",
        "header-bytes-431": head(b"X-Big: " + b"a" * 1500, b"X-Big: " + b"b" * 1500),
        "head-deadline-408": head()[:-2],  # the head never ends
    }
    expected = int(kind.rsplit("-", 1)[1])
    with RawConnection(limited.port, timeout=5) as c:
        port = c.local_port
        c.send(fill(raws[kind], recorder, ""))
        responses, _ = read_all_responses(c)
    assert [r.status for r in responses] == [expected]
    lines = access_lines_for(limited, port)
    statuses = [re.search(r" status=(\d+) ", l).group(1) for l in lines]
    assert all(s == str(expected) for s in statuses), (
        f"client got {expected}, access log says: {lines}"
    )


# ---------------------------------------------------------------------------
# Head limits: 414, 431, 413
# ---------------------------------------------------------------------------


def test_uri_too_long_is_414(limited, recorder):
    watch = LogWatch(limited)
    mark = recorder.mark()
    base = recorder.url + "/u?"
    at_limit = base + "a" * (LIMITS["max_uri_bytes"] - len(base))
    assert len(at_limit) == LIMITS["max_uri_bytes"]
    assert get(limited.port, at_limit).status == 200
    resp = get(limited.port, at_limit + "a")
    assert_short_text_error(resp, 414)
    watch.wait(r"414 from 127\.0\.0\.1: URI too long \(limits\.max_uri_bytes\)")
    # A request line far beyond every limit (the line reader's own bound).
    with RawConnection(limited.port) as c:
        c.send(b"GET " + (base + "b" * 5000).encode() + b" HTTP/1.1\r\n")
        assert_short_text_error(c.read_response(), 414)
    time.sleep(0.1)
    assert [r["target"] for r in recorder.requests_since(mark)] == [at_limit[len(recorder.url):]]


def test_header_bytes_over_limit_is_431(limited, recorder):
    watch = LogWatch(limited)
    mark = recorder.mark()
    # Many modest fields adding up past max_header_bytes.
    fields = [(f"X-Pad-{i}", "p" * 300) for i in range(8)]
    with RawConnection(limited.port) as c:
        c.send(build_request("GET", recorder.url + "/big", [("Host", recorder.authority), *fields]))
        assert_short_text_error(c.read_response(), 431)
    watch.wait(r"431 from 127\.0\.0\.1: request header fields too large \(limits\.max_header_bytes\)")
    # One field line longer than the whole limit.
    watch = LogWatch(limited)
    with RawConnection(limited.port) as c:
        c.send(build_request("GET", recorder.url + "/big", [("Host", recorder.authority), ("X-Huge", "h" * 4000)]))
        assert_short_text_error(c.read_response(), 431)
    watch.wait(r"431 from .*\(limits\.max_header_bytes\)")
    # Just under the limit passes.
    ok = [(f"X-Pad-{i}", "p" * 300) for i in range(5)]
    with RawConnection(limited.port) as c:
        c.send(build_request("GET", recorder.url + "/fits", [("Host", recorder.authority), *ok]))
        assert c.read_response().status == 200
    time.sleep(0.1)
    assert [r["target"] for r in recorder.requests_since(mark)] == ["/fits"]


def test_too_many_header_fields_is_431(limited, recorder):
    watch = LogWatch(limited)
    mark = recorder.mark()
    limit = LIMITS["max_headers"]
    fields = lambda n: [("Host", recorder.authority)] + [(f"X-F{i}", "1") for i in range(n - 1)]  # noqa: E731
    with RawConnection(limited.port) as c:
        c.send(build_request("GET", recorder.url + "/many", fields(limit)))
        assert c.read_response().status == 200
    with RawConnection(limited.port) as c:
        c.send(build_request("GET", recorder.url + "/too-many", fields(limit + 1)))
        assert_short_text_error(c.read_response(), 431)
    watch.wait(r"431 from 127\.0\.0\.1: too many request header fields \(limits\.max_headers\)")
    time.sleep(0.1)
    assert [r["target"] for r in recorder.requests_since(mark)] == ["/many"]


def test_body_over_limit_is_413(limited, recorder):
    limit = LIMITS["max_body_bytes"]
    mark = recorder.mark()
    # At the limit: relayed.
    with RawConnection(limited.port) as c:
        c.send(build_request("POST", recorder.url + "/fits", [("Host", recorder.authority)], body=b"x" * limit))
        resp = c.read_response()
    assert resp.status == 200 and resp.json()["body_length"] == limit
    # Content-Length over the limit: refused from the head, before any body is sent.
    watch = LogWatch(limited)
    with RawConnection(limited.port, timeout=5) as c:
        c.send(
            b"POST %s/too-big HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n"
            % (recorder.url.encode(), recorder.authority.encode(), limit + 1)
        )
        resp = c.read_response()
    assert_short_text_error(resp, 413)
    watch.wait(r"413 POST \S+/too-big from 127\.0\.0\.1: request body too large \(refused by limits\.max_body_bytes\)")
    # With Expect: 100-continue, the client is not invited to send the body.
    with RawConnection(limited.port, timeout=5) as c:
        c.send(
            b"POST %s/too-big-expect HTTP/1.1\r\nHost: %s\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n"
            % (recorder.url.encode(), recorder.authority.encode(), limit * 10)
        )
        resp = c.read_response()
    assert resp.status == 413 and resp.informational == [], [i.status for i in resp.informational]
    time.sleep(0.1)
    assert [r["target"] for r in recorder.requests_since(mark)] == ["/fits"]
    # A chunked body that outgrows the limit.
    watch = LogWatch(limited)
    with RawConnection(limited.port, timeout=5) as c:
        c.send(build_request("POST", recorder.url + "/chunked-too-big", [("Host", recorder.authority)],
                             chunks=[b"y" * 400] * 4))
        resp = c.read_response()
    assert_short_text_error(resp, 413)
    watch.wait(r"413 POST \S+/chunked-too-big from 127\.0\.0\.1: request body too large \(refused by limits\.max_body_bytes\)")
    time.sleep(0.1)
    late = [r for r in recorder.requests_since(mark) if r["target"] == "/chunked-too-big"]
    assert not any(r["complete"] for r in late), "the origin got the whole over-limit body"
    assert all(len(r["body"]) <= limit for r in late)


# ---------------------------------------------------------------------------
# Head deadline (slowloris), client idle, tunnel idle
# ---------------------------------------------------------------------------


class Slowloris(threading.Thread):
    """Sends a request head one byte at a time, never finishing it."""

    def __init__(self, port: int, target: bytes, interval: float = 0.1, duration: float = 6.0):
        super().__init__(daemon=True)
        self.sock = socket.create_connection((LOOPBACK, port), timeout=duration + 2)
        self.target = target
        self.interval = interval
        self.duration = duration
        self.received = bytearray()
        self.cut_after: float | None = None
        self.sent = 0

    def run(self) -> None:
        started = time.monotonic()
        payload = b"GET " + self.target + b" HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 10000
        self.sock.setblocking(False)
        try:
            for byte in payload:
                if time.monotonic() - started > self.duration:
                    break
                try:
                    self.sock.send(bytes([byte]))
                    self.sent += 1
                except (BrokenPipeError, ConnectionResetError):
                    break
                end = time.monotonic() + self.interval
                closed = False
                while time.monotonic() < end:
                    try:
                        data = self.sock.recv(65536)
                    except BlockingIOError:
                        time.sleep(0.01)
                        continue
                    except ConnectionResetError:
                        data = b""
                    if not data:
                        closed = True
                        break
                    self.received += data
                if closed:
                    self.cut_after = time.monotonic() - started
                    break
        finally:
            self.sock.close()


def test_slowloris_cut_off_at_head_deadline(limited, recorder):
    watch = LogWatch(limited)
    mark = recorder.mark()
    target = (recorder.url + "/slow-head").encode()
    attackers = [Slowloris(limited.port, target) for _ in range(10)]
    for a in attackers:
        a.start()
    time.sleep(0.3)
    # The proxy keeps serving others meanwhile.
    started = time.monotonic()
    assert get(limited.port, recorder.url + "/during-attack").status == 200
    assert time.monotonic() - started < 0.5
    for a in attackers:
        a.join(10)
    timeout = LIMITS["header_timeout"]
    for a in attackers:
        assert a.cut_after is not None, f"slowloris still connected after {a.duration} s ({a.sent} bytes sent)"
        assert timeout * 0.9 <= a.cut_after <= timeout + 1.0, f"cut after {a.cut_after:.2f} s"
        assert a.received.startswith(b"HTTP/1.1 408 "), bytes(a.received[:200])
    watch.wait(r"408 from 127\.0\.0\.1: request head not complete within 1 s \(limits\.header_timeout\)")
    time.sleep(0.1)
    assert [r["target"] for r in recorder.requests_since(mark)] == ["/during-attack"]


def test_head_deadline_applies_to_each_request_on_a_connection(limited, recorder):
    """A slow second head on a kept-alive connection is cut off too."""
    with RawConnection(limited.port, timeout=5) as c:
        c.send(build_request("GET", recorder.url + "/first", [("Host", recorder.authority)]))
        assert c.read_response().status == 200
        time.sleep(0.8)  # idle between requests (below client_idle_timeout) is not a slow head
        started = time.monotonic()
        c.send(b"GET " + recorder.url.encode() + b"/second HTTP/1.1\r\nX-Slow: ")
        while not select.select([c.sock], [], [], 0.1)[0] and time.monotonic() - started < 4:
            c.send(b"s")
        resp = c.read_response()
        elapsed = time.monotonic() - started
    assert resp.status == 408
    assert 0.9 <= elapsed <= 2.2, elapsed


def test_client_idle_timeout(limited):
    """A connection that never sends anything is closed after forward.client_idle_timeout."""
    watch = LogWatch(limited)
    with RawConnection(limited.port, timeout=10) as c:
        port = c.local_port
        started = time.monotonic()
        data = c.read_to_eof()
        elapsed = time.monotonic() - started
    assert 2.3 <= elapsed <= 4.0, f"closed after {elapsed:.2f} s with client_idle_timeout=2.5"
    assert data in (b"",) or data.startswith(b"HTTP/1.1 408"), data[:200]
    line = watch.wait(rf"{port}")
    assert "client_idle_timeout" in line, f"the idle-timeout log line does not name the rule: {line!r}"


def test_idle_tunnel_closed_active_tunnel_kept(limited, tcp_origin):
    watch = LogWatch(limited)
    idle, resp = open_tunnel(limited, tcp_origin.authority, timeout=10)
    started = time.monotonic()
    assert resp.status == 200
    active, resp = open_tunnel(limited, tcp_origin.authority, timeout=10)
    assert resp.status == 200
    sent = b""
    idle_closed_after = None
    idle.sock.setblocking(False)
    last_sent = 0.0
    while time.monotonic() - started < 3.0:
        if time.monotonic() - last_sent > 0.3:
            piece = b"k%d;" % len(sent)
            active.send(piece)
            sent += piece
            last_sent = time.monotonic()
        if idle_closed_after is None:
            try:
                if idle.sock.recv(1024) == b"":
                    idle_closed_after = time.monotonic() - started
            except BlockingIOError:
                pass
        time.sleep(0.1)
    assert idle_closed_after is not None, "an idle tunnel outlived limits.tunnel_idle_timeout=1 by 2 s"
    assert 0.9 <= idle_closed_after <= 2.0, idle_closed_after
    # The active tunnel still works end to end, half-close included.
    active.shutdown_write()
    answer = active.read_to_eof()
    active.close()
    idle.close()
    assert answer == b"%d %s\n" % (len(sent), hashlib.sha256(sent).hexdigest().encode())
    watch.wait(rf"closing tunnel to 127\.0\.0\.1:{tcp_origin.port}: idle past limits\.tunnel_idle_timeout")


# ---------------------------------------------------------------------------
# Upstream connect and first-byte timeouts
# ---------------------------------------------------------------------------


@pytest.fixture
def blackhole():
    """A loopback port whose accept queue is full: new connections hang in SYN_SENT."""
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(2):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex((LOOPBACK, port))
        fillers.append(s)
    time.sleep(0.1)
    probe = socket.socket()
    probe.settimeout(0.5)
    try:
        probe.connect((LOOPBACK, port))
        pytest.skip("cannot make a black-hole port here (connections are accepted)")
    except socket.timeout:
        pass
    finally:
        probe.close()
    yield port
    for s in fillers:
        s.close()
    listener.close()


def test_upstream_connect_timeout_is_504(limited, blackhole):
    watch = LogWatch(limited)
    url = f"http://{LOOPBACK}:{blackhole}/never"
    started = time.monotonic()
    resp = get(limited.port, url)
    elapsed = time.monotonic() - started
    assert_short_text_error(resp, 504)
    assert 0.9 <= elapsed <= 3.0, f"504 after {elapsed:.2f} s with upstream.connect_timeout=1"
    line = watch.wait(rf"504 GET {re.escape(url)}: .*timed out")
    assert "upstream.connect_timeout" in line, f"the log line does not name the rule: {line!r}"


def test_upstream_first_byte_timeout_is_504(limited, origin):
    watch = LogWatch(limited)
    url = origin.url + "/slow"
    started = time.monotonic()
    resp = get(limited.port, url)
    elapsed = time.monotonic() - started
    assert_short_text_error(resp, 504)
    assert 0.9 <= elapsed <= 3.0, f"504 after {elapsed:.2f} s with upstream.read_timeout=1"
    # An origin answering within the timeout is fine.
    assert get(limited.port, origin.url + "/delay/300").status == 200
    line = watch.wait(rf"504 GET {re.escape(url)}: .*sent nothing for 1 s")
    assert "upstream.read_timeout" in line, f"the log line does not name the rule: {line!r}"


# ---------------------------------------------------------------------------
# Connections in total and per client; request rate
# ---------------------------------------------------------------------------


def hold(port: int, source: str, recorder: RecordingOrigin) -> RawConnection:
    """An admitted, kept-alive connection from C{source}."""
    c = SourcedConnection(port, source, timeout=5)
    c.send(build_request("GET", recorder.url + "/hold", [("Host", recorder.authority)]))
    resp = c.read_response()
    assert resp.status == 200, (resp.status, resp.body[:200])
    return c


def assert_refused_connection(port: int, source: str) -> None:
    with SourcedConnection(port, source, timeout=5) as c:
        resp = c.read_response()
        assert_short_text_error(resp, 503)
        assert b"too many connections" in resp.body
        assert resp.get("retry-after") is not None and resp.get("retry-after").isdigit()
        assert c.read_to_eof() == b"", "a refused connection must be closed"


def test_connections_per_client_limit(proxy_factory, recorder):
    p = proxy_factory(limits={"max_connections_per_client": 2})
    watch = LogWatch(p)
    held = [hold(p.port, "127.0.0.1", recorder) for _ in range(2)]
    assert_refused_connection(p.port, "127.0.0.1")
    watch.wait(r"503 connection from 127\.0\.0\.1 refused by limits\.max_connections_per_client")
    # Another client address is not affected.
    other = hold(p.port, "127.0.0.2", recorder)
    # A client sending its request at once (as real clients do) still gets the 503.
    s = requests.Session()
    s.trust_env = False
    r = s.get(recorder.url + "/refused", proxies={"http": p.url}, timeout=5)
    assert r.status_code == 503 and r.headers.get("Retry-After")
    # Closing one admitted connection makes room again.
    held.pop().close()
    deadline = time.monotonic() + 3
    while True:
        try:
            held.append(hold(p.port, "127.0.0.1", recorder))
            break
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    for c in held + [other]:
        c.close()


def test_connection_slots_released_on_every_path(proxy_factory, recorder, tcp_origin, closed_port):
    """
    Connections that end in a refusal, an error, a tunnel or a client abort
    all give their slot back: afterwards the client can again hold its
    max_connections_per_client connections.
    """
    p = proxy_factory(limits={"max_connections_per_client": 2, "max_uri_bytes": 256, "max_header_bytes": 2048})
    r = recorder

    def exchange(raw: bytes, method: str = "GET") -> int | None:
        with RawConnection(p.port, timeout=5) as c:
            c.send(raw)
            try:
                return c.read_response(method).status
            except (ConnectionClosed, OSError):
                return None

    assert exchange(fill(head(b"Content-Length: 1", b"Content-Length: 1"), r, "")) == 400
    assert exchange(fill(head(TE) + b"zz\r\n", r, "")) == 400
    assert exchange(b"GET " + r.url.encode() + b"/" + b"u" * 400 + b" HTTP/1.1\r\n\r\n") == 414
    assert exchange(fill(head(b"X-Big: " + b"b" * 3000), r, "")) == 431
    assert exchange(build_request("CONNECT", r.authority, [("Host", r.authority)]), "CONNECT") == 403
    assert exchange(build_request("GET", f"http://{LOOPBACK}:{closed_port}/", [("Host", "x")])) == 502
    c, resp = open_tunnel(p, tcp_origin.authority, timeout=5)
    assert resp.status == 200
    c.send(b"some bytes")
    c.close()
    with RawConnection(p.port) as c:  # abort mid-body
        c.send(build_request("POST", r.url + "/abort", [("Host", r.authority)], body=b"x" * 100)[:-90])
        time.sleep(0.1)
    RawConnection(p.port).close()  # abort before sending anything
    held = []
    deadline = time.monotonic() + 3
    while len(held) < 2:
        try:
            held.append(hold(p.port, "127.0.0.1", r))
        except (AssertionError, ConnectionClosed, OSError):
            if time.monotonic() > deadline:
                pytest.fail(f"only {len(held)} of 2 connections admitted: a slot leaked\n{p.output()[-2000:]}")
            time.sleep(0.1)
    for c in held:
        c.close()


def test_connections_total_limit(proxy_factory, recorder):
    p = proxy_factory(limits={"max_connections": 3})
    watch = LogWatch(p)
    held = [hold(p.port, f"127.0.0.{i}", recorder) for i in (1, 2, 3)]
    assert_refused_connection(p.port, "127.0.0.4")
    watch.wait(r"503 connection from 127\.0\.0\.4 refused by limits\.max_connections\b")
    held.pop(0).close()
    deadline = time.monotonic() + 3
    while True:
        try:
            held.append(hold(p.port, "127.0.0.4", recorder))
            break
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    for c in held:
        c.close()


def test_request_rate_limit_is_429(proxy_factory, recorder, tcp_origin):
    p = proxy_factory(limits={"requests_per_second": 2, "burst": 3})
    watch = LogWatch(p)
    mark = recorder.mark()
    statuses = []
    with RawConnection(p.port) as c:
        for i in range(4):
            c.send(build_request("GET", f"{recorder.url}/rate-{i}", [("Host", recorder.authority)]))
            statuses.append(c.read_response())
    assert [r.status for r in statuses] == [200, 200, 200, 429]
    refused = statuses[3]
    assert_short_text_error(refused, 429)
    retry = refused.get("retry-after")
    assert retry is not None and retry.isdigit() and 1 <= int(retry) <= 2, retry
    watch.wait(r"429 GET \S+/rate-3 from 127\.0\.0\.1: too many requests \(refused by limits\.requests_per_second\)")
    # CONNECT counts too.
    c, resp = open_tunnel(p, tcp_origin.authority, timeout=5)
    c.close()
    assert resp.status == 429 and resp.get("retry-after")
    watch.wait(r"429 CONNECT \S+ from 127\.0\.0\.1: too many requests \(refused by limits\.requests_per_second\)")
    # Another client is not limited.
    assert get(p.port, recorder.url + "/other-client", source="127.0.0.2").status == 200
    # After Retry-After, the client may go on.
    time.sleep(int(retry))
    assert get(p.port, recorder.url + "/after-wait").status == 200
    time.sleep(0.1)
    assert [r["target"] for r in recorder.requests_since(mark)] == [
        "/rate-0", "/rate-1", "/rate-2", "/other-client", "/after-wait"
    ]


# ---------------------------------------------------------------------------
# Proxy authentication
# ---------------------------------------------------------------------------

USERS = {
    "alice": "alice-Secr3t-bcrypt",
    "bob": "bob-Secr3t-sha512",
    "carol": "carol:Secr3t:sha256",  # a colon in a password is allowed
}
REALM = "Hardening Realm"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture(scope="module")
def htpasswd(tmp_path_factory) -> Path:
    openssl = require_tool("openssl")

    def crypt(flag: str, password: str) -> str:
        out = subprocess.run([openssl, "passwd", flag, "-stdin"], input=password, capture_output=True,
                             text=True, check=True)
        return out.stdout.strip()

    path = tmp_path_factory.mktemp("auth") / "htpasswd"
    alice = bcrypt.hashpw(USERS["alice"].encode(), bcrypt.gensalt(rounds=5)).decode()
    bob = crypt("-6", USERS["bob"])
    carol = crypt("-5", USERS["carol"])
    assert alice.startswith("$2b$") and bob.startswith("$6$") and carol.startswith("$5$")
    path.write_text(f"alice:{alice}\nbob:{bob}\ncarol:{carol}\n")
    return path


@pytest.fixture
def auth_proxy(module_launcher, htpasswd):
    """
    Authentication on; alice and bob may reach the loopback origins, nobody
    else.  One proxy per test: failed attempts are limited per client, and
    every test's client is 127.0.0.1.
    """
    loopback = ["127.0.0.0/8", "::1/128"]
    return module_launcher(
        forward={"auth_file": str(htpasswd), "auth_realm": REALM},
        egress={
            "rules": [
                {"name": "alice and bob", "action": "allow", "users": ["alice", "bob"], "networks": loopback},
                {"name": "everyone else", "action": "deny", "networks": loopback},
            ]
        },
    )


def assert_407(resp: Response) -> None:
    assert resp.status == 407, (resp.status, resp.body[:200])
    challenge = resp.get("proxy-authenticate") or ""
    assert challenge.startswith(f'Basic realm="{REALM}"'), challenge


@pytest.mark.parametrize(
    "credentials",
    [
        pytest.param(None, id="none"),
        pytest.param(basic("alice", "wrong"), id="wrong-password"),
        pytest.param(basic("mallory", "x"), id="unknown-user"),
        pytest.param(basic("bob", USERS["alice"]), id="other-users-password"),
        pytest.param("Bearer abc", id="other-scheme"),
        pytest.param("Basic !!!not-base64", id="bad-base64"),
        pytest.param("Basic " + base64.b64encode(b"alice").decode(), id="no-colon"),
    ],
)
def test_missing_or_bad_credentials_are_407(auth_proxy, recorder, tcp_origin, credentials):
    watch = LogWatch(auth_proxy)
    mark = recorder.mark()
    extra = [("Proxy-Authorization", credentials)] if credentials else []
    # absolute-form, with a body
    with RawConnection(auth_proxy.port) as c:
        c.send(build_request("POST", recorder.url + "/auth-abs", [("Host", recorder.authority), *extra], body=b"data"))
        resp = c.read_response()
    assert_407(resp)
    assert_short_text_error(resp, 407)
    watch.wait(r"407 POST \S+/auth-abs from 127\.0\.0\.1: proxy authentication required \(refused by forward\.auth_file\)")
    # header-routed
    with RawConnection(auth_proxy.port) as c:
        c.send(build_request("GET", "/auth-hdr", [("Host", "x"), ("x-target-host", recorder.url), *extra]))
        assert_407(c.read_response())
    watch.wait(r"407 GET /auth-hdr from .*\(refused by forward\.auth_file\)")
    # CONNECT
    with RawConnection(auth_proxy.port) as c:
        c.send(build_request("CONNECT", tcp_origin.authority, [("Host", tcp_origin.authority), *extra]))
        assert_407(c.read_response("CONNECT"))
    watch.wait(rf"407 CONNECT {re.escape(tcp_origin.authority)}: proxy authentication required \(refused by forward\.auth_file\)")
    time.sleep(0.1)
    assert recorder.requests_since(mark) == []


@pytest.mark.parametrize("user", ["alice", "bob", "carol"])
def test_valid_credentials_each_hash_scheme(auth_proxy, recorder, user):
    """bcrypt (alice), SHA-512-crypt (bob), SHA-256-crypt (carol, refused by the users rule)."""
    watch = LogWatch(auth_proxy)
    mark = recorder.mark()
    creds = basic(user, USERS[user])
    resp = get(auth_proxy.port, recorder.url + f"/hello-{user}", [("Proxy-Authorization", creds)])
    if user == "carol":
        assert_short_text_error(resp, 403)
        watch.wait(r"403 GET \S+/hello-carol from 127\.0\.0\.1: destination not allowed "
                   r"\(refused by egress\.rules\[1\] everyone else\)")
        assert recorder.requests_since(mark) == []
        return
    assert resp.status == 200, (resp.status, resp.body[:200])
    seen = recorder.requests_since(mark)
    assert [r["target"] for r in seen] == [f"/hello-{user}"]
    assert "proxy-authorization" not in [n.lower() for n, _ in seen[0]["headers"]]


def test_authenticated_clients_with_requests_and_curl(auth_proxy, origin, curl):
    url = origin.url + "/echo?via=requests"
    s = requests.Session()
    s.trust_env = False
    anonymous = s.get(url, proxies={"http": auth_proxy.url}, timeout=10)
    assert anonymous.status_code == 407
    assert anonymous.headers["Proxy-Authenticate"].startswith(f'Basic realm="{REALM}"')
    proxied = f"http://alice:{USERS['alice']}@{LOOPBACK}:{auth_proxy.port}"
    r = s.get(url, proxies={"http": proxied}, timeout=10)
    assert r.status_code == 200
    assert "proxy-authorization" not in [n.lower() for n, _ in r.json()["headers"]]
    # header-routed, credentials sent as the client would for the proxy itself
    r = s.get(auth_proxy.url + "/echo?via=header", headers={"x-target-host": origin.url,
                                                             "Proxy-Authorization": basic("bob", USERS["bob"])},
              timeout=10)
    assert r.status_code == 200
    assert "proxy-authorization" not in [n.lower() for n, _ in r.json()["headers"]]
    # Listed as hop-by-hop by the client too: still never forwarded.
    r = s.get(url, proxies={"http": proxied}, headers={"Connection": "Proxy-Authorization"}, timeout=10)
    assert r.status_code == 200
    assert "proxy-authorization" not in [n.lower() for n, _ in r.json()["headers"]]
    out = subprocess.run(
        [curl, "-s", "-o", "-", "-w", "\n%{http_code}", "--proxy", auth_proxy.url,
         "--proxy-user", f"bob:{USERS['bob']}", origin.url + "/echo?via=curl"],
        capture_output=True, text=True, timeout=20,
    )
    body, _, code = out.stdout.rpartition("\n")
    assert code == "200", out
    assert "proxy-authorization" not in [n.lower() for n, _ in json.loads(body)["headers"]]


def test_connect_needs_credentials_and_obeys_user_rules(auth_proxy, tcp_origin):
    watch = LogWatch(auth_proxy)
    # alice: tunnel established and working
    c = RawConnection(auth_proxy.port, timeout=10)
    c.send(build_request("CONNECT", tcp_origin.authority,
                         [("Host", tcp_origin.authority), ("Proxy-Authorization", basic("alice", USERS["alice"]))]))
    resp = c.read_response("CONNECT")
    assert resp.status == 200
    c.send(b"through the tunnel")
    c.shutdown_write()
    assert c.read_to_eof() == b"18 %s\n" % hashlib.sha256(b"through the tunnel").hexdigest().encode()
    c.close()
    # carol: authenticated, but the users rule refuses her
    c = RawConnection(auth_proxy.port, timeout=10)
    c.send(build_request("CONNECT", tcp_origin.authority,
                         [("Host", tcp_origin.authority), ("Proxy-Authorization", basic("carol", USERS["carol"]))]))
    assert_short_text_error(c.read_response("CONNECT"), 403)
    c.close()
    watch.wait(rf"403 CONNECT {re.escape(tcp_origin.authority)}: destination not allowed "
               r"\(refused by egress\.rules\[1\] everyone else\)")


def test_credentials_never_logged(auth_proxy, recorder, tcp_origin):
    """Neither passwords nor Basic tokens appear in the access log or the proxy's output."""
    secrets = []
    for user, password in USERS.items():
        token = basic(user, password)
        secrets += [password, token.split()[1]]
        for pw in (password, password + "-wrong"):
            creds = basic(user, pw)
            secrets += [pw, creds.split()[1]]
            get(auth_proxy.port, recorder.url + "/leak-check", [("Proxy-Authorization", creds)])
            with RawConnection(auth_proxy.port, timeout=10) as c:
                c.send(build_request("CONNECT", tcp_origin.authority,
                                     [("Host", tcp_origin.authority), ("Proxy-Authorization", creds)]))
                c.read_response("CONNECT")
    # a malformed header is not logged either
    odd = "Basic " + base64.b64encode(b"eve:pass\x01word").decode()
    secrets.append(odd.split()[1])
    get(auth_proxy.port, recorder.url + "/leak-check", [("Proxy-Authorization", odd)])
    time.sleep(0.5)  # the access log is flushed every 0.2 s
    logs = auth_proxy.output() + "\n".join(auth_proxy.access_lines())
    assert "/leak-check" in logs, "the requests were not logged at all"
    leaked = [s for s in secrets if s in logs]
    assert not leaked, f"credentials found in the logs: {leaked}"
    raw = recorder.all_raw()
    assert not [s for s in secrets if s.encode() in raw], "credentials reached the origin"


def test_userinfo_in_request_target_never_logged_or_forwarded(auth_proxy, recorder):
    """
    Credentials a client puts in the request target's userinfo are dropped
    (never forwarded); they must not be written to the logs either, refused
    or not.
    """
    watch = LogWatch(auth_proxy)
    mark = recorder.mark()
    secret = "UserinfoPw" + tag()
    target = f"http://someone:{secret}@{recorder.authority}/userinfo"
    for extra in ([], [("Proxy-Authorization", basic("alice", USERS["alice"]))],
                  [("Proxy-Authorization", basic("carol", USERS["carol"]))]):
        get(auth_proxy.port, target, extra)
    time.sleep(0.5)
    assert [r["target"] for r in recorder.requests_since(mark)] == ["/userinfo"]
    assert secret.encode() not in recorder.all_raw(), "userinfo reached the origin"
    watch.wait(r"407 GET .*/userinfo from 127\.0\.0\.1")
    watch.wait(r"403 GET .*/userinfo from 127\.0\.0\.1")
    access = [l for l in auth_proxy.access_lines() if "/userinfo" in l]
    assert len(access) == 3
    leaked = [l for l in watch.new().splitlines() + access if secret in l]
    assert not leaked, f"userinfo password written to the logs: {leaked}"
