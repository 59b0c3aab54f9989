"""
Unit tests of the egress policy and client access (L{mydataproxy.egress.policy}):
the SSRF guard's table of special-purpose ranges, rule evaluation per
resolved address, and which X-Forwarded-For hop is believed.

Pure functions only: no sockets, no reactor running.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mydataproxy.config import EgressRule, EgressSettings, ForwardSettings, settingsFromMapping
from mydataproxy.egress.policy import ClientAccess, Decision, EgressPolicy, Request, guardedRange, httpPortAllowed


def egressSettings(**table) -> EgressSettings:
    """The [egress] section as the config loader builds it from C{table}."""
    return settingsFromMapping({"egress": table}, "<test>", "", Path(".")).egress


def forwardSettings(**table) -> ForwardSettings:
    return settingsFromMapping({"forward": table}, "<test>", "", Path(".")).forward


def policy(*rules: dict, **table) -> EgressPolicy:
    return EgressPolicy(egressSettings(rules=list(rules), **table))


def req(host: str = "example.test", port: int = 80, mode: str = "absolute", user=None) -> Request:
    return Request(mode, host, port, user)


def ip(text: str):
    return ipaddress.ip_address(text)


# ---------------------------------------------------------------------------
# guardedRange
# ---------------------------------------------------------------------------

LOOPBACK4 = "loopback 127.0.0.0/8"
METADATA4 = "cloud metadata 169.254.169.254/32"
PRIVATE10 = "private (RFC 1918) 10.0.0.0/8"

GUARDED_TABLE = [
    # IPv4 special-purpose ranges
    ("127.0.0.1", LOOPBACK4),
    ("127.255.255.254", LOOPBACK4),
    ("10.0.0.1", PRIVATE10),
    ("10.255.255.255", PRIVATE10),
    ("172.16.0.1", "private (RFC 1918) 172.16.0.0/12"),
    ("172.31.255.255", "private (RFC 1918) 172.16.0.0/12"),
    ("192.168.1.1", "private (RFC 1918) 192.168.0.0/16"),
    ("100.64.0.1", "carrier-grade NAT 100.64.0.0/10"),
    ("100.127.255.255", "carrier-grade NAT 100.64.0.0/10"),
    ("169.254.169.254", METADATA4),  # the metadata address, not just "link-local"
    ("169.254.0.1", "link-local 169.254.0.0/16"),
    ("169.254.169.253", "link-local 169.254.0.0/16"),
    ("0.0.0.0", "unspecified/this network 0.0.0.0/8"),
    ("0.1.2.3", "unspecified/this network 0.0.0.0/8"),
    ("224.0.0.1", "multicast 224.0.0.0/4"),
    ("239.255.255.250", "multicast 224.0.0.0/4"),
    ("240.0.0.1", "reserved 240.0.0.0/4"),
    ("255.255.255.255", "reserved 240.0.0.0/4"),
    ("192.0.0.8", "IETF protocol assignments 192.0.0.0/24"),
    ("192.0.2.1", "documentation 192.0.2.0/24"),
    ("198.51.100.7", "documentation 198.51.100.0/24"),
    ("203.0.113.9", "documentation 203.0.113.0/24"),
    ("198.18.0.1", "benchmarking 198.18.0.0/15"),
    ("192.88.99.1", "6to4 relay anycast 192.88.99.0/24"),
    # IPv4 global addresses, including the neighbours of guarded ranges
    ("8.8.8.8", None),
    ("93.184.216.34", None),
    ("172.32.0.1", None),
    ("172.15.255.255", None),
    ("100.128.0.1", None),
    ("100.63.255.255", None),
    ("11.0.0.1", None),
    ("223.255.255.255", None),
    ("192.169.0.1", None),
    # IPv6 special-purpose ranges
    ("::1", "loopback ::1/128"),
    ("::", "unspecified ::/128"),
    ("fd00:ec2::254", "cloud metadata fd00:ec2::254/128"),
    ("fd00:ec2::253", "unique local fc00::/7"),
    ("fd12:3456::1", "unique local fc00::/7"),
    ("fc00::1", "unique local fc00::/7"),
    ("fe80::1", "link-local fe80::/10"),
    ("febf::1", "link-local fe80::/10"),
    ("fec0::1", "site-local (deprecated, RFC 3879) fec0::/10"),
    ("feff::1", "site-local (deprecated, RFC 3879) fec0::/10"),
    ("ff02::1", "multicast ff00::/8"),
    ("ff05::1:3", "multicast ff00::/8"),
    ("2001:db8::1", "documentation 2001:db8::/32"),
    ("100::1", "discard-only 100::/64"),
    ("64:ff9b:1::1", "local-use NAT64 64:ff9b:1::/48"),
    # Teredo (2001::/32) is inside the IETF protocol assignments block
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "IETF protocol assignments 2001::/23"),
    ("2001::1", "IETF protocol assignments 2001::/23"),
    # IPv4 inside IPv6: judged as the IPv4 address it carries
    ("::ffff:127.0.0.1", LOOPBACK4),
    ("::ffff:7f00:1", LOOPBACK4),
    ("::ffff:169.254.169.254", METADATA4),
    ("::ffff:a9fe:a9fe", METADATA4),
    ("::ffff:10.0.0.1", PRIVATE10),
    ("::ffff:0.0.0.0", "unspecified/this network 0.0.0.0/8"),
    ("64:ff9b::a9fe:a9fe", METADATA4),  # NAT64 well-known prefix
    ("64:ff9b::7f00:1", LOOPBACK4),
    ("64:ff9b::c0a8:101", "private (RFC 1918) 192.168.0.0/16"),
    ("2002:7f00:1::", LOOPBACK4),  # 6to4
    ("2002:a9fe:a9fe::1", METADATA4),
    ("2002:a00:1::", PRIVATE10),
    # IPv6 global addresses, and public IPv4 inside IPv6
    ("2606:4700:4700::1111", None),
    ("2001:4860:4860::8888", None),
    ("::ffff:8.8.8.8", None),
    ("64:ff9b::808:808", None),
    ("2002:808:808::", None),
]


@pytest.mark.parametrize("address, expected", GUARDED_TABLE)
def test_guardedRange(address: str, expected: str | None) -> None:
    assert guardedRange(ip(address)) == expected


@pytest.mark.parametrize(
    "address",
    [
        "::7f00:1",  # IPv4-compatible ::127.0.0.1 (deprecated, RFC 4291 2.5.5.1)
        "::a9fe:a9fe",  # IPv4-compatible ::169.254.169.254
        "::ffff:0:7f00:1",  # IPv4-translated ::ffff:0:127.0.0.1 (RFC 2765)
    ],
)
def test_guardedRangeReservedIPv4EmbeddingForms(address: str) -> None:
    """
    ::/8 is reserved by the IETF (IANA IPv6 address space); the deprecated
    IPv4-compatible and IPv4-translated forms of a guarded IPv4 address
    carry it just as the mapped form does.
    """
    assert guardedRange(ip(address)) is not None, f"{address} is in the reserved ::/8 and embeds a guarded IPv4"


@settings(max_examples=400, deadline=None)
@given(st.ip_addresses(v=4))
def test_guardedRangeJudgesEmbeddedIPv4AsIPv4(address: ipaddress.IPv4Address) -> None:
    """Mapped, NAT64 and 6to4 forms of any IPv4 address get the IPv4 verdict."""
    expected = guardedRange(address)
    value = int(address)
    mapped = ipaddress.IPv6Address((0xFFFF << 32) | value)
    nat64 = ipaddress.IPv6Address((0x0064FF9B << 96) | value)
    sixToFour = ipaddress.IPv6Address((0x2002 << 112) | (value << 80) | 1)
    assert guardedRange(mapped) == expected
    assert guardedRange(nat64) == expected
    assert guardedRange(sixToFour) == expected


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)))
def test_guardedRangeCoversEveryNonGlobalAddress(address) -> None:
    """Whatever Python's own table calls non-global is guarded too."""
    if isinstance(address, ipaddress.IPv6Address) and (address.ipv4_mapped or address.sixtofour):
        return  # judged by the IPv4 address it carries, covered above
    if not address.is_global or address.is_multicast or address.is_unspecified or address.is_loopback:
        assert guardedRange(address) is not None, address


