"""
Key stores in, PEM out (L{mydataproxy.tls.keystore}, C{mydataproxy keystore}).

Stores are made here by C{keytool} (JKS, JCEKS, Java's PKCS#12; missing
C{keytool} fails under C{CI=true}) and by C{cryptography} (PEM, PKCS#12),
from a test CA, an intermediate and leaves (RSA and EC).  What is read, and
what is written back as PEM, must equal the originals byte for byte.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import random
import stat
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from conftest import require_tool
from mydataproxy import cli
from mydataproxy.tls import keystore
from mydataproxy.tls.keystore import KeyStoreError, loadKeyStore

DER = serialization.Encoding.DER
PEM = serialization.Encoding.PEM

STORE_PASSWORD = "Store-Secret-7781"
KEY_PASSWORD = "Key-Secret-5519"
WRONG_PASSWORD = "Not-The-Password-3302"
REGISTRATION_NUMBER = "123-45-67890"

NOW = datetime.datetime.now(datetime.timezone.utc)


# ---------------------------------------------------------------------------
# Test material
# ---------------------------------------------------------------------------


def _name(cn: str, serialNumber: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COUNTRY_NAME, "KR"),
                  x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Bank")]
    if serialNumber:
        attributes.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, serialNumber))
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attributes)


def _cert(subject, key, issuer=None, issuerKey=None, ca=False, sans=(), days=200):
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer is not None else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        general = []
        for san in sans:
            try:
                general.append(x509.IPAddress(ipaddress.ip_address(san)))
            except ValueError:
                general.append(x509.DNSName(san))
        builder = builder.add_extension(x509.SubjectAlternativeName(general), critical=False)
    return builder.sign(issuerKey if issuerKey is not None else key, hashes.SHA256())


@dataclass
class Material:
    rootKey: ec.EllipticCurvePrivateKey
    root: x509.Certificate
    interKey: ec.EllipticCurvePrivateKey
    inter: x509.Certificate
    rsaKey: rsa.RSAPrivateKey
    rsaLeaf: x509.Certificate
    ecKey: ec.EllipticCurvePrivateKey
    ecLeaf: x509.Certificate
    otherRoot: x509.Certificate
    soonKey: ec.EllipticCurvePrivateKey
    soonLeaf: x509.Certificate


@pytest.fixture(scope="module")
def material() -> Material:
    rootKey = ec.generate_private_key(ec.SECP384R1())
    root = _cert(_name("Test Root CA"), rootKey, ca=True, days=3000)
    interKey = ec.generate_private_key(ec.SECP256R1())
    inter = _cert(_name("Test Issuing CA"), interKey, root, rootKey, ca=True, days=1000)
    rsaKey = rsa.generate_private_key(65537, 2048)
    rsaLeaf = _cert(_name("client.example", REGISTRATION_NUMBER), rsaKey, inter, interKey,
                    sans=("client.example", "10.1.2.3"))
    ecKey = ec.generate_private_key(ec.SECP256R1())
    ecLeaf = _cert(_name("ec.example"), ecKey, inter, interKey, sans=("ec.example",))
    otherKey = ec.generate_private_key(ec.SECP256R1())
    otherRoot = _cert(_name("Other Root CA"), otherKey, ca=True)
    soonKey = ec.generate_private_key(ec.SECP256R1())
    soonLeaf = _cert(_name("soon.example"), soonKey, inter, interKey, sans=("soon.example",), days=10)
    return Material(rootKey, root, interKey, inter, rsaKey, rsaLeaf, ecKey, ecLeaf, otherRoot,
                    soonKey, soonLeaf)


def pkcs8(key) -> bytes:
    return key.private_bytes(DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def ders(certs) -> list[bytes]:
    return [c.public_bytes(DER) for c in certs]


def assertEntry(entry: keystore.KeyEntry, key, chain) -> None:
    """The entry's key and chain are the originals, byte for byte."""
    assert pkcs8(entry.key) == pkcs8(key)
    assert ders(entry.chain) == ders(chain)


def assertNoSecret(message: str) -> None:
    for secret in (STORE_PASSWORD, KEY_PASSWORD, WRONG_PASSWORD):
        assert secret not in message


def expectError(path, password, keyPassword=None, *fragments: str) -> str:
    with pytest.raises(KeyStoreError) as info:
        loadKeyStore(str(path), password, keyPassword)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    assertNoSecret(message)
    return message


