"""
TLS end to end, through a real C{twistd mydataproxy} and real clients.

  - Inbound (C{[forward.tls]}): C{curl --proxy https://...} (absolute-form and
    CONNECT) with the listener's key store as JKS (made by C{keytool}),
    PKCS#12 and PEM; TLS 1.0/1.1 refused and C{min_version} honoured
    (C{openssl s_client}); C{client_auth} C{need} and C{want}, the verified
    subject in the access log and in egress rules (C{client_certificates}).
  - Outbound (C{[upstream.tls]} and its profiles): trust stores (PEM bundle,
    JKS, PKCS#12; the proxy's C{SSL_CERT_FILE} holds another CA, so only the
    configured store can make a request succeed), host name and issuer
    checks, pins (and two pins for a rotation), the subject serialNumber,
    mutual TLS towards an origin (a small Twisted origin in this file that
    demands a client certificate and reports its subject), the C{mydata}
    preset, C{verify = false} (still sending the client certificate).
  - The Java product's C{application.properties} with C{server.ssl.*}.
  - SIGHUP (the whole config file and its stores read again): new
    certificates for new handshakes, idle connections closed and requests in
    flight finished on the old material, broken stores keep the old material
    (the error names the store, never a password), no failed request while
    swapping, the outbound client certificate renewed.
  - Expiry warnings at start and after a reload.

Everything stays on loopback; names used for origins are in a hosts file
given to the proxy.  C{curl}, C{openssl} and C{keytool} missing fail the
tests under C{CI=true}.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from conftest import (
    LOOPBACK,
    RELOAD_FAILED,
    RELOAD_OK,
    TWISTD,
    ConnectionClosed,
    OriginProcess,
    ProxyLauncher,
    RawConnection,
    Response,
    TLSFiles,
    build_request,
    get_free_port,
    parse_access_line,
    require_tool,
    wait_for_port,
)
from recording_origin import RecordingOrigin

PEM = serialization.Encoding.PEM
DER = serialization.Encoding.DER

STORE_PASSWORD = "Tls-Store-Pass-4417"
OTHER_PASSWORD = "Other-Pass-9023"
REGISTRATION_NUMBER = "123-45-67890"
CLIENT_SUBJECT = "CN=gateway,O=Example Bank"
INTRUDER_SUBJECT = "CN=intruder,O=Elsewhere"
NOW = datetime.datetime.now(datetime.timezone.utc)

# Every name an origin is reached by; the proxy's hosts file maps them to 127.0.0.1.
ORIGIN_NAMES = [
    "pinned.test", "pinwrong.test", "a.rot.test", "b.rot.test", "c.rot.test", "serial.test",
    "serialwrong.test", "nomatch.test", "jks.test", "p12.test", "mtls.test",
    "mtls-nocert.test", "mydata.test", "mydata-ok.test", "tls12.test", "noverify.test",
]


# ---------------------------------------------------------------------------
# Certificates and stores
# ---------------------------------------------------------------------------


def _name(cn: str, org: str | None = None, serialNumber: str | None = None) -> x509.Name:
    attributes = []
    if org:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    if serialNumber:
        attributes.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, serialNumber))
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attributes)


@dataclass
class Issued:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    issuer: "Issued | None" = None

    @property
    def chain(self) -> list[x509.Certificate]:
        return [self.cert] + ([self.issuer.cert] if self.issuer is not None else [])

    def key_pem(self) -> bytes:
        return self.key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(PEM)

    def fingerprint(self) -> str:
        digest = self.cert.fingerprint(hashes.SHA256()).hex().upper()
        return ":".join(digest[i : i + 2] for i in range(0, 64, 2))


def make_ca(cn: str) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn, "MyData Proxy Tests"))
        .issuer_name(_name(cn, "MyData Proxy Tests"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=400))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(key, cert)


def make_leaf(ca: Issued, cn: str, sans=(), org: str | None = None, serialNumber: str | None = None,
              days: float = 200, client: bool = False) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn, org, serialNumber))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]),
            critical=False,
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    if sans:
        general = []
        for san in sans:
            try:
                general.append(x509.IPAddress(ipaddress.ip_address(san)))
            except ValueError:
                general.append(x509.DNSName(san))
        builder = builder.add_extension(x509.SubjectAlternativeName(general), critical=False)
    return Issued(key, builder.sign(ca.key, hashes.SHA256()), ca)


def server_leaf(ca: Issued, days: float = 200) -> Issued:
    return make_leaf(ca, "proxy.test", ["127.0.0.1", "localhost"], org="MyData Proxy Tests", days=days)


def write_pem_identity(path: Path, leaf: Issued) -> Path:
    """Key, certificate and issuer in one PEM file."""
    path.write_bytes(leaf.key_pem() + b"".join(c.public_bytes(PEM) for c in leaf.chain))
    return path


def write_p12(path: Path, leaf: Issued, password: str = STORE_PASSWORD, alias: bytes = b"identity") -> Path:
    path.write_bytes(pkcs12.serialize_key_and_certificates(
        alias, leaf.key, leaf.cert, [c for c in leaf.chain[1:]],
        serialization.BestAvailableEncryption(password.encode())))
    return path


def replace_file(path: Path, data: bytes) -> None:
    """Atomically give C{path} new content (a reload sees old or new, never half)."""
    temporary = path.with_name(path.name + ".new")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def run_keytool(commands: list[list[str]]) -> None:
    tool = require_tool("keytool")
    procs = [subprocess.Popen([tool, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for args in commands]
    for args, proc in zip(commands, procs):
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"keytool {' '.join(args)} failed: {output}"


def jks_from_p12(p12: Path, jks: Path, password: str = STORE_PASSWORD) -> list[str]:
    return ["-importkeystore", "-srckeystore", str(p12), "-srcstoretype", "PKCS12", "-srcstorepass", password,
            "-destkeystore", str(jks), "-deststoretype", "JKS", "-deststorepass", password, "-noprompt"]


def trust_store(certificate_der: Path, store: Path, storetype: str, password: str = STORE_PASSWORD) -> list[str]:
    return ["-importcert", "-noprompt", "-trustcacerts", "-alias", "ca", "-file", str(certificate_der),
            "-keystore", str(store), "-storetype", storetype, "-storepass", password]


@dataclass
class Material:
    dir: Path
    listenerCA: Issued  # signs the listener's and the trusted clients' certificates
    server: Issued
    client: Issued  # CLIENT_SUBJECT, from listenerCA
    intruder: Issued  # INTRUDER_SUBJECT, from otherCA
    otherCA: Issued
    originCA: Issued  # trusted by upstream.tls, never in SSL_CERT_FILE
    untrustedCA: Issued
    originA: Issued
    originB: Issued
    mtlsServer: Issued
    untrustedServer: Issued
    paths: dict[str, Path]


@pytest.fixture(scope="module")
def material(tmp_path_factory) -> Material:
    d = tmp_path_factory.mktemp("tls-material")
    listenerCA = make_ca("Listener CA")
    otherCA = make_ca("Other Client CA")
    originCA = make_ca("Origin CA")
    untrustedCA = make_ca("Untrusted Origin CA")
    server = server_leaf(listenerCA)
    client = make_leaf(listenerCA, "gateway", org="Example Bank", client=True)
    intruder = make_leaf(otherCA, "intruder", org="Elsewhere", client=True)
    originA = make_leaf(
        originCA, "origin-a", ["127.0.0.1", "localhost", "pinned.test", "pinwrong.test", "a.rot.test",
                               "serial.test", "serialwrong.test"],
        org="Example Bank", serialNumber=REGISTRATION_NUMBER)
    originB = make_leaf(originCA, "origin-b", ["127.0.0.1", "b.rot.test"])
    mtlsServer = make_leaf(originCA, "mtls-origin", ["mtls.test", "mtls-nocert.test", "mydata.test",
                                                     "mydata-ok.test", "tls12.test", "*.reload.test",
                                                     "c.rot.test"])
    untrustedServer = make_leaf(untrustedCA, "untrusted-origin", ["127.0.0.1", "jks.test", "p12.test",
                                                                  "noverify.test"])
    p: dict[str, Path] = {}

    def put(name: str, data: bytes) -> None:
        p[name] = d / name
        p[name].write_bytes(data)

    put("listener-ca.pem", listenerCA.cert_pem())
    put("other-ca.pem", otherCA.cert_pem())
    put("origin-ca.pem", originCA.cert_pem())
    put("untrusted-ca.der", untrustedCA.cert.public_bytes(DER))
    put("listener-ca.der", listenerCA.cert.public_bytes(DER))
    # A bundle: the origin CA among others.
    put("origin-bundle.pem", otherCA.cert_pem() + b"# the origin CA\n" + originCA.cert_pem()
        + listenerCA.cert_pem())
    p["server.pem"] = write_pem_identity(d / "server.pem", server)
    p["server.p12"] = write_p12(d / "server.p12", server)
    p["client.p12"] = write_p12(d / "client.p12", client)
    put("client.cert.pem", client.cert_pem())
    put("client.key.pem", client.key_pem())
    put("intruder.cert.pem", intruder.cert_pem())
    put("intruder.key.pem", intruder.key_pem())
    for label, leaf in [("origin-a", originA), ("origin-b", originB), ("mtls-server", mtlsServer),
                        ("untrusted-server", untrustedServer)]:
        put(f"{label}.cert.pem", b"".join(c.public_bytes(PEM) for c in leaf.chain))
        put(f"{label}.key.pem", leaf.key_pem())
    for name in ("server.jks", "client.jks", "untrusted-trust.jks", "untrusted-trust.p12", "clients-trust.jks"):
        p[name] = d / name
    run_keytool([
        jks_from_p12(p["server.p12"], p["server.jks"]),
        jks_from_p12(p["client.p12"], p["client.jks"]),
        trust_store(p["untrusted-ca.der"], p["untrusted-trust.jks"], "JKS"),
        trust_store(p["untrusted-ca.der"], p["untrusted-trust.p12"], "PKCS12"),
        trust_store(p["listener-ca.der"], p["clients-trust.jks"], "JKS"),
    ])
    for name in ("server.jks", "client.jks", "untrusted-trust.jks", "clients-trust.jks"):
        assert p[name].read_bytes()[:4] == b"\xfe\xed\xfe\xed", f"{name} is not a JKS store"
    return Material(d, listenerCA, server, client, intruder, otherCA, originCA, untrustedCA, originA,
                    originB, mtlsServer, untrustedServer, p)


# ---------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------


def client_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in list(env):
        if name.lower() in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "curl_ca_bundle",
                            "ssl_cert_file"):
            del env[name]
    return env


@dataclass
class CurlResult:
    returncode: int
    status: int
    body: str
    stderr: str


def curl_via(proxy, url: str, ca: Path, *extra: str, tunnel: bool = False) -> CurlResult:
    """C{url} through the proxy's TLS listener, with curl."""
    tool = require_tool("curl")
    argv = [tool, "-sS", "--max-time", "15", "--proxy", f"https://{LOOPBACK}:{proxy.port}",
            "--proxy-cacert", str(ca), "-o", "-", "-w", "\n%{http_code}", *extra]
    if tunnel:
        argv.append("-p")
    argv.append(url)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=client_env(),
                            stdin=subprocess.DEVNULL)
    body, _, code = result.stdout.rpartition("\n")
    return CurlResult(result.returncode, int(code or 0), body, result.stderr)