# ---------------------------------------------------------------------------
# EgressPolicy.decideAddress / decide
# ---------------------------------------------------------------------------


def test_guardRefusesLoopbackWithoutRules() -> None:
    decision = policy().decideAddress(req(), "127.0.0.1")
    assert not decision.allowed
    assert decision.rule == "egress.guard (loopback 127.0.0.0/8)"


def test_guardRefusesMetadataAddressesWithoutRules() -> None:
    p = policy()
    assert p.decideAddress(req(), "169.254.169.254").rule == f"egress.guard ({METADATA4})"
    assert p.decideAddress(req(), "fd00:ec2::254").rule == "egress.guard (cloud metadata fd00:ec2::254/128)"
    assert not p.decideAddress(req(), "fd00:ec2::254").allowed


def test_defaultAllowForGlobalAddress() -> None:
    decision = policy().decideAddress(req(), "93.184.216.34")
    assert decision.allowed and decision.rule == "egress.default (allow)"


def test_defaultDeny() -> None:
    decision = policy(default="deny").decideAddress(req(), "93.184.216.34")
    assert not decision.allowed and decision.rule == "egress.default (deny)"


def test_guardOffLetsLoopbackFallToDefault() -> None:
    assert policy(guard=False).decideAddress(req(), "127.0.0.1").allowed
    decision = policy(guard=False, default="deny").decideAddress(req(), "127.0.0.1")
    assert not decision.allowed and decision.rule == "egress.default (deny)"


