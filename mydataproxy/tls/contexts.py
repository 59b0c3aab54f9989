"""
TLS material for both sides, built from key stores into holders that the
listeners and the upstream pool ask for each new connection.

  - L{ServerTLS}: a listener's certificate and its client-certificate policy
    (C{none}, C{want}, C{need}).
  - L{OriginTLS}: how to reach each https origin: trust, versions, client
    certificate (mutual TLS), pins, required subject serialNumber.

Building (at start, on SIGHUP and in C{check-config}) is one code path; a
failure raises L{TLSConfigError} naming the store and what is wrong.  A
holder never changes once built: a reload builds new holders with the rest
of the configuration, and the service puts them in force for new
connections (L{mydataproxy.generation}) while open ones keep theirs, or
keeps the old ones if anything fails.
"""

from __future__ import annotations

import datetime
import ipaddress
import weakref
from dataclasses import dataclass

import txaio
from cryptography import x509
from OpenSSL import SSL, crypto
from service_identity.hazmat import (
    DNS_ID,
    CertificateError,
    DNSPattern,
    IPAddress_ID,
    IPAddressPattern,
    VerificationError,
    verify_service_identity,
)
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator
from zope.interface import implementer

from mydataproxy.config import OriginTLSProfile, ServerTLSSettings, StoreRef
from mydataproxy.http.hosts import hostMatches
from mydataproxy.tls.keystore import KeyStoreError, daysToExpiry, describe, fingerprint, loadKeyStore, resolvePassword

txaio.use_twisted()
log = txaio.make_logger()

EXPIRY_WARNING_DAYS = 30
_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
# ALPN: Twisted always installs a selection callback, and with no protocol
# list every client that offers ALPN (curl, browsers) fails the handshake.
_ALPN = [b"http/1.1"]


class TLSConfigError(Exception):
    """TLS material could not be built; the message names the store and why."""


class TLSCheckFailed(Exception):
    """An origin's certificate failed a check of ours (pin, serialNumber)."""


@dataclass(frozen=True)
class _Identity:
    """A private key with its certificate chain, ready for pyOpenSSL."""

    key: crypto.PKey
    chain: tuple[x509.Certificate, ...]

    def extraChain(self) -> list[crypto.X509]:
        return [crypto.X509.from_cryptography(c) for c in self.chain[1:]]


def _password(ref: StoreRef, spec: str, what: str) -> str | None:
    if not spec:
        return None
    try:
        return resolvePassword(spec)
    except (KeyStoreError, OSError, KeyError, ValueError) as e:
        raise TLSConfigError(f"{ref.path}: {what}: {e}") from None


def loadIdentity(ref: StoreRef) -> _Identity:
    """Our private key and certificate chain from a key store."""
    try:
        store = loadKeyStore(
            ref.path, _password(ref, ref.password, "password"), _password(ref, ref.key_password, "key password")
        )
        entry = store.keyEntry(ref.alias or None)
    except KeyStoreError as e:
        raise TLSConfigError(str(e)) from None
    return _Identity(crypto.PKey.from_cryptography_key(entry.key), tuple(entry.chain))


def loadTrust(ref: StoreRef) -> list[x509.Certificate]:
    """The certificates a trust store holds (trusted entries and chains)."""
    try:
        certificates = loadKeyStore(ref.path, _password(ref, ref.password, "password")).certificates()
    except KeyStoreError as e:
        raise TLSConfigError(str(e)) from None
    if not certificates:
        raise TLSConfigError(f"{ref.path}: holds no certificate")
    return list(certificates)


