"""Fixtures for the reverse-proxy tests: a dedicated proxy with a [reverse] listener."""

from __future__ import annotations

import pytest

from conftest import LOOPBACK, ProxyProcess, get_free_port


@pytest.fixture
def reverse_factory(proxy_factory):
    """
    A function C{(routes, **sections) -> ProxyProcess} starting a proxy whose
    reverse listener (on a free loopback port, C{.reverse_port}) serves
    C{routes}; C{reverse={...}} adds keys to C{[reverse]}, other keyword
    arguments override config sections as for C{proxy_factory}.
    """

    def start(routes: list[dict], **sections) -> ProxyProcess:
        reverse = {"listen": f"tcp:{get_free_port()}:interface={LOOPBACK}", "routes": routes}
        reverse.update(sections.pop("reverse", {}))
        return proxy_factory(reverse=reverse, **sections)

    return start