@pytest.mark.parametrize(
    "rule",
    [
        {"name": "everything", "action": "allow"},
        {"name": "port 80", "action": "allow", "ports": [80]},
        {"name": "absolute mode", "action": "allow", "modes": ["absolute"]},
    ],
)
def test_ruleThatDoesNotNameTheDestinationDoesNotLiftGuard(rule: dict) -> None:
    p = policy(rule)
    assert p.decideAddress(req(), "93.184.216.34").rule == f"egress.rules[0] {rule['name']}"
    for address, label in [("127.0.0.1", LOOPBACK4), ("169.254.169.254", METADATA4), ("10.0.0.1", PRIVATE10)]:
        decision = p.decideAddress(req(), address)
        assert not decision.allowed, (rule, address)
        assert decision.rule == f"egress.guard ({label})"


def test_ruleNamingNetworkLiftsGuard() -> None:
    p = policy({"name": "origins", "action": "allow", "networks": ["127.0.0.0/8"]})
    decision = p.decideAddress(req(), "127.0.0.5")
    assert decision.allowed and decision.rule == "egress.rules[0] origins"
    # Only for the network it names.
    assert not p.decideAddress(req(), "10.0.0.1").allowed
    assert not p.decideAddress(req(), "::1").allowed


def test_ruleNamingHostLiftsGuardOnlyForThatHost() -> None:
    p = policy({"name": "bank", "action": "allow", "hosts": ["API.Bank.Test."]})
    decision = p.decideAddress(req("api.bank.test"), "10.1.2.3")
    assert decision.allowed and decision.rule == "egress.rules[0] bank"
    refused = p.decideAddress(req("other.bank.test"), "10.1.2.3")
    assert not refused.allowed and refused.rule == f"egress.guard ({PRIVATE10})"


def test_ruleHostsAreNormalisedAtLoad() -> None:
    rules = egressSettings(
        rules=[{"action": "allow", "hosts": ["API.Bank.Test.", "*.Corp.TEST", "bücher.test", "0x7f.1"]}]
    ).rules
    assert rules[0].hosts == ("api.bank.test", "*.corp.test", "xn--bcher-kva.test", "127.0.0.1")
    assert rules[0].name == "egress.rules[0]"


@pytest.mark.parametrize(
    "host, matches",
    [
        ("a.corp.test", True),
        ("a.b.corp.test", True),
        ("corp.test", False),
        ("evilcorp.test", False),
        ("corp.test.evil", False),
        ("a.corp.test.evil", False),
    ],
)
def test_suffixRule(host: str, matches: bool) -> None:
    p = policy({"name": "corp", "action": "allow", "hosts": ["*.corp.test"]}, default="deny")
    decision = p.decideAddress(req(host), "93.184.216.34")
    assert decision.allowed is matches
    assert decision.rule == ("egress.rules[0] corp" if matches else "egress.default (deny)")


