"""
Who may use the proxy and where they may go.

Every decision names the rule that made it, so a refusal's log line can say
why.  Destinations are decided per resolved address: a request goes only to
addresses that were allowed, and the connection is made to exactly those
(no second lookup that DNS rebinding could answer differently).
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from typing import Sequence

from mydataproxy.config import EgressRule, EgressSettings, ForwardSettings, IPNetwork, ReverseSettings
from mydataproxy.http.hosts import hostMatches

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Special-purpose ranges (RFC 6890 and successors) a proxy must not reach
# unless a rule names them: the SSRF guard.  Order matters only for the name
# a refusal shows.
GUARDED: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(network), label)
    for network, label in [
        ("169.254.169.254/32", "cloud metadata"),
        ("fd00:ec2::254/128", "cloud metadata"),
        ("0.0.0.0/8", "unspecified/this network"),
        ("10.0.0.0/8", "private (RFC 1918)"),
        ("100.64.0.0/10", "carrier-grade NAT"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private (RFC 1918)"),
        ("192.0.0.0/24", "IETF protocol assignments"),
        ("192.0.2.0/24", "documentation"),
        ("192.88.99.0/24", "6to4 relay anycast"),
        ("192.168.0.0/16", "private (RFC 1918)"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("64:ff9b:1::/48", "local-use NAT64"),
        ("100::/64", "discard-only"),
        ("2001::/23", "IETF protocol assignments"),
        ("2001:db8::/32", "documentation"),
        ("fc00::/7", "unique local"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local (deprecated, RFC 3879)"),
        ("ff00::/8", "multicast"),
        ("::/8", "reserved (IPv4-compatible and -translated forms)"),
    ]
)


def guardedRange(address: IPAddress) -> str | None:
    """The special-purpose range C{address} is in, described, or L{None}."""
    if isinstance(address, ipaddress.IPv6Address):
        # An IPv4 address inside IPv6 (mapped, NAT64, 6to4) is judged as IPv4.
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return guardedRange(embedded)
    for network, label in GUARDED:
        if address in network:
            return f"{label} {network}"
    return None


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of a policy check; C{rule} names what decided it."""

    allowed: bool
    rule: str


@dataclass(frozen=True, slots=True)
class Request:
    """What a destination decision looks at."""

    mode: str
    host: str
    port: int
    user: str | None = None
    certificate: str = ""


def _matchesByName(rule: EgressRule, request: Request) -> bool:
    """Do C{rule}'s conditions other than C{networks} hold for C{request}?"""
    if rule.modes and request.mode not in rule.modes:
        return False
    if rule.ports and request.port not in rule.ports:
        return False
    if rule.users and request.user not in rule.users:
        return False
    if rule.client_certificates and request.certificate not in rule.client_certificates:
        return False
    return not rule.hosts or hostMatches(rule.hosts, request.host)


class EgressPolicy:
    """Destination rules, default and SSRF guard, decided per address."""

    def __init__(self, settings: EgressSettings) -> None:
        self._rules = settings.rules
        self._default = settings.default
        self._guard = settings.guard
        # Decisions depend only on their inputs and the (frozen) settings.
        self.decideAddress = functools.lru_cache(maxsize=8192)(self.decideAddress)
        self.refusedByName = functools.lru_cache(maxsize=8192)(self.refusedByName)

    def refusedByName(self, request: Request) -> Decision | None:
        """
        The refusal C{request} gets whatever its host resolves to, or L{None}
        when that depends on the address (or it may be allowed): only then
        does the host need resolving.  Deciding first keeps names the rules
        refuse out of DNS, which would otherwise carry them out of the
        network.

        Rules are walked in order as L{decideAddress} does; the first whose
        name, port, mode, user and certificate conditions hold settles the
        answer unless it has C{networks}.  Whenever this returns a refusal,
        L{decideAddress} refuses every address for C{request} too.
        """
        try:
            address = _ip(request.host)
        except ValueError:
            address = None
        if address is not None:
            # An IP literal is its own answer: decide it exactly.
            decision = self.decideAddress(request, str(address))
            return None if decision.allowed else decision
        for rule in self._rules:
            if not _matchesByName(rule, request):
                continue
            if rule.networks:
                return None  # this rule, or a later one, depending on the address
            if rule.action == "deny":
                return Decision(False, rule.name)
            # An allowing rule: allowed, or refused by the guard for some
            # addresses only.
            return None
        if self._default == "deny":
            # The guard refuses special addresses and the default the rest.
            return Decision(False, f"egress.default ({self._default})")
        return None

    def _firstMatch(self, request: Request, address: IPAddress) -> EgressRule | None:
        for rule in self._rules:
            if not _matchesByName(rule, request):
                continue
            if rule.networks and not any(address in n for n in rule.networks):
                continue
            return rule
        return None

    def decideAddress(self, request: Request, address: str) -> Decision:
        """May C{request} connect to C{address}?"""
        ip = _ip(address)  # an IPv4-mapped answer is judged as the IPv4 address it is
        rule = self._firstMatch(request, ip)
        special = guardedRange(ip) if self._guard else None
        if rule is not None and rule.action == "deny":
            return Decision(False, rule.name)
        if special is not None:
            # Only a rule that names this destination lifts the guard.
            if rule is not None and (rule.hosts or rule.networks):
                return Decision(True, rule.name)
            return Decision(False, f"egress.guard ({special})")
        if rule is not None:
            return Decision(True, rule.name)
        return Decision(self._default == "allow", f"egress.default ({self._default})")

    def decide(self, request: Request, addresses: Sequence[str]) -> tuple[list[str], Decision]:
        """
        The addresses C{request} may connect to, and the decision to report:
        the first allowing one, or (when none may be used) the first refusal.
        """
        allowed: list[str] = []
        first: Decision | None = None
        refusal: Decision | None = None
        for address in addresses:
            decision = self.decideAddress(request, address)
            if decision.allowed:
                allowed.append(address)
                first = first or decision
            else:
                refusal = refusal or decision
        return allowed, first or refusal


