"""
Key stores in, PEM out.

Users of the Java product bring Java key stores; this module reads them and
the other usual containers into one shape, L{KeyStore}, that the daemon and
the C{mydataproxy keystore} command use:

  - B{JKS} (magic C{0xFEEDFEED}, versions 1 and 2): read by our own reader of
    the format that C{sun.security.provider.JavaKeyStore} writes.  Private
    keys are protected by Sun's "JKS key protector" (a SHA-1 key stream XORed
    over the PKCS#8 encoding, 20-byte salt, SHA-1 check digest); the whole
    store is protected by SHA-1(password as UTF-16BE + C{b"Mighty Aphrodite"}
    + body), verified whenever a store password is given (as Java does).
  - B{JCEKS} (magic C{0xCECECECE}): same layout; private keys under Sun's
    C{PBEWithMD5AndTripleDES}.  Secret-key entries (serialised Java objects)
    are refused with a clear error.
  - B{PKCS#12}: through C{cryptography}; several private keys per file and
    trust-only stores (certificates without keys, as Java writes them with
    its trusted-certificate bag attribute) are supported.
  - B{PEM}: any mix of private keys (PKCS#8 or traditional, optionally
    encrypted) and certificates; a lone B{DER} certificate is accepted too.

The format is recognised from the content (magic bytes, ASN.1 structure, PEM
armour), never from the file name.  Passwords never appear in errors.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import math
import os
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtensionOID, NameOID

__all__ = [
    "KeyEntry",
    "KeyStore",
    "KeyStoreError",
    "daysToExpiry",
    "describe",
    "fingerprint",
    "keyDescription",
    "loadKeyStore",
    "resolvePassword",
    "writePem",
]

#: Key stores are small (a JDK cacerts is ~200 KB); refuse anything absurd.
MAX_STORE_SIZE = 32 * 1024 * 1024

#: Upper bound on the PBE iteration count of a JCEKS key (Java's own limit).
MAX_JCEKS_ITERATIONS = 5_000_000

#: A chain longer than this is not a chain but a loop or an attack.
MAX_CHAIN_LENGTH = 16

JKS_MAGIC = b"\xfe\xed\xfe\xed"
JCEKS_MAGIC = b"\xce\xce\xce\xce"

# Tags of the entries in JKS and JCEKS stores.
_PRIVATE_KEY_ENTRY = 1
_TRUSTED_CERT_ENTRY = 2
_SECRET_KEY_ENTRY = 3  # JCEKS only


class KeyStoreError(Exception):
    """
    A key store could not be read, or an entry asked of it does not exist.

    The message names the file and the problem; it never contains a password.
    """


@dataclass(frozen=True)
class KeyEntry:
    """
    A private key and its certificate chain.

    @ivar alias: the entry's name in the store (Java alias, PKCS#12 friendly
        name; C{"key"} or C{"key-N"} where the store has no names).
    @ivar key: the private key.
    @ivar chain: certificates, leaf first, then each certificate's issuer as
        found in the store.
    """

    alias: str
    key: PrivateKeyTypes
    chain: tuple[x509.Certificate, ...]

    @property
    def certificate(self) -> x509.Certificate:
        """
        @return: the leaf certificate, the one for C{key}.
        """
        return self.chain[0]


@dataclass(frozen=True)
class KeyStore:
    """
    The content of a key store, whatever its format.

    @ivar source: the file it was read from.
    @ivar format: C{"JKS"}, C{"JCEKS"}, C{"PKCS12"}, C{"PEM"} or C{"DER"}.
    @ivar keys: the private-key entries.
    @ivar trusted: the trusted-certificate entries as C{(alias, certificate)};
        for PKCS#12 and PEM, every certificate that is not part of a key's chain.
    """

    source: str
    format: str
    keys: tuple[KeyEntry, ...]
    trusted: tuple[tuple[str, x509.Certificate], ...]

    def keyEntry(self, alias: str | None = None) -> KeyEntry:
        """
        One private-key entry.

        @param alias: the entry's alias; matched exactly, else without regard
            to case (Java's JKS and PKCS#12 aliases are case-insensitive).
            C{None} asks for the store's only key entry.
        @return: the entry.
        @raise KeyStoreError: there is no such entry, or C{alias} is C{None}
            and the store holds no key or several.
        """
        if alias is None:
            if len(self.keys) == 1:
                return self.keys[0]
            if not self.keys:
                raise KeyStoreError(f"{self.source}: no private-key entry in this {self.format} store")
            names = ", ".join(repr(entry.alias) for entry in self.keys)
            raise KeyStoreError(
                f"{self.source}: {len(self.keys)} private-key entries ({names}); choose one by alias"
            )
        for entry in self.keys:
            if entry.alias == alias:
                return entry
        folded = [entry for entry in self.keys if entry.alias.casefold() == alias.casefold()]
        if len(folded) == 1:
            return folded[0]
        names = ", ".join(repr(entry.alias) for entry in self.keys) or "none"
        raise KeyStoreError(
            f"{self.source}: no private-key entry with alias {alias!r} (private-key entries: {names})"
        )

    def certificates(self) -> list[x509.Certificate]:
        """
        @return: every certificate in the store, once each: the key entries'
            chains first, then the trusted certificates.
        """
        seen: set[bytes] = set()
        result: list[x509.Certificate] = []
        for cert in [c for entry in self.keys for c in entry.chain] + [c for _, c in self.trusted]:
            der = cert.public_bytes(serialization.Encoding.DER)
            if der not in seen:
                seen.add(der)
                result.append(cert)
        return result


# ---------------------------------------------------------------------------
# Passwords
# ---------------------------------------------------------------------------


def resolvePassword(spec: str) -> str:
    """
    Turn a password setting from the config or the command line into the
    password.

    @param spec: C{env:NAME} (the value of environment variable C{NAME}),
        C{file:PATH} (the first line of that file, without its line end),
        C{pass:TEXT} (C{TEXT} literally, for passwords that begin with
        C{env:} or C{file:}), or anything else: the password itself.
    @return: the password.
    @raise KeyStoreError: the variable is not set or the file cannot be read;
        the message names the variable or the file, never a value.
    """
    if spec.startswith("env:"):
        name = spec[4:]
        if not name:
            raise KeyStoreError("password spec 'env:' names no environment variable")
        value = os.environ.get(name)
        if value is None:
            raise KeyStoreError(f"password environment variable {name} is not set")
        return value
    if spec.startswith("file:"):
        path = spec[5:]
        if not path:
            raise KeyStoreError("password spec 'file:' names no file")
        try:
            with open(path, "rb") as f:
                raw = f.read(64 * 1024)
        except OSError as e:
            raise KeyStoreError(f"cannot read password file {path}: {e.strerror or e}") from None
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise KeyStoreError(f"password file {path} is not UTF-8 text") from None
        line = text.split("\n", 1)[0]
        return line[:-1] if line.endswith("\r") else line
    if spec.startswith("pass:"):
        return spec[5:]
    return spec


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def loadKeyStore(path: str, password: str | None, keyPassword: str | None = None) -> KeyStore:
    """
    Read a key store of any supported format, recognised by its content.

    @param path: the file.
    @param password: the store password; C{None} for none.  For JKS and
        JCEKS without a password the integrity check is skipped, as Java
        does.  For PEM it decrypts encrypted keys when C{keyPassword} is not
        given.
    @param keyPassword: the private keys' password where it differs from the
        store password (JKS, JCEKS, PEM); defaults to C{password}, as in Java.
    @return: the store's entries.
    @raise KeyStoreError: unreadable, unknown format, wrong password,
        truncated or corrupted content; the message names the file.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_STORE_SIZE + 1)
    except OSError as e:
        raise KeyStoreError(f"{path}: cannot read key store: {e.strerror or e}") from None
    if len(data) > MAX_STORE_SIZE:
        raise KeyStoreError(f"{path}: larger than {MAX_STORE_SIZE} bytes, not a key store")
    if not data.strip():
        raise KeyStoreError(f"{path}: empty file, not a key store")
    if keyPassword is None:
        keyPassword = password
    if data.startswith(JKS_MAGIC):
        return _loadJavaStore(path, data, "JKS", password, keyPassword)
    if data.startswith(JCEKS_MAGIC):
        return _loadJavaStore(path, data, "JCEKS", password, keyPassword)
    if _looksLikePkcs12(data):
        return _loadPkcs12(path, data, password if password is not None else keyPassword)
    if b"-----BEGIN " in data:
        return _loadPem(path, data, keyPassword)
    if data[:1] == b"\x30":
        try:
            cert = _loadDerCert(data)
        except ValueError:
            pass
        else:
            return KeyStore(path, "DER", (), ((_certAlias(cert, 1), cert),))
    raise KeyStoreError(f"{path}: unknown key store format (not JKS, JCEKS, PKCS#12, PEM or a DER certificate)")