@dataclass(frozen=True)
class LoadedCertificates:
    """
    The certificates one build of a holder read, grouped as its report
    tells them.

    @ivar own: Our certificates (the chains in our key stores), each with
        what it is to us.
    @ivar pinned: Pinned certificates found in a profile's trust store, each
        with the profile that pins it.
    @ivar trustStores: Each trust store read: its path, what it is for, and
        its certificates.
    """

    own: tuple[tuple[x509.Certificate, str], ...] = ()
    pinned: tuple[tuple[x509.Certificate, str], ...] = ()
    trustStores: tuple[tuple[str, str, tuple[x509.Certificate, ...]], ...] = ()

    def __add__(self, other: LoadedCertificates) -> LoadedCertificates:
        return LoadedCertificates(
            self.own + other.own, self.pinned + other.pinned, self.trustStores + other.trustStores
        )


def reportExpiry(label: str, loaded: LoadedCertificates, now: datetime.datetime | None = None) -> None:
    """
    Log what C{loaded} holds: one line per certificate of ours and per
    pinned certificate (a warning inside the renewal window, an error once
    expired), and one summary line per trust store.  A trust store's
    expired certificates are counted, never listed nor warned about: a
    bundle such as the JDK's C{cacerts} carries roots nobody chose.

    @param now: The moment to count days from; the current time by default.
    """
    if now is None:
        now = datetime.datetime.now(datetime.timezone.utc)
    for certificate, where in _onceEach(loaded.own):
        _reportCertificate(label, certificate, where, now)
    for certificate, where in _onceEach(loaded.pinned):
        _reportCertificate(label, certificate, where, now)
    stores: dict[str, tuple[list[str], tuple[x509.Certificate, ...]]] = {}
    for path, use, certificates in loaded.trustStores:
        uses = stores.setdefault(path, ([], certificates))[0]
        if use not in uses:
            uses.append(use)
    for path, (uses, certificates) in stores.items():
        _reportTrustStore(label, f"{path} ({', '.join(uses)})", certificates, now)


def _onceEach(entries: tuple[tuple[x509.Certificate, str], ...]) -> list[tuple[x509.Certificate, str]]:
    """C{entries} with one per certificate, its places joined."""
    places: dict[str, tuple[x509.Certificate, list[str]]] = {}
    for certificate, where in entries:
        seen = places.setdefault(fingerprint(certificate), (certificate, []))[1]
        if where not in seen:
            seen.append(where)
    return [(certificate, "; ".join(where)) for certificate, where in places.values()]


def _subject(certificate: x509.Certificate) -> str:
    return certificate.subject.rfc4514_string() or "(empty subject)"


def _notAfter(certificate: x509.Certificate) -> str:
    return certificate.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")


def _reportCertificate(label: str, certificate: x509.Certificate, where: str, now: datetime.datetime) -> None:
    days = daysToExpiry(certificate, now)
    fields = {"label": label, "subject": _subject(certificate), "where": where, "notAfter": _notAfter(certificate)}
    if days < 0:
        log.error("{label}: {subject} ({where}): EXPIRED since {notAfter}", **fields)
    elif days < EXPIRY_WARNING_DAYS:
        log.warn("{label}: {subject} ({where}): expires in {days} days, not after {notAfter}", days=days, **fields)
    else:
        log.info("{label}: {subject} ({where}): expires in {days} days, not after {notAfter}", days=days, **fields)


def _reportTrustStore(
    label: str, store: str, certificates: tuple[x509.Certificate, ...], now: datetime.datetime
) -> None:
    valid = [c for c in certificates if daysToExpiry(c, now) >= 0]
    count = f"{len(certificates)} certificate{'' if len(certificates) == 1 else 's'}"
    fields = {"label": label, "store": store, "count": count, "expired": len(certificates) - len(valid)}
    if not valid:
        log.warn("{label}: trust store {store}: {count}, all expired", **fields)
        return
    earliest = min(valid, key=lambda c: c.not_valid_after_utc)
    log.info(
        "{label}: trust store {store}: {count}, {expired} expired;"
        " the first of the valid ones to expire: {subject}, in {days} days, not after {notAfter}",
        days=daysToExpiry(earliest, now), notAfter=_notAfter(earliest), subject=_subject(earliest), **fields,
    )