def s_client(port: int, *options: str) -> subprocess.CompletedProcess:
    tool = require_tool("openssl")
    return subprocess.run(
        [tool, "s_client", "-connect", f"{LOOPBACK}:{port}", *options],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20, env=client_env(),
    )


def negotiated(result: subprocess.CompletedProcess) -> str | None:
    """The protocol s_client negotiated, if the handshake succeeded."""
    match = re.search(r"^New, (TLSv[\d.]+|SSLv3)", result.stdout, re.M)
    if result.returncode != 0 or match is None:
        return None
    return match.group(1)


def tls_context(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def tls_connection(port: int, context: ssl.SSLContext, timeout: float = 10.0) -> RawConnection:
    """A L{RawConnection} to the proxy's TLS listener."""
    c = RawConnection(port, timeout=timeout)
    c.sock = context.wrap_socket(c.sock, server_hostname=LOOPBACK)
    return c


def peer_serial(connection: RawConnection) -> int:
    return x509.load_der_x509_certificate(connection.sock.getpeercert(binary_form=True)).serial_number


def exchange(proxy, raw: bytes, method: str = "GET") -> Response:
    with RawConnection(proxy.port, timeout=15) as c:
        c.send(raw)
        return c.read_response(method)


def via(proxy, url: str) -> Response:
    """C{GET url} (absolute-form) through a plain-text listener."""
    authority = url.split("/")[2]
    return exchange(proxy, build_request("GET", url, [("Host", authority)]))


def wait_output(proxy, pattern: str, count: int = 1, timeout: float = 10.0) -> list[str]:
    """Wait until C{pattern} (a regex) matches at least C{count} lines of the proxy's output."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in proxy.output().splitlines() if re.search(pattern, line)]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


# ---------------------------------------------------------------------------
# A TLS origin that can demand a client certificate and cap the TLS version
# ---------------------------------------------------------------------------

TLS_ORIGIN = r'''
import json, sys
from twisted.internet import reactor, ssl
from twisted.internet.protocol import Factory, Protocol

certPath, keyPath, clientCA, maxVersion = sys.argv[1:5]

class Echo(Protocol):
    buffer = b""

    def dataReceived(self, data):
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            peer = self.transport.getPeerCertificate()
            handle = self.transport.getHandle()
            body = json.dumps({
                "request": head.split(b"\r\n")[0].decode("latin-1"),
                "client_subject": peer.to_cryptography().subject.rfc4514_string() if peer is not None else "",
                "tls_version": handle.get_protocol_version_name(),
            }).encode()
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

with open(certPath, "rb") as f:
    certificate = f.read()
with open(keyPath, "rb") as f:
    key = f.read()
identity = ssl.PrivateCertificate.loadPEM(certificate + b"\n" + key)
options = dict(privateKey=identity.privateKey.original, certificate=identity.original,
               acceptableProtocols=[b"http/1.1"])
if clientCA != "-":
    with open(clientCA, "rb") as f:
        options["trustRoot"] = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(f.read())])
if maxVersion == "1.2":
    options["lowerMaximumSecurityTo"] = ssl.TLSVersion.TLSv1_2
port = reactor.listenSSL(0, Factory.forProtocol(Echo), ssl.CertificateOptions(**options),
                         interface="127.0.0.1")
print(port.getHost().port, flush=True)
reactor.run()
'''


class TLSOrigin:
    """L{TLS_ORIGIN} in a subprocess: answers every request with JSON about the TLS session."""

    def __init__(self, script: Path, cert: Path, key: Path, client_ca: Path | None = None,
                 max_version: str = "1.3") -> None:
        self.stderr_path = script.with_name(f"{cert.stem}-{os.getpid()}-{id(self)}.stderr")
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(cert), str(key), str(client_ca or "-"), max_version],
            stdout=subprocess.PIPE, stderr=self._stderr, stdin=subprocess.DEVNULL,
        )
        result: list[bytes] = []
        reader = threading.Thread(target=lambda: result.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(10)
        if not result or not result[0].strip():
            self.stop()
            raise RuntimeError(f"TLS origin did not start: {self.stderr_path.read_text(errors='replace')}")
        self.port = int(result[0])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc.stdout.close()
        self._stderr.close()


# ---------------------------------------------------------------------------
# Proxies
# ---------------------------------------------------------------------------


def server_tls(store: Path, **more) -> dict:
    settings = {"key_store": str(store), "key_store_password": STORE_PASSWORD}
    settings.update(more)
    return settings


@pytest.fixture(scope="module")
def launcher(tmp_path_factory, ca_pem, session_connect_ports, dns_server):
    """Proxies shared by the tests of this module (stopped at its end)."""
    launcher = ProxyLauncher(tmp_path_factory.mktemp("tls-proxies"), ca_pem, session_connect_ports, dns_server)
    yield launcher
    problems = launcher.stop_all()
    assert not problems, problems


def output_tail(proxy) -> str:
    return proxy.output()[-3000:]


# ===========================================================================
# Inbound TLS
# ===========================================================================


@pytest.mark.parametrize("store", ["server.jks", "server.p12", "server.pem"])
def test_listener_serves_absolute_form_and_connect(proxy_factory, material, origin, store):
    """curl --proxy https://...: absolute-form and CONNECT, whatever the key store's format."""
    proxy = proxy_factory(forward={"tls": server_tls(material.paths[store])})
    ca = material.paths["listener-ca.pem"]
    absolute = curl_via(proxy, f"{origin.url}/echo?absolute-{store}", ca)
    assert (absolute.returncode, absolute.status) == (0, 200), absolute
    assert json.loads(absolute.body)["uri"] == f"/echo?absolute-{store}"
    tunnelled = curl_via(proxy, f"{origin.url}/echo?tunnel-{store}", ca, tunnel=True)
    assert (tunnelled.returncode, tunnelled.status) == (0, 200), tunnelled
    # Through the tunnel, the origin sees an origin-form request.
    assert json.loads(tunnelled.body)["uri"] == f"/echo?tunnel-{store}"
    lines = proxy.wait_access_lines(lambda l: "method=CONNECT" in l or f"absolute-{store}" in l, count=2)
    assert sorted(l["method"] for l in lines) == ["CONNECT", "GET"], lines
    # A plain-text client gets no HTTP from a TLS listener.
    with RawConnection(proxy.port, timeout=5) as c:
        c.send(build_request("GET", f"{origin.url}/echo?plain", [("Host", origin.authority)]))
        try:
            answer = c.read_to_eof()
        except OSError:
            answer = b""
    assert not answer.startswith(b"HTTP/"), answer[:200]


@pytest.fixture(scope="module")
def jks_listener(launcher, material):
    return launcher(forward={"tls": server_tls(material.paths["server.jks"])})


@pytest.mark.parametrize("version", ["-tls1", "-tls1_1"])
def test_old_tls_versions_refused(jks_listener, material, version):
    # SECLEVEL=0 lets the local OpenSSL offer TLS 1.0/1.1: a failure is the server's refusal.
    refused = s_client(jks_listener.port, version, "-cipher", "DEFAULT@SECLEVEL=0")
    assert negotiated(refused) is None, refused.stdout[-2000:]
    # Control: the same client command does get TLS 1.0/1.1 from a server that allows it.
    for _attempt in range(3):  # the free port may be taken in between
        port = get_free_port()
        server = subprocess.Popen(
            [require_tool("openssl"), "s_server", "-accept", f"{LOOPBACK}:{port}",
             "-cert", str(material.paths["server.pem"]), "-key", str(material.paths["server.pem"]),
             "-cipher", "DEFAULT@SECLEVEL=0", version],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        if wait_for_port(port, 10.0, server):
            break
        server.wait(5)
        server.stdin.close()
    try:
        assert server.poll() is None, "openssl s_server did not start"
        control = s_client(port, version, "-cipher", "DEFAULT@SECLEVEL=0")
        assert negotiated(control) is not None, control.stdout[-2000:] + control.stderr[-2000:]
    finally:
        server.kill()
        server.wait(5)
        server.stdin.close()
    # The same command with TLS 1.2 works: the client side is able.
    accepted = s_client(jks_listener.port, "-tls1_2", "-cipher", "DEFAULT@SECLEVEL=0")
    assert negotiated(accepted) == "TLSv1.2", accepted.stdout[-2000:] + accepted.stderr[-2000:]


def test_min_version_tls13(proxy_factory, material, origin):
    proxy = proxy_factory(forward={"tls": server_tls(material.paths["server.p12"], min_version="TLSv1.3")})
    refused = s_client(proxy.port, "-tls1_2")
    assert negotiated(refused) is None, refused.stdout[-2000:]
    accepted = s_client(proxy.port, "-tls1_3")
    assert negotiated(accepted) == "TLSv1.3", accepted.stdout[-2000:] + accepted.stderr[-2000:]
    # And curl (TLS 1.3 capable) is served.
    plain = curl_via(proxy, f"{origin.url}/echo", material.paths["listener-ca.pem"])
    assert (plain.returncode, plain.status) == (0, 200), plain


# --- client_auth ---------------------------------------------------------------


def test_client_auth_need(proxy_factory, material, origin):
    proxy = proxy_factory(forward={"tls": server_tls(
        material.paths["server.p12"], client_auth="need", trust_store=str(material.paths["listener-ca.pem"]))})
    ca = material.paths["listener-ca.pem"]
    p = material.paths
    good = curl_via(proxy, f"{origin.url}/echo?need", ca,
                    "--proxy-cert", str(p["client.cert.pem"]), "--proxy-key", str(p["client.key.pem"]))
    assert (good.returncode, good.status) == (0, 200), good
    bare = curl_via(proxy, f"{origin.url}/echo?bare", ca)
    assert bare.returncode != 0 and bare.status == 0, bare
    foreign = curl_via(proxy, f"{origin.url}/echo?foreign", ca,
                       "--proxy-cert", str(p["intruder.cert.pem"]), "--proxy-key", str(p["intruder.key.pem"]))
    assert foreign.returncode != 0 and foreign.status == 0, foreign
    # Refused in the handshake, not by an HTTP answer: neither reached the log
    # (which is written in order: once the next good request is there, so would they be).
    again = curl_via(proxy, f"{origin.url}/echo?need-again", ca,
                     "--proxy-cert", str(p["client.cert.pem"]), "--proxy-key", str(p["client.key.pem"]))
    assert again.status == 200, again
    proxy.wait_access_lines(lambda l: "need-again" in l)
    lines = [parse_access_line(line) for line in proxy.access_lines()]
    assert [l["target"].rsplit("?", 1)[1] for l in lines] == ["need", "need-again"], lines
    assert {l["cert"] for l in lines} == {CLIENT_SUBJECT}
    # Also with TLS 1.2, where the refusal is part of the handshake itself.
    refused = s_client(proxy.port, "-tls1_2", "-CAfile", str(ca))
    assert negotiated(refused) is None, refused.stdout[-2000:]


@pytest.fixture(scope="module")
def plain_origin_2(tmp_path_factory):
    o = OriginProcess(tmp_path_factory.mktemp("tls-second-origin"))
    yield o
    o.stop()


def test_client_auth_want_and_certificate_rules(proxy_factory, material, origin, plain_origin_2):
    """
    want: clients without a certificate are served; a verified certificate's
    subject is logged and can be required by an egress rule.
    """
    p = material.paths
    proxy = proxy_factory(
        forward={"tls": server_tls(p["server.p12"], client_auth="want", trust_store=str(p["listener-ca.pem"])),
                 "connect_ports": [origin.port, plain_origin_2.port]},
        egress={
            "default": "deny",
            "rules": [
                {"name": "open origin", "action": "allow", "networks": ["127.0.0.0/8"], "ports": [origin.port]},
                {"name": "cert holders", "action": "allow", "networks": ["127.0.0.0/8"],
                 "client_certificates": [CLIENT_SUBJECT]},
            ],
        },
    )
    ca = p["listener-ca.pem"]
    withCert = ("--proxy-cert", str(p["client.cert.pem"]), "--proxy-key", str(p["client.key.pem"]))
    bare = curl_via(proxy, f"{origin.url}/echo?want-bare", ca)
    assert (bare.returncode, bare.status) == (0, 200), bare
    held = curl_via(proxy, f"{origin.url}/echo?want-cert", ca, *withCert)
    assert (held.returncode, held.status) == (0, 200), held
    # Only the certificate holder reaches the second origin.
    denied = curl_via(proxy, f"{plain_origin_2.url}/echo?second-bare", ca)
    assert denied.status == 403, denied
    allowed = curl_via(proxy, f"{plain_origin_2.url}/echo?second-cert", ca, *withCert)
    assert allowed.status == 200, allowed
    # The same for tunnels.
    tunnelDenied = curl_via(proxy, f"{plain_origin_2.url}/echo?tunnel-bare", ca, tunnel=True)
    assert tunnelDenied.returncode != 0 and tunnelDenied.status in (0, 403), tunnelDenied
    assert "403" in tunnelDenied.stderr, tunnelDenied
    tunnelled = curl_via(proxy, f"{plain_origin_2.url}/echo?tunnel-cert", ca, *withCert, tunnel=True)
    assert (tunnelled.returncode, tunnelled.status) == (0, 200), tunnelled
    connects = proxy.wait_access_lines(lambda l: "method=CONNECT" in l, count=2)
    assert sorted((l["status"], l.get("cert", "")) for l in connects) == [
        ("200", CLIENT_SUBJECT), ("403", "")], connects
    lines = {l["target"].rsplit("?", 1)[-1]: l for l in proxy.wait_access_lines(lambda l: "?" in l, count=4)}
    assert lines["want-cert"].get("cert") == CLIENT_SUBJECT, lines["want-cert"]["_line"]
    assert lines["second-cert"].get("cert") == CLIENT_SUBJECT, lines["second-cert"]["_line"]
    assert "cert" not in lines["want-bare"], lines["want-bare"]["_line"]
    assert "cert" not in lines["second-bare"] and lines["second-bare"]["status"] == "403"
    # A certificate from a CA the listener does not trust is never taken as verified.
    foreign = curl_via(proxy, f"{plain_origin_2.url}/echo?second-foreign", ca,
                       "--proxy-cert", str(p["intruder.cert.pem"]), "--proxy-key", str(p["intruder.key.pem"]))
    assert foreign.status != 200, foreign
    assert not any(INTRUDER_SUBJECT in l for l in proxy.access_lines())


# --- refusals and failed handshakes on the listener ---------------------------


@pytest.fixture(scope="module")
def listener_material(tmp_path_factory) -> SimpleNamespace:
    """A listener identity, a client certificate from its CA and one from a foreign CA (no keytool)."""
    d = tmp_path_factory.mktemp("listener-refusals")
    ca = make_ca("Refusals CA")
    foreignCA = make_ca("Foreign CA")
    paths = SimpleNamespace(dir=d, ca=d / "ca.pem", store=write_pem_identity(d / "server.pem", server_leaf(ca)))
    paths.ca.write_bytes(ca.cert_pem())
    for label, leaf in (("client", make_leaf(ca, "gateway", org="Example Bank", client=True)),
                        ("foreign", make_leaf(foreignCA, "intruder", org="Elsewhere", client=True))):
        (d / f"{label}.cert.pem").write_bytes(leaf.cert_pem())
        (d / f"{label}.key.pem").write_bytes(leaf.key_pem())
        setattr(paths, label, (d / f"{label}.cert.pem", d / f"{label}.key.pem"))
    return paths


def closed_within(sock, seconds: float) -> float | None:
    """Seconds until the peer closed C{sock} without sending a byte, or None if it did not in time."""
    started = time.monotonic()
    sock.settimeout(seconds)
    try:
        data = sock.recv(4096)
    except (ConnectionResetError, TimeoutError):
        data = None if time.monotonic() - started >= seconds else b""
    if data is None:
        return None
    assert data == b"", data[:100]
    return time.monotonic() - started


def served_tls_connection(proxy, context: ssl.SSLContext, origin) -> RawConnection:
    """A TLS connection that got a 200, retried while the one-connection slot is still taken."""
    deadline = time.monotonic() + 5
    while True:
        try:
            c = tls_connection(proxy.port, context, timeout=5)
        except (ssl.SSLError, ConnectionError):
            # Until the proxy has seen the close of an earlier connection (the harness's port probe).
            assert time.monotonic() < deadline, output_tail(proxy)
            time.sleep(0.1)
            continue
        c.send(build_request("GET", f"{origin.url}/echo", [("Host", origin.authority)]))
        assert c.read_response().status == 200
        return c


def test_connection_beyond_the_limits_is_closed_before_tls(proxy_factory, listener_material, origin):
    """Under a TLS listener a refused connection cannot get its 503 (no handshake yet): closed at once."""
    proxy = proxy_factory(forward={"tls": {"key_store": str(listener_material.store)}},
                          limits={"max_connections_per_client": 1})
    context = tls_context(listener_material.ca)
    with served_tls_connection(proxy, context, origin):
        with socket.create_connection((LOOPBACK, proxy.port)) as second:
            elapsed = closed_within(second, 5)
        assert elapsed is not None and elapsed < 2, "the refused connection is held open"
        with pytest.raises((ssl.SSLError, ConnectionError)):
            tls_connection(proxy.port, context, timeout=5).close()
        lines = wait_output(proxy, r"connection from 127\.0\.0\.1 closed before TLS: refused by the connection limits",
                            count=2)
        assert len(lines) >= 2 and re.search(r"\(\d+ so far\)", lines[-1]), output_tail(proxy)
    # The slot is free again once the first connection is gone.
    served_tls_connection(proxy, context, origin).close()


def test_silent_client_is_closed_at_the_handshake_deadline(proxy_factory, listener_material):
    """A client that connects and never sends a ClientHello is closed within a few seconds."""
    from mydataproxy.tls.listener import HANDSHAKE_SECONDS

    proxy = proxy_factory(forward={"tls": {"key_store": str(listener_material.store)},
                                   "client_idle_timeout": 60.0},
                          limits={"header_timeout": 60.0})
    with socket.create_connection((LOOPBACK, proxy.port)) as silent:
        port = silent.getsockname()[1]
        elapsed = closed_within(silent, HANDSHAKE_SECONDS + 5)
    assert elapsed is not None, "a silent client holds its connection past the handshake deadline"
    assert HANDSHAKE_SECONDS - 0.5 <= elapsed <= HANDSHAKE_SECONDS + 2, elapsed
    assert wait_output(proxy, rf"TLS handshake from 127\.0\.0\.1:{port} not complete within "
                              rf"{HANDSHAKE_SECONDS} s: closed \(1 so far\)"), output_tail(proxy)


def test_failed_handshakes_are_logged_with_client_and_reason(proxy_factory, listener_material, origin):
    m = listener_material
    proxy = proxy_factory(forward={"tls": {"key_store": str(m.store), "client_auth": "need",
                                           "trust_store": str(m.ca)}})

    def attempt(certificate: tuple[Path, Path] | None) -> int:
        context = tls_context(m.ca)
        if certificate is not None:
            context.load_cert_chain(*map(str, certificate))
        c = RawConnection(proxy.port, timeout=10)
        port = c.sock.getsockname()[1]
        try:
            c.sock = context.wrap_socket(c.sock, server_hostname=LOOPBACK)
            # TLS 1.3: the client may think it is done; the refusal comes with the first read.
            c.send(build_request("GET", f"{origin.url}/echo", [("Host", origin.authority)]))
            c.read_response()
        except (ssl.SSLError, ConnectionError, OSError):
            pass
        else:
            raise AssertionError("the handshake was expected to fail")
        finally:
            c.close()
        return port

    def plain() -> int:
        with RawConnection(proxy.port, timeout=10) as c:
            port = c.sock.getsockname()[1]
            c.send(build_request("GET", f"{origin.url}/echo?plain", [("Host", origin.authority)]))
            try:
                answer = c.read_to_eof()
            except OSError:
                answer = b""
        assert not answer.startswith(b"HTTP/"), answer[:100]
        return port

    expected = [
        (plain(), "plain HTTP on the TLS port"),
        (attempt(None), "no client certificate"),
        (attempt(m.foreign), "client certificate not trusted"),
    ]
    for number, (port, why) in enumerate(expected, 1):
        lines = wait_output(proxy, rf"TLS handshake from 127\.0\.0\.1:{port} failed: ")
        assert lines, (why, output_tail(proxy))
        assert why in lines[0] and f"({number} failed handshakes so far)" in lines[0], lines[0]
    # The good client is served, and its handshake is not counted as failed.
    good = curl_via(proxy, f"{origin.url}/echo?good", m.ca,
                    "--proxy-cert", str(m.client[0]), "--proxy-key", str(m.client[1]))
    assert (good.returncode, good.status) == (0, 200), good
    assert len(wait_output(proxy, r"TLS handshake from .* failed", timeout=1)) == 3, output_tail(proxy)


# ===========================================================================
# Outbound TLS
# ===========================================================================


@dataclass
class Origins:
    a: OriginProcess  # originA: pins, serialNumber, names
    b: OriginProcess  # originB: the rotated pin
    untrusted: OriginProcess
    mtls: TLSOrigin  # demands a client certificate from listenerCA
    mtlsUntrusted: TLSOrigin  # the same, with a certificate from an untrusted CA
    tls12: TLSOrigin  # TLS 1.2 at most


@pytest.fixture(scope="module")
def origins(tmp_path_factory, material):
    d = tmp_path_factory.mktemp("tls-origins")
    script = d / "tls_origin.py"
    script.write_text(TLS_ORIGIN)
    p = material.paths

    def files(label: str) -> TLSFiles:
        return TLSFiles(p["origin-ca.pem"], p[f"{label}.cert.pem"], p[f"{label}.key.pem"])

    starters = {
        "a": lambda: OriginProcess(d / "a", tls=files("origin-a")),
        "b": lambda: OriginProcess(d / "b", tls=files("origin-b")),
        "untrusted": lambda: OriginProcess(d / "untrusted", tls=files("untrusted-server")),
        "mtls": lambda: TLSOrigin(script, p["mtls-server.cert.pem"], p["mtls-server.key.pem"],
                                  p["listener-ca.pem"]),
        "mtlsUntrusted": lambda: TLSOrigin(script, p["untrusted-server.cert.pem"], p["untrusted-server.key.pem"],
                                           p["listener-ca.pem"]),
        "tls12": lambda: TLSOrigin(script, p["mtls-server.cert.pem"], p["mtls-server.key.pem"], None, "1.2"),
    }
    with ThreadPoolExecutor(len(starters)) as pool:
        futures = {name: pool.submit(start) for name, start in starters.items()}
    started = {}
    errors = []
    for name, future in futures.items():
        try:
            started[name] = future.result()
        except Exception as e:  # noqa: BLE001 - reported below after cleanup
            errors.append(f"{name}: {e}")
    if errors:
        for o in started.values():
            o.stop()
        pytest.fail("; ".join(errors))
    yield Origins(**started)
    for o in started.values():
        o.stop()


def outbound_config(material: Material, hosts_file: Path) -> dict:
    p = material.paths
    jksClient = {"key_store": str(p["client.jks"]), "key_store_password": STORE_PASSWORD}
    return {
        "upstream": {
            "tls": {
                "trust_store": str(p["origin-bundle.pem"]),
                "profiles": [
                    {"name": "pinned", "hosts": ["pinned.test"], "pins": [material.originA.fingerprint()]},
                    {"name": "pin-other", "hosts": ["pinwrong.test"], "pins": [material.originB.fingerprint()]},
                    {"name": "rotation", "hosts": ["*.rot.test"],
                     "pins": [material.originA.fingerprint(), material.originB.fingerprint().replace(":", "")]},
                    {"name": "serial", "hosts": ["serial.test"], "serial_number": REGISTRATION_NUMBER},
                    {"name": "serial-other", "hosts": ["serialwrong.test"], "serial_number": "999-99-99999"},
                    {"name": "jks trust", "hosts": ["jks.test"], "trust_store": str(p["untrusted-trust.jks"]),
                     "trust_store_password": STORE_PASSWORD},
                    {"name": "p12 trust", "hosts": ["p12.test"], "trust_store": str(p["untrusted-trust.p12"]),
                     "trust_store_password": STORE_PASSWORD},
                    {"name": "mtls", "hosts": ["mtls.test"], **jksClient},
                    {"name": "mtls without certificate", "hosts": ["mtls-nocert.test"]},
                    {"name": "mydata", "hosts": ["mydata.test", "mydata-ok.test"], "preset": "mydata", **jksClient},
                    {"name": "unverified", "hosts": ["noverify.test"], "verify": False,
                     "key_store": str(p["client.p12"]), "key_store_password": STORE_PASSWORD},
                ],
            },
        },
        "resolver": {"hosts_file": str(hosts_file)},
    }


@pytest.fixture(scope="module")
def outbound(launcher, material, tmp_path_factory):
    hosts = tmp_path_factory.mktemp("tls-hosts") / "hosts"
    hosts.write_text("127.0.0.1 localhost " + " ".join(ORIGIN_NAMES) + "\n::1 localhost\n")
    return launcher(**outbound_config(material, hosts))


def assert_502(resp: Response, *fragments: str) -> None:
    assert resp.status == 502, f"{resp.status} {resp.body[:300]!r}"
    text = resp.body.decode("utf-8", "replace")
    for fragment in fragments:
        assert fragment in text, text


def test_outbound_trust_store_pem_bundle(outbound, origins, material, ca_pem):
    """The origin CA is only in upstream.tls.trust_store (SSL_CERT_FILE has another CA)."""
    # The proxy runs with SSL_CERT_FILE=ca_pem: not the origins' CA.
    assert material.originCA.cert_pem() not in ca_pem.read_bytes()
    resp = via(outbound, f"https://127.0.0.1:{origins.a.port}/echo?bundle")
    assert resp.status == 200, resp.body[:300]
    assert resp.json()["tls"] is True
    raw = (
        f"GET /echo?header HTTP/1.1\r\nHost: 127.0.0.1:{outbound.port}\r\n"
        f"x-target-host: https://127.0.0.1:{origins.a.port}\r\n\r\n"
    ).encode()
    resp = exchange(outbound, raw)
    assert resp.status == 200, resp.body[:300]
    assert resp.json()["uri"] == "/echo?header"


@pytest.mark.parametrize("name", ["jks.test", "p12.test"])
def test_outbound_trust_store_java_formats(outbound, origins, name):
    """A profile's JKS / PKCS#12 trust store (the default trust does not hold this CA)."""
    resp = via(outbound, f"https://{name}:{origins.untrusted.port}/echo?{name}")
    assert resp.status == 200, resp.body[:300]
    assert resp.json()["uri"] == f"/echo?{name}"


def test_outbound_untrusted_issuer(outbound, origins):
    resp = via(outbound, f"https://127.0.0.1:{origins.untrusted.port}/echo?untrusted")
    assert_502(resp, "untrusted issuer")


def test_outbound_hostname_mismatch(outbound, origins):
    resp = via(outbound, f"https://nomatch.test:{origins.a.port}/echo?nomatch")
    assert_502(resp, "hostname mismatch")
    line = outbound.wait_access_lines(lambda l: "nomatch.test" in l)
    assert line and line[0]["status"] == "502", line
    # An IP address is checked against the certificate's IP SANs (this one has names only).
    assert_502(via(outbound, f"https://127.0.0.1:{origins.tls12.port}/echo?by-ip"), "hostname mismatch")
    assert wait_output(outbound, r"502 GET https://nomatch\.test:\d+/echo\?nomatch: .*hostname mismatch")


@pytest.fixture(scope="module")
def ip_in_dns_san(tmp_path_factory):
    """
    An origin on 127.0.0.1 whose certificate lists the address both as a
    dNSName and as an iPAddress (as internal backends often do), a second
    one with the address only as a dNSName, and the CA of both.
    """
    d = tmp_path_factory.mktemp("ip-in-dns-san")
    ca = make_ca("IP SAN CA")
    (d / "ca.pem").write_bytes(ca.cert_pem())
    started = []

    def start(label: str, general: list) -> OriginProcess:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(label))
            .issuer_name(ca.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(days=1))
            .not_valid_after(NOW + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(general), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca.key, hashes.SHA256())
        )
        leaf = Issued(key, cert, ca)
        (d / f"{label}.cert.pem").write_bytes(b"".join(c.public_bytes(PEM) for c in leaf.chain))
        (d / f"{label}.key.pem").write_bytes(leaf.key_pem())
        origin = OriginProcess(d / label, tls=TLSFiles(d / "ca.pem", d / f"{label}.cert.pem", d / f"{label}.key.pem"))
        started.append(origin)
        return origin

    loopback = ipaddress.ip_address(LOOPBACK)
    both = start("both", [x509.DNSName(LOOPBACK), x509.IPAddress(loopback), x509.DNSName("both.test")])
    dnsOnly = start("dns-only", [x509.DNSName(LOOPBACK)])
    yield SimpleNamespace(ca=d / "ca.pem", both=both, dnsOnly=dnsOnly, dir=d)
    for origin in started:
        origin.stop()