# -- JKS and JCEKS -----------------------------------------------------------


class _Truncated(Exception):
    """The data ends early, or is malformed where the format is rigid."""


class _Reader:
    """Java C{DataInputStream} over bytes, with bounds checks."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise _Truncated()
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u32(self) -> int:
        return struct.unpack(">I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack(">Q", self.take(8))[0]

    def utf(self) -> str:
        """Java's C{readUTF}: 2-byte length, then modified UTF-8."""
        (length,) = struct.unpack(">H", self.take(2))
        raw = self.take(length).replace(b"\xc0\x80", b"\x00")
        # Modified UTF-8 encodes characters outside the BMP as two encoded
        # surrogates; pair them up through UTF-16.
        try:
            text = raw.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise _Truncated() from None  # Java: UTFDataFormatException
        return text.encode("utf-16-be", "surrogatepass").decode("utf-16-be", "replace")


@dataclass
class _RawKey:
    alias: str
    protected: bytes  # DER EncryptedPrivateKeyInfo
    chain: list[bytes]


def _loadJavaStore(
    path: str, data: bytes, kind: str, password: str | None, keyPassword: str | None
) -> KeyStore:
    reader = _Reader(data)
    rawKeys: list[_RawKey] = []
    rawTrusted: list[tuple[str, bytes]] = []
    try:
        reader.take(4)
        version = reader.u32()
        if kind == "JKS" and version not in (1, 2) or kind == "JCEKS" and version != 2:
            raise KeyStoreError(f"{path}: unsupported {kind} version {version}")
        count = reader.u32()
        for _ in range(count):
            tag = reader.u32()
            alias = reader.utf()
            reader.u64()  # creation date, milliseconds since the epoch
            if tag == _PRIVATE_KEY_ENTRY:
                protected = reader.take(reader.u32())
                chain = [_readJavaCert(reader, version, path, alias) for _ in range(reader.u32())]
                rawKeys.append(_RawKey(alias, protected, chain))
            elif tag == _TRUSTED_CERT_ENTRY:
                rawTrusted.append((alias, _readJavaCert(reader, version, path, alias)))
            elif tag == _SECRET_KEY_ENTRY and kind == "JCEKS":
                raise KeyStoreError(
                    f"{path}: JCEKS secret-key entry {alias!r} is not supported (only private keys "
                    "and certificates are); export the private key entries with keytool -importkeystore "
                    "-srcalias ALIAS -deststoretype PKCS12"
                )
            else:
                raise KeyStoreError(f"{path}: corrupted {kind} store (unknown entry type {tag})")
        bodyEnd = reader.pos
        digest = reader.take(20)
    except _Truncated:
        raise KeyStoreError(f"{path}: truncated or corrupted {kind} store") from None
    if reader.pos != len(data):
        raise KeyStoreError(
            f"{path}: corrupted {kind} store ({len(data) - reader.pos} unexpected bytes after its end)"
        )
    if password is not None:
        expected = hashlib.sha1(
            password.encode("utf-16-be") + b"Mighty Aphrodite" + data[:bodyEnd]
        ).digest()
        if not hmac.compare_digest(expected, digest):
            raise KeyStoreError(f"{path}: {kind} integrity check failed: wrong password or corrupted")

    keys = []
    for raw in rawKeys:
        if keyPassword is None:
            raise KeyStoreError(
                f"{path}: private-key entry {raw.alias!r} is protected: a password is needed"
            )
        pkcs8 = _recoverJavaKey(path, kind, raw, keyPassword)
        try:
            key = serialization.load_der_private_key(pkcs8, None)
        except Exception as e:  # malformed, or an unsupported algorithm
            # JKS keys passed a check digest; JCEKS ones only a padding check.
            hint = ": wrong key password or corrupted" if kind == "JCEKS" else ""
            raise KeyStoreError(
                f"{path}: cannot load private-key entry {raw.alias!r} ({type(e).__name__}){hint}"
            ) from None
        if not raw.chain:
            raise KeyStoreError(f"{path}: private-key entry {raw.alias!r} has no certificate")
        chain = tuple(_parseCert(path, raw.alias, der) for der in raw.chain)
        keys.append(KeyEntry(raw.alias, key, chain))
    trusted = tuple((alias, _parseCert(path, alias, der)) for alias, der in rawTrusted)
    return KeyStore(path, kind, tuple(keys), trusted)