def test_denyBeforeAllowFirstMatchWins() -> None:
    deny = {"name": "no bank", "action": "deny", "hosts": ["api.bank.test"]}
    allow = {"name": "all", "action": "allow", "hosts": ["*.bank.test", "api.bank.test"]}
    decision = policy(deny, allow).decideAddress(req("api.bank.test"), "93.184.216.34")
    assert not decision.allowed and decision.rule == "egress.rules[0] no bank"
    decision = policy(allow, deny).decideAddress(req("api.bank.test"), "93.184.216.34")
    assert decision.allowed and decision.rule == "egress.rules[0] all"


def test_denyRuleRefusesEvenWhenGuardWouldToo() -> None:
    decision = policy({"name": "no loopback", "action": "deny", "networks": ["127.0.0.0/8"]}).decideAddress(
        req(), "127.0.0.1"
    )
    assert not decision.allowed and decision.rule == "egress.rules[0] no loopback"


def test_denyRuleByNetworkIsNotBypassedByIPv4MappedAnswer() -> None:
    """
    An AAAA answer ::ffff:a.b.c.d reaches a.b.c.d: a rule refusing that IPv4
    network must refuse it too.
    """
    p = policy({"name": "no example", "action": "deny", "networks": ["93.184.216.0/24"]}, guard=False)
    assert not p.decideAddress(req(), "93.184.216.34").allowed
    decision = p.decideAddress(req(), "::ffff:93.184.216.34")
    assert not decision.allowed, decision
    assert decision.rule == "egress.rules[0] no example"


@pytest.mark.parametrize("mode", ["absolute", "header", "connect"])
def test_modeRules(mode: str) -> None:
    p = policy(
        {"name": "no tunnels", "action": "deny", "modes": ["connect"]},
        {"name": "header only", "action": "allow", "modes": ["header"], "networks": ["10.0.0.0/8"]},
    )
    decision = p.decideAddress(req(mode=mode), "10.0.0.1")
    expected = {
        "absolute": (False, f"egress.guard ({PRIVATE10})"),
        "header": (True, "egress.rules[1] header only"),
        "connect": (False, "egress.rules[0] no tunnels"),
    }[mode]
    assert (decision.allowed, decision.rule) == expected


def test_portRules() -> None:
    p = policy(
        {"name": "no 25", "action": "deny", "ports": [25]},
        {"name": "internal https", "action": "allow", "ports": [443, 8443], "networks": ["10.0.0.0/8"]},
    )
    assert p.decideAddress(req(port=443), "10.0.0.1").allowed
    assert p.decideAddress(req(port=8443), "10.0.0.1").rule == "egress.rules[1] internal https"
    assert p.decideAddress(req(port=80), "10.0.0.1").rule == f"egress.guard ({PRIVATE10})"
    decision = p.decideAddress(req(port=25), "93.184.216.34")
    assert not decision.allowed and decision.rule == "egress.rules[0] no 25"


def test_decideKeepsOnlyAllowedAddresses() -> None:
    p = policy({"name": "two", "action": "allow", "networks": ["127.0.0.2/32"]})
    allowed, decision = p.decide(req(), ["127.0.0.1", "127.0.0.2", "169.254.169.254", "93.184.216.34"])
    assert allowed == ["127.0.0.2", "93.184.216.34"]
    assert decision.allowed and decision.rule == "egress.rules[0] two"


def test_decideReportsFirstRefusalWhenNothingIsAllowed() -> None:
    allowed, decision = policy().decide(req(), ["10.0.0.1", "127.0.0.1", "::1"])
    assert allowed == []
    assert not decision.allowed and decision.rule == f"egress.guard ({PRIVATE10})"


def test_decideRefusesAllWhenEveryAddressIsGuarded() -> None:
    allowed, decision = policy().decide(req(), ["127.0.0.1", "::1", "fd00:ec2::254"])
    assert allowed == [] and not decision.allowed