# ---------------------------------------------------------------------------
# Stores made with cryptography
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cryptoStores(tmp_path_factory, material) -> dict[str, Path]:
    """PKCS#12 and PEM stores written by cryptography."""
    m = material
    d = tmp_path_factory.mktemp("crypto-stores")
    stores: dict[str, Path] = {}

    def write(name: str, data: bytes) -> None:
        stores[name] = d / name
        stores[name].write_bytes(data)

    secret = STORE_PASSWORD.encode()
    write("modern.p12", pkcs12.serialize_key_and_certificates(
        b"client", m.rsaKey, m.rsaLeaf, [m.inter, m.root], serialization.BestAvailableEncryption(secret)))
    legacy = (
        serialization.PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(2048)
        .key_cert_algorithm(pkcs12.PBES.PBESv1SHA1And3KeyTripleDESCBC)
        .hmac_hash(hashes.SHA1())
        .build(secret)
    )
    write("legacy.p12", pkcs12.serialize_key_and_certificates(b"ec", m.ecKey, m.ecLeaf, [m.inter], legacy))
    write("open.p12", pkcs12.serialize_key_and_certificates(
        None, m.ecKey, m.ecLeaf, [m.inter, m.root], serialization.NoEncryption()))
    write("trust.p12", pkcs12.serialize_key_and_certificates(
        None, None, None,
        [pkcs12.PKCS12Certificate(m.root, b"rootca"), pkcs12.PKCS12Certificate(m.otherRoot, b"other")],
        serialization.BestAvailableEncryption(secret)))

    encrypted = m.rsaKey.private_bytes(
        PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(KEY_PASSWORD.encode()))
    # Leaf, intermediate and root out of order, an unrelated CA, text between blocks.
    write("bundle.pem", b"# client bundle\n" + m.root.public_bytes(PEM) + encrypted
          + b"Bag Attributes: ignored\n" + m.inter.public_bytes(PEM) + m.otherRoot.public_bytes(PEM)
          + m.rsaLeaf.public_bytes(PEM))
    traditional = m.ecKey.private_bytes(
        PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())
    write("traditional.pem", m.ecLeaf.public_bytes(PEM) + traditional + m.inter.public_bytes(PEM))
    rsaTraditional = m.rsaKey.private_bytes(
        PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.BestAvailableEncryption(KEY_PASSWORD.encode()))
    write("rsa-traditional.pem", rsaTraditional + m.rsaLeaf.public_bytes(PEM))
    write("two-keys.pem", pkcs8_pem(m.rsaKey) + m.rsaLeaf.public_bytes(PEM)
          + pkcs8_pem(m.ecKey) + m.ecLeaf.public_bytes(PEM) + m.inter.public_bytes(PEM))
    write("soon.pem", pkcs8_pem(m.soonKey) + m.soonLeaf.public_bytes(PEM) + m.inter.public_bytes(PEM))
    write("cas.pem", m.root.public_bytes(PEM) + m.otherRoot.public_bytes(PEM))
    write("root.der", m.root.public_bytes(DER))
    return stores


def pkcs8_pem(key) -> bytes:
    return key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


# ---------------------------------------------------------------------------
# Stores made with keytool
# ---------------------------------------------------------------------------


@dataclass
class JavaStores:
    dir: Path
    jks: Path  # rsaLeaf chain as "client" + trusted "rootca"
    jceks: Path  # rsaLeaf chain as "client"
    javaP12: Path  # rsaLeaf chain as "client" + trusted "rootca"
    keyPassJks: Path  # store STORE_PASSWORD, key KEY_PASSWORD
    genJks: Path  # keytool -genkeypair: "rsa" and "ec"
    genP12: Path  # genJks converted by keytool
    genCerts: dict[str, bytes]  # alias -> DER exported by keytool
    genListing: str  # keytool -list -v of genJks
    cacerts: Path  # JKS trust store, password changeit
    trustP12: Path
    secretJceks: Path