def _readJavaCert(reader: _Reader, version: int, path: str, alias: str) -> bytes:
    if version == 2:
        certType = reader.utf()
        if certType != "X.509":
            raise KeyStoreError(f"{path}: entry {alias!r} holds a {certType!r} certificate, not X.509")
    return reader.take(reader.u32())


def _loadDerCert(der: bytes) -> x509.Certificate:
    with warnings.catch_warnings():
        # JDK trust stores hold a few old roots with a zero or negative
        # serial number: accepted, as Java does, without the noise.
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        return x509.load_der_x509_certificate(der)


def _parseCert(path: str, alias: str, der: bytes) -> x509.Certificate:
    try:
        return _loadDerCert(der)
    except ValueError as e:
        raise KeyStoreError(f"{path}: entry {alias!r}: unreadable certificate ({e})") from None


# Object identifiers, DER-encoded (content octets only).
def _oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out.extend(reversed(chunk))
    return bytes(out)


_OID_JKS_KEY_PROTECTOR = _oid("1.3.6.1.4.1.42.2.17.1.1")
_OID_JCEKS_KEY_PROTECTOR = _oid("1.3.6.1.4.1.42.2.19.1")  # PBEWithMD5AndTripleDES
_OID_PKCS7_DATA = _oid("1.2.840.113549.1.7.1")
_OID_KEY_BAG = _oid("1.2.840.113549.1.12.10.1.1")
_OID_SHROUDED_KEY_BAG = _oid("1.2.840.113549.1.12.10.1.2")
_OID_FRIENDLY_NAME = _oid("1.2.840.113549.1.9.20")