def test_rebindingAnswerDecidedPerResolution() -> None:
    """The same host, two answers: each set is decided on its own addresses."""
    p = policy({"name": "only .2", "action": "allow", "networks": ["127.0.0.2/32"]})
    assert p.decide(req("rebind.test"), ["127.0.0.2"])[0] == ["127.0.0.2"]
    allowed, decision = p.decide(req("rebind.test"), ["127.0.0.1"])
    assert allowed == [] and decision.rule == f"egress.guard ({LOOPBACK4})"


# ---------------------------------------------------------------------------
# EgressPolicy.refusedByName: refusals decided before any DNS query
# ---------------------------------------------------------------------------

BANK = {"name": "bank", "action": "allow", "hosts": ["api.bank.test"]}
NO_BANK = {"name": "no bank", "action": "deny", "hosts": ["*.bank.test"]}
PRIVATE_NET = {"name": "private", "action": "allow", "networks": ["10.0.0.0/8"]}
DENY_NET = {"name": "no 192.0.2", "action": "deny", "networks": ["192.0.2.0/24"]}


def test_refusedByNameDefaultDenyRefusesUnlistedName() -> None:
    """Issue 7 item 12: an unlisted name under default deny is refused unresolved."""
    decision = policy(BANK, default="deny").refusedByName(req("exfiltrate.attacker.test"))
    assert decision == Decision(False, "egress.default (deny)")


def test_refusedByNameDefaultDenyWithGuardOff() -> None:
    decision = policy(BANK, default="deny", guard=False).refusedByName(req("other.test"))
    assert decision == Decision(False, "egress.default (deny)")


def test_refusedByNameAllowedNameNeedsResolving() -> None:
    assert policy(BANK, default="deny").refusedByName(req("api.bank.test")) is None


def test_refusedByNameDefaultAllowNeedsResolving() -> None:
    # The guard may still refuse the address: only the answer can tell.
    assert policy().refusedByName(req("anything.test")) is None
    assert policy(BANK).refusedByName(req("other.test")) is None


def test_refusedByNameDenyRuleByHost() -> None:
    p = policy(NO_BANK, BANK)
    assert p.refusedByName(req("api.bank.test")) == Decision(False, "egress.rules[0] no bank")
    assert p.refusedByName(req("bank.test")) is None


def test_refusedByNameFirstMatchWins() -> None:
    # The allowing rule comes first: the later deny never decides.
    assert policy(BANK, NO_BANK, default="deny").refusedByName(req("api.bank.test")) is None


@pytest.mark.parametrize(
    "rule",
    [
        {"name": "everything", "action": "allow"},
        {"name": "port 80", "action": "allow", "ports": [80]},
    ],
)
def test_refusedByNameAllowRuleNotNamingTheHostNeedsResolving(rule: dict) -> None:
    # Allowed for public addresses, refused by the guard for others.
    assert policy(rule, default="deny").refusedByName(req("x.test")) is None


@pytest.mark.parametrize("rule", [PRIVATE_NET, DENY_NET])
def test_refusedByNameNetworkRuleNeedsTheAddress(rule: dict) -> None:
    assert policy(rule, NO_BANK, default="deny").refusedByName(req("api.bank.test")) is None


def test_refusedByNameSkipsNetworkRulesThatCannotMatch() -> None:
    """A network rule for other ports, modes or users never needs the address."""
    p = policy(
        {"action": "allow", "networks": ["10.0.0.0/8"], "ports": [8443]},
        {"action": "allow", "networks": ["10.0.0.0/8"], "modes": ["connect"]},
        {"action": "allow", "networks": ["10.0.0.0/8"], "hosts": ["*.corp.test"]},
        default="deny",
    )
    assert p.refusedByName(req("x.test", port=80)) == Decision(False, "egress.default (deny)")
    assert p.refusedByName(req("x.test", port=8443)) is None
    assert p.refusedByName(req("x.test", mode="connect")) is None
    assert p.refusedByName(req("a.corp.test")) is None


