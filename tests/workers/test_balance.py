"""
The supervisor spreads connections over the workers, end to end with real
processes on loopback: a burst of 50 connections opened at once (what a load generator,
or an API gateway's pool filling at start-up, does) is served by both
workers of C{workers = 2} in even shares; every connection is held by
exactly one worker and none by the supervisor once handed over; the
connections handed to a worker that dies before it reads them are taken
back and served by the other; the connections of a TLS listener, and those
of a C{haproxy:} listener (the PROXY header read by the worker), are handed
over like any other.
"""

from __future__ import annotations

import os
import re
import signal
import ssl
import time
from concurrent.futures import ThreadPoolExecutor

from conftest import LOOPBACK, RawConnection, build_request, get_free_port, process_tcp_sockets
from recording_origin import RecordingOrigin
from supervised import admin_socket, alive, requests_counted, start_supervised, unix_get

#: The bench's burst: connections opened at once, then requests on each, kept alive.
BURST = 50
REQUESTS_EACH = 3


def holders(pids: list[int], port: int) -> dict[int, set[int]]:
    """For each process of C{pids}: the client ports of the connections it holds, accepted on C{port}."""
    return {
        pid: {s.remote[1] for s in process_tcp_sockets(pid) if s.state == "ESTABLISHED" and s.local[1] == port}
        for pid in pids
    }


def keep_alive_requests(connection: RawConnection, origin: RecordingOrigin, tag: str) -> list[int]:
    """L{REQUESTS_EACH} requests one after the other on one keep-alive connection: their statuses."""
    statuses = []
    for n in range(REQUESTS_EACH):
        connection.send(build_request("GET", f"{origin.url}/burst/{tag}/{n}", [("Host", origin.authority)]))
        statuses.append(connection.read_response().status)
    return statuses


def test_a_burst_of_connections_is_spread_over_both_workers(proxy_factory) -> None:
    origin = RecordingOrigin()
    supervised = start_supervised(proxy_factory)
    proxy = supervised.proxy
    workers = supervised.workers()
    clients = []
    try:
        # Opened at once: on loopback each handshake completes in the
        # kernel within connect(), before any process accepts, as a load
        # generator's or a pool's do.
        clients = [RawConnection(proxy.port, timeout=10) for _ in range(BURST)]
        with ThreadPoolExecutor(BURST) as pool:
            statuses = list(pool.map(lambda n: keep_alive_requests(clients[n], origin, str(n)), range(BURST)))
        assert statuses == [[200] * REQUESTS_EACH] * BURST
        ports = {client.local_port for client in clients}
        held = holders([supervised.pid, *workers], proxy.port)
        assert not held[supervised.pid] & ports, "the supervisor kept connections it handed over"
        shares = {pid: len(held[pid] & ports) for pid in workers}
        assert sum(shares.values()) == BURST, f"connections by worker: {shares}: one is held twice or by none"
        assert all(0.3 * BURST <= n <= 0.7 * BURST for n in shares.values()), f"connections by worker: {shares}"
        served = {pid: requests_counted(unix_get(admin_socket(pid), "/metrics")[1]) for pid in workers}
        assert served == {pid: shares[pid] * REQUESTS_EACH for pid in workers}
    finally:
        for client in clients:
            client.close()
        origin.close()


def test_connections_a_dead_worker_never_read_are_served_by_the_other(proxy_factory) -> None:
    origin = RecordingOrigin()
    supervised = start_supervised(proxy_factory)
    proxy = supervised.proxy
    victim, survivor = supervised.workers()
    clients = []
    try:
        # A stopped worker reads nothing, and counts as serving until its
        # next readiness probe times out (2 s): half the connections are
        # queued to it meanwhile.
        os.kill(victim, signal.SIGSTOP)
        clients = [RawConnection(proxy.port, timeout=10) for _ in range(6)]
        for n, client in enumerate(clients):
            client.send(build_request("GET", f"{origin.url}/orphan/{n}", [("Host", origin.authority),
                                                                         ("Connection", "close")]))
        deadline = time.monotonic() + 5
        while len(origin.requests) < 3:
            assert time.monotonic() < deadline, f"the live worker served {len(origin.requests)} of its 3"
            time.sleep(0.02)
        time.sleep(0.2)
        assert len(origin.requests) == 3, "the stopped worker's connections were served before it died"
        os.kill(victim, signal.SIGKILL)
        assert [client.read_response().status for client in clients] == [200] * 6
        unread = re.findall(r"pid (\d+), generation 1\) left (\d+) connections unread", proxy.output())
        assert unread == [(str(victim), "3")], proxy.output()[-3000:]
        assert not alive(victim) and alive(survivor)
    finally:
        for client in clients:
            client.close()
        origin.close()


def test_a_tls_listener_through_the_workers(proxy_factory, tls_files, tmp_path) -> None:
    store = tmp_path / "listener.pem"
    store.write_bytes(tls_files.key_pem.read_bytes() + tls_files.cert_pem.read_bytes())
    origin = RecordingOrigin()
    supervised = start_supervised(proxy_factory, forward={"tls": {"key_store": str(store)}})
    proxy = supervised.proxy
    context = ssl.create_default_context(cafile=str(tls_files.ca_pem))
    try:
        def one(n: int) -> int:
            with RawConnection(proxy.port, timeout=10) as c:
                c.sock = context.wrap_socket(c.sock, server_hostname=LOOPBACK)
                c.send(build_request("GET", f"{origin.url}/tls/{n}", [("Host", origin.authority),
                                                                      ("Connection", "close")]))
                return c.read_response().status

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(one, range(16))) == [200] * 16
        served = [requests_counted(unix_get(admin_socket(pid), "/metrics")[1]) for pid in supervised.workers()]
        assert sum(served) == 16 and min(served) > 0, f"TLS requests by worker: {served}"
        assert len(origin.requests) == 16
    finally:
        origin.close()


def test_a_proxy_protocol_listener_through_the_workers(proxy_factory) -> None:
    origin = RecordingOrigin()
    port = get_free_port()
    supervised = start_supervised(proxy_factory, forward={"listen": f"haproxy:tcp:{port}:interface={LOOPBACK}"})
    try:
        for n in range(4):
            with RawConnection(port, timeout=10) as c:
                c.send(f"PROXY TCP4 198.51.100.{n} {LOOPBACK} {40000 + n} {port}\r\n".encode())
                c.send(build_request("GET", f"{origin.url}/proxied/{n}", [("Host", origin.authority),
                                                                         ("Connection", "close")]))
                assert c.read_response().status == 200
        lines = supervised.proxy.wait_access_lines(lambda line: "/proxied/" in line, count=4)
        assert sorted(line["client"] for line in lines) == [f"198.51.100.{n}:{40000 + n}" for n in range(4)]
        served = [requests_counted(unix_get(admin_socket(pid), "/metrics")[1]) for pid in supervised.workers()]
        assert sum(served) == 4 and min(served) > 0, f"requests by worker: {served}"
    finally:
        origin.close()