class _Malformed(Exception):
    pass


def _tlv(data: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """
    One DER element at C{pos}.

    @return: C{(tag, contentStart, contentEnd)}.
    @raise _Malformed: not definite-length DER within C{end}.
    """
    if pos + 2 > end:
        raise _Malformed()
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise _Malformed()
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 4 or pos + n > end:
            raise _Malformed()
        length = int.from_bytes(data[pos : pos + n], "big")
        pos += n
    if pos + length > end:
        raise _Malformed()
    return tag, pos, pos + length


def _children(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    out = []
    pos = start
    while pos < end:
        tag, s, e = _tlv(data, pos, end)
        out.append((tag, s, e))
        pos = e
    return out


def _recoverJavaKey(path: str, kind: str, raw: _RawKey, keyPassword: str) -> bytes:
    """
    Decrypt a JKS or JCEKS private key.

    @return: the PKCS#8 C{PrivateKeyInfo} DER.
    """
    data = raw.protected
    try:
        # EncryptedPrivateKeyInfo ::= SEQUENCE { AlgorithmIdentifier, OCTET STRING }
        tag, s, e = _tlv(data, 0, len(data))
        if tag != 0x30 or e != len(data):
            raise _Malformed()
        (algTag, algS, algE), (octTag, octS, octE) = _children(data, s, e)
        if algTag != 0x30 or octTag != 0x04:
            raise _Malformed()
        algorithm = _children(data, algS, algE)
        oidTag, oidS, oidE = algorithm[0]
        if oidTag != 0x06:
            raise _Malformed()
        oid = data[oidS:oidE]
        encrypted = data[octS:octE]
    except (_Malformed, ValueError, IndexError):
        raise KeyStoreError(f"{path}: private-key entry {raw.alias!r} is corrupted") from None
    if oid == _OID_JKS_KEY_PROTECTOR:
        plain = _jksKeyProtectorRecover(encrypted, keyPassword)
    elif oid == _OID_JCEKS_KEY_PROTECTOR:
        try:
            if len(algorithm) != 2 or algorithm[1][0] != 0x30:
                raise _Malformed()
            (saltTag, saltS, saltE), (countTag, countS, countE) = _children(
                data, algorithm[1][1], algorithm[1][2]
            )
            if saltTag != 0x04 or countTag != 0x02 or countE - countS > 4:
                raise _Malformed()
            salt = data[saltS:saltE]
            iterations = int.from_bytes(data[countS:countE], "big", signed=True)
            if len(salt) != 8 or not 0 < iterations <= MAX_JCEKS_ITERATIONS:
                raise _Malformed()
        except (_Malformed, ValueError):
            raise KeyStoreError(f"{path}: private-key entry {raw.alias!r} is corrupted") from None
        plain = _jceksKeyProtectorRecover(encrypted, keyPassword, salt, iterations)
    else:
        raise KeyStoreError(
            f"{path}: private-key entry {raw.alias!r} is protected by an unsupported algorithm"
        )
    if plain is None:
        raise KeyStoreError(
            f"{path}: cannot decrypt private-key entry {raw.alias!r}: wrong key password or corrupted"
        )
    return plain


def _jksKeyProtectorRecover(encrypted: bytes, password: str) -> bytes | None:
    """
    Sun's JKS key protector (C{sun.security.provider.KeyProtector}): the key
    is XORed with a stream of SHA-1 digests, C{d(i) = SHA1(password || d(i-1))}
    with C{d(0)} the 20-byte salt; a SHA-1 of C{password || key} follows.
    The password is taken as UTF-16BE, Java's C{char[]}.

    @return: the PKCS#8 DER, or C{None} when the check digest does not match.
    """
    if len(encrypted) < 40:
        return None
    passwordBytes = password.encode("utf-16-be", "surrogatepass")
    salt, body, check = encrypted[:20], encrypted[20:-20], encrypted[-20:]
    stream = bytearray()
    digest = salt
    while len(stream) < len(body):
        digest = hashlib.sha1(passwordBytes + digest).digest()
        stream += digest
    plain = bytes(a ^ b for a, b in zip(body, stream))
    if not hmac.compare_digest(hashlib.sha1(passwordBytes + plain).digest(), check):
        return None
    return plain


def _jceksKeyProtectorRecover(
    encrypted: bytes, password: str, salt: bytes, iterations: int
) -> bytes | None:
    """
    Sun's C{PBEWithMD5AndTripleDES} (C{com.sun.crypto.provider.PBES1Core}):
    each half of the 8-byte salt (the first reversed when both are equal) is
    hashed C{iterations} times as C{MD5(previous || password)}; the two
    16-byte results give the 24-byte DES-EDE3 key and the 8-byte CBC IV.
    The password must be ASCII.

    @return: the PKCS#8 DER, or C{None} when the password does not fit.
    """
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
    from cryptography.hazmat.primitives import padding
    from cryptography.hazmat.primitives.ciphers import Cipher, modes

    try:
        passwordBytes = password.encode("ascii")
    except UnicodeEncodeError:
        return None
    if len(encrypted) == 0 or len(encrypted) % 8:
        return None
    halves = [salt[:4], salt[4:]]
    if halves[0] == halves[1]:
        halves[0] = halves[0][::-1]
    derived = b""
    for half in halves:
        value = half
        for _ in range(iterations):
            value = hashlib.md5(value + passwordBytes).digest()
        derived += value
    decryptor = Cipher(TripleDES(derived[:24]), modes.CBC(derived[24:])).decryptor()
    padded = decryptor.update(encrypted) + decryptor.finalize()
    unpadder = padding.PKCS7(64).unpadder()
    try:
        plain = unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        return None
    # No check digest here: a wrong password gives garbage, which is caught
    # by requiring a well-formed PrivateKeyInfo.
    try:
        tag, _, end = _tlv(plain, 0, len(plain))
    except _Malformed:
        return None
    if tag != 0x30 or end != len(plain):
        return None
    return plain


# -- PKCS#12 -------------------------------------------------------------------


def _looksLikePkcs12(data: bytes) -> bool:
    """
    C{PFX ::= SEQUENCE { version INTEGER (3), authSafe ContentInfo, ... }},
    definite or indefinite length.
    """
    if len(data) < 8 or data[0] != 0x30:
        return False
    pos = 1
    length = data[pos]
    pos += 1
    if length & 0x80 and length != 0x80:
        pos += length & 0x7F
    return data[pos : pos + 3] == b"\x02\x01\x03" and data[pos + 3 : pos + 4] == b"\x30"


@dataclass
class _KeyBag:
    friendlyName: str | None
    der: bytes
    shrouded: bool


def _pkcs12KeyBags(data: bytes) -> list[_KeyBag] | None:
    """
    The key bags in the unencrypted parts of a PKCS#12 file (where Java,
    OpenSSL and cryptography put them), with their friendly names.

    @return: the bags, or C{None} when the file is not plain DER (BER with
        indefinite lengths, say) and cannot be looked into this way.
    """
    try:
        _, s, e = _tlv(data, 0, len(data))
        _version, authSafe = _children(data, s, e)[:2]
        contentType, content = _children(data, authSafe[1], authSafe[2])[:2]
        if data[contentType[1] : contentType[2]] != _OID_PKCS7_DATA or content[0] != 0xA0:
            return None
        octet = _tlv(data, content[1], content[2])
        if octet[0] != 0x04:
            return None
        safe = _tlv(data, octet[1], octet[2])
        bags: list[_KeyBag] = []
        for _, infoS, infoE in _children(data, safe[1], safe[2]):
            infoType, *rest = _children(data, infoS, infoE)
            if data[infoType[1] : infoType[2]] != _OID_PKCS7_DATA:
                continue  # encrypted or enveloped: certificates, usually
            inner = _tlv(data, rest[0][1], rest[0][2])
            if inner[0] != 0x04:
                return None
            contents = _tlv(data, inner[1], inner[2])
            for _, bagS, bagE in _children(data, contents[1], contents[2]):
                bagId, bagValue, *attributes = _children(data, bagS, bagE)
                oid = data[bagId[1] : bagId[2]]
                if oid not in (_OID_KEY_BAG, _OID_SHROUDED_KEY_BAG):
                    continue
                value = _tlv(data, bagValue[1], bagValue[2])
                name = None
                if attributes:
                    for _, attrS, attrE in _children(data, attributes[0][1], attributes[0][2]):
                        attrType, values = _children(data, attrS, attrE)
                        if data[attrType[1] : attrType[2]] == _OID_FRIENDLY_NAME:
                            first = _children(data, values[1], values[2])[0]
                            if first[0] == 0x1E:  # BMPString
                                name = data[first[1] : first[2]].decode("utf-16-be", "replace")
                start = bagValue[1]
                bags.append(_KeyBag(name, data[start : value[2]], oid == _OID_SHROUDED_KEY_BAG))
        return bags
    except (_Malformed, ValueError, IndexError):
        return None


def _loadPkcs12(path: str, data: bytes, password: str | None) -> KeyStore:
    try:
        _, _, end = _tlv(data, 0, len(data))
    except _Malformed:
        pass  # BER, or truncated: cryptography decides
    else:
        if end != len(data):
            raise KeyStoreError(
                f"{path}: corrupted PKCS#12 store ({len(data) - end} unexpected bytes after its end)"
            )
    secret = password.encode("utf-8") if password is not None else None
    # A store without integrity and encryption opens with no password (Java
    # 18+ writes such stores); a password given for it does no harm.
    attempts = [secret, None] if secret is not None else [None, b""]
    loaded = None
    for attempt in attempts:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CryptographyDeprecationWarning)
                warnings.simplefilter("ignore", UserWarning)  # "parsed as BER"
                loaded = pkcs12.load_pkcs12(data, attempt)
            secret = attempt
            break
        except ValueError:
            continue
        except Exception as e:  # unsupported algorithms and such
            raise KeyStoreError(f"{path}: cannot read PKCS#12 store ({type(e).__name__}: {e})") from None
    if loaded is None:
        if password is None:
            raise KeyStoreError(f"{path}: PKCS#12 store is protected: a password is needed (or corrupted)")
        raise KeyStoreError(f"{path}: cannot open PKCS#12 store: wrong password or corrupted")

    pool: list[tuple[str | None, x509.Certificate]] = []
    if loaded.cert is not None:
        pool.append((_friendlyName(loaded.cert.friendly_name), loaded.cert.certificate))
    for extra in loaded.additional_certs:
        pool.append((_friendlyName(extra.friendly_name), extra.certificate))

    bags = _pkcs12KeyBags(data)
    keyed: list[tuple[str | None, PrivateKeyTypes]] = []
    if bags is not None and len(bags) > 1:
        # cryptography returns one key only; decrypt each bag ourselves.
        for index, bag in enumerate(bags, 1):
            label = repr(bag.friendlyName) if bag.friendlyName else f"#{index}"
            try:
                key = serialization.load_der_private_key(bag.der, secret if bag.shrouded else None)
            except Exception as e:
                raise KeyStoreError(
                    f"{path}: cannot decrypt PKCS#12 private key {label} ({type(e).__name__})"
                ) from None
            keyed.append((bag.friendlyName, key))
    elif loaded.key is not None:
        name = bags[0].friendlyName if bags else None
        if name is None and loaded.cert is not None:
            name = _friendlyName(loaded.cert.friendly_name)
        keyed.append((name, loaded.key))

    used: set[int] = set()
    keys: list[KeyEntry] = []
    for index, (name, key) in enumerate(keyed, 1):
        leaf = _matchingCert(key, pool, used)
        if leaf is None:
            raise KeyStoreError(f"{path}: PKCS#12 private key {name or index!r} has no certificate")
        chain = _buildChain(leaf, pool, used)
        alias = name or ("key" if len(keyed) == 1 else f"key-{index}")
        keys.append(KeyEntry(alias, key, tuple(pool[i][1] for i in chain)))
    trusted = tuple(
        (name or _certAlias(cert, i), cert) for i, (name, cert) in enumerate(pool) if i not in used
    )
    return KeyStore(path, "PKCS12", tuple(keys), trusted)


def _friendlyName(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    return raw.decode("utf-8", "replace")


# -- PEM -----------------------------------------------------------------------


_PEM_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.DOTALL
)
_PEM_KEY_TYPES = {
    b"PRIVATE KEY",
    b"ENCRYPTED PRIVATE KEY",
    b"RSA PRIVATE KEY",
    b"EC PRIVATE KEY",
    b"DSA PRIVATE KEY",
    b"OPENSSH PRIVATE KEY",
}
_PEM_IGNORED_TYPES = {b"EC PARAMETERS", b"DH PARAMETERS"}


def _loadPem(path: str, data: bytes, password: str | None) -> KeyStore:
    keys: list[PrivateKeyTypes] = []
    pool: list[tuple[str | None, x509.Certificate]] = []
    blocks = list(_PEM_BLOCK.finditer(data))
    if not blocks:
        raise KeyStoreError(f"{path}: corrupted PEM (a BEGIN line without its END line)")
    if data.count(b"-----BEGIN ") != len(blocks):
        raise KeyStoreError(f"{path}: corrupted PEM (a BEGIN line without its END line)")
    for number, match in enumerate(blocks, 1):
        kind = match.group(1)
        block = match.group(0)
        label = kind.decode("ascii")
        if kind in _PEM_KEY_TYPES:
            secret = password.encode("utf-8") if password is not None else None
            load = (
                serialization.load_ssh_private_key
                if kind == b"OPENSSH PRIVATE KEY"
                else serialization.load_pem_private_key
            )
            try:
                try:
                    key = load(block, secret)
                except TypeError:
                    if secret is None:
                        raise KeyStoreError(
                            f"{path}: PEM block {number} ({label}) is encrypted: a password is needed"
                        ) from None
                    # Not encrypted: a password meant for other stores does no harm.
                    key = load(block, None)
            except KeyStoreError:
                raise
            except Exception as e:
                hint = "wrong password or corrupted" if secret is not None else "corrupted"
                raise KeyStoreError(
                    f"{path}: cannot read PEM block {number} ({label}): {hint} ({type(e).__name__})"
                ) from None
            keys.append(key)
        elif kind in (b"CERTIFICATE", b"X509 CERTIFICATE", b"TRUSTED CERTIFICATE"):
            try:
                if kind == b"TRUSTED CERTIFICATE":
                    # OpenSSL's: the certificate, then its trust settings.
                    der = _pemBody(block)
                    _, _, end = _tlv(der, 0, len(der))
                    cert = _loadDerCert(der[:end])
                else:
                    cert = _loadDerCert(_pemBody(block))
            except (ValueError, _Malformed) as e:
                raise KeyStoreError(
                    f"{path}: cannot read PEM block {number} ({label}): corrupted ({e})"
                ) from None
            pool.append((None, cert))
        elif kind in _PEM_IGNORED_TYPES:
            continue
        else:
            raise KeyStoreError(
                f"{path}: PEM block {number} is a {label}, not a key or certificate"
            )

    used: set[int] = set()
    entries = []
    for index, key in enumerate(keys, 1):
        leaf = _matchingCert(key, pool, used)
        if leaf is None:
            raise KeyStoreError(
                f"{path}: private key {index} has no matching certificate in this file"
            )
        chain = _buildChain(leaf, pool, used)
        alias = "key" if len(keys) == 1 else f"key-{index}"
        entries.append(KeyEntry(alias, key, tuple(pool[i][1] for i in chain)))
    trusted = tuple((_certAlias(cert, i + 1), cert) for i, (_, cert) in enumerate(pool) if i not in used)
    return KeyStore(path, "PEM", tuple(entries), trusted)


def _pemBody(block: bytes) -> bytes:
    import base64

    lines = block.strip().splitlines()[1:-1]
    body = b"".join(line.strip() for line in lines if b":" not in line)
    return base64.b64decode(body, validate=True)


# -- Chains ----------------------------------------------------------------------


def _spki(key: Any) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _matchingCert(
    key: PrivateKeyTypes, pool: list[tuple[str | None, x509.Certificate]], used: set[int]
) -> int | None:
    """
    @return: the index of the first unused certificate for C{key}'s public
        key (marked used), or C{None}.
    """
    wanted = _spki(key.public_key())
    for i, (_, cert) in enumerate(pool):
        if i in used:
            continue
        try:
            if _spki(cert.public_key()) == wanted:
                used.add(i)
                return i
        except Exception:  # unsupported public key algorithm
            continue
    return None


def _isSelfIssued(cert: x509.Certificate) -> bool:
    return cert.subject == cert.issuer


def _buildChain(
    leaf: int, pool: list[tuple[str | None, x509.Certificate]], used: set[int]
) -> list[int]:
    """
    Follow issuers from C{leaf} through the unused certificates of C{pool}
    (name match and signature), marking them used.  Certificates without a
    friendly name are preferred (Java names trusted entries; the chain
    copies it writes carry the subject as their name).

    @return: indices into C{pool}, leaf first.
    """
    chain = [leaf]
    current = pool[leaf][1]
    while not _isSelfIssued(current) and len(chain) < MAX_CHAIN_LENGTH:
        candidates = []
        for i, (name, cert) in enumerate(pool):
            if i in used or cert.subject != current.issuer:
                continue
            try:
                current.verify_directly_issued_by(cert)
            except Exception:
                continue
            javaChainCopy = name is not None and name == _javaName(cert.subject)
            candidates.append((0 if name is None or javaChainCopy else 1, i))
        if not candidates:
            break
        _, pick = min(candidates)
        used.add(pick)
        chain.append(pick)
        current = pool[pick][1]
    return chain


def _javaName(name: x509.Name) -> str:
    """The subject as Java's C{X500Principal.getName()} (RFC 2253) writes it."""
    return name.rfc4514_string()


def _certAlias(cert: x509.Certificate, index: int) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if names and isinstance(names[0].value, str) and names[0].value:
        return names[0].value
    return f"cert-{index}"


# ---------------------------------------------------------------------------
# Describing certificates
# ---------------------------------------------------------------------------


def fingerprint(cert: x509.Certificate) -> str:
    """
    @return: the SHA-256 fingerprint of the certificate's DER, upper-case hex
        pairs joined by colons (as C{keytool} and the MyData registry print it).
    """
    from cryptography.hazmat.primitives import hashes

    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def daysToExpiry(cert: x509.Certificate, now: datetime.datetime | None = None) -> int:
    """
    @param now: the moment to count from (UTC if naive); the current time by
        default.
    @return: whole days left until the certificate's not-after time, rounded
        down; negative once it has expired.
    """
    if now is None:
        now = datetime.datetime.now(datetime.timezone.utc)
    elif now.tzinfo is None:
        now = now.replace(tzinfo=datetime.timezone.utc)
    return math.floor((cert.not_valid_after_utc - now).total_seconds() / 86400)


def describe(cert: x509.Certificate, now: datetime.datetime | None = None) -> dict[str, Any]:
    """
    The facts about a certificate that operators check.

    @param now: as for L{daysToExpiry}.
    @return: C{subject} and C{issuer} (RFC 4514 strings), C{sans} (list of
        C{"DNS:name"}, C{"IP:address"}, C{"email:..."}, C{"URI:..."}),
        C{serialNumber} (the subject's serialNumber attribute, OID 2.5.4.5:
        the MyData business registration number; C{None} if absent),
        C{serial} (the certificate serial number, upper-case hex),
        C{fingerprint} (L{fingerprint}), C{notBefore} and C{notAfter}
        (aware UTC datetimes) and C{daysToExpiry}.
    """
    sans: list[str] = []
    try:
        extension = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    except x509.ExtensionNotFound:
        pass
    else:
        for name in extension.value:
            if isinstance(name, x509.DNSName):
                sans.append(f"DNS:{name.value}")
            elif isinstance(name, x509.IPAddress):
                sans.append(f"IP:{name.value}")
            elif isinstance(name, x509.RFC822Name):
                sans.append(f"email:{name.value}")
            elif isinstance(name, x509.UniformResourceIdentifier):
                sans.append(f"URI:{name.value}")
    serialNumbers = [
        str(attribute.value) for attribute in cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    ]
    serial = cert.serial_number
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "sans": sans,
        "serialNumber": ", ".join(serialNumbers) if serialNumbers else None,
        "serial": format(serial, "X") if serial >= 0 else "-" + format(-serial, "X"),
        "fingerprint": fingerprint(cert),
        "notBefore": cert.not_valid_before_utc,
        "notAfter": cert.not_valid_after_utc,
        "daysToExpiry": daysToExpiry(cert, now),
    }