def keytool(tool: str, *args: str) -> None:
    result = subprocess.run([tool, *args], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, f"keytool {args[0]} failed: {result.stdout}{result.stderr}"


def runParallel(tool: str, commands: list[list[str]]) -> None:
    procs = [subprocess.Popen([tool, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for args in commands]
    for args, proc in zip(commands, procs):
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"keytool {' '.join(args[:1])} failed: {output}"


@pytest.fixture(scope="module")
def javaStores(tmp_path_factory, material, cryptoStores) -> JavaStores:
    tool = require_tool("keytool")
    m = material
    d = tmp_path_factory.mktemp("java-stores")
    (d / "root.der").write_bytes(m.root.public_bytes(DER))
    (d / "inter.der").write_bytes(m.inter.public_bytes(DER))
    (d / "other.der").write_bytes(m.otherRoot.public_bytes(DER))
    source = ["-srckeystore", str(cryptoStores["modern.p12"]), "-srcstoretype", "PKCS12",
              "-srcstorepass", STORE_PASSWORD, "-noprompt"]
    dname = f"CN=gen.example, SERIALNUMBER={REGISTRATION_NUMBER}, O=Example Bank, C=KR"
    gen = ["-keystore", str(d / "gen.jks"), "-storetype", "JKS", "-storepass", STORE_PASSWORD,
           "-keypass", STORE_PASSWORD, "-validity", "400"]
    # Phase 1: everything that starts from nothing, in parallel.
    runParallel(tool, [
        ["-importkeystore", *source, "-destkeystore", str(d / "store.jks"), "-deststoretype", "JKS",
         "-deststorepass", STORE_PASSWORD],
        ["-importkeystore", *source, "-destkeystore", str(d / "store.jceks"), "-deststoretype", "JCEKS",
         "-deststorepass", STORE_PASSWORD],
        ["-importkeystore", *source, "-destkeystore", str(d / "java.p12"), "-deststoretype", "PKCS12",
         "-deststorepass", STORE_PASSWORD],
        ["-importkeystore", *source, "-srcalias", "client", "-destkeystore", str(d / "keypass.jks"),
         "-deststoretype", "JKS", "-deststorepass", STORE_PASSWORD, "-destkeypass", KEY_PASSWORD],
        ["-genkeypair", "-alias", "rsa", "-keyalg", "RSA", "-keysize", "2048", "-dname", dname,
         "-ext", "san=dns:gen.example,ip:10.9.8.7", *gen],
        ["-importcert", "-noprompt", "-alias", "rootca", "-file", str(d / "root.der"),
         "-keystore", str(d / "cacerts"), "-storetype", "JKS", "-storepass", "changeit"],
        ["-importcert", "-noprompt", "-alias", "rootca", "-file", str(d / "root.der"),
         "-keystore", str(d / "trust.p12"), "-storetype", "PKCS12", "-storepass", STORE_PASSWORD],
        ["-genseckey", "-alias", "aes", "-keyalg", "AES", "-keysize", "128", "-keystore",
         str(d / "secret.jceks"), "-storetype", "JCEKS", "-storepass", STORE_PASSWORD,
         "-keypass", STORE_PASSWORD],
    ])
    # Phase 2: additions to those stores.
    runParallel(tool, [
        ["-genkeypair", "-alias", "ec", "-keyalg", "EC", "-groupname", "secp256r1", "-dname",
         "CN=ec.gen.example", *gen],
        ["-importcert", "-noprompt", "-alias", "interca", "-file", str(d / "inter.der"),
         "-keystore", str(d / "cacerts"), "-storepass", "changeit"],
        ["-importcert", "-noprompt", "-alias", "other", "-file", str(d / "other.der"),
         "-keystore", str(d / "trust.p12"), "-storepass", STORE_PASSWORD],
        ["-importcert", "-noprompt", "-alias", "rootca", "-file", str(d / "root.der"),
         "-keystore", str(d / "store.jks"), "-storepass", STORE_PASSWORD],
        ["-importcert", "-noprompt", "-alias", "rootca", "-file", str(d / "root.der"),
         "-keystore", str(d / "java.p12"), "-storepass", STORE_PASSWORD],
    ])
    # Phase 3: the generated store's certificates and Java's own PKCS#12 copy of it.
    runParallel(tool, [
        ["-importcert", "-noprompt", "-alias", "otherca", "-file", str(d / "other.der"),
         "-keystore", str(d / "cacerts"), "-storepass", "changeit"],
        ["-importkeystore", "-srckeystore", str(d / "gen.jks"), "-srcstoretype", "JKS",
         "-srcstorepass", STORE_PASSWORD, "-destkeystore", str(d / "gen.p12"),
         "-deststoretype", "PKCS12", "-deststorepass", STORE_PASSWORD, "-noprompt"],
        *[["-exportcert", "-alias", alias, "-file", str(d / f"{alias}.der"), "-keystore",
           str(d / "gen.jks"), "-storepass", STORE_PASSWORD] for alias in ("rsa", "ec")],
    ])
    listing = subprocess.run(
        [tool, "-list", "-v", "-keystore", str(d / "gen.jks"), "-storepass", STORE_PASSWORD],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    return JavaStores(
        d, d / "store.jks", d / "store.jceks", d / "java.p12", d / "keypass.jks", d / "gen.jks",
        d / "gen.p12", {a: (d / f"{a}.der").read_bytes() for a in ("rsa", "ec")}, listing,
        d / "cacerts", d / "trust.p12", d / "secret.jceks",
    )


# ---------------------------------------------------------------------------
# Reading: every format gives back the originals
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["store.jks", "store.jceks", "java.p12"])
def test_keytool_stores_round_trip(javaStores, material, name):
    m = material
    store = loadKeyStore(str(javaStores.dir / name), STORE_PASSWORD)
    assert store.format == {"store.jks": "JKS", "store.jceks": "JCEKS", "java.p12": "PKCS12"}[name]
    assert [e.alias for e in store.keys] == ["client"]
    assertEntry(store.keyEntry(), m.rsaKey, [m.rsaLeaf, m.inter, m.root])
    assertEntry(store.keyEntry("client"), m.rsaKey, [m.rsaLeaf, m.inter, m.root])
    expectedTrusted = [] if name == "store.jceks" else [("rootca", m.root.public_bytes(DER))]
    assert [(a, c.public_bytes(DER)) for a, c in store.trusted] == expectedTrusted
    assert ders(store.certificates()) == ders([m.rsaLeaf, m.inter, m.root])


def test_java_stores_without_store_password_skip_the_integrity_check(javaStores, material):
    """As Java: no store password, no integrity check; keys still need their password."""
    for path in (javaStores.jks, javaStores.jceks):
        store = loadKeyStore(str(path), None, STORE_PASSWORD)
        assertEntry(store.keyEntry(), material.rsaKey, [material.rsaLeaf, material.inter, material.root])
        expectError(path, None, None, "'client'", "password is needed")
    trust = loadKeyStore(str(javaStores.cacerts), None)
    assert sorted(a for a, _ in trust.trusted) == ["interca", "otherca", "rootca"]  # Java's order: a hash's


def test_jks_key_password_differs_from_store_password(javaStores, material):
    path = javaStores.keyPassJks
    store = loadKeyStore(str(path), STORE_PASSWORD, KEY_PASSWORD)
    assertEntry(store.keyEntry(), material.rsaKey, [material.rsaLeaf, material.inter, material.root])
    expectError(path, STORE_PASSWORD, None, "'client'", "wrong key password or corrupted")
    expectError(path, KEY_PASSWORD, KEY_PASSWORD, "wrong password or corrupted")


def test_keytool_generated_keys_equal_javas_own_pkcs12_export(javaStores):
    """
    Keys made by keytool: our JKS reader agrees with keytool's own conversion
    to PKCS#12 (decrypted by cryptography) and with keytool -exportcert.
    """
    jks = loadKeyStore(str(javaStores.genJks), STORE_PASSWORD)
    p12 = loadKeyStore(str(javaStores.genP12), STORE_PASSWORD)
    assert sorted(e.alias for e in jks.keys) == ["ec", "rsa"]
    assert sorted(e.alias for e in p12.keys) == ["ec", "rsa"]
    for alias in ("rsa", "ec"):
        fromJks, fromP12 = jks.keyEntry(alias), p12.keyEntry(alias)
        assert pkcs8(fromJks.key) == pkcs8(fromP12.key)
        assert ders(fromJks.chain) == ders(fromP12.chain) == [javaStores.genCerts[alias]]
    assert keystore.keyDescription(jks.keyEntry("rsa").key) == "RSA 2048"
    assert keystore.keyDescription(jks.keyEntry("ec").key) == "EC secp256r1"
    assert jks.trusted == () and p12.trusted == ()


def test_fingerprint_matches_keytool(javaStores):
    store = loadKeyStore(str(javaStores.genJks), STORE_PASSWORD)
    for entry in store.keys:
        printed = keystore.fingerprint(entry.certificate)
        assert f"SHA256: {printed}\n" in javaStores.genListing
    facts = keystore.describe(store.keyEntry("rsa").certificate)
    assert facts["serialNumber"] == REGISTRATION_NUMBER
    assert facts["sans"] == ["DNS:gen.example", "IP:10.9.8.7"]


@pytest.mark.parametrize("name", ["cacerts", "trust.p12"])
def test_keytool_trust_only_stores(javaStores, material, name):
    password = "changeit" if name == "cacerts" else STORE_PASSWORD
    store = loadKeyStore(str(javaStores.dir / name), password)
    assert store.keys == ()
    expected = {"rootca": material.root, "interca": material.inter, "otherca": material.otherRoot,
                "other": material.otherRoot}
    assert len(store.trusted) == (3 if name == "cacerts" else 2)
    for alias, cert in store.trusted:
        assert cert.public_bytes(DER) == expected[alias].public_bytes(DER)
    with pytest.raises(KeyStoreError, match="no private-key entry"):
        store.keyEntry()


def test_system_java_cacerts():
    """The JDK's own trust store, where there is one (Debian: JKS, changeit)."""
    path = Path("/etc/ssl/certs/java/cacerts")
    if not path.exists():
        pytest.skip("no system Java trust store")
    store = loadKeyStore(str(path), "changeit")
    assert store.keys == () and len(store.trusted) > 50
    assert len({a for a, _ in store.trusted}) == len(store.trusted)


def test_jks_version_1(tmp_path, javaStores, material):
    """Version 1 stores (no certificate type strings) are read too."""
    data = javaStores.cacerts.read_bytes()
    count = struct.unpack(">I", data[8:12])[0]
    pos, body = 12, bytearray(b"\xfe\xed\xfe\xed" + struct.pack(">II", 1, count))
    for _ in range(count):
        tag, aliasLength = struct.unpack(">IH", data[pos:pos + 6])
        assert tag == 2
        aliasEnd = pos + 6 + aliasLength
        body += data[pos:aliasEnd + 8]  # tag, alias, date
        typeLength = struct.unpack(">H", data[aliasEnd + 8:aliasEnd + 10])[0]
        certStart = aliasEnd + 10 + typeLength
        certLength = struct.unpack(">I", data[certStart:certStart + 4])[0]
        body += data[certStart:certStart + 4 + certLength]
        pos = certStart + 4 + certLength
    import hashlib

    digest = hashlib.sha1("changeit".encode("utf-16-be") + b"Mighty Aphrodite" + bytes(body)).digest()
    path = tmp_path / "v1.jks"
    path.write_bytes(bytes(body) + digest)
    store = loadKeyStore(str(path), "changeit")
    assert store.format == "JKS"
    trusted = {a: c.public_bytes(DER) for a, c in store.trusted}
    assert trusted == {"rootca": material.root.public_bytes(DER), "interca": material.inter.public_bytes(DER),
                       "otherca": material.otherRoot.public_bytes(DER)}
    expectError(path, "changeme", None, "wrong password or corrupted")


def test_cryptography_pkcs12_round_trip(cryptoStores, material):
    m = material
    store = loadKeyStore(str(cryptoStores["modern.p12"]), STORE_PASSWORD)
    assert store.format == "PKCS12" and store.keyEntry().alias == "client"
    assertEntry(store.keyEntry(), m.rsaKey, [m.rsaLeaf, m.inter, m.root])
    assert store.trusted == ()
    store = loadKeyStore(str(cryptoStores["legacy.p12"]), STORE_PASSWORD)
    assertEntry(store.keyEntry("ec"), m.ecKey, [m.ecLeaf, m.inter])
    store = loadKeyStore(str(cryptoStores["open.p12"]), None)
    assertEntry(store.keyEntry(), m.ecKey, [m.ecLeaf, m.inter, m.root])
    assert store.keyEntry().alias == "key"
    # An unprotected store opens whatever password is configured (as in Java).
    store = loadKeyStore(str(cryptoStores["open.p12"]), STORE_PASSWORD)
    assertEntry(store.keyEntry(), m.ecKey, [m.ecLeaf, m.inter, m.root])
    store = loadKeyStore(str(cryptoStores["trust.p12"]), STORE_PASSWORD)
    assert store.keys == ()
    assert [(a, c.public_bytes(DER)) for a, c in store.trusted] == [
        ("rootca", m.root.public_bytes(DER)), ("other", m.otherRoot.public_bytes(DER))]


def test_pem_round_trip(cryptoStores, material):
    m = material
    store = loadKeyStore(str(cryptoStores["bundle.pem"]), None, KEY_PASSWORD)
    assert store.format == "PEM"
    assertEntry(store.keyEntry(), m.rsaKey, [m.rsaLeaf, m.inter, m.root])
    assert ders(c for _, c in store.trusted) == ders([m.otherRoot])
    # The store password decrypts PEM keys when no key password is given.
    assertEntry(loadKeyStore(str(cryptoStores["bundle.pem"]), KEY_PASSWORD).keyEntry(),
                m.rsaKey, [m.rsaLeaf, m.inter, m.root])
    for password in (None, STORE_PASSWORD):  # a password for an unencrypted key does no harm
        store = loadKeyStore(str(cryptoStores["traditional.pem"]), password)
        assertEntry(store.keyEntry(), m.ecKey, [m.ecLeaf, m.inter])
    store = loadKeyStore(str(cryptoStores["rsa-traditional.pem"]), KEY_PASSWORD)
    assertEntry(store.keyEntry(), m.rsaKey, [m.rsaLeaf])
    store = loadKeyStore(str(cryptoStores["two-keys.pem"]), None)
    assertEntry(store.keyEntry("key-1"), m.rsaKey, [m.rsaLeaf, m.inter])
    assertEntry(store.keyEntry("key-2"), m.ecKey, [m.ecLeaf])  # the intermediate went to key-1
    store = loadKeyStore(str(cryptoStores["cas.pem"]), None)
    assert store.keys == () and ders(c for _, c in store.trusted) == ders([m.root, m.otherRoot])
    store = loadKeyStore(str(cryptoStores["root.der"]), None)
    assert store.format == "DER" and ders(c for _, c in store.trusted) == ders([m.root])


def test_format_is_recognised_by_content_not_name(tmp_path, cryptoStores, javaStores):
    misnamed = {
        "looks-like.pem": javaStores.jks, "looks-like.jks": cryptoStores["modern.p12"],
        "looks-like.p12": cryptoStores["traditional.pem"], "looks-like.crt": javaStores.jceks,
    }
    formats = {}
    for name, source in misnamed.items():
        (tmp_path / name).write_bytes(source.read_bytes())
        formats[name] = loadKeyStore(str(tmp_path / name), STORE_PASSWORD
                                     if name != "looks-like.p12" else None).format
    assert formats == {"looks-like.pem": "JKS", "looks-like.jks": "PKCS12",
                       "looks-like.p12": "PEM", "looks-like.crt": "JCEKS"}


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["store.jks", "store.jceks", "java.p12"])
def test_wrong_store_password(javaStores, name):
    expectError(javaStores.dir / name, WRONG_PASSWORD, None, "wrong password or corrupted")


def test_wrong_key_password_in_java_stores(javaStores):
    for path in (javaStores.jks, javaStores.jceks):
        expectError(path, None, WRONG_PASSWORD, "'client'", "wrong key password or corrupted")


def test_wrong_or_missing_password_pkcs12_and_pem(cryptoStores):
    expectError(cryptoStores["modern.p12"], WRONG_PASSWORD, None, "wrong password or corrupted")
    expectError(cryptoStores["modern.p12"], None, None, "password is needed")
    expectError(cryptoStores["bundle.pem"], WRONG_PASSWORD, None, "wrong password or corrupted")
    expectError(cryptoStores["bundle.pem"], None, None, "encrypted: a password is needed")


def test_jceks_secret_key_entries_are_refused(javaStores):
    expectError(javaStores.secretJceks, STORE_PASSWORD, None, "secret-key entry 'aes'", "not supported")


@pytest.mark.parametrize("name", ["store.jks", "store.jceks", "java.p12", "cacerts"])
def test_truncated_java_and_pkcs12_stores(tmp_path, javaStores, name):
    data = (javaStores.dir / name).read_bytes()
    password = "changeit" if name == "cacerts" else STORE_PASSWORD
    for cut in (5, 13, 40, len(data) // 2, len(data) - 21, len(data) - 1):
        path = tmp_path / f"cut{cut}"
        path.write_bytes(data[:cut])
        expectError(path, password, None)
    path = tmp_path / "longer"
    path.write_bytes(data + b"\0")
    expectError(path, password, None, "corrupted")


def test_corrupted_jks_fails_the_integrity_check_at_any_byte(tmp_path, javaStores):
    """With the store password, every single-byte change is caught."""
    data = javaStores.jks.read_bytes()
    rng = random.Random(1234)
    positions = sorted({rng.randrange(12, len(data)) for _ in range(60)} | {len(data) - 1})
    for pos in positions:
        damaged = bytearray(data)
        damaged[pos] ^= 1 << rng.randrange(8)
        path = tmp_path / "damaged.jks"
        path.write_bytes(bytes(damaged))
        expectError(path, STORE_PASSWORD, None)


def test_corrupted_stores_without_password_give_clean_errors(tmp_path, javaStores, cryptoStores):
    """No integrity check: damage gives a KeyStoreError or a store, never a crash."""
    rng = random.Random(99)
    for source, keyPassword in ((javaStores.jks, STORE_PASSWORD), (javaStores.jceks, STORE_PASSWORD),
                                (cryptoStores["traditional.pem"], None)):
        data = source.read_bytes()
        for _ in range(40):
            damaged = bytearray(data)
            for _ in range(rng.randrange(1, 4)):
                damaged[rng.randrange(4, len(data))] = rng.randrange(256)
            path = tmp_path / "damaged"
            path.write_bytes(bytes(damaged))
            try:
                loadKeyStore(str(path), None, keyPassword)
            except KeyStoreError as e:
                assert str(path) in str(e)
                assertNoSecret(str(e))
    # Damage inside the encrypted key is caught by the key protector's check digest.
    data = bytearray(javaStores.jks.read_bytes())
    data[data.index(b"client") + 6 + 8 + 4 + 40] ^= 0x01
    path = tmp_path / "key-damaged.jks"
    path.write_bytes(bytes(data))
    expectError(path, None, STORE_PASSWORD, "'client'", "wrong key password or corrupted")


def test_unknown_formats_and_unreadable_files(tmp_path, material):
    samples = {
        "random": random.Random(5).randbytes(300),
        "text": b"hello, this is not a key store\n",
        "zip": b"PK\x03\x04" + b"\0" * 60,
        "der-sequence": b"\x30\x03\x02\x01\x05",
        "csr-ish": b"\x30\x82\x01\x00" + b"\0" * 256,
    }
    for name, data in samples.items():
        (tmp_path / name).write_bytes(data)
        expectError(tmp_path / name, STORE_PASSWORD, None, "unknown key store format")
    (tmp_path / "empty").write_bytes(b"")
    expectError(tmp_path / "empty", None, None, "empty file")
    expectError(tmp_path / "missing.jks", None, None, "cannot read key store")
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "lonely-key.pem").write_bytes(pkcs8_pem(key))
    expectError(tmp_path / "lonely-key.pem", None, None, "no matching certificate")
    (tmp_path / "broken.pem").write_bytes(material.root.public_bytes(PEM)[:-30])
    expectError(tmp_path / "broken.pem", None, None, "corrupted PEM")
    (tmp_path / "csr.pem").write_bytes(b"-----BEGIN CERTIFICATE REQUEST-----\nMAA=\n-----END CERTIFICATE REQUEST-----\n")
    expectError(tmp_path / "csr.pem", None, None, "CERTIFICATE REQUEST, not a key or certificate")


def test_ambiguous_and_missing_alias(javaStores, cryptoStores):
    store = loadKeyStore(str(javaStores.genJks), STORE_PASSWORD)
    with pytest.raises(KeyStoreError) as info:
        store.keyEntry()
    assert str(javaStores.genJks) in str(info.value)
    assert "'rsa'" in str(info.value) and "'ec'" in str(info.value) and "choose one" in str(info.value)
    assert store.keyEntry("RSA").alias == "rsa"  # Java aliases ignore case
    with pytest.raises(KeyStoreError, match="no private-key entry with alias 'nope'"):
        store.keyEntry("nope")
    with pytest.raises(KeyStoreError, match="choose one"):
        keystore.writePem(store, javaStores.dir / "never")
    assert not (javaStores.dir / "never" / "key.pem").exists()


# ---------------------------------------------------------------------------
# Passwords
# ---------------------------------------------------------------------------


def test_resolve_password(tmp_path, monkeypatch):
    monkeypatch.setenv("MDP_TEST_PW", STORE_PASSWORD)
    assert keystore.resolvePassword("env:MDP_TEST_PW") == STORE_PASSWORD
    monkeypatch.delenv("MDP_TEST_PW")
    with pytest.raises(KeyStoreError, match="MDP_TEST_PW is not set"):
        keystore.resolvePassword("env:MDP_TEST_PW")
    secretFile = tmp_path / "pw"
    secretFile.write_text(f"{STORE_PASSWORD}\r\nsecond line\n")
    assert keystore.resolvePassword(f"file:{secretFile}") == STORE_PASSWORD
    secretFile.write_text(f"{STORE_PASSWORD}")
    assert keystore.resolvePassword(f"file:{secretFile}") == STORE_PASSWORD
    secretFile.write_text(" spaced \x0cand\x1c\n")
    assert keystore.resolvePassword(f"file:{secretFile}") == " spaced \x0cand\x1c"
    secretFile.write_text("")
    assert keystore.resolvePassword(f"file:{secretFile}") == ""
    with pytest.raises(KeyStoreError) as info:
        keystore.resolvePassword(f"file:{tmp_path / 'absent'}")
    assert str(tmp_path / "absent") in str(info.value)
    assert keystore.resolvePassword(STORE_PASSWORD) == STORE_PASSWORD
    assert keystore.resolvePassword("pass:env:HOME") == "env:HOME"


# ---------------------------------------------------------------------------
# Describing
# ---------------------------------------------------------------------------


def test_describe(material):
    cert = material.rsaLeaf
    facts = keystore.describe(cert, now=cert.not_valid_after_utc - datetime.timedelta(days=10, hours=12))
    assert facts["subject"] == cert.subject.rfc4514_string()
    assert facts["issuer"] == material.inter.subject.rfc4514_string()
    assert facts["sans"] == ["DNS:client.example", "IP:10.1.2.3"]
    assert facts["serialNumber"] == REGISTRATION_NUMBER
    assert facts["serial"] == format(cert.serial_number, "X")
    assert facts["fingerprint"] == ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))
    assert facts["notAfter"] == cert.not_valid_after_utc
    assert facts["daysToExpiry"] == 10
    assert keystore.daysToExpiry(cert, cert.not_valid_after_utc + datetime.timedelta(hours=1)) == -1
    assert keystore.daysToExpiry(cert, (cert.not_valid_after_utc - datetime.timedelta(days=3))
                                 .replace(tzinfo=None)) == 3
    assert keystore.describe(material.root)["serialNumber"] is None