@pytest.mark.parametrize(
    "request_, matches",
    [
        (Request("absolute", "x.test", 80, "alice"), True),
        (Request("absolute", "x.test", 80, "bob"), False),
        (Request("absolute", "x.test", 80, None), False),
        (Request("connect", "x.test", 80, "alice"), False),
        (Request("absolute", "x.test", 443, "alice"), False),
        (Request("absolute", "x.test", 80, "alice", "CN=gateway"), True),
    ],
)
def test_refusedByNameRuleConditions(request_: Request, matches: bool) -> None:
    # Built directly: the loader wants forward.auth_file for rules naming users.
    rule = EgressRule(
        "alice", "deny", users=frozenset({"alice"}), modes=frozenset({"absolute", "header"}), ports=frozenset({80})
    )
    p = EgressPolicy(EgressSettings(rules=(rule,)))
    expected = Decision(False, "alice") if matches else None
    assert p.refusedByName(request_) == expected


def test_refusedByNameClientCertificateCondition() -> None:
    p = policy({"name": "gw", "action": "deny", "client_certificates": ["CN=gateway"]})
    assert p.refusedByName(Request("header", "x.test", 443, None, "CN=gateway")) == Decision(
        False, "egress.rules[0] gw"
    )
    assert p.refusedByName(Request("header", "x.test", 443, None, "CN=other")) is None


@pytest.mark.parametrize(
    "host, rules, table, expected",
    [
        # An IP literal needs no DNS: it is decided exactly, network rules included.
        ("127.0.0.1", (), {}, Decision(False, f"egress.guard ({LOOPBACK4})")),
        ("10.1.2.3", (PRIVATE_NET,), {"default": "deny"}, None),
        ("192.0.2.7", (DENY_NET,), {"guard": False}, Decision(False, "egress.rules[0] no 192.0.2")),
        ("93.184.216.34", (), {}, None),
        ("93.184.216.34", (), {"default": "deny"}, Decision(False, "egress.default (deny)")),
        ("::ffff:192.0.2.7", (DENY_NET,), {"guard": False}, Decision(False, "egress.rules[0] no 192.0.2")),
        ("fd00:ec2::254", (BANK,), {}, Decision(False, "egress.guard (cloud metadata fd00:ec2::254/128)")),
    ],
)
def test_refusedByNameIPLiteral(host: str, rules: tuple, table: dict, expected: Decision | None) -> None:
    assert policy(*rules, **table).refusedByName(req(host)) == expected


SAMPLE_ADDRESSES = ["93.184.216.34", "192.0.2.7", "10.1.2.3", "127.0.0.1", "169.254.169.254", "::1", "2606:4700::1"]
SAMPLE_POLICIES = [
    ((), {}),
    ((), {"default": "deny"}),
    ((), {"default": "deny", "guard": False}),
    ((BANK,), {"default": "deny"}),
    ((NO_BANK, BANK), {}),
    ((DENY_NET, BANK), {"default": "deny"}),
    ((PRIVATE_NET, NO_BANK), {"guard": False}),
    (({"action": "allow", "ports": [443]},), {"default": "deny"}),
]


@pytest.mark.parametrize("rules, table", SAMPLE_POLICIES)
@pytest.mark.parametrize("host", ["api.bank.test", "www.bank.test", "other.test", "10.1.2.3", "192.0.2.7"])
@pytest.mark.parametrize("port", [80, 443])
def test_refusedByNameAgreesWithDecideAddress(rules: tuple, table: dict, host: str, port: int) -> None:
    """A refusal by name holds for every address the name could resolve to."""
    p = policy(*rules, **table)
    request = req(host, port=port)
    refusal = p.refusedByName(request)
    # An IP literal is not resolved: it is the one address there is.
    addresses = [host] if host[0].isdigit() else SAMPLE_ADDRESSES
    decisions = [p.decideAddress(request, address) for address in addresses]
    if refusal is not None:
        assert not refusal.allowed
        assert not any(d.allowed for d in decisions), (refusal, decisions)
        assert refusal.rule in {d.rule for d in decisions}


# ---------------------------------------------------------------------------
# Port lists: CONNECT and the HTTP forms
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("port", [80, 443, 8080, 8443])
def test_httpPortAllowedByDefault(port: int) -> None:
    assert httpPortAllowed(ForwardSettings(), port) == Decision(True, f"forward.http_ports {port}")


@pytest.mark.parametrize("port", [21, 22, 25, 6379, 9200, 11211, 1, 65535, 8000, 8081])
def test_httpPortRefusedByDefault(port: int) -> None:
    """Issue 7 item 15: http://host:25/ or :6379/ is a cross-protocol lever."""
    assert httpPortAllowed(ForwardSettings(), port) == Decision(False, "forward.http_ports")


