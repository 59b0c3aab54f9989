"""
A small configurable HTTP/1.1 backend for the reverse-proxy tests: it lives in
the test process (a thread per connection, loopback only), records every
request as it came off the wire and answers

  - with a canned response registered by L{Backend.answer} when the request's
    path (the target up to C{?}) equals the registered path: what a test
    needs to see response headers rewritten (C{Location}, C{Set-Cookie}...);
  - otherwise C{200} with a JSON echo: the backend's name, the method, the raw
    target, the headers (names and order as received), the body's length and
    the serial number of the connection the request came on.

Bodies are read by C{Content-Length} or chunked framing and kept whole (the
tests send only small ones here: large bodies go to C{tests/origin.py}).
A C{HEAD} gets the head only; C{Connection: close} closes after the answer.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass

LOOPBACK = "127.0.0.1"


@dataclass
class Seen:
    """One request as the backend received it."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    connection: int

    def values(self, name: str) -> list[str]:
        """The values of every C{name} field, in order (case-insensitive name)."""
        return [v for n, v in self.headers if n.lower() == name.lower()]


class Backend:
    """The backend described in the module docstring, named C{name} in its echoes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.requests: list[Seen] = []
        self.connections = 0
        self._answers: dict[str, tuple[int, list[tuple[str, str]], bytes]] = {}
        self._sockets: list[socket.socket] = []
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind((LOOPBACK, 0))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def authority(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.authority}"

    def answer(self, path: str, status: int, headers: list[tuple[str, str]], body: bytes = b"") -> None:
        """Answer requests for C{path} with this response (a Content-Length is added)."""
        with self.lock:
            self._answers[path] = (status, list(headers), body)

    def mark(self) -> int:
        """A position in the record, for L{since}."""
        with self.lock:
            return len(self.requests)

    def since(self, mark: int) -> list[Seen]:
        with self.lock:
            return self.requests[mark:]

    def wait(self, mark: int, count: int, timeout: float = 5.0) -> list[Seen]:
        """The requests since C{mark}, once there are C{count} (or the timeout passed)."""
        deadline = time.monotonic() + timeout
        while True:
            seen = self.since(mark)
            if len(seen) >= count or time.monotonic() > deadline:
                return seen
            time.sleep(0.02)

    def close(self) -> None:
        self.listener.close()
        with self.lock:
            for s in self._sockets:
                s.close()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
                serial = self.connections
                self._sockets.append(sock)
            threading.Thread(target=self._serve, args=(sock, serial), daemon=True).start()

    def _serve(self, sock: socket.socket, serial: int) -> None:
        buf = bytearray()
        try:
            while True:
                seen = _read_request(sock, buf, serial)
                with self.lock:
                    self.requests.append(seen)
                    canned = self._answers.get(seen.target.split("?", 1)[0])
                if canned is None:
                    canned = (200, [("Content-Type", "application/json")], json.dumps({
                        "backend": self.name, "method": seen.method, "target": seen.target,
                        "headers": seen.headers, "body_length": len(seen.body),
                        "connection": serial,
                    }).encode())
                status, headers, body = canned
                head = [f"HTTP/1.1 {status} Backend"] + [f"{n}: {v}" for n, v in headers]
                head.append(f"Content-Length: {len(body)}")
                out = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
                sock.sendall(out if seen.method == "HEAD" else out + body)
                if any("close" in v.lower() for v in seen.values("connection")):
                    return
        except (EOFError, OSError, ValueError):
            pass
        finally:
            sock.close()


def _fill(sock: socket.socket, buf: bytearray) -> None:
    data = sock.recv(65536)
    if not data:
        raise EOFError
    buf += data


def _until(sock: socket.socket, buf: bytearray, marker: bytes) -> bytes:
    while marker not in buf:
        _fill(sock, buf)
    i = buf.index(marker)
    out = bytes(buf[:i])
    del buf[: i + len(marker)]
    return out


def _exact(sock: socket.socket, buf: bytearray, n: int) -> bytes:
    while len(buf) < n:
        _fill(sock, buf)
    out = bytes(buf[:n])
    del buf[:n]
    return out


def _read_request(sock: socket.socket, buf: bytearray, serial: int) -> Seen:
    lines = _until(sock, buf, b"\r\n\r\n").decode("latin-1").split("\r\n")
    method, target, _version = lines[0].split(" ")
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name, value.strip(" \t")))
    seen = Seen(method, target, headers, b"", serial)
    if any("chunked" in v.lower() for v in seen.values("transfer-encoding")):
        body = bytearray()
        while size := int(_until(sock, buf, b"\r\n").split(b";")[0], 16):
            body += _exact(sock, buf, size)
            _exact(sock, buf, 2)
        while _until(sock, buf, b"\r\n"):
            pass
        seen.body = bytes(body)
    elif seen.values("content-length"):
        seen.body = _exact(sock, buf, int(seen.values("content-length")[0]))
    return seen