def _trustRoot(certificates: list[x509.Certificate]):
    return ssl.trustRootFromCertificates(
        [ssl.Certificate(crypto.X509.from_cryptography(c)) for c in certificates]
    )


def _checkKeyMatches(context: SSL.Context, where: str) -> None:
    try:
        context.check_privatekey()
    except SSL.Error:
        raise TLSConfigError(f"{where}: the private key does not match its certificate") from None


def buildServerContext(settings: ServerTLSSettings) -> tuple[SSL.Context, LoadedCertificates]:
    """
    The server context for C{settings}, and the certificates it loaded.

    @raise TLSConfigError: On any unusable store or setting.
    """
    identity = loadIdentity(settings.key_store)
    trusted = loadTrust(settings.trust_store) if settings.trust_store else []
    options = {
        "privateKey": identity.key,
        "certificate": crypto.X509.from_cryptography(identity.chain[0]),
        "extraCertChain": identity.extraChain(),
        "raiseMinimumTo": _VERSIONS[settings.min_version],
        "acceptableProtocols": _ALPN,
    }
    if settings.ciphers:
        options["acceptableCiphers"] = ssl.AcceptableCiphers.fromOpenSSLCipherString(settings.ciphers)
    if settings.client_auth == "need":
        options["trustRoot"] = _trustRoot(trusted)
    elif settings.client_auth == "want":
        options.update(
            verify=True,
            caCerts=[crypto.X509.from_cryptography(c) for c in trusted],
            requireCertificate=False,
        )
    try:
        context = ssl.CertificateOptions(**options).getContext()
    except (SSL.Error, ValueError) as e:
        raise TLSConfigError(f"{settings.key_store.path}: cannot build a TLS context: {e}") from None
    _checkKeyMatches(context, settings.key_store.path)
    own = ((identity.chain[0], "certificate"),) + tuple((c, "its chain") for c in identity.chain[1:])
    trustStores = ((settings.trust_store.path, "client certificates", tuple(trusted)),) if trusted else ()
    return context, LoadedCertificates(own=own, trustStores=trustStores)


class ServerConnection(SSL.Connection):
    """
    A server-side connection that keeps the error its handshake failed
    with, for the listener's log (Twisted passes it to the application only).

    @ivar handshakeError: the error, or L{None}.
    """

    handshakeError: SSL.Error | None = None

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except SSL.WantReadError:
            raise
        except SSL.Error as e:
            self.handshakeError = e
            raise


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """
    A listener's TLS material: its context, for every handshake.

    @ivar loaded: The certificates the material was built from.
    """

    def __init__(self, settings: ServerTLSSettings, label: str = "forward.tls") -> None:
        self.settings = settings
        self.label = label
        self._context, self.loaded = buildServerContext(settings)

    def report(self) -> None:
        """Log what is loaded, when it is put in force."""
        reportExpiry(self.label, self.loaded)

    def serverConnectionForTLS(self, tlsProtocol) -> ServerConnection:
        return ServerConnection(self._context, None)

def clientSubject(transport) -> str:
    """The verified client certificate's subject on a TLS transport, or ''."""
    getPeerCertificate = getattr(transport, "getPeerCertificate", None)
    certificate = getPeerCertificate() if getPeerCertificate else None
    if certificate is None:
        return ""
    return certificate.to_cryptography().subject.rfc4514_string()


# X509 verification errors by connection, so a failed handshake can say
# which check failed (pyOpenSSL exposes no verify result afterwards).
_verifyErrors: weakref.WeakKeyDictionary[SSL.Connection, int] = weakref.WeakKeyDictionary()


def _recordVerifyError(connection: SSL.Connection, certificate, errno: int, depth: int, ok: int) -> bool:
    if not ok:
        _verifyErrors.setdefault(connection, errno)
    return bool(ok)