class ClientAccess:
    """
    A listener's client allow-list, and which X-Forwarded-For hop to
    believe.

    @param settings: The listener's section (C{client_allow},
        C{trusted_proxies}).
    @param section: Its name in the config, for the rules decisions name.
    """

    def __init__(self, settings: ForwardSettings | ReverseSettings, section: str = "forward") -> None:
        self._networks = settings.client_allow
        self._trusted = settings.trusted_proxies
        self._rule = f"{section}.client_allow"
        self._everyone = Decision(True, f"{self._rule} is empty")
        self.allowed = functools.lru_cache(maxsize=4096)(self.allowed)

    def trusts(self, peer: str) -> bool:
        """Is C{peer} (an address) one of the trusted proxies?"""
        if not self._trusted:
            return False
        try:
            return self._trusts(_ip(peer))
        except ValueError:
            return False

    def _trusts(self, ip: IPAddress) -> bool:
        return any(ip in network for network in self._trusted)

    def clientAddress(self, peer: str, forwardedFor: Sequence[bytes] | None) -> str:
        """
        The address a request comes from: the socket peer, unless the peer
        is a trusted proxy, in which case the rightmost X-Forwarded-For hop
        that is not itself a trusted proxy.
        """
        if not self._trusted or not forwardedFor or not self._trusts(_ip(peer)):
            return peer
        hops = [h.strip() for value in forwardedFor for h in value.split(b",")]
        for hop in reversed(hops):
            try:
                ip = _ip(hop.decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                return peer  # a garbled chain proves nothing
            if not self._trusts(ip):
                return str(ip)
        return peer

    def allowed(self, address: str) -> Decision:
        """May the client at C{address} use this listener?"""
        if not self._networks:
            return self._everyone
        try:
            ip = _ip(address)
        except ValueError:
            return Decision(False, f"{self._rule} (not an IP client)")
        for network in self._networks:
            if ip in network:
                return Decision(True, f"{self._rule} {network}")
        return Decision(False, f"{self._rule} (no match)")


@functools.lru_cache(maxsize=4096)
def _ip(text: str) -> IPAddress:
    ip = ipaddress.ip_address(text.strip("[]"))
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def connectAllowed(settings: ForwardSettings, port: int) -> Decision:
    """May a CONNECT tunnel go to C{port}?"""
    if port in settings.connect_ports:
        return Decision(True, f"forward.connect_ports {port}")
    return Decision(False, "forward.connect_ports")


def httpPortAllowed(settings: ForwardSettings, port: int) -> Decision:
    """
    May an absolute-form or header-routed request go to C{port}?  Other
    ports would let a request speak HTTP at a mail server, Redis and the
    like (a cross-protocol attack).
    """
    if any(low <= port <= high for low, high in settings.http_ports):
        return Decision(True, f"forward.http_ports {port}")
    return Decision(False, "forward.http_ports")
