"""
SIGTERM drains: new connections are refused at once and /readyz turns 503,
a request in flight finishes (a 3 s response completes), an idle keep-alive
connection is closed, the access log gets every line, the exit is clean;
past daemon.shutdown_timeout what is left is cut off, and the access line
says so; a second SIGTERM cuts at once.
"""

from __future__ import annotations

import signal
import socket
import time

import requests

from conftest import LOOPBACK, RawConnection, build_request, get_free_port, wait_for_port
from recording_origin import RecordingOrigin

# A drained stop exits 0 (twistd's own handler would end the process by the
# signal once stopped).
CLEAN_EXIT = (0,)


def send_slow(proxy, origin: RecordingOrigin, ms: int, tag: str) -> RawConnection:
    connection = RawConnection(proxy.port, timeout=15)
    connection.send(build_request("GET", f"{origin.url}/delay/{ms}/{tag}", [("Host", origin.authority)]))
    origin.wait_for(tag)
    return connection


def test_sigterm_lets_a_request_in_flight_finish(proxy_factory) -> None:
    origin = RecordingOrigin()
    admin = get_free_port()
    try:
        proxy = proxy_factory(daemon={"shutdown_timeout": 10.0}, admin={"listen": f"tcp:{admin}:interface={LOOPBACK}"})
        assert wait_for_port(admin, 10.0, proxy.proc)
        idle = RawConnection(proxy.port, timeout=10)
        idle.send(build_request("GET", f"{origin.url}/idle", [("Host", origin.authority)]))
        assert idle.read_response().status == 200
        slow = send_slow(proxy, origin, 3000, "held")
        started = time.monotonic()
        proxy.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert requests.get(f"http://{LOOPBACK}:{admin}/readyz", timeout=5).status_code == 503
        try:
            socket.create_connection((LOOPBACK, proxy.port), timeout=2).close()
            refused = False
        except OSError:
            refused = True
        assert refused, "a draining proxy still accepts connections"
        assert idle.sock.recv(1) == b"", "the idle keep-alive connection was not closed"
        response = slow.read_response()
        assert response.status == 200, "the request in flight did not finish"
        assert proxy.proc.wait(10) in CLEAN_EXIT
        assert 2.5 < time.monotonic() - started < 9, "the drain neither waited for the response nor ended after it"
        lines = [line for line in proxy.access_lines() if "/delay/3000/held" in line]
        assert len(lines) == 1 and "status=200" in lines[0], lines
    finally:
        origin.close()


def test_the_deadline_cuts_what_is_left_and_says_so(proxy_factory) -> None:
    origin = RecordingOrigin()
    try:
        proxy = proxy_factory(daemon={"shutdown_timeout": 1.0})
        slow = send_slow(proxy, origin, 8000, "cut")
        started = time.monotonic()
        proxy.proc.send_signal(signal.SIGTERM)
        assert proxy.proc.wait(10) in CLEAN_EXIT
        assert time.monotonic() - started < 4, "the drain outlived daemon.shutdown_timeout"
        try:
            ended = slow.sock.recv(1) == b""
        except ConnectionResetError:
            ended = True  # a cut-off is an abort: the client may see the reset
        assert ended, "the cut-off connection sent something"
        lines = proxy.wait_access_lines(lambda line: "/delay/8000/cut" in line)
        assert len(lines) == 1 and lines[0].get("rule") == "daemon.shutdown_timeout", lines
    finally:
        origin.close()


def test_a_second_sigterm_stops_at_once(proxy_factory) -> None:
    origin = RecordingOrigin()
    try:
        proxy = proxy_factory(daemon={"shutdown_timeout": 30.0})
        send_slow(proxy, origin, 20000, "second")
        proxy.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proxy.alive(), "the first SIGTERM did not drain"
        started = time.monotonic()
        proxy.proc.send_signal(signal.SIGTERM)
        assert proxy.proc.wait(10) in CLEAN_EXIT
        assert time.monotonic() - started < 3
    finally:
        origin.close()