@implementer(IOpenSSLClientConnectionCreator)
class _OriginClientTLS:
    """
    Client connections to one origin host: SNI, and the profile's context
    (trust, versions, client certificate).  The host name itself is checked
    by L{OriginTLS.checkPeer} when the handshake completes, before any
    request byte is sent.
    """

    def __init__(self, host: str, context: SSL.Context) -> None:
        self._host = host.encode("idna") if not _isIP(host) else None
        self._context = context

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        if self._host is not None:
            connection.set_tlsext_host_name(self._host)
        connection.set_connect_state()
        return connection


def _namesMatch(certificate: x509.Certificate, host: str) -> bool:
    """
    Whether C{certificate}'s subjectAltName covers C{host} (RFC 6125): an IP
    address against the iPAddress entries only, a name against the dNSName
    entries.  DNS entries service_identity cannot parse (an IP address
    written as a dNSName is common on internal backends) are skipped rather
    than failing the whole check.
    """
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    if _isIP(host):
        patterns = [IPAddressPattern(ip) for ip in names.get_values_for_type(x509.IPAddress)]
        identity = IPAddress_ID(host)
    else:
        patterns = []
        for name in names.get_values_for_type(x509.DNSName):
            try:
                patterns.append(DNSPattern.from_bytes(name.encode("utf-8")))
            except CertificateError:
                continue
        identity = DNS_ID(host)
    if not patterns:
        return False
    try:
        verify_service_identity(patterns, obligatory_ids=[identity], optional_ids=[])
    except VerificationError:
        return False
    return True