def keyDescription(key: PrivateKeyTypes) -> str:
    """
    @return: the key's algorithm and size, as C{"RSA 2048"}, C{"EC secp256r1"}.
    """
    if isinstance(key, rsa.RSAPrivateKey):
        return f"RSA {key.key_size}"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"EC {key.curve.name}"
    if isinstance(key, dsa.DSAPrivateKey):
        return f"DSA {key.key_size}"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "Ed25519"
    if isinstance(key, ed448.Ed448PrivateKey):
        return "Ed448"
    return type(key).__name__


# ---------------------------------------------------------------------------
# Writing PEM
# ---------------------------------------------------------------------------


def writePem(
    store: KeyStore, out: Path, alias: str | None = None, force: bool = False
) -> list[Path]:
    """
    Write a store's key, chain and trusted certificates as PEM files in
    C{out} (created if missing):

      - C{key.pem}: the private key, unencrypted PKCS#8, created with mode
        0600 from the start (never a wider mode, not chmod-ed afterwards);
      - C{chain.pem}: the leaf certificate, then the intermediates;
      - C{root.pem}: the self-signed root that ends the stored chain, if the
        store has one there (TLS peers need not be sent it);
      - C{ca.pem}: the trusted certificates.

    Only the files that have content are written.

    @param alias: the key entry to write; C{None} for the only one.  A store
        without key entries writes C{ca.pem} alone (C{alias} must then be
        C{None}).
    @param force: replace existing files (each atomically); without it, an
        existing file is an error and nothing is written.
    @return: the paths written.
    @raise KeyStoreError: the entry is missing or ambiguous, the store is
        empty, a file exists, or writing failed.
    """
    pem = serialization.Encoding.PEM
    files: list[tuple[str, bytes, int]] = []
    if store.keys or alias is not None:
        entry = store.keyEntry(alias)
        chain = list(entry.chain)
        root = None
        if len(chain) > 1 and _isSelfIssued(chain[-1]):
            root = chain.pop()
        keyPem = entry.key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        files.append(("key.pem", keyPem, 0o600))
        files.append(("chain.pem", b"".join(c.public_bytes(pem) for c in chain), 0o644))
        if root is not None:
            files.append(("root.pem", root.public_bytes(pem), 0o644))
    if store.trusted:
        files.append(("ca.pem", b"".join(c.public_bytes(pem) for _, c in store.trusted), 0o644))
    if not files:
        raise KeyStoreError(f"{store.source}: nothing to write: the store holds no entries")

    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KeyStoreError(f"cannot create {out}: {e.strerror or e}") from None
    if not force:
        existing = [str(out / name) for name, _, _ in files if os.path.lexists(out / name)]
        if existing:
            raise KeyStoreError(f"{', '.join(existing)}: already exists (use --force to replace)")
    written: list[Path] = []
    for name, content, mode in files:
        target = out / name
        try:
            _writeFile(target, content, mode, force)
        except FileExistsError:
            raise KeyStoreError(f"{target}: already exists (use --force to replace)") from None
        except OSError as e:
            raise KeyStoreError(f"cannot write {target}: {e.strerror or e}") from None
        written.append(target)
    return written


def _writeFile(target: Path, content: bytes, mode: int, force: bool) -> None:
    """
    Create C{target} with C{mode} from its first instant: exclusively, or,
    with C{force}, as a temporary file renamed over the old one.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    path = target.with_name(f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp") if force else target
    fd = os.open(path, flags, mode)
    try:
        try:
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if force:
            os.replace(path, target)
    except BaseException:
        try:
            os.unlink(path)
        except OSError:
            pass
        raise