def test_outbound_ip_address_in_a_dns_san(proxy_factory, ip_in_dns_san):
    """
    An IP target is checked against the iPAddress SANs; a dNSName holding an
    address (which service_identity cannot parse) neither breaks the check
    nor counts as a match.
    """
    hosts = ip_in_dns_san.dir / "hosts"
    hosts.write_text("127.0.0.1 localhost both.test dns-only.test\n")
    proxy = proxy_factory(upstream={"tls": {"trust_store": str(ip_in_dns_san.ca)}},
                          resolver={"hosts_file": str(hosts)})
    both, dnsOnly = ip_in_dns_san.both.port, ip_in_dns_san.dnsOnly.port
    ok = via(proxy, f"https://{LOOPBACK}:{both}/echo?by-ip")
    assert ok.status == 200, ok.body[:300]
    assert ok.json()["tls"] is True
    byName = via(proxy, f"https://both.test:{both}/echo?by-name")
    assert byName.status == 200, byName.body[:300]
    # The address only as a dNSName: not a match for the IP, a 502 that says why.
    assert_502(via(proxy, f"https://{LOOPBACK}:{dnsOnly}/echo?dns-only"), "hostname mismatch")
    assert_502(via(proxy, f"https://dns-only.test:{dnsOnly}/echo?dns-only-name"), "hostname mismatch")
    assert wait_output(proxy, r"502 GET https://127\.0\.0\.1:\d+/echo\?dns-only: .*hostname mismatch"), output_tail(proxy)
    assert "Unhandled" not in proxy.output() and "Traceback" not in proxy.output(), output_tail(proxy)


