"""
TLS on the reverse listener itself (C{[reverse.tls]}): real handshakes on
loopback, the proxy's certificate from a PEM key store, clients verified
when C{client_auth = "need"}.
"""

from __future__ import annotations

import json
import socket
import ssl

import pytest

from conftest import LOOPBACK
from recording_origin import RecordingOrigin


@pytest.fixture
def backend():
    origin = RecordingOrigin()
    yield origin
    origin.close()


@pytest.fixture
def identity(tls_files, tmp_path):
    """The test leaf and its key in one PEM file, as a key store."""
    store = tmp_path / "reverse.pem"
    store.write_bytes(tls_files.key_pem.read_bytes() + tls_files.cert_pem.read_bytes())
    return store


def https_get(port: int, ca, path: str) -> tuple[int, bytes]:
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection((LOOPBACK, port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_reverse_listener_speaks_tls_and_says_so_to_the_backend(reverse_factory, backend, identity, tls_files):
    proxy = reverse_factory(
        [{"prefix": "/", "backends": [backend.url + "/"]}],
        reverse={"tls": {"key_store": str(identity)}},
    )
    status, body = https_get(proxy.reverse_port, tls_files.ca_pem, "/over-tls")
    assert status == 200, body
    assert json.loads(body)["target"] == "/over-tls"
    seen = dict((name.lower(), value) for name, value in backend.requests[-1]["headers"])
    assert seen["x-forwarded-proto"] == "https"
    assert "proto=https" in seen["forwarded"]
    lines = proxy.wait_access_lines(lambda line: "over-tls" in line)
    assert lines[0]["target"] == f"https://localhost:{proxy.reverse_port}/over-tls", lines[0]["_line"]


def test_reverse_listener_requiring_client_certificates_refuses_a_client_without(
    reverse_factory, backend, identity, tls_files
):
    proxy = reverse_factory(
        [{"prefix": "/", "backends": [backend.url + "/"]}],
        reverse={"tls": {"key_store": str(identity), "client_auth": "need", "trust_store": str(tls_files.ca_pem)}},
    )
    with pytest.raises((ssl.SSLError, ConnectionError)):
        https_get(proxy.reverse_port, tls_files.ca_pem, "/no-certificate")
    assert not [r for r in backend.requests if "no-certificate" in r["target"]]