def _isIP(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class _BuiltProfile:
    profile: OriginTLSProfile
    context: SSL.Context


def _buildProfile(profile: OriginTLSProfile) -> tuple[_BuiltProfile, LoadedCertificates]:
    identity = loadIdentity(profile.key_store) if profile.key_store else None
    trusted = loadTrust(profile.trust_store) if profile.trust_store else []
    options: dict = {
        "raiseMinimumTo": _VERSIONS[profile.min_version],
        "lowerMaximumSecurityTo": _VERSIONS[profile.max_version],
        "acceptableProtocols": _ALPN,
    }
    if profile.ciphers:
        options["acceptableCiphers"] = ssl.AcceptableCiphers.fromOpenSSLCipherString(profile.ciphers)
    if identity is not None:
        # Sent whether or not we verify the origin: the Java product dropped
        # the client certificate with validation off, a bug we do not copy.
        options.update(
            privateKey=identity.key,
            certificate=crypto.X509.from_cryptography(identity.chain[0]),
            extraCertChain=identity.extraChain(),
        )
    if profile.verify:
        options["trustRoot"] = _trustRoot(trusted) if trusted else ssl.platformTrust()
    try:
        context = ssl.CertificateOptions(**options).getContext()
    except (SSL.Error, ValueError) as e:
        raise TLSConfigError(f"{profile.name}: cannot build a TLS context: {e}") from None
    if identity is not None:
        _checkKeyMatches(context, profile.key_store.path)
    if profile.verify:
        context.set_verify(SSL.VERIFY_PEER, _recordVerifyError)
    return _BuiltProfile(profile, context), _profileCertificates(profile, identity, trusted)


def _profileCertificates(
    profile: OriginTLSProfile, identity: _Identity | None, trusted: list[x509.Certificate]
) -> LoadedCertificates:
    name = profile.name or f"profile for {', '.join(profile.hosts)}"
    own: tuple[tuple[x509.Certificate, str], ...] = ()
    if identity is not None:
        own = ((identity.chain[0], f"client certificate of {name}"),) + tuple(
            (c, f"chain of {name}'s client certificate") for c in identity.chain[1:]
        )
    if not trusted:
        return LoadedCertificates(own=own)
    pinned = tuple((c, f"pinned by {name}") for c in trusted if fingerprint(c) in profile.pins)
    return LoadedCertificates(own=own, pinned=pinned, trustStores=((profile.trust_store.path, name, tuple(trusted)),))


class OriginTLS:
    """
    Outbound TLS per destination: the first profile whose C{hosts} match,
    else the default.  Connection creators are built once per host.

    @ivar loaded: The certificates the material was built from, every profile's.
    """

    def __init__(self, default: OriginTLSProfile, profiles: tuple[OriginTLSProfile, ...]) -> None:
        self._default, loaded = _buildProfile(default)
        self._profiles: list[_BuiltProfile] = []
        for profile in profiles:
            built, more = _buildProfile(profile)
            self._profiles.append(built)
            loaded += more
        self.loaded = loaded

    def report(self) -> None:
        """Log what is loaded, when it is put in force."""
        for built in [self._default, *self._profiles]:
            if not built.profile.verify:
                log.warn("{name}: verify = false: origin certificates are NOT checked", name=built.profile.name)
        reportExpiry("upstream.tls", self.loaded)

    def profileFor(self, host: str) -> OriginTLSProfile:
        return self._builtFor(host).profile

    def _builtFor(self, host: str) -> _BuiltProfile:
        for built in self._profiles:
            if hostMatches(built.profile.hosts, host):
                return built
        return self._default

    def creatorFor(self, host: str) -> IOpenSSLClientConnectionCreator:
        """The connection creator for an https origin at C{host}."""
        built = self._builtFor(host)
        if not built.profile.verify:
            log.warn("TLS to {host} without verifying its certificate ({name})", host=host, name=built.profile.name)
        return _OriginClientTLS(host, built.context)

    def checkPeer(self, host: str, connection: SSL.Connection) -> str | None:
        """
        What is wrong with the origin at C{host} once its handshake is done:
        host name or IP address (when verifying), pins, serialNumber;
        L{None} if nothing.  Never raises: a certificate that cannot be
        checked is a problem named in the result.
        """
        profile = self.profileFor(host)
        certificate = connection.get_peer_certificate()
        if certificate is None:
            return "no certificate presented" if profile.verify or profile.pins or profile.serial_number else None
        try:
            leaf = certificate.to_cryptography()
            if profile.verify and not _namesMatch(leaf, host):
                return "hostname mismatch"
            if profile.pins and fingerprint(leaf) not in profile.pins:
                return f"certificate pin mismatch ({fingerprint(leaf)} is not pinned)"
            if profile.serial_number and describe(leaf)["serialNumber"] != profile.serial_number:
                return f"subject serialNumber is not {profile.serial_number}"
        except Exception as e:  # noqa: BLE001 - any parsing trouble fails the check, never the proxy
            return f"certificate could not be checked ({type(e).__name__}: {e})"[:200]
        return None

_VERIFY_ERRORS = {
    2: "untrusted issuer",
    18: "untrusted issuer (self-signed certificate)",
    19: "untrusted issuer (self-signed certificate in chain)",
    20: "untrusted issuer",
    21: "untrusted issuer",
    9: "certificate not yet valid",
    10: "certificate expired",
    62: "hostname mismatch",
}


def describeHandshakeFailure(transport, failure) -> str:
    """Which check a failed TLS exchange with an origin failed, in words."""
    if failure.check(TLSCheckFailed):
        return str(failure.value)
    handle = transport.getHandle() if transport is not None else None
    code = _verifyErrors.get(handle, 0) if isinstance(handle, SSL.Connection) else 0
    if code:
        return _VERIFY_ERRORS.get(code, f"certificate verification failed (X509 error {code})")
    text = str(failure.value).lower()
    if "version" in text or "no protocols available" in text:
        return "TLS version not accepted"
    if "certificate required" in text or "alert certificate" in text or "handshake failure" in text:
        return "the origin refused the handshake (client certificate required or rejected?)"
    return text.strip()[:200] or type(failure.value).__name__
