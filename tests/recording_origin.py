"""
A recording HTTP/1.1 origin for the forward-side regression tests: it lives
in the test process (a thread per connection, loopback only) and keeps what
reached it exactly as it came off the wire, so a test can say which requests
arrived, with which header names (case kept), which framing and which body.

Its parser is lenient on purpose (a head ends at the first CRLFCRLF, any
Transfer-Encoding means chunked, the request line is split at the first and
last space): whatever a proxy lets through is recorded rather than refused.

Paths it knows (anything else is answered C{200} with a JSON summary once the
request body is complete):

  - C{/delay/MS...}: the summary, MS milliseconds after the body completed.
  - C{/early-status/N...}: answers C{N} with C{Connection: close} as soon as
    the head is in, without reading the body, then closes after a lingering
    drain of at most two seconds (what servers do to get a refusal across).
  - C{/stream-early...}: answers C{200} chunked as soon as the head is in and
    keeps sending a small chunk every 50 ms, for at most five seconds, while
    it reads and drops the request body.
"""

from __future__ import annotations

import json
import socket
import threading
import time

from loopback_server import LoopbackServer


class RecordingOrigin(LoopbackServer):
    """
    The origin described in the module docstring.  C{requests} holds one
    dict per request head received: C{method}, C{target}, C{version},
    C{request_line}, C{headers} (list of (name, value), names as sent),
    C{body} (bytes, de-framed), C{chunked}, C{complete}.
    """

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.connections: list[dict] = []
        super().__init__(backlog=128)

    # -- observation ----------------------------------------------------------

    def mark(self) -> int:
        """A position in the request record, for L{requests_since}."""
        with self.lock:
            return len(self.requests)

    def requests_since(self, mark: int) -> list[dict]:
        with self.lock:
            return [dict(r) for r in self.requests[mark:]]

    def wait_requests(self, mark: int, count: int, timeout: float = 3.0) -> list[dict]:
        """The requests since C{mark}, once there are C{count} (or the timeout passed)."""
        deadline = time.monotonic() + timeout
        while True:
            seen = self.requests_since(mark)
            if len(seen) >= count or time.monotonic() > deadline:
                return seen
            time.sleep(0.02)

    def wait_for(self, tag: str, timeout: float = 5.0) -> None:
        """Return once the head of a request whose target holds C{tag} has come (fail the test if not)."""
        deadline = time.monotonic() + timeout
        while not any(tag in r["target"] for r in self.requests_since(0)):
            assert time.monotonic() < deadline, f"the origin never got {tag}"
            time.sleep(0.02)

    def all_raw(self) -> bytes:
        """Every byte received so far, on every connection (drained bodies excepted)."""
        with self.lock:
            return b"".join(bytes(c["raw"]) for c in self.connections)

    # -- serving --------------------------------------------------------------

    def handle(self, sock: socket.socket) -> None:
        conn = {"raw": bytearray()}
        with self.lock:
            self.connections.append(conn)
        self._serve(sock, conn)

    def _serve(self, sock: socket.socket, conn: dict) -> None:
        reader = _Reader(sock, conn, self.lock)
        while True:
            entry = self._read_head(reader)
            target = entry["target"]
            if target.startswith("/early-status/"):
                self._early_status(sock, reader, int(target.split("/")[2].split("?")[0]))
                return
            if target.startswith("/stream-early"):
                self._stream_early(sock, reader, entry)
                return
            body = self._read_body(reader, entry)
            with self.lock:
                entry["body"] = body
                entry["complete"] = True
            if target.startswith("/delay/"):
                time.sleep(int(target.split("/")[2].split("?")[0]) / 1000.0)
            answer = json.dumps({"target": target, "body_length": len(body)}).encode()
            sock.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer)
            )

    def _read_head(self, reader: "_Reader") -> dict:
        head = reader.until(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        first = lines[0].decode("latin-1")
        method, _, rest = first.partition(" ")
        target, _, version = rest.rpartition(" ")
        headers = []
        for field in lines[1:]:
            name, _, value = field.partition(b":")
            headers.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
        lower = [n.lower() for n, _ in headers]
        entry = {
            "method": method,
            "target": target,
            "version": version,
            "request_line": first,
            "headers": headers,
            "body": b"",
            "chunked": "transfer-encoding" in lower,
            "complete": False,
        }
        with self.lock:
            self.requests.append(entry)
        return entry

    @staticmethod
    def _read_body(reader: "_Reader", entry: dict) -> bytes:
        values = {n.lower(): v for n, v in entry["headers"]}
        body = bytearray()
        if entry["chunked"]:
            while True:
                size = int(reader.until(b"\r\n").split(b";")[0].strip(), 16)
                if size == 0:
                    while reader.until(b"\r\n"):
                        pass
                    return bytes(body)
                body += reader.exact(size)
                if reader.exact(2) != b"\r\n":
                    raise EOFError
        if "content-length" in values:
            body += reader.exact(int(values["content-length"]))
        return bytes(body)

    @staticmethod
    def _early_status(sock: socket.socket, reader: "_Reader", status: int) -> None:
        body = b"refused early by the origin\n"
        sock.sendall(
            b"HTTP/1.1 %d Early\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (status, len(body), body)
        )
        sock.shutdown(socket.SHUT_WR)
        reader.drain(2.0)

    @staticmethod
    def _stream_early(sock: socket.socket, reader: "_Reader", entry: dict) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n")
        stop = threading.Event()

        def stream() -> None:
            deadline = time.monotonic() + 5.0
            try:
                while not stop.is_set() and time.monotonic() < deadline:
                    sock.sendall(b"6\r\ntick\r\n\r\n")
                    stop.wait(0.05)
                sock.sendall(b"0\r\n\r\n")
            except OSError:
                pass

        streamer = threading.Thread(target=stream, daemon=True)
        streamer.start()
        reader.drain(6.0)
        stop.set()
        streamer.join(2)


class _Reader:
    """Buffered reads from one origin-side socket; every byte read is recorded, except what L{drain} drops."""

    def __init__(self, sock: socket.socket, conn: dict, lock: threading.Lock) -> None:
        self.sock = sock
        self.conn = conn
        self.lock = lock
        self.buf = bytearray()

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError
        with self.lock:
            self.conn["raw"] += data
        self.buf += data

    def until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            self._fill()
        i = self.buf.index(marker)
        out = bytes(self.buf[:i])
        del self.buf[: i + len(marker)]
        return out

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def drain(self, seconds: float) -> None:
        """Read and drop whatever comes for at most C{seconds}, or until EOF."""
        deadline = time.monotonic() + seconds
        self.buf.clear()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.sock.settimeout(left)
            try:
                if not self.sock.recv(65536):
                    return
            except OSError:
                return
