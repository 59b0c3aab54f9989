"""
Unit tests of what the TLS holders log about their certificates at start and
after a reload (L{mydataproxy.tls.contexts.reportExpiry}): one line per
certificate of ours and per pinned certificate found in a store, with a
warning inside the renewal window and an error once expired, and a single
summary line per trust store, whose expired roots are counted, not warned
about.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.logger import LogEvent, LogLevel, capturedLogs, formatEvent

from conftest import require_tool
from test_tls import Issued, _name, make_ca, make_leaf, server_leaf, write_p12, write_pem_identity
from test_tls_reload import reloadable, reloadNow, write_config
from mydataproxy.config import OriginTLSProfile, ServerTLSSettings, StoreRef
from mydataproxy.tls import contexts as tls
from mydataproxy.tls.keystore import loadKeyStore

NOW = datetime.datetime.now(datetime.timezone.utc)
DAY = datetime.timedelta(days=1)
STORE_PASSWORD = "changeit"


@pytest.fixture
def logs() -> Iterator[Sequence[LogEvent]]:
    """The log events emitted while the test runs."""
    with capturedLogs() as events:
        yield events


def lines(events: Sequence[LogEvent], level: LogLevel | None = None) -> list[str]:
    """The TLS report's lines among C{events} (only those at C{level} if given), formatted."""
    chosen = [e for e in events if level is None or e["log_level"] == level]
    return [line for line in map(formatEvent, chosen) if line.startswith(("forward.tls:", "upstream.tls:"))]


def warnings(events: Sequence[LogEvent]) -> list[str]:
    """The events at warning level or above, formatted."""
    return [formatEvent(e) for e in events if e["log_level"] >= LogLevel.warn]


def notAfter(certificate: x509.Certificate) -> str:
    return certificate.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")


def issue(cn: str, until: datetime.datetime, issuer: Issued | None = None,
          key: ec.EllipticCurvePrivateKey | None = None) -> Issued:
    """
    A certificate valid from 400 days ago C{until} (in the past for an
    expired one): a CA signed by itself, or a leaf signed by C{issuer}.
    """
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = _name(cn, "Report Tests")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.cert.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - 400 * DAY)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
        .sign(issuer.key if issuer else key, hashes.SHA256())
    )
    return Issued(key, cert, issuer)


def pem_store(path: Path, certificates: Sequence[x509.Certificate]) -> Path:
    path.write_bytes(b"".join(c.public_bytes(Encoding.PEM) for c in certificates))
    return path


