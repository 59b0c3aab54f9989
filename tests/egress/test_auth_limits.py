"""
Proxy authentication through a running proxy: a burst of wrong passwords
from one client is answered 429 (without a hash check) while another client
still authenticates.  The two clients are told apart by X-Forwarded-For from
a trusted hop (loopback), so every socket stays on 127.0.0.1.
"""

from __future__ import annotations

import base64
import re
import time

import bcrypt

from conftest import RawConnection, build_request
from mydataproxy.egress import auth


def test_wrong_password_burst_gets_429_while_another_client_authenticates(proxy_factory, origin, tmp_path):
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"alice:{bcrypt.hashpw(b'right', bcrypt.gensalt(4)).decode()}\n")
    proxy = proxy_factory(forward={"auth_file": str(htpasswd), "trusted_proxies": ["127.0.0.1/32"]})

    def get(client: str, password: str, tag: str):
        credentials = base64.b64encode(f"alice:{password}".encode()).decode()
        with RawConnection(proxy.port, timeout=10) as c:
            c.send(build_request("GET", f"{origin.url}/echo?{tag}", [
                ("Host", origin.authority), ("Proxy-Authorization", f"Basic {credentials}"),
                ("X-Forwarded-For", client)]))
            return c.read_response()

    for attempt in range(auth.FAILURE_LIMIT):
        assert get("192.0.2.66", f"wrong{attempt}", f"guess{attempt}").status == 407, attempt
    started = time.monotonic()
    locked = get("192.0.2.66", "right", "locked")
    assert locked.status == 429, locked.body
    assert 1 <= int(locked.get("Retry-After")) <= auth.FAILURE_WINDOW
    assert time.monotonic() - started < 1
    other = get("192.0.2.7", "right", "other")
    assert other.status == 200, other.body
    assert other.json()["uri"] == "/echo?other"
    deadline = time.monotonic() + 5
    while not re.search(r"429 GET \S+/echo\?locked from 192\.0\.2\.66: too many failed authentication attempts",
                        proxy.output()):
        assert time.monotonic() < deadline, proxy.output()[-3000:]
        time.sleep(0.05)