def test_httpPortRangesFromConfig() -> None:
    settings = forwardSettings(http_ports=[80, "8000-8099", "8090-8100", 9000, "9001-9001"])
    assert settings.http_ports == ((80, 80), (8000, 8100), (9000, 9001))
    for port, allowed in [(80, True), (8000, True), (8050, True), (8100, True), (8101, False),
                          (443, False), (9001, True), (79, False)]:
        assert httpPortAllowed(settings, port).allowed is allowed, port


# ---------------------------------------------------------------------------
# ClientAccess
# ---------------------------------------------------------------------------


def access(**table) -> ClientAccess:
    return ClientAccess(forwardSettings(**table))


TRUSTED = {"client_allow": ["10.9.0.0/16", "2001:db8:9::/48"], "trusted_proxies": ["127.0.0.1/32", "::1/128"]}


@pytest.mark.parametrize(
    "peer, xff, client",
    [
        ("127.0.0.1", [b"1.2.3.4, 10.9.1.1"], "10.9.1.1"),
        ("127.0.0.1", [b"10.9.1.1, 1.2.3.4"], "1.2.3.4"),
        ("127.0.0.1", [b"1.2.3.4", b"10.9.1.1"], "10.9.1.1"),  # two fields: the last one's hop
        ("127.0.0.1", [b"10.9.1.1, 127.0.0.1"], "10.9.1.1"),  # trusted hops are skipped
        ("127.0.0.1", [b"10.9.1.1,127.0.0.1 ,  ::1"], "10.9.1.1"),
        ("127.0.0.1", [b"127.0.0.1"], "127.0.0.1"),  # only trusted hops: the peer
        ("127.0.0.1", [b"2001:db8:9::5"], "2001:db8:9::5"),
        ("127.0.0.1", [b"[2001:db8:9::5]"], "2001:db8:9::5"),
        ("127.0.0.1", [b"::ffff:10.9.1.1"], "10.9.1.1"),
        ("127.0.0.1", [b"10.9.1.1, garbage"], "127.0.0.1"),  # a garbled chain proves nothing
        ("127.0.0.1", [b"10.9.1.1:5555"], "127.0.0.1"),
        ("127.0.0.1", None, "127.0.0.1"),
        ("::1", [b"10.9.1.1"], "10.9.1.1"),
        ("10.9.1.1", [b"1.2.3.4"], "10.9.1.1"),  # untrusted peer: its XFF is ignored
        ("192.0.2.1", [b"10.9.1.1"], "192.0.2.1"),
    ],
)
def test_clientAddressWithTrustedProxies(peer: str, xff, client: str) -> None:
    assert access(**TRUSTED).clientAddress(peer, xff) == client


def test_clientAddressIgnoresXFFWithoutTrustedProxies() -> None:
    a = access(client_allow=["10.9.0.0/16"])
    assert a.clientAddress("127.0.0.1", [b"10.9.1.1"]) == "127.0.0.1"
    assert not a.allowed("127.0.0.1").allowed


@pytest.mark.parametrize(
    "address, allowed, rule",
    [
        ("10.9.1.1", True, "forward.client_allow 10.9.0.0/16"),
        ("10.10.0.1", False, "forward.client_allow (no match)"),
        ("::ffff:10.9.1.1", True, "forward.client_allow 10.9.0.0/16"),
        ("2001:db8:9:1::1", True, "forward.client_allow 2001:db8:9::/48"),
        ("2001:db8:a::1", False, "forward.client_allow (no match)"),
        ("127.0.0.1", False, "forward.client_allow (no match)"),
        ("not-an-ip", False, "forward.client_allow (not an IP client)"),
    ],
)
def test_clientAllowList(address: str, allowed: bool, rule: str) -> None:
    decision = access(**TRUSTED).allowed(address)
    assert (decision.allowed, decision.rule) == (allowed, rule)


def test_emptyClientAllowListAllowsEveryone() -> None:
    decision = access().allowed("203.0.113.7")
    assert decision.allowed and decision.rule == "forward.client_allow is empty"