def test_outbound_pins(outbound, origins):
    ok = via(outbound, f"https://pinned.test:{origins.a.port}/echo?pinned")
    assert ok.status == 200, ok.body[:300]
    assert_502(via(outbound, f"https://pinwrong.test:{origins.a.port}/echo?pin-other"), "pin mismatch")
    # Rotation: two pins, both origins' certificates are accepted.
    for name, origin in (("a.rot.test", origins.a), ("b.rot.test", origins.b)):
        resp = via(outbound, f"https://{name}:{origin.port}/echo?rot")
        assert resp.status == 200, (name, resp.body[:300])
    # ... and a third one (trusted, right name) is not.
    assert_502(via(outbound, f"https://c.rot.test:{origins.tls12.port}/echo?c"), "pin mismatch")


def test_outbound_serial_number(outbound, origins):
    assert via(outbound, f"https://serial.test:{origins.a.port}/echo?serial").status == 200
    assert_502(via(outbound, f"https://serialwrong.test:{origins.a.port}/echo?serial"), "serialNumber")


def test_outbound_mutual_tls(outbound, origins):
    missing = via(outbound, f"https://mtls-nocert.test:{origins.mtls.port}/echo")
    assert_502(missing, "client certificate")
    resp = via(outbound, f"https://mtls.test:{origins.mtls.port}/echo")
    assert resp.status == 200, resp.body[:300]
    assert resp.json()["client_subject"] == CLIENT_SUBJECT


