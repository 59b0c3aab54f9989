"""
The material layer: a config naming key stores or an htpasswd file loads as
data (L{mydataproxy.config.load} reads no store), and
L{mydataproxy.material.loadMaterial} reads them, failing with the file, the
key the user wrote and its line.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mydataproxy import config
from mydataproxy.config import ConfigError, Settings
from mydataproxy.egress.auth import Htpasswd
from mydataproxy.material import Material, loadMaterial
from mydataproxy.tls.contexts import OriginTLS, ServerTLS


def write(tmp_path: Path, text: str, name: str = "mydataproxy.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def materialError(path: Path, key: str, line: int | None, *fragments: str) -> ConfigError:
    """C{path} loads as data; its material does not, with a located error."""
    settings = config.load(path)
    with pytest.raises(ConfigError) as info:
        loadMaterial(settings)
    error = info.value
    assert (error.source, error.key, error.line) == (str(path), key, line), str(error)
    where = f"{path}:{line}" if line is not None else str(path)
    assert str(error).startswith(f"{where}: {key}: "), str(error)
    for fragment in fragments:
        assert fragment in str(error), str(error)
    return error


@pytest.fixture
def pem(tmp_path: Path) -> Path:
    """A PEM key store: a self-signed certificate and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "proxy.example")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=100))
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / "server.pem"
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        + certificate.public_bytes(serialization.Encoding.PEM)
    )
    return path


def test_defaults() -> None:
    material = loadMaterial(Settings())
    assert material.serverTLS is None and material.htpasswd is None
    assert isinstance(material.originTLS, OriginTLS)


def test_loadsWhatTheConfigNames(tmp_path: Path, pem: Path) -> None:
    (tmp_path / "proxy.htpasswd").write_text("gateway:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n")
    path = write(
        tmp_path,
        '[forward]\nauth_file = "proxy.htpasswd"\n\n[forward.tls]\nkey_store = "server.pem"\n'
        '\n[upstream.tls]\ntrust_store = "server.pem"\n',
    )
    material = loadMaterial(config.load(path))
    assert isinstance(material, Material)
    assert isinstance(material.serverTLS, ServerTLS) and material.serverTLS.settings.key_store.path == str(pem)
    assert isinstance(material.htpasswd, Htpasswd) and material.htpasswd.path == str(tmp_path / "proxy.htpasswd")
    assert isinstance(material.originTLS, OriginTLS)


def test_tomlMissingKeyStoreIsDataUntilLoaded(tmp_path: Path) -> None:
    path = write(tmp_path, '[forward]\nlisten = "tcp:9443"\ntls = { key_store = "absent.p12" }\n')
    settings = config.load(path)
    assert settings.forward.tls.key_store.path == str(tmp_path / "absent.p12")
    materialError(path, "forward.tls", 3, "absent.p12", "cannot read")


def test_tomlMissingTrustStoreForOrigins(tmp_path: Path) -> None:
    path = write(tmp_path, '[upstream]\nconnect_timeout = 5\ntls = { trust_store = "absent.pem" }\n')
    materialError(path, "upstream.tls", 3, "absent.pem", "cannot read")


def test_tomlMissingHtpasswd(tmp_path: Path) -> None:
    path = write(tmp_path, '[forward]\n\nauth_file = "absent.htpasswd"\n')
    assert config.load(path).forward.auth_file == str(tmp_path / "absent.htpasswd")
    materialError(path, "forward.auth_file", 3, "absent.htpasswd")


def test_tomlBadHtpasswd(tmp_path: Path) -> None:
    (tmp_path / "proxy.htpasswd").write_text("gateway\n")
    path = write(tmp_path, '[forward]\nauth_file = "proxy.htpasswd"\n')
    materialError(path, "forward.auth_file", 2, "proxy.htpasswd, line 1")


def test_propertiesMissingStoresAreDataUntilLoaded(tmp_path: Path, pem: Path) -> None:
    path = write(tmp_path, f"server.port=9000\nserver.ssl.trust-store={tmp_path / 'absent.jks'}\n", "application.properties")
    assert config.load(path).upstream.tls.trust_store.path == str(tmp_path / "absent.jks")
    materialError(path, "server.ssl.trust-store", 2, "absent.jks", "cannot read")
    # The key of the store that fails, not the other one.
    path = write(
        tmp_path,
        f"server.ssl.enabled=true\nserver.ssl.key-store={pem}\n"
        f"server.ssl.trust-store={tmp_path / 'absent.jks'}\nserver.ssl.client-auth=need\n",
        "application.properties",
    )
    materialError(path, "server.ssl.trust-store", 3, "absent.jks")
    path = write(tmp_path, f"\nserver.ssl.enabled=true\nserver.ssl.key-store={tmp_path / 'absent.p12'}\n",
                 "application.properties")
    materialError(path, "server.ssl.key-store", 3, "absent.p12")


def test_locate() -> None:
    settings = Settings(locations=(("upstream.tls", "server.ssl.key-store", 4),
                                   ("upstream.tls.trust_store", "server.ssl.trust-store", 7)))
    assert settings.locate("upstream.tls.trust_store") == ("server.ssl.trust-store", 7)
    # Falls back to the enclosing setting ...
    assert settings.locate("upstream.tls.key_store") == ("server.ssl.key-store", 4)
    assert settings.locate("upstream.tls.profiles[0].key_store") == ("server.ssl.key-store", 4)
    # ... else names the setting itself.
    assert settings.locate("forward.auth_file") == ("forward.auth_file", None)


def test_configLoadReadsNoMaterial(tmp_path: Path) -> None:
    """Loading the settings is plain data: the loaders record where material is named."""
    path = write(tmp_path, '[forward]\nauth_file = "a"\ntls = { key_store = "k.p12" }\n')
    assert config.load(path).locations == (("forward.auth_file", "forward.auth_file", 2), ("forward.tls", "forward.tls", 3))
    assert config.load(write(tmp_path, "")).locations == ()
