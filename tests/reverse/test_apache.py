"""
The reverse listener behind a real Apache httpd, fronted as the deployment
guide does it: C{etc/apache/mydataproxy.conf} as shipped (ports and
certificate paths substituted, see tests/apache.py).

  curl (from 127.0.0.2) --TLS--> Apache (127.0.0.1) --> reverse listener
  (trusted_proxies = 127.0.0.1/32) --> origin

The client comes from 127.0.0.2 so that its address differs from Apache's
(127.0.0.1, the trusted hop): the proxy must name 127.0.0.2 as the client,
never an address the client wrote into X-Forwarded-For itself.

Routes, both for the public host C{localhost} only:
  - C{/} -> a L{RecordingOrigin} under C{/app/} (headers and bodies as they
    arrived on the wire);
  - C{/answers/} -> L{AnsweringOrigin} under C{/base/} (redirects, cookies,
    a download, a websocket echo), answers that point at the backend and
    must come back pointing at Apache's public URL.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import ssl
import subprocess
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urljoin

import pytest

from apache import ApacheProcess, apache_binary, start_apache
from conftest import LOOPBACK, ProxyProcess, TLSFiles
from origin import patternBytes, patternSha256
from recording_origin import RecordingOrigin

MiB = 1024 * 1024
PUBLIC_HOST = "localhost"
CLIENT_ADDRESS = "127.0.0.2"
SPOOFED_ADDRESS = "6.6.6.6"
SPOOFED_HOST = "evil.example"
WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


# ---------------------------------------------------------------------------
# An origin with answers that point at itself
# ---------------------------------------------------------------------------


class AnsweringOrigin:
    """
    A threaded HTTP/1.1 origin on loopback, serving under C{/base/}:

      - C{/base/redirect}: 302 with C{Location} and C{Content-Location} as
        absolute URLs of this origin;
      - C{/base/redirect-path}: 302 with C{Location: /base/next?x=1};
      - C{/base/cookies}: two C{Set-Cookie} with Path under C{/base/}, one
        with C{Domain} = this origin's host;
      - C{/base/bytes/N}: N bytes of tests/origin.py's pattern;
      - C{/base/ws}: C{101} for a websocket upgrade, then echoes raw bytes.

    C{heads} records C{(path, headers)} of every request.
    """

    def __init__(self) -> None:
        self.heads: list[tuple[str, list[tuple[str, str]]]] = []
        origin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                origin.heads.append((self.path, list(self.headers.items())))
                origin.answer(self)

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        path = handler.path
        if path == "/base/redirect":
            self._send(handler, 302, [("Location", f"{self.url}/base/next?x=1"),
                                      ("Content-Location", f"{self.url}/base/item")])
        elif path == "/base/redirect-path":
            self._send(handler, 302, [("Location", "/base/next?x=1")])
        elif path == "/base/cookies":
            self._send(handler, 200, [
                ("Set-Cookie", f"a=b; Path=/base/; Domain={LOOPBACK}"),
                ("Set-Cookie", "c=d; Path=/base/sub; Secure; HttpOnly"),
            ])
        elif path.startswith("/base/bytes/"):
            self._send(handler, 200, [("Content-Type", "application/octet-stream")],
                       patternBytes(int(path.rsplit("/", 1)[1])))
        elif path == "/base/ws" and handler.headers.get("Upgrade", "").lower() == "websocket":
            self._echo_websocket(handler)
        else:
            self._send(handler, 404, [], b"not here\n")

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, headers: list[tuple[str, str]],
              body: bytes = b"") -> None:
        handler.send_response(status)
        for name, value in headers:
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    @staticmethod
    def _echo_websocket(handler: BaseHTTPRequestHandler) -> None:
        key = handler.headers["Sec-WebSocket-Key"]
        accept = base64.b64encode(hashlib.sha1((key + WEBSOCKET_GUID).encode()).digest()).decode()
        handler.send_response(101)
        handler.send_header("Upgrade", "websocket")
        handler.send_header("Connection", "Upgrade")
        handler.send_header("Sec-WebSocket-Accept", accept)
        handler.end_headers()
        handler.wfile.flush()
        handler.close_connection = True
        while True:
            data = handler.rfile.read1(65536)
            if not data:
                return
            handler.wfile.write(data)
            handler.wfile.flush()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------------------
# Fixtures: origins, the proxy, Apache in front
# ---------------------------------------------------------------------------


@dataclass
class Front:
    """Everything one test talks to."""

    apache: ApacheProcess
    proxy: ProxyProcess
    recording: RecordingOrigin
    answering: AnsweringOrigin
    tls: TLSFiles
    curl: str
    scratch: Path

    def port(self, scheme: str) -> int:
        return self.apache.https_port if scheme == "https" else self.apache.http_port

    def public(self, scheme: str) -> str:
        """The public base URL of the vhost for C{scheme}, as the client names it."""
        return f"{scheme}://{PUBLIC_HOST}:{self.port(scheme)}"


@dataclass
class CurlResult:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def values(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


@pytest.fixture
def recording_origin():
    origin = RecordingOrigin()
    yield origin
    origin.close()


@pytest.fixture
def answering_origin():
    origin = AnsweringOrigin()
    yield origin
    origin.close()


@pytest.fixture
def apache2() -> str:
    """The apache2 binary, checked before any proxy is started for nothing."""
    return apache_binary()


@pytest.fixture
def front(apache2, reverse_factory, recording_origin, answering_origin, tls_files, tmp_path, curl):
    routes = [
        {"prefix": "/", "name": "app", "backends": [f"{recording_origin.url}/app/"],
         "hosts": [PUBLIC_HOST], "preserve_host": True},
        {"prefix": "/answers/", "name": "answers", "backends": [f"{answering_origin.url}/base/"],
         "hosts": [PUBLIC_HOST], "preserve_host": True},
    ]
    proxy = reverse_factory(routes, reverse={"trusted_proxies": ["127.0.0.1/32"]})
    apache = start_apache(tmp_path / "apache", proxy.reverse_port, tls_files)
    yield Front(apache, proxy, recording_origin, answering_origin, tls_files, curl, tmp_path)
    code = apache.stop()
    assert code is not None, f"apache2 ignored SIGTERM for 15 s:\n{apache.logs()}"


def fetch(front: Front, scheme: str, path: str, *curl_args: str,
          host: str = PUBLIC_HOST) -> CurlResult:
    """
    curl from C{CLIENT_ADDRESS} to Apache's C{scheme} vhost, naming it
    C{host} (resolved to loopback); the last response head and the body.
    """
    port = front.port(scheme)
    head_file, body_file = front.scratch / "curl.head", front.scratch / "curl.body"
    argv = [front.curl, "-sS", "--max-time", "30", "--noproxy", "*",
            "--interface", CLIENT_ADDRESS, "--cacert", str(front.tls.ca_pem),
            "--resolve", f"{PUBLIC_HOST}:{port}:{LOOPBACK}",
            "-D", str(head_file), "-o", str(body_file), *curl_args,
            f"{scheme}://{host}:{port}{path}"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, (
        f"curl failed ({done.returncode}): {done.stderr}\napache:\n{front.apache.logs()}"
        f"\nproxy:\n{front.proxy.output()[-3000:]}")
    blocks = [b for b in head_file.read_bytes().decode("latin-1").split("\r\n\r\n") if b.strip()]
    lines = blocks[-1].split("\r\n")
    headers = [(n.strip(), v.strip()) for n, _, v in (line.partition(":") for line in lines[1:])]
    return CurlResult(int(lines[0].split()[1]), headers, body_file.read_bytes())


def one(headers: list[tuple[str, str]], name: str) -> str:
    """The single value of header C{name}; fails when it is absent or repeated."""
    values = [v for n, v in headers if n.lower() == name.lower()]
    assert len(values) == 1, f"expected one {name}, got {values} in {headers}"
    return values[0]


def forwarded_elements(value: str) -> list[dict[str, str]]:
    """RFC 7239 C{Forwarded} parsed: one dict per element, parameter names lower-cased, quotes removed."""
    elements = []
    for element in value.split(","):
        pairs = {}
        for pair in element.split(";"):
            name, _, val = pair.strip().partition("=")
            pairs[name.lower()] = val.strip('"')
        elements.append(pairs)
    return elements


SPOOFING_HEADERS = [
    "-H", f"X-Forwarded-For: {SPOOFED_ADDRESS}",
    "-H", f"X-Forwarded-Host: {SPOOFED_HOST}",
    "-H", "X-Forwarded-Proto: gopher",
    "-H", "X-Forwarded-Port: 1",
    "-H", f"Forwarded: for={SPOOFED_ADDRESS};host={SPOOFED_HOST};proto=gopher",
]


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["https", "http"])
def test_origin_sees_public_host_and_apaches_forwarding_headers(front, scheme):
    mark = front.recording.mark()
    answer = fetch(front, scheme, "/x/y?q=1&r=%2F", *SPOOFING_HEADERS)
    assert answer.status == 200, answer
    (seen,) = front.recording.wait_requests(mark, 1)
    headers = seen["headers"]
    port = front.port(scheme)
    assert seen["target"] == "/app/x/y?q=1&r=%2F"
    assert one(headers, "Host") == f"{PUBLIC_HOST}:{port}"
    assert one(headers, "X-Forwarded-For") == CLIENT_ADDRESS
    assert one(headers, "X-Forwarded-Proto") == scheme
    assert one(headers, "X-Forwarded-Host") == f"{PUBLIC_HOST}:{port}"
    assert one(headers, "X-Forwarded-Port") == str(port)
    (element,) = forwarded_elements(one(headers, "Forwarded"))
    assert element.get("for") == CLIENT_ADDRESS, element
    assert element.get("proto") == scheme, element
    assert element.get("host") == f"{PUBLIC_HOST}:{port}", element
    assert [v for n, v in headers if n.lower() == "via"], f"no Via in {headers}"
    spoofed = [(n, v) for n, v in headers
               if SPOOFED_ADDRESS in v or SPOOFED_HOST in v or "gopher" in v]
    assert not spoofed, f"the client's own forwarding headers reached the origin: {spoofed}"


@pytest.mark.parametrize("scheme", ["https", "http"])
def test_redirect_to_the_backend_comes_back_public(front, scheme):
    answer = fetch(front, scheme, "/answers/redirect")
    assert answer.status == 302, answer
    public = front.public(scheme)
    assert one(answer.headers, "Location") == f"{public}/answers/next?x=1"
    assert one(answer.headers, "Content-Location") == f"{public}/answers/item"


def test_redirect_by_absolute_path_comes_back_under_the_prefix(front):
    answer = fetch(front, "https", "/answers/redirect-path")
    assert answer.status == 302, answer
    public = front.public("https")
    location = one(answer.headers, "Location")
    assert urljoin(f"{public}/answers/redirect-path", location) == f"{public}/answers/next?x=1", location


def test_cookies_come_back_with_public_path_and_no_backend_domain(front):
    answer = fetch(front, "https", "/answers/cookies")
    assert answer.status == 200, answer
    cookies = {}
    for value in answer.values("Set-Cookie"):
        first, *attributes = [part.strip() for part in value.split(";")]
        cookies[first] = {a.partition("=")[0].lower(): a.partition("=")[2] for a in attributes}
    assert set(cookies) == {"a=b", "c=d"}, answer.values("Set-Cookie")
    assert cookies["a=b"] == {"path": "/answers/"}, answer.values("Set-Cookie")
    assert cookies["c=d"] == {"path": "/answers/sub", "secure": "", "httponly": ""}, \
        answer.values("Set-Cookie")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_upload_arrives_byte_exact(front, tmp_path, chunked):
    body = os.urandom(5 * MiB)
    upload = tmp_path / "upload.bin"
    upload.write_bytes(body)
    framing = ["-H", "Transfer-Encoding: chunked"] if chunked else []
    mark = front.recording.mark()
    answer = fetch(front, "https", "/upload", "--data-binary", f"@{upload}",
                   "-H", "Content-Type: application/octet-stream", *framing)
    assert answer.status == 200, answer
    assert json.loads(answer.body) == {"target": "/app/upload", "body_length": len(body)}
    (seen,) = front.recording.wait_requests(mark, 1)
    assert seen["method"] == "POST"
    assert seen["complete"] and len(seen["body"]) == len(body)
    assert hashlib.sha256(seen["body"]).hexdigest() == hashlib.sha256(body).hexdigest()


def test_download_arrives_byte_exact(front):
    size = 4 * MiB + 1
    answer = fetch(front, "https", f"/answers/bytes/{size}")
    assert answer.status == 200, answer
    assert len(answer.body) == size
    assert hashlib.sha256(answer.body).hexdigest() == patternSha256(size)


def test_unknown_host_is_404_and_reaches_no_origin(front):
    mark = front.recording.mark()
    answered = len(front.answering.heads)
    answer = fetch(front, "https", "/answers/redirect", host=LOOPBACK)
    assert answer.status == 404, answer
    assert b"no route" in answer.body, answer.body
    assert front.recording.requests_since(mark) == []
    assert len(front.answering.heads) == answered


def test_websocket_upgrade_through_apache(front):
    context = ssl.create_default_context(cafile=str(front.tls.ca_pem))
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.settimeout(10)
    raw.bind((CLIENT_ADDRESS, 0))
    raw.connect((LOOPBACK, front.apache.https_port))
    key = base64.b64encode(os.urandom(16)).decode()
    with context.wrap_socket(raw, server_hostname=PUBLIC_HOST) as conn:
        conn.sendall(
            f"GET /answers/ws HTTP/1.1\r\nHost: {PUBLIC_HOST}:{front.apache.https_port}\r\n"
            f"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {key}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            data = conn.recv(4096)
            assert data, f"closed before the 101; got {head!r}\napache:\n{front.apache.logs()}"
            head += data
        head, _, rest = head.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head
        assert rest == b""
        for message in (b"hello through apache", os.urandom(100_000)):
            conn.sendall(message)
            echoed = b""
            while len(echoed) < len(message):
                data = conn.recv(65536)
                assert data, f"tunnel closed after {len(echoed)} of {len(message)} bytes"
                echoed += data
            assert echoed == message
    (path, headers) = front.answering.heads[-1]
    assert path == "/base/ws"
    assert one(headers, "Upgrade").lower() == "websocket"
    assert one(headers, "Host") == f"{PUBLIC_HOST}:{front.apache.https_port}"
