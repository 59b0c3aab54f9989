"""
SIGTERM with work still in flight: the requests and tunnels the reactor tears
down at shutdown still get their access lines (the access log stops last).
"""

from __future__ import annotations

import time

from conftest import RawConnection, build_request, open_tunnel


def test_open_request_and_tunnel_are_logged_at_sigterm(proxy_factory, fresh_origin, tcp_origin):
    proxy = proxy_factory()
    slow = RawConnection(proxy.port, timeout=10)
    tunnel = None
    try:
        slow.send(build_request("GET", f"{fresh_origin.url}/slow?held", [("Host", fresh_origin.authority)]))
        tunnel, resp = open_tunnel(proxy, tcp_origin.authority)
        assert resp.status == 200
        tunnel.send(b"some bytes through the tunnel")
        deadline = time.monotonic() + 10
        while fresh_origin.stats()["requests"] < 1:
            assert time.monotonic() < deadline, "the origin never got the slow request"
            time.sleep(0.05)
        assert not any("/slow?held" in line for line in proxy.access_lines())
        code = proxy.stop()
        assert code is not None, "the proxy did not stop on SIGTERM"
    finally:
        slow.close()
        if tunnel is not None:
            tunnel.close()
    lines = proxy.access_lines()
    held = [line for line in lines if "/slow?held" in line]
    connects = [line for line in lines if "method=CONNECT" in line]
    assert len(held) == 1, (lines, proxy.output()[-2000:])
    assert len(connects) == 1 and " in=29 " in connects[0], connects