def bundle(tmp_path: Path, valid: int, expired: int) -> tuple[Path, list[x509.Certificate]]:
    """A PEM trust store of C{valid} good roots (the first expiring in 45 days) and C{expired} expired ones."""
    key = ec.generate_private_key(ec.SECP256R1())
    good = [issue(f"Root {i}", NOW + (45 + i) * DAY, key=key).cert for i in range(valid)]
    old = [issue(f"Old Root {i}", NOW - (10 + i) * DAY, key=key).cert for i in range(expired)]
    certificates = old[: expired // 2] + good + old[expired // 2 :]
    return pem_store(tmp_path / "bundle.pem", certificates), good


def listener(tmp_path: Path, days: float = 200, trust: Path | None = None) -> tls.ServerTLS:
    store = write_pem_identity(tmp_path / "listener.pem", server_leaf(make_ca("Listener CA"), days=days))
    if trust is None:
        return tls.ServerTLS(ServerTLSSettings(StoreRef(str(store))))
    return tls.ServerTLS(ServerTLSSettings(StoreRef(str(store)), StoreRef(str(trust)), "want"))


def jdk_cacerts() -> Path:
    """The trust store of the JDK on this machine (the openjdk package's C{keytool} sits beside it)."""
    keytool = Path(os.path.realpath(require_tool("keytool")))
    path = keytool.parent.parent / "lib" / "security" / "cacerts"
    assert path.exists(), f"no cacerts beside {keytool}"
    return path


# ---------------------------------------------------------------------------
# Trust stores: one line each
# ---------------------------------------------------------------------------


def test_a_bundle_of_146_roots_is_one_line_and_its_expired_roots_no_warning(tmp_path: Path, logs) -> None:
    store, good = bundle(tmp_path, valid=141, expired=5)
    holder = tls.OriginTLS(OriginTLSProfile(trust_store=StoreRef(str(store))), ())
    del logs[:]
    holder.report()
    reported = lines(logs)
    assert len(reported) == 1, reported
    assert reported[0].startswith(f"upstream.tls: trust store {store} (upstream.tls): 146 certificates, 5 expired;")
    assert reported[0].endswith(f"the first of the valid ones to expire: CN=Root 0,O=Report Tests, in 44 days, "
                                f"not after {notAfter(good[0])}"), reported[0]
    assert "Old Root" not in reported[0]
    assert warnings(logs) == []


def test_the_jdk_cacerts_is_one_line(logs) -> None:
    path = jdk_cacerts()
    certificates = loadKeyStore(str(path), "changeit").certificates()
    expired = sum(1 for c in certificates if c.not_valid_after_utc < datetime.datetime.now(datetime.timezone.utc))
    assert len(certificates) > 100
    holder = tls.OriginTLS(OriginTLSProfile(trust_store=StoreRef(str(path), "changeit")), ())
    del logs[:]
    holder.report()
    reported = lines(logs)
    assert len(reported) == 1, reported
    assert f"trust store {path} (upstream.tls): {len(certificates)} certificates, {expired} expired;" in reported[0]
    assert warnings(logs) == []


def test_profiles_sharing_a_trust_store_get_one_line_naming_them(tmp_path: Path, logs) -> None:
    store, _ = bundle(tmp_path, valid=20, expired=1)
    trust = StoreRef(str(store))
    holder = tls.OriginTLS(OriginTLSProfile(trust_store=trust), (
        OriginTLSProfile(name="upstream.tls.profiles[0] bank", hosts=("*.bank.test",), trust_store=trust),
        OriginTLSProfile(name="", hosts=("card.test",), trust_store=trust),  # as the loader leaves an unnamed one
    ))
    del logs[:]
    holder.report()
    reported = lines(logs)
    assert len(reported) == 1, reported
    uses = "upstream.tls, upstream.tls.profiles[0] bank, profile for card.test"
    assert f"trust store {store} ({uses}): 21 certificates, 1 expired;" in reported[0], reported[0]


def test_a_trust_store_with_nothing_valid_is_a_warning(tmp_path: Path, logs) -> None:
    store = pem_store(tmp_path / "dead.pem", [issue("Dead Root", NOW - 3 * DAY).cert])
    holder = tls.OriginTLS(OriginTLSProfile(trust_store=StoreRef(str(store))), ())
    del logs[:]
    holder.report()
    assert warnings(logs) == [f"upstream.tls: trust store {store} (upstream.tls): 1 certificate, all expired"]


def test_the_listener_trust_store_is_summarised_too(tmp_path: Path, logs) -> None:
    store, _ = bundle(tmp_path, valid=146, expired=0)
    holder = listener(tmp_path, trust=store)
    del logs[:]
    holder.report()
    summaries = [line for line in lines(logs) if "trust store" in line]
    assert summaries == [line for line in lines(logs) if str(store) in line]
    assert len(summaries) == 1 and "(client certificates): 146 certificates, 0 expired;" in summaries[0]


# ---------------------------------------------------------------------------
# Our own certificates and the pinned ones: a line each
# ---------------------------------------------------------------------------


def test_an_expiring_listener_certificate_is_a_warning(tmp_path: Path, logs) -> None:
    holder = listener(tmp_path, days=10.5)
    del logs[:]
    holder.report()
    warned = lines(logs, LogLevel.warn)
    assert len(warned) == 1, lines(logs)
    leaf = holder.loaded.own[0][0]
    assert warned == warnings(logs)
    assert warned[0] == (f"forward.tls: CN=proxy.test,O=MyData Proxy Tests (certificate): "
                         f"expires in 10 days, not after {notAfter(leaf)}")
    # Its issuer, far from expiry, has a line of its own, for information.
    assert [line for line in lines(logs, LogLevel.info) if "CN=Listener CA" in line and "(its chain)" in line]


def test_an_expired_certificate_of_ours_is_an_error(tmp_path: Path, logs) -> None:
    expired = issue("proxy.test", NOW - 2 * DAY, issuer=make_ca("Listener CA"))
    store = write_pem_identity(tmp_path / "old.pem", expired)
    holder = tls.ServerTLS(ServerTLSSettings(StoreRef(str(store))))
    del logs[:]
    holder.report()
    assert warnings(logs) == [
        f"forward.tls: CN=proxy.test,O=Report Tests (certificate): EXPIRED since {notAfter(expired.cert)}"]
    assert lines(logs, LogLevel.error) == warnings(logs)


def test_client_certificates_and_pinned_certificates_are_reported(tmp_path: Path, logs) -> None:
    root = make_ca("Client CA")
    client = write_p12(tmp_path / "client.p12", make_leaf(root, "gateway", org="Example Bank", client=True, days=12.5),
                       STORE_PASSWORD)
    pinnedOrigin = make_leaf(root, "api.bank.test", ["api.bank.test"], days=300)
    expiringPin = make_leaf(root, "old.bank.test", ["old.bank.test"], days=5.5)
    store, _ = bundle(tmp_path, valid=30, expired=2)
    trust = pem_store(tmp_path / "trust.pem", [*loadKeyStore(str(store), None).certificates(), root.cert,
                                               pinnedOrigin.cert, expiringPin.cert])
    absent = "AB:" * 31 + "AB"
    holder = tls.OriginTLS(OriginTLSProfile(trust_store=StoreRef(str(trust))), (OriginTLSProfile(
        name="upstream.tls.profiles[0] bank", hosts=("*.bank.test",),
        key_store=StoreRef(str(client), STORE_PASSWORD), trust_store=StoreRef(str(trust)),
        pins=(pinnedOrigin.fingerprint(), expiringPin.fingerprint(), absent)),))
    del logs[:]
    holder.report()
    reported = lines(logs)
    # The client certificate and its issuer, two pinned certificates, one trust store: five lines.
    assert len(reported) == 5, reported
    assert re.fullmatch(
        r"upstream\.tls: CN=gateway,O=Example Bank \(client certificate of upstream\.tls\.profiles\[0\] bank\): "
        r"expires in 12 days, not after \S+Z", lines(logs, LogLevel.warn)[0])
    pins = [line for line in reported if "pinned by" in line]
    assert [line.split(" (")[0] for line in pins] == [
        "upstream.tls: CN=api.bank.test", "upstream.tls: CN=old.bank.test"]
    assert "(pinned by upstream.tls.profiles[0] bank): expires in 5 days" in pins[1]
    assert lines(logs, LogLevel.warn) == [reported[0], pins[1]]
    assert "35 certificates, 2 expired;" in reported[-1]


def test_a_reload_reports_the_same_way(tmp_path: Path, logs) -> None:
    store, _ = bundle(tmp_path, valid=140, expired=6)
    ca = make_ca("Listener CA")
    key_store = write_pem_identity(tmp_path / "listener.pem", server_leaf(ca, days=200))
    path = write_config(tmp_path / "mydataproxy.toml", tmp_path, key_store, trust_store=str(store),
                        client_auth="want")
    with reloadable(path) as (service, reactor):
        write_pem_identity(key_store, server_leaf(ca, days=20.5))
        del logs[:]
        assert reloadNow(service, reactor) is True
    reported = lines(logs)
    # The renewed listener certificate, its issuer and the trust store, as the reload read them.
    assert len(reported) == 3, reported
    assert f"trust store {store} (client certificates): 146 certificates, 6 expired;" in reported[2]
    warned = warnings(logs)
    assert len(warned) == 1 and warned[0].startswith("forward.tls: CN=proxy.test") and "expires in 20 days" in warned[0]