# ---------------------------------------------------------------------------
# Writing PEM
# ---------------------------------------------------------------------------


def test_write_pem_from_every_format_is_byte_for_byte(tmp_path, javaStores, cryptoStores, material):
    m = material
    expectedKey = pkcs8_pem(m.rsaKey)
    sources = [(javaStores.jks, STORE_PASSWORD, None), (javaStores.jceks, STORE_PASSWORD, None),
               (javaStores.javaP12, STORE_PASSWORD, None), (javaStores.keyPassJks, STORE_PASSWORD, KEY_PASSWORD),
               (cryptoStores["modern.p12"], STORE_PASSWORD, None), (cryptoStores["bundle.pem"], KEY_PASSWORD, None)]
    for index, (source, password, keyPassword) in enumerate(sources):
        out = tmp_path / f"out{index}"
        written = keystore.writePem(loadKeyStore(str(source), password, keyPassword), out)
        names = [p.name for p in written]
        assert names[:3] == ["key.pem", "chain.pem", "root.pem"], source
        assert (out / "key.pem").read_bytes() == expectedKey
        assert stat.S_IMODE((out / "key.pem").stat().st_mode) == 0o600
        assert (out / "chain.pem").read_bytes() == m.rsaLeaf.public_bytes(PEM) + m.inter.public_bytes(PEM)
        assert (out / "root.pem").read_bytes() == m.root.public_bytes(PEM)
        trusted = {"store.jks": m.root, "java.p12": m.root, "bundle.pem": m.otherRoot}.get(source.name)
        if trusted is None:
            assert names == ["key.pem", "chain.pem", "root.pem"]
        else:
            assert names[3:] == ["ca.pem"] and (out / "ca.pem").read_bytes() == trusted.public_bytes(PEM)
        # What was written reads back as the same store.
        again = tmp_path / f"again{index}.pem"
        again.write_bytes(b"".join(p.read_bytes() for p in written if p.name != "ca.pem"))
        assertEntry(loadKeyStore(str(again), None).keyEntry(), m.rsaKey, [m.rsaLeaf, m.inter, m.root])
    out = tmp_path / "trust-only"
    assert keystore.writePem(loadKeyStore(str(javaStores.cacerts), "changeit"), out) == [out / "ca.pem"]
    blocks = (out / "ca.pem").read_bytes().replace(b"-----\n-----", b"-----\n\0-----").split(b"\0")
    assert sorted(blocks) == sorted(c.public_bytes(PEM) for c in (m.root, m.inter, m.otherRoot))


