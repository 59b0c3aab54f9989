"""
Who may use the proxy and where they may go.

This is the first slice of the egress policy: the client allow-list and the
CONNECT port list.  Every refusal carries the rule that decided it, so the
log line can name it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from mydataproxy.config import ForwardSettings


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of a policy check; C{rule} names what decided it."""

    allowed: bool
    rule: str


class ForwardPolicy:
    """Checks a forward-proxy request against the listener's settings."""

    def __init__(self, settings: ForwardSettings) -> None:
        self._networks = settings.client_allow
        self._connectPorts = settings.connect_ports

    def clientAllowed(self, address: str) -> Decision:
        """May the client at C{address} use this listener?"""
        if not self._networks:
            return Decision(True, "forward.client_allow is empty")
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return Decision(False, "forward.client_allow (not an IP client)")
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        for network in self._networks:
            if ip in network:
                return Decision(True, f"forward.client_allow {network}")
        return Decision(False, "forward.client_allow (no match)")

    def connectAllowed(self, port: int) -> Decision:
        """May a CONNECT tunnel go to C{port}?"""
        if port in self._connectPorts:
            return Decision(True, f"forward.connect_ports {port}")
        return Decision(False, "forward.connect_ports")