def test_outbound_mydata_preset(outbound, origins):
    resp = via(outbound, f"https://mydata.test:{origins.tls12.port}/echo")
    assert_502(resp, "TLS version")
    # The same origin is fine for a profile that allows TLS 1.2 ...
    ok12 = via(outbound, f"https://tls12.test:{origins.tls12.port}/echo")
    assert ok12.status == 200 and ok12.json()["tls_version"] == "TLSv1.2", ok12.body[:300]
    # ... and the preset works with a TLS 1.3 origin, sending the client certificate.
    ok = via(outbound, f"https://mydata-ok.test:{origins.mtls.port}/echo")
    assert ok.status == 200, ok.body[:300]
    assert ok.json()["tls_version"] == "TLSv1.3"
    assert ok.json()["client_subject"] == CLIENT_SUBJECT


def test_outbound_verify_false_still_sends_client_certificate(outbound, origins):
    resp = via(outbound, f"https://noverify.test:{origins.mtlsUntrusted.port}/echo")
    assert resp.status == 200, resp.body[:300]
    assert resp.json()["client_subject"] == CLIENT_SUBJECT
    # The same origin is refused where verification is on.
    assert_502(via(outbound, f"https://127.0.0.1:{origins.mtlsUntrusted.port}/echo"), "untrusted issuer")
    # Warned about at start, and on each connection made without verifying.
    atStart = wait_output(outbound, r"unverified: verify = false: origin certificates are NOT checked")
    assert atStart and "#warn]" in atStart[0], output_tail(outbound)
    perConnection = wait_output(outbound, r"TLS to noverify\.test without verifying its certificate")
    assert perConnection and "#warn]" in perConnection[0], output_tail(outbound)