def test_write_pem_key_is_created_0600_and_never_chmod(tmp_path, cryptoStores, monkeypatch):
    store = loadKeyStore(str(cryptoStores["traditional.pem"]), None)
    created = {}
    realOpen = os.open

    def recordingOpen(path, flags, mode=0o777, *args, **kwargs):
        created[Path(path).name] = (flags, mode)
        return realOpen(path, flags, mode, *args, **kwargs)

    def noChmod(*args, **kwargs):
        raise AssertionError("chmod after creation")

    monkeypatch.setattr(os, "open", recordingOpen)
    monkeypatch.setattr(os, "chmod", noChmod)
    monkeypatch.setattr(os, "fchmod", noChmod)
    old = os.umask(0)
    try:
        keystore.writePem(store, tmp_path / "out")
    finally:
        os.umask(old)
    flags, mode = created["key.pem"]
    assert mode == 0o600 and flags & os.O_CREAT and flags & os.O_EXCL
    assert stat.S_IMODE((tmp_path / "out" / "key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "out" / "chain.pem").stat().st_mode) == 0o644


def test_write_pem_refuses_to_overwrite_unless_forced(tmp_path, cryptoStores, material):
    out = tmp_path / "out"
    out.mkdir()
    (out / "chain.pem").write_bytes(b"precious")
    store = loadKeyStore(str(cryptoStores["traditional.pem"]), None)
    with pytest.raises(KeyStoreError, match="already exists"):
        keystore.writePem(store, out)
    assert sorted(p.name for p in out.iterdir()) == ["chain.pem"]  # nothing half-written
    assert (out / "chain.pem").read_bytes() == b"precious"
    keystore.writePem(store, out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["chain.pem", "key.pem"]  # no temporary files left
    assert (out / "chain.pem").read_bytes() == material.ecLeaf.public_bytes(PEM) + material.inter.public_bytes(PEM)
    (out / "key.pem").chmod(0o644)
    keystore.writePem(store, out, force=True)
    assert stat.S_IMODE((out / "key.pem").stat().st_mode) == 0o600


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------


def runCli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_show(capsys, javaStores, cryptoStores, material, monkeypatch):
    monkeypatch.setenv("MDP_STORE_PW", STORE_PASSWORD)
    code, out, err = runCli(capsys, "keystore", "show", str(javaStores.jks), "--password", "env:MDP_STORE_PW")
    assert (code, err) == (0, "")
    assert "JKS, 1 private-key entry, 1 trusted certificate" in out
    assert "alias client: private key (RSA 2048), chain of 3" in out
    assert "alias rootca: trusted certificate" in out
    assert "DNS:client.example, IP:10.1.2.3" in out
    assert f"serialNumber: {REGISTRATION_NUMBER}" in out
    for cert in (material.rsaLeaf, material.inter, material.root):
        assert keystore.fingerprint(cert) in out
    assert "WARNING" not in out
    assertNoSecret(out)

    code, out, err = runCli(capsys, "keystore", "show", str(cryptoStores["soon.pem"]))
    assert code == 0
    assert "days  WARNING: expires in under 30 days" in out.split("[1]")[0]
    assert out.count("WARNING") == 1  # the intermediate is fine


def test_cli_password_from_environment_default(capsys, javaStores, monkeypatch):
    monkeypatch.setenv(cli.PASSWORD_VARIABLE, STORE_PASSWORD)
    code, out, err = runCli(capsys, "keystore", "show", str(javaStores.javaP12))
    assert code == 0 and "PKCS12" in out
    monkeypatch.delenv(cli.PASSWORD_VARIABLE)
    code, out, err = runCli(capsys, "keystore", "show", str(javaStores.javaP12))
    assert code == 2 and "password is needed" in err


def test_cli_convert(tmp_path, capsys, javaStores, material):
    pwFile = tmp_path / "pw"
    pwFile.write_text(STORE_PASSWORD + "\n")
    keyPwFile = tmp_path / "keypw"
    keyPwFile.write_text(KEY_PASSWORD + "\n")
    out = tmp_path / "pem"
    code, stdout, err = runCli(capsys, "keystore", "convert", str(javaStores.keyPassJks), "--out", str(out),
                               "--password", f"file:{pwFile}", "--key-password", f"file:{keyPwFile}")
    assert (code, err) == (0, "")
    assert stdout.splitlines() == [f"wrote {out / n}" for n in ("key.pem", "chain.pem", "root.pem")]
    assert (out / "key.pem").read_bytes() == pkcs8_pem(material.rsaKey)
    assert stat.S_IMODE((out / "key.pem").stat().st_mode) == 0o600
    # Again: refused without --force, done with it.
    code, stdout, err = runCli(capsys, "keystore", "convert", str(javaStores.keyPassJks), "--out", str(out),
                               "--password", f"file:{pwFile}", "--key-password", f"file:{keyPwFile}")
    assert code == 2 and err.startswith("error: ") and "already exists" in err and err.count("\n") == 1
    code, stdout, err = runCli(capsys, "keystore", "convert", str(javaStores.keyPassJks), "--out", str(out),
                               "--password", f"file:{pwFile}", "--key-password", f"file:{keyPwFile}",
                               "--force")
    assert code == 0
    # Several keys: --alias chooses.
    code, stdout, err = runCli(capsys, "keystore", "convert", str(javaStores.genJks), "--out",
                               str(tmp_path / "gen"), "--password", STORE_PASSWORD)
    assert code == 2 and "choose one by alias" in err and err.count("\n") == 1
    code, stdout, err = runCli(capsys, "keystore", "convert", str(javaStores.genJks), "--out",
                               str(tmp_path / "gen"), "--password", STORE_PASSWORD, "--alias", "ec")
    assert code == 0
    assert (tmp_path / "gen" / "chain.pem").read_bytes() == x509.load_der_x509_certificate(
        javaStores.genCerts["ec"]).public_bytes(PEM)


def test_cli_errors_are_one_line_without_passwords(tmp_path, capsys, javaStores, monkeypatch):
    cases = [
        ["keystore", "show", str(javaStores.jks), "--password", WRONG_PASSWORD],
        ["keystore", "show", str(javaStores.jks), "--password", STORE_PASSWORD, "--key-password",
         WRONG_PASSWORD],
        ["keystore", "convert", str(javaStores.jceks), "--out", str(tmp_path / "x"), "--password",
         WRONG_PASSWORD],
        ["keystore", "show", str(javaStores.jks), "--password", "env:MDP_UNSET_VARIABLE"],
        ["keystore", "show", str(tmp_path / "absent.jks")],
    ]
    monkeypatch.delenv("MDP_UNSET_VARIABLE", raising=False)
    for argv in cases:
        code, out, err = runCli(capsys, *argv)
        assert code == 2, argv
        assert out == "" and err.startswith("error: ") and err.count("\n") == 1, err
        assertNoSecret(err)
    assert not (tmp_path / "x").exists()


def test_cli_check_config_still_works(capsys):
    config = Path(__file__).resolve().parents[2] / "etc" / "mydataproxy.toml"
    code, out, err = runCli(capsys, "check-config", str(config))
    assert code == 0 and ": OK" in out
