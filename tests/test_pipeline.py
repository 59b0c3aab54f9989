"""
Unit tests of the request pipeline (L{mydataproxy.pipeline}): what a listener
gives it (client, credentials, certificate, target and its mode) and what it
gets back (a L{Refusal} naming its rule, or an admitted L{Destination}), on
in-memory parts: a L{MemoryReactorClock} and a resolver double.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import ipaddress
from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.internet.error import DNSLookupError
from twisted.internet.testing import MemoryReactorClock

from mydataproxy.config import EgressRule, EgressSettings, Settings
from mydataproxy.egress.auth import Htpasswd, ProxyAuthenticator
from mydataproxy.http.target import Destination, Refusal, Target, parseTarget
from mydataproxy.pipeline import RequestPipeline

LOOPBACK_ALLOWED = EgressSettings(
    rules=(EgressRule("egress.rules[0] test origins", "allow", networks=(ipaddress.ip_network("127.0.0.0/8"),)),)
)


def isIPLiteral(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class RecordingResolver:
    """
    A resolver double: an IP literal is its own answer (as with
    L{mydataproxy.egress.resolver.Resolver}), other C{known} names come from
    a dict, and other lookups are recorded and held.
    """

    def __init__(self, known: dict[str, list[str]] | None = None) -> None:
        self._known = known or {}
        self.asked: list[str] = []
        self.pending: list[defer.Deferred] = []

    def known(self, host: str) -> list[str] | None:
        if isIPLiteral(host):
            return [host]
        return self._known.get(host)

    def resolve(self, host: str) -> defer.Deferred:
        if isIPLiteral(host):
            return defer.succeed([host])
        self.asked.append(host)
        self.pending.append(defer.Deferred())
        return self.pending[-1]


class AcceptingAuthenticator:
    """An authenticator double that proves C{user} for any credentials."""

    def __init__(self, user: str = "alice") -> None:
        self.user = user
        self.asked: list[tuple[list[bytes] | None, str]] = []

    def authenticate(self, credentials: list[bytes] | None, client: str) -> defer.Deferred:
        self.asked.append((credentials, client))
        return defer.succeed(self.user)


def settingsWith(egress: EgressSettings = LOOPBACK_ALLOWED, **sections) -> Settings:
    base = Settings(egress=egress)
    changes = {
        name: dataclasses.replace(getattr(base, name), **values) for name, values in sections.items()
    }
    return dataclasses.replace(base, **changes)


def pipelineWith(settings: Settings | None = None, resolver=None, authenticator=None) -> RequestPipeline:
    return RequestPipeline(
        settings or settingsWith(), resolver or RecordingResolver(), authenticator, MemoryReactorClock()
    )


def target(uri: bytes, method: bytes = b"GET") -> Target:
    return parseTarget(method, uri, None)


def refusalOf(d: defer.Deferred) -> Refusal:
    failures = []
    d.addErrback(failures.append)
    [failure] = failures
    failure.trap(Refusal)
    return failure.value


def resultOf(d: defer.Deferred):
    results = []
    d.addCallback(results.append)
    [result] = results
    return result


# The client


def test_clientIsThePeerUnlessItIsATrustedProxy() -> None:
    trusting = pipelineWith(settingsWith(forward={"trusted_proxies": (ipaddress.ip_network("10.0.0.0/8"),)}))
    assert trusting.clientOf("192.0.2.7", [b"198.51.100.1"]) == "192.0.2.7"
    assert trusting.clientOf("10.0.0.5", [b"198.51.100.1"]) == "198.51.100.1"
    assert pipelineWith().clientOf("10.0.0.5", [b"198.51.100.1"]) == "10.0.0.5"


def test_clientOutsideTheAllowListIsRefusedWithItsRule() -> None:
    pipeline = pipelineWith(settingsWith(forward={"client_allow": (ipaddress.ip_network("10.0.0.0/8"),)}))
    pipeline.admitClient("10.1.2.3")
    with pytest.raises(Refusal) as refused:
        pipeline.admitClient("192.0.2.7")
    assert (refused.value.status, refused.value.reason) == (403, "client address not allowed")
    assert refused.value.rule


def test_clientOverItsRateIs429WithRetryAfter() -> None:
    pipeline = pipelineWith(settingsWith(limits={"requests_per_second": 1.0, "burst": 1}))
    pipeline.admitClient("192.0.2.7")
    with pytest.raises(Refusal) as refused:
        pipeline.admitClient("192.0.2.7")
    assert (refused.value.status, refused.value.rule) == (429, "limits.requests_per_second")
    assert refused.value.fields == [(b"Retry-After", b"1")]
    pipeline.admitClient("192.0.2.8")  # per client


# The target


def test_httpRequestToAPortOutsideHttpPortsIsRefused() -> None:
    pipeline = pipelineWith()
    pipeline.checkTarget(target(b"http://127.0.0.1:8080/"))
    with pytest.raises(Refusal) as refused:
        pipeline.checkTarget(target(b"http://127.0.0.1:25/"))
    assert refused.value.status == 403
    assert refused.value.reason == "port 25 is not allowed (cross-protocol request)"
    assert refused.value.rule == "forward.http_ports"


def test_checkTargetLeavesConnectPortsToAdmission() -> None:
    pipelineWith().checkTarget(target(b"127.0.0.1:25", b"CONNECT"))


# Decided on the spot


def test_knownDestinationIsDecidedWithoutADeferred() -> None:
    resolver = RecordingResolver()
    destination = pipelineWith(resolver=resolver).decideNow(target(b"http://127.0.0.1:8080/x"), "")
    assert destination == Destination("http", "127.0.0.1", 8080, ("127.0.0.1",))
    assert resolver.asked == []


def test_cachedNameIsDecidedWithoutADeferred() -> None:
    resolver = RecordingResolver({"origin.test": ["127.0.0.2", "169.254.169.254", "93.184.216.34"]})
    destination = pipelineWith(resolver=resolver).decideNow(target(b"http://origin.test:8080/"), "")
    # Only the addresses the policy allows: the guard keeps link-local out.
    assert destination.addresses == ("127.0.0.2", "93.184.216.34")
    assert resolver.asked == []


def test_aDecisionIsRememberedForItsAddressesOnly() -> None:
    known = {"origin.test": ["127.0.0.2"]}
    pipeline = pipelineWith(resolver=RecordingResolver(known))
    first = pipeline.decideNow(target(b"http://origin.test:8080/a"), "")
    assert pipeline.decideNow(target(b"http://origin.test:8080/b"), "") is first
    # The name now resolves elsewhere: decided afresh, on the new answer.
    known["origin.test"] = ["169.254.169.254"]
    with pytest.raises(Refusal) as refused:
        pipeline.decideNow(target(b"http://origin.test:8080/a"), "")
    assert refused.value.rule == "egress.guard (cloud metadata 169.254.169.254/32)"


def test_aDecisionIsRememberedPerClientCertificate() -> None:
    egress = EgressSettings(
        rules=(
            EgressRule(
                "egress.rules[0] certified", "allow", networks=(ipaddress.ip_network("127.0.0.0/8"),),
                client_certificates=("CN=gateway",),
            ),
        )
    )
    pipeline = pipelineWith(settingsWith(egress=egress))
    assert pipeline.decideNow(target(b"http://127.0.0.1:8080/"), "CN=gateway").rule == "egress.rules[0] certified"
    with pytest.raises(Refusal):
        pipeline.decideNow(target(b"http://127.0.0.1:8080/"), "CN=somebody-else")


def test_knownDestinationRefusedOnTheSpotNamesItsRule() -> None:
    with pytest.raises(Refusal) as refused:
        pipelineWith(settingsWith(egress=EgressSettings())).decideNow(target(b"http://127.0.0.1:8080/"), "")
    assert (refused.value.status, refused.value.reason) == (403, "destination not allowed")
    assert refused.value.rule


def test_unknownNameOrAuthenticationIsNotDecidedNow() -> None:
    assert pipelineWith().decideNow(target(b"http://origin.test:8080/"), "") is None
    authenticating = pipelineWith(authenticator=AcceptingAuthenticator())
    assert authenticating.decideNow(target(b"http://127.0.0.1:8080/"), "") is None


def test_connectDecidedNowChecksItsPort() -> None:
    with pytest.raises(Refusal) as refused:
        pipelineWith().decideNow(target(b"127.0.0.1:8443", b"CONNECT"), "")
    assert (refused.value.status, refused.value.rule) == (403, "forward.connect_ports")


# The whole way


def test_nameRefusedBeforeDNS() -> None:
    egress = EgressSettings(rules=(EgressRule("egress.rules[0] no secrets", "deny", hosts=("secret.test",)),))
    resolver = RecordingResolver()
    refusal = refusalOf(pipelineWith(settingsWith(egress=egress), resolver).admit(
        None, target(b"http://secret.test:8080/"), "", "192.0.2.7"
    ))
    assert (refusal.status, refusal.reason, refusal.rule) == (403, "destination not allowed", "egress.rules[0] no secrets")
    assert resolver.asked == [], "a refused name must not reach DNS"


def test_resolvedAddressesAreJudgedByThePolicy() -> None:
    resolver = RecordingResolver()
    pipeline = pipelineWith(resolver=resolver)
    d = pipeline.admit(None, target(b"http://origin.test:8080/"), "", "192.0.2.7")
    assert resolver.asked == ["origin.test"]
    resolver.pending[0].callback(["169.254.169.254", "127.0.0.3"])
    assert resultOf(d) == Destination("http", "origin.test", 8080, ("127.0.0.3",))


def test_onlyGuardedAddressesIsRefusedWithItsRule() -> None:
    resolver = RecordingResolver()
    d = pipelineWith(settingsWith(egress=EgressSettings()), resolver).admit(
        None, target(b"http://origin.test:8080/"), "", "192.0.2.7"
    )
    resolver.pending[0].callback(["169.254.169.254"])
    refusal = refusalOf(d)
    assert (refusal.status, refusal.reason) == (403, "destination not allowed")
    assert refusal.rule


def test_resolutionErrorsPassThrough() -> None:
    resolver = RecordingResolver()
    d = pipelineWith(resolver=resolver).admit(None, target(b"http://origin.test:8080/"), "", "192.0.2.7")
    resolver.pending[0].errback(DNSLookupError("origin.test"))
    failures = []
    d.addErrback(failures.append)
    assert failures[0].check(DNSLookupError)


def test_connectToAPortOutsideConnectPortsIsRefused() -> None:
    refusal = refusalOf(pipelineWith().admit(None, target(b"127.0.0.1:8443", b"CONNECT"), "", "192.0.2.7"))
    assert (refusal.status, refusal.reason, refusal.rule) == (
        403, "CONNECT to port 8443 is not allowed", "forward.connect_ports",
    )


def test_connectToAnAllowedPortIsAdmitted() -> None:
    destination = resultOf(pipelineWith().admit(None, target(b"127.0.0.1:443", b"CONNECT"), "", "192.0.2.7"))
    assert (destination.port, destination.addresses) == (443, ("127.0.0.1",))


def test_missingCredentialsAre407WithAChallenge(tmp_path: Path) -> None:
    digest = base64.b64encode(hashlib.sha1(b"secret").digest()).decode()
    path = tmp_path / "htpasswd"
    path.write_text(f"alice:{{SHA}}{digest}\n")
    reactor = MemoryReactorClock()
    authenticator = ProxyAuthenticator(Htpasswd.load(str(path)), "Test Realm", reactor)
    resolver = RecordingResolver()
    pipeline = RequestPipeline(settingsWith(), resolver, authenticator, reactor)
    refusal = refusalOf(pipeline.admit(None, target(b"http://127.0.0.1:8080/"), "", "192.0.2.7"))
    assert (refusal.status, refusal.reason, refusal.rule) == (407, "proxy authentication required", "forward.auth_file")
    assert [name for name, _ in refusal.fields] == [b"Proxy-Authenticate"]
    assert resolver.asked == []


def test_authenticationComesBeforeTheConnectPort() -> None:
    class Refusing:
        def authenticate(self, credentials, client):
            return defer.fail(Refusal(407, "proxy authentication required", "forward.auth_file"))

    pipeline = pipelineWith(authenticator=Refusing())
    refusal = refusalOf(pipeline.admit(None, target(b"127.0.0.1:8443", b"CONNECT"), "", "192.0.2.7"))
    assert refusal.status == 407


def test_authenticatedUserReachesThePolicy() -> None:
    egress = EgressSettings(
        rules=(
            EgressRule(
                "egress.rules[0] alice only", "allow",
                networks=(ipaddress.ip_network("127.0.0.0/8"),), users=frozenset({"alice"}),
            ),
        ),
        default="deny",
    )
    authenticator = AcceptingAuthenticator("alice")
    pipeline = pipelineWith(settingsWith(egress=egress), authenticator=authenticator)
    destination = resultOf(pipeline.admit([b"Basic x"], target(b"http://127.0.0.1:8080/"), "", "192.0.2.7"))
    assert destination.addresses == ("127.0.0.1",)
    assert authenticator.asked == [([b"Basic x"], "192.0.2.7")]
    authenticator.user = "bob"
    refusal = refusalOf(pipeline.admit([b"Basic y"], target(b"http://127.0.0.1:8080/"), "", "192.0.2.7"))
    # Not alice: the rule does not match, and the guard refuses loopback.
    assert (refusal.status, refusal.rule) == (403, "egress.guard (loopback 127.0.0.0/8)")