def test_check_config_warns_about_verify_false(outbound):
    result = subprocess.run(
        [str(Path(sys.executable).parent / "mydataproxy"), "check-config", str(outbound.config_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = [l for l in result.stdout.splitlines() if "verify=false" in l]
    assert len(lines) == 1 and "unverified" in lines[0] and "WARNING" in lines[0], result.stdout


# ===========================================================================
# The Java product's application.properties
# ===========================================================================


class LegacyProxy:
    """twistd with an application.properties (conftest's ProxyProcess writes TOML)."""

    def __init__(self, workdir: Path, properties: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.path = workdir / "application.properties"
        self.path.write_text(properties)
        self.output_path = workdir / "twistd.out"
        self._output = open(self.output_path, "wb")
        self.proc = subprocess.Popen(
            [str(TWISTD), "-n", "--pidfile=", "mydataproxy", "--config", str(self.path)],
            cwd=workdir, stdout=self._output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=client_env(),
        )

    def output(self) -> str:
        return self.output_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._output.close()


def start_legacy(workdir: Path, properties: str) -> tuple[LegacyProxy, int]:
    """A LegacyProxy on a free port (C{{port}} in C{properties}); retried if the port is taken meanwhile."""
    for attempt in range(3):
        port = get_free_port()
        legacy = LegacyProxy(workdir / f"try{attempt}", properties.format(port=port))
        listening = re.compile(rf"forward listening on .*port={port}\)")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and legacy.proc.poll() is None and not listening.search(legacy.output()):
            time.sleep(0.05)
        if listening.search(legacy.output()):
            return legacy, port
        legacy.stop()
        if "Address already in use" not in legacy.output():
            break
    raise AssertionError(f"the legacy proxy did not start:\n{legacy.output()}")


def test_legacy_properties_serve_mutual_tls(tmp_path, material, origin):
    p = material.paths
    # Relative to the properties file, as the Java product's file:../conf/... locations were.
    relative = os.path.relpath(p["server.jks"], tmp_path / "try0")
    legacy, port = start_legacy(tmp_path, (
        "server.port={port}\n"
        "server.address=127.0.0.1\n"
        "server.ssl.enabled=true\n"
        f"server.ssl.key-store=file:{relative}\n"
        f"server.ssl.key-store-password={STORE_PASSWORD}\n"
        f"server.ssl.key-password={STORE_PASSWORD}\n"
        "server.ssl.client-auth=need\n"
        f"server.ssl.trust-store=file:{p['clients-trust.jks']}\n"
        f"server.ssl.trust-store-password={STORE_PASSWORD}\n"
        "logging.file.name=access.log\n"
    ))
    try:
        target = SimpleNamespace(port=port)
        ca = p["listener-ca.pem"]
        good = curl_via(target, f"{origin.url}/echo?legacy", ca,
                        "--proxy-cert", str(p["client.cert.pem"]), "--proxy-key", str(p["client.key.pem"]))
        # The listener served it (the egress guard, without rules in the
        # properties, answers for loopback itself).
        assert good.returncode == 0 and good.status == 403, good
        bare = curl_via(target, f"{origin.url}/echo?legacy-bare", ca)
        assert bare.returncode != 0 and bare.status == 0, bare
        again = curl_via(target, f"{origin.url}/echo?legacy-again", ca,
                         "--proxy-cert", str(p["client.cert.pem"]), "--proxy-key", str(p["client.key.pem"]))
        assert again.status == 403, again
        assert STORE_PASSWORD not in legacy.output()
        log = legacy.path.parent / "access.log"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and "legacy-again" not in (log.read_text() if log.exists() else ""):
            time.sleep(0.05)
        lines = [parse_access_line(line) for line in log.read_text().splitlines()]
        assert [(l["target"], l["status"], l.get("cert")) for l in lines] == [
            (f"{origin.url}/echo?legacy", "403", CLIENT_SUBJECT),
            (f"{origin.url}/echo?legacy-again", "403", CLIENT_SUBJECT),
        ], lines
    finally:
        legacy.stop()


# ===========================================================================
# Reload (SIGHUP)
# ===========================================================================


@pytest.fixture
def reload_proxy(proxy_factory, material, tmp_path):
    """A TLS listener whose key store (PKCS#12) the test may replace."""
    store = tmp_path / "listener-store"
    first = server_leaf(material.listenerCA)
    write_p12(store, first)
    proxy = proxy_factory(forward={"tls": server_tls(store)}, daemon={"shutdown_timeout": 1.0})
    return proxy, store, first


@pytest.fixture
def recording_origin():
    """An in-process origin that records each request as it arrives (closed after the test)."""
    origin = RecordingOrigin()
    yield origin
    origin.close()


def reload_ok(proxy, generation: int) -> None:
    """SIGHUP, and wait until the config file and its stores, read again, are in force as C{generation}."""
    line = proxy.reload()
    taken = RELOAD_OK.search(line)
    assert taken and int(taken.group(1)) == generation, (line, output_tail(proxy))


def reload_refused(proxy, generation: int) -> str:
    """SIGHUP, and wait until the reload is refused with C{generation} still in force; the line."""
    line = proxy.reload()
    refused = RELOAD_FAILED.search(line)
    assert refused and int(refused.group(1)) == generation, (line, output_tail(proxy))
    return line


def handshake_serial(port: int, context: ssl.SSLContext) -> int:
    with tls_connection(port, context) as c:
        return peer_serial(c)


def test_reload_new_certificate_for_new_handshakes(reload_proxy, material, recording_origin):
    """
    A reload with a renewed key store: new handshakes get the new
    certificate as soon as the reload is in force; an idle keep-alive
    connection made before is closed by the reload; a request in flight
    across the reload is answered on its connection, whose certificate is
    the old one, and that connection closes after the answer.
    """
    proxy, store, first = reload_proxy
    origin = recording_origin
    context = tls_context(material.paths["listener-ca.pem"])
    assert handshake_serial(proxy.port, context) == first.cert.serial_number
    idle = tls_connection(proxy.port, context)
    busy = tls_connection(proxy.port, context)
    try:
        idle.send(build_request("GET", f"{origin.url}/idle", [("Host", origin.authority)]))
        assert idle.read_response().status == 200
        busy.send(build_request("GET", f"{origin.url}/delay/2500/held", [("Host", origin.authority)]))
        origin.wait_for("/delay/2500/held")
        admitted = time.monotonic()
        second = server_leaf(material.listenerCA)
        replace_file(store, Path(write_p12(store.with_name("second.p12"), second)).read_bytes())
        reload_ok(proxy, 2)
        assert time.monotonic() - admitted < 2.0, "the reload took longer than the request it should overlap"
        assert handshake_serial(proxy.port, context) == second.cert.serial_number
        assert closed_within(idle.sock, 3.0) is not None, "an idle keep-alive connection outlived the reload"
        held = busy.read_response()
        assert held.status == 200 and held.json()["target"] == "/delay/2500/held", held.body[:200]
        assert peer_serial(busy) == first.cert.serial_number
        assert closed_within(busy.sock, 3.0) is not None, "the connection busy at the reload stayed open"
    finally:
        idle.close()
        busy.close()
    assert proxy.alive()


def test_reload_broken_store_keeps_the_old_certificate(reload_proxy, material, tmp_path):
    proxy, store, first = reload_proxy
    context = tls_context(material.paths["listener-ca.pem"])
    other = server_leaf(material.listenerCA)
    stranger = server_leaf(material.listenerCA)
    broken = [
        ("garbage", b"\x00garbage, not a key store\n" * 20, "unknown key store format"),
        ("wrong password", write_p12(tmp_path / "wrong.p12", other, OTHER_PASSWORD).read_bytes(), "wrong password"),
        ("key without its certificate", other.key_pem() + stranger.cert_pem(), "no matching certificate"),
        ("empty", b"", "empty file"),
    ]
    for label, content, why in broken:
        replace_file(store, content)
        failed = reload_refused(proxy, 1)
        assert f"{proxy.config_path}:" in failed and "forward.tls" in failed, (label, failed)
        assert why in failed and str(store) in failed, (label, failed)
        assert STORE_PASSWORD not in failed and OTHER_PASSWORD not in failed
        assert handshake_serial(proxy.port, context) == first.cert.serial_number, label
    assert proxy.alive()
    # A good store after all that is taken.
    replace_file(store, write_p12(tmp_path / "good.p12", other).read_bytes())
    reload_ok(proxy, 2)
    assert handshake_serial(proxy.port, context) == other.cert.serial_number


@dataclass
class Handshake:
    """One handshake of the traffic loop: when it started and ended, and the certificate it got."""

    started: float
    ended: float
    serial: int


def test_reload_under_traffic(reload_proxy, material, origin, tmp_path):
    """
    Five reloads, each with a new certificate, under traffic (three clients,
    a handshake then two requests per connection): no failed request, and
    every handshake that began after a reload was in force and ended before
    the next SIGHUP got that reload's certificate.

    A request on a reused connection that the proxy closes before any byte
    of an answer (idle between two requests at a reload) is sent again once
    on a new connection, as HTTP clients do (RFC 9112 9.3.1); any other
    error is a failure.
    """
    proxy, store, first = reload_proxy
    context = tls_context(material.paths["listener-ca.pem"])
    stop = threading.Event()
    failures: list[str] = []
    handshakes: list[Handshake] = []
    retried: list[str] = []
    done = [0]

    def connect() -> RawConnection:
        started = time.monotonic()
        c = tls_connection(proxy.port, context, timeout=10)
        handshakes.append(Handshake(started, time.monotonic(), peer_serial(c)))
        return c

    def get(c: RawConnection, tag: str) -> None:
        c.send(build_request("GET", f"{origin.url}/echo?{tag}", [("Host", origin.authority)]))
        resp = c.read_response()
        if resp.status != 200:
            failures.append(f"{tag}: {resp.status} {resp.body[:200]!r}")
        done[0] += 1

    def traffic(worker: int) -> None:
        for n in range(1000):
            if stop.is_set():
                return
            tag = f"w{worker}-{n}"
            try:
                with connect() as c:
                    get(c, f"{tag}-0")
                    try:
                        get(c, f"{tag}-1")
                    except (ConnectionClosed, ConnectionError, ssl.SSLError):
                        if c.buf:
                            raise
                        retried.append(tag)
                        with connect() as again:
                            get(again, f"{tag}-1")
            except Exception as e:  # noqa: BLE001 - every failure is the finding
                failures.append(f"{tag}: {type(e).__name__}: {e}")

    workers = [threading.Thread(target=traffic, args=(i,), daemon=True) for i in range(3)]
    for w in workers:
        w.start()
    leaves = [server_leaf(material.listenerCA) for _ in range(5)]
    # (SIGHUP sent, reload in force, the certificate it brought), from the start-up's.
    reloads = [(0.0, 0.0, first.cert.serial_number)]
    try:
        for number, leaf in enumerate(leaves):
            time.sleep(0.3)
            replace_file(store, write_p12(tmp_path / f"swap{number}.p12", leaf).read_bytes())
            sent = time.monotonic()
            reload_ok(proxy, number + 2)
            reloads.append((sent, time.monotonic(), leaf.cert.serial_number))
        time.sleep(0.3)
    finally:
        stop.set()
        for w in workers:
            w.join(15)
    assert not failures, failures[:10]
    assert done[0] >= 30, done[0]
    assert len(retried) <= len(leaves) * len(workers), retried
    checked = set()
    for (_, inForce, serial), (nextSighup, _, _) in zip(reloads, [*reloads[1:], (float("inf"), 0.0, 0)]):
        for handshake in handshakes:
            if inForce < handshake.started and handshake.ended < nextSighup:
                assert handshake.serial == serial, "a handshake got a certificate not in force"
                checked.add(serial)
    assert len(checked) >= 3, "too few handshakes fell between the reloads to check them"
    assert "reload failed" not in proxy.output()


def test_reload_outbound_client_certificate(proxy_factory, material, origins, tmp_path):
    """
    SIGHUP re-reads upstream stores too: connections to an origin after the
    reload present the new client certificate, to a host the proxy had a
    pooled connection to as well; the new material is reported; a broken
    store keeps the old.
    """
    store = write_p12(tmp_path / "client-store", material.client)
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost r0.reload.test\n")
    proxy = proxy_factory(
        upstream={"tls": {"trust_store": str(material.paths["origin-ca.pem"]), "profiles": [
            {"name": "reloaded", "hosts": ["*.reload.test"], "key_store": str(store),
             "key_store_password": STORE_PASSWORD}]}},
        resolver={"hosts_file": str(hosts)},
        daemon={"shutdown_timeout": 1.0},
    )

    def subject() -> str:
        resp = via(proxy, f"https://r0.reload.test:{origins.mtls.port}/echo")
        assert resp.status == 200, resp.body[:300]
        return resp.json()["client_subject"]

    assert subject() == CLIENT_SUBJECT
    renewed = make_leaf(material.listenerCA, "gateway-renewed", org="Example Bank", client=True, days=10)
    replace_file(store, write_p12(tmp_path / "renewed.p12", renewed).read_bytes())
    reload_ok(proxy, 2)
    assert subject() == "CN=gateway-renewed,O=Example Bank"
    # The renewed certificate is close to expiry: said at the reload.
    assert re.search(r"upstream\.tls: CN=gateway-renewed.* expires in (9|10|11) days", proxy.output()), \
        output_tail(proxy)
    # A broken store keeps what was loaded, and says why.
    replace_file(store, b"not a store at all\n")
    failed = reload_refused(proxy, 2)
    assert "upstream.tls" in failed and str(store) in failed and "unknown key store format" in failed, failed
    assert subject() == "CN=gateway-renewed,O=Example Bank"


# ===========================================================================
# Expiry
# ===========================================================================


def test_expiry_warning_at_start_and_after_reload(proxy_factory, material, tmp_path):
    soon = server_leaf(material.listenerCA, days=10)
    store = write_pem_identity(tmp_path / "soon.pem", soon)
    proxy = proxy_factory(forward={"tls": {"key_store": str(store)}})
    pattern = r"CN=proxy\.test.* expires in (9|10|11) days"
    at_start = wait_output(proxy, pattern)
    assert len(at_start) == 1, proxy.output()
    # Logged as a warning, naming the listener.
    assert "forward.tls" in at_start[0]
    assert "warn" in at_start[0].lower(), at_start[0]
    # Certificates far from expiry are not warned about (the CA: 400 days).
    assert not re.search(r"Listener CA.* expires in \d+ days.*", "\n".join(
        l for l in proxy.output().splitlines() if "warn" in l.lower())), proxy.output()
    reload_ok(proxy, 2)
    after = [line for line in proxy.output().splitlines() if re.search(pattern, line)]
    assert len(after) == 2, output_tail(proxy)
