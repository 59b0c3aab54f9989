"""
Tests for L{mydataproxy.config} (TOML) and L{mydataproxy.config.legacy} (the Java
product's application.properties).  Pure unit tests: files under tmp_path, no
network.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import subprocess
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from conftest import require_tool
from mydataproxy import cli, config, material
from mydataproxy.config import legacy
from mydataproxy.config import ConfigError, Settings
from mydataproxy.tls.keystore import resolvePassword

ETC = Path(__file__).resolve().parents[2] / "etc"
SECRET = "s3cr3t-Pa55"


def write(tmp_path: Path, text: str, name: str = "mydataproxy.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def loadMaterial(path: Path) -> material.Material:
    """Load C{path} and the material it names, as start-up and check-config do."""
    return material.loadMaterial(config.load(path))


def loadError(path: Path, key: str | None, line: int | None, *fragments: str, load=config.load) -> ConfigError:
    """Load C{path}, expecting a ConfigError located at C{key} and C{line}."""
    with pytest.raises(ConfigError) as info:
        load(path)
    error = info.value
    text = str(error)
    assert (error.source, error.key, error.line) == (str(path), key, line), text
    where = f"{path}:{line}" if line is not None else str(path)
    assert text.startswith(f"{where}: {key}: " if key else f"{where}: "), text
    for fragment in fragments:
        assert fragment in text, text
    return error


def net(text: str) -> config.IPNetwork:
    return ipaddress.ip_network(text)


# --- TOML ---------------------------------------------------------------------


def test_tomlEverything(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
# A comment.
[forward]
listen = "tcp:8123:interface=127.0.0.1"
client_allow = ["10.1.0.0/16", "192.0.2.7", "::1", "10.2.*.*"]
connect_ports = [443, 8443]
header_filter = [" X-Secret ", "x-target-host"]
client_idle_timeout = 5

[upstream]
connect_timeout = 1.5
read_timeout = 2
pool_wait_timeout = 3
idle_timeout = 4
max_connections_per_destination = 7
max_connections_total = 70

[logging]
access_log = "logs/access.log"
level = "DEBUG"
""",
    )
    (tmp_path / "logs").mkdir()
    settings = config.load(path)
    assert settings.source == str(path)
    assert settings.notices == ()
    assert settings.forward == config.ForwardSettings(
        listen="tcp:8123:interface=127.0.0.1",
        client_allow=(
            net("10.1.0.0/16"), net("192.0.2.7/32"), net("::1/128"), net("10.2.0.0/16"),
        ),
        connect_ports=frozenset({443, 8443}),
        header_filter=frozenset({b"x-secret", b"x-target-host"}),
        client_idle_timeout=5.0,
    )
    assert isinstance(settings.forward.client_idle_timeout, float)
    assert settings.upstream == config.UpstreamSettings(
        connect_timeout=1.5, read_timeout=2.0, pool_wait_timeout=3.0,
        idle_timeout=4.0, max_connections_per_destination=7,
        max_connections_total=70,
    )
    assert settings.logging == config.LoggingSettings(
        access_log=str((tmp_path / "logs" / "access.log").resolve()), level="debug"
    )


def test_tomlEmptyIsDefaults(tmp_path: Path) -> None:
    settings = config.load(write(tmp_path, "# nothing\n"))
    assert settings == Settings(source=str(tmp_path / "mydataproxy.toml"))
    assert settings.forward.listen == "tcp:9000:interface=127.0.0.1"
    assert settings.logging.access_log is None and settings.logging.accessPath("h") == "-"


def test_tomlStdoutAccessLog(tmp_path: Path) -> None:
    settings = config.load(write(tmp_path, '[logging]\naccess_log = "-"\n'))
    assert settings.logging.access_log == config.STDOUT


@pytest.mark.parametrize(
    "text, key, line, fragment",
    [
        # Unknown sections and keys.
        ('[forward]\nlisten = "tcp:1"\n\n[bogus]\nx = 1\n', "bogus", 4, "unknown section"),
        ("[forward]\n\nlisen = 'tcp:1'\n", "forward.lisen", 3, "unknown key"),
        ("[upstream]\nconnect_timeout = 1\nread_timeot = 2\n", "upstream.read_timeot", 3,
         "unknown key"),
        ("[logging]\n\n\nfile = 'x'\n", "logging.file", 4, "unknown key"),
        ("\nforward = 3\n", "forward", 2, "must be a table"),
        # Wrong types.
        ("[forward]\nlisten = 9000\n", "forward.listen", 2, "non-empty string"),
        ("[forward]\nlisten = ''\n", "forward.listen", 2, "non-empty string"),
        ("[forward]\nclient_allow = '10.0.0.0/8'\n", "forward.client_allow", 2,
         "list of strings"),
        ("[forward]\nheader_filter = [1, 2]\n", "forward.header_filter", 2, "list of strings"),
        ("[forward]\nconnect_ports = 443\n", "forward.connect_ports", 2, "non-empty list"),
        ("[forward]\nconnect_ports = []\n", "forward.connect_ports", 2, "non-empty list"),
        ("[forward]\nconnect_ports = ['443']\n", "forward.connect_ports", 2, "an integer"),
        ("[forward]\nclient_idle_timeout = 0\n", "forward.client_idle_timeout", 2,
         "at least"),
        ("[upstream]\n\nconnect_timeout = 'fast'\n", "upstream.connect_timeout", 3,
         "must be a number"),
        ("[upstream]\nread_timeout = true\n", "upstream.read_timeout", 2, "must be a number"),
        ("[upstream]\npool_wait_timeout = -1\n", "upstream.pool_wait_timeout", 2, "at least"),
        ("[upstream]\nmax_connections_total = 1.5\n", "upstream.max_connections_total", 2,
         "must be an integer"),
        ("[upstream]\nmax_connections_per_destination = 0\n",
         "upstream.max_connections_per_destination", 2, "at least 1"),
        ("[logging]\naccess_log = 5\n", "logging.access_log", 2, "non-empty string"),
        # Bad networks.
        ("[forward]\nclient_allow = ['10.0.0.0/8', '10.0.0.1/8']\n", "forward.client_allow", 2,
         "host bits set"),
        ("[forward]\nclient_allow = ['10.0.0.300']\n", "forward.client_allow", 2, "10.0.0.300"),
        ("[forward]\nclient_allow = ['10.*.1.*']\n", "forward.client_allow", 2,
         "trailing octets"),
        ("[forward]\nclient_allow = ['10.*']\n", "forward.client_allow", 2, "wildcard"),
        # Ports out of range.
        ("[forward]\nconnect_ports = [443, 70000]\n", "forward.connect_ports", 2,
         "out of range"),
        ("[forward]\nconnect_ports = [0]\n", "forward.connect_ports", 2, "at least 1"),
        # Listener endpoint strings.
        ("[forward]\n\nlisten = 'bogus:9000'\n", "forward.listen", 3,
         "not a valid endpoint description"),
        ("[forward]\nlisten = 'tcp:http-alt'\n", "forward.listen", 2,
         "not a valid endpoint description"),
        # Log level.
        ("[logging]\nlevel = 'verbose'\n", "logging.level", 2, "must be one of"),
        # Workers.
        ("[daemon]\nworkers = 0\n", "daemon.workers", 2, "at least 1"),
        ("[daemon]\nworkers = 'all'\n", "daemon.workers", 2, '"auto"'),
        ("[daemon]\nworkers = 2.5\n", "daemon.workers", 2, "must be an integer"),
    ],
)
def test_tomlErrors(tmp_path: Path, text: str, key: str, line: int, fragment: str) -> None:
    loadError(write(tmp_path, text), key, line, fragment)


@pytest.mark.parametrize("value, expected", [("3", 3), ('"auto"', os.cpu_count() or 1)])
def test_tomlWorkers(tmp_path: Path, value: str, expected: int) -> None:
    assert config.load(write(tmp_path, f"[daemon]\nworkers = {value}\n")).daemon.workers == expected


def test_tomlSyntaxError(tmp_path: Path) -> None:
    loadError(write(tmp_path, "[forward\n"), None, None, "not valid TOML")


def test_tomlUnreadable(tmp_path: Path) -> None:
    loadError(tmp_path / "missing.toml", None, None, "cannot read")


@pytest.mark.parametrize("name, text", [
    ("mydataproxy.toml", '[forward]\nlisten = "tcp:9123"\nauth_file = "users"\n'),
    ("application.properties", "server.port=9123\n"),
])
def test_contentAlreadyRead(tmp_path: Path, name: str, text: str) -> None:
    """The bytes given are loaded, not the file's now, under the file's name."""
    path = write(tmp_path, "[forward\n" if name.endswith(".toml") else "server.port=no port\n", name)
    settings = config.load(path, text.encode())
    assert settings.forward.listen.startswith("tcp:9123") and settings.source == str(path)
    if name.endswith(".toml"):
        # Relative paths are still the file's folder's.
        assert settings.forward.auth_file == str(tmp_path / "users")
    with pytest.raises(ConfigError):
        config.load(path)


# --- parseNetwork ---------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern, expected",
    [
        ("10.1.2.3", "10.1.2.3/32"),
        ("10.1.*.*", "10.1.0.0/16"),
        ("10.*.*.*", "10.0.0.0/8"),
        ("*.*.*.*", "0.0.0.0/0"),
        ("10.1.2.*", "10.1.2.0/24"),
        (" 192.0.2.0/24 ", "192.0.2.0/24"),
        ("2001:db8::/32", "2001:db8::/32"),
    ],
)
def test_parseNetwork(pattern: str, expected: str) -> None:
    assert config.parseNetwork(pattern) == net(expected)


# --- The .properties parser ------------------------------------------------------


def test_propertiesSyntax() -> None:
    text = (
        "# comment = not a key\n"  # 1
        "! also a comment\n"  # 2
        "\n"  # 3
        "   \t\n"  # 4
        "a=1\n"  # 5
        "b: 2\n"  # 6
        "c 3\n"  # 7
        "   d   =   4 \n"  # 8
        "e=x=y:z\n"  # 9
        "f\n"  # 10
        "g =\n"  # 11
        "h = one, \\\n"  # 12
        "     two, \\\n"  # 13
        "     # not a comment\n"  # 14
        "i=\\u00e9t\\u00C9\\t\\n|\\q\\\\\n"  # 15
        "j\\=k\\:l\\ m = v\n"  # 16
        "n = ends with a backslash \\\\\n"  # 17
        "o = 5\n"  # 18
    )
    assert legacy.parseProperties(text, "x") == [
        ("a", "1", 5),
        ("b", "2", 6),
        ("c", "3", 7),
        ("d", "4 ", 8),
        ("e", "x=y:z", 9),
        ("f", "", 10),
        ("g", "", 11),
        ("h", "one, two, # not a comment", 12),
        ("i", "\u00e9t\u00c9\t\n|q\\", 15),
        ("j=k:l m", "v", 16),
        ("n", "ends with a backslash \\", 17),
        ("o", "5", 18),
    ]


def test_propertiesLineEndings() -> None:
    text = "a=1\r\nb=2\\\r\n  3\rc=4\n"
    assert legacy.parseProperties(text, "x") == [("a", "1", 1), ("b", "23", 2), ("c", "4", 4)]


def test_propertiesContinuationAtEnd() -> None:
    assert legacy.parseProperties("a=1\\", "x") == [("a", "1", 1)]
    assert legacy.parseProperties("a=1\\\n", "x") == [("a", "1", 1)]


def test_propertiesCommentIsNotContinued() -> None:
    assert legacy.parseProperties("# a \\\nb=1\n", "x") == [("b", "1", 2)]


def test_propertiesMalformedEscape(tmp_path: Path) -> None:
    path = write(tmp_path, "\nserver.port=9000\nproxy.ip.allow=\\u12G4\n", "a.properties")
    loadError(path, "proxy.ip.allow", 3, "malformed \\uXXXX")


# --- application.properties mapping ---------------------------------------------


def props(tmp_path: Path, text: str) -> Settings:
    return config.load(write(tmp_path, text, "application.properties"))


def otherNotices(settings: Settings) -> tuple[str, ...]:
    """The notices but the open-proxy warning (a bare server.port listens on
    every interface; test_propertiesOpenProxyWarning pins that one)."""
    return tuple(notice for notice in settings.notices if "OPEN PROXY" not in notice)


def propsError(tmp_path: Path, text: str, key: str | None, line: int | None,
               *fragments: str, load=config.load) -> ConfigError:
    return loadError(write(tmp_path, text, "application.properties"), key, line, *fragments, load=load)


def test_propertiesEverything(tmp_path: Path) -> None:
    (tmp_path.parent / "logs").mkdir(exist_ok=True)
    settings = props(
        tmp_path,
        """\
server.port=9100
server.address=192.0.2.10
proxy.header.filter=Host, X-Forwarded-For ,x-real-ip
proxy.ip.allow=10.1.2.3;10.1.*.*,192.0.2.0/24
proxy.ssl.client.connectTimeout=5
proxy.ssl.client.socketTimeout=61.5
proxy.ssl.client.connectionRequestTimeout=7
proxy.httpclient.maxConnPerRoute=20
proxy.httpclient.maxConnTotal=50
logging.file.name=../logs/apim-proxy.log
server.ssl.enabled=false
proxy.ssl.client.enabled=false
""",
    )
    path = tmp_path / "application.properties"
    defaults = Settings()
    assert settings.source == str(path)
    assert settings.notices == ()
    assert settings.forward == config.ForwardSettings(
        listen="tcp:9100:interface=192.0.2.10",
        client_allow=(net("10.1.2.3/32"), net("10.1.0.0/16"), net("192.0.2.0/24")),
        connect_ports=defaults.forward.connect_ports,
        header_filter=frozenset({b"x-target-host", b"x-forwarded-for", b"x-real-ip"}),
        client_idle_timeout=defaults.forward.client_idle_timeout,
    )
    assert settings.upstream == config.UpstreamSettings(
        connect_timeout=5.0, read_timeout=61.5, pool_wait_timeout=7.0,
        idle_timeout=defaults.upstream.idle_timeout,
        max_connections_per_destination=20, max_connections_total=50,
    )
    assert settings.logging == config.LoggingSettings(
        access_log=str((tmp_path.parent / "logs" / "apim-proxy.log").resolve()),
        level=defaults.logging.level,
    )


def test_propertiesEmptyIsDefaults(tmp_path: Path) -> None:
    settings = props(tmp_path, "# nothing\n")
    assert settings == Settings(source=str(tmp_path / "application.properties"))


def test_propertiesIsLoadedByLegacy(tmp_path: Path) -> None:
    path = write(tmp_path, "server.port=9001\n", "application.properties")
    assert legacy.loadProperties(path) == config.load(path)
    assert config.load(path).forward.listen == "tcp:9001"


@pytest.mark.parametrize(
    "text, listen, interface",
    [
        # Like Spring: all interfaces unless server.address is given.
        ("server.port=8080\n", "tcp:8080", ""),
        ("server.port=1\nserver.address=127.0.0.1\n", "tcp:1:interface=127.0.0.1", "127.0.0.1"),
        ("server.address=127.0.0.1\nserver.port=65535\n", "tcp:65535:interface=127.0.0.1",
         "127.0.0.1"),
        ("server.address=0.0.0.0\n", "tcp:9000:interface=0.0.0.0", "0.0.0.0"),
        ("server.port=9000\nserver.address=::1\n", "tcp:9000:interface=\\:\\:1", "::1"),
        ("server.port=9000\nserver.address=[::1]\n", "tcp:9000:interface=\\:\\:1", "::1"),
        ("server.port=9000\nserver.address=2001:DB8:0::7\n",
         "tcp:9000:interface=2001\\:db8\\:\\:7", "2001:db8::7"),
        ("server.port=9000\nserver.address=\\:\\:\n", "tcp:9000:interface=\\:\\:", "::"),
    ],
)
def test_propertiesListen(tmp_path: Path, text: str, listen: str, interface: str) -> None:
    settings = props(tmp_path, text)
    assert settings.forward.listen == listen
    assert config.parseListen(listen) == config.ListenAddress(interface, int(listen.split(":")[1]))


@pytest.mark.parametrize("port", ["0", "65536", "-1", "abc", "90 00", "", "9000.0"])
def test_propertiesBadPort(tmp_path: Path, port: str) -> None:
    propsError(tmp_path, f"# listener\n\nserver.port={port}\n", "server.port", 3,
               "port number from 1 to 65535", repr(port))


@pytest.mark.parametrize("address", ["localhost", "10.0.0.256", "::g", ""])
def test_propertiesBadAddress(tmp_path: Path, address: str) -> None:
    propsError(tmp_path, f"server.port=9000\nserver.address={address}\n", "server.address", 2,
               "must be an IP address", repr(address))


@pytest.mark.parametrize(
    "value, expected",
    [
        # The Java default: host is dropped (the proxy sets it), not refused.
        ("host,x-target-host", {b"x-target-host"}),
        (" Host ,X-A", {b"x-target-host", b"x-a"}),
        ("", {b"x-target-host"}),
        ("Cookie", {b"x-target-host", b"cookie"}),
        (" X-A ,, x-b,", {b"x-target-host", b"x-a", b"x-b"}),
        ("X-TARGET-HOST", {b"x-target-host"}),
    ],
)
def test_propertiesHeaderFilter(tmp_path: Path, value: str, expected: set[bytes]) -> None:
    settings = props(tmp_path, f"proxy.header.filter={value}\n")
    assert settings.forward.header_filter == frozenset(expected)


@pytest.mark.parametrize("value", ["x-a,bad header", "x-a;x-b", "caf\\u00e9", "x-a:b", "x-\\u0001"])
def test_propertiesBadHeaderFilter(tmp_path: Path, value: str) -> None:
    propsError(tmp_path, f"\nproxy.header.filter={value}\n", "proxy.header.filter", 2,
               "not a valid header field name (RFC 9110 token)")


@pytest.mark.parametrize("value", ["x-a,Content-Length", "transfer-encoding", "host, TRANSFER-ENCODING "])
def test_propertiesHeaderFilterRefusesFramingFields(tmp_path: Path, value: str) -> None:
    # A filtered Content-Length would let the body be read as a second request.
    propsError(tmp_path, f"server.port=9000\nproxy.header.filter={value}\n", "proxy.header.filter", 2,
               "cannot be filtered: the proxy writes Content-Length, Transfer-Encoding and Host itself")


@pytest.mark.parametrize(
    "value, expected",
    [
        ("", ()),
        ("  ", ()),
        ("10.1.2.3", ("10.1.2.3/32",)),
        ("10.1.2.3;10.1.*.*", ("10.1.2.3/32", "10.1.0.0/16")),
        ("10.1.2.3,10.*.*.*", ("10.1.2.3/32", "10.0.0.0/8")),
        ("10.1.2.3 ; 192.0.2.0/24 , ::1;", ("10.1.2.3/32", "192.0.2.0/24", "::1/128")),
        ("10.1.2.*", ("10.1.2.0/24",)),
    ],
)
def test_propertiesAllow(tmp_path: Path, value: str, expected: tuple[str, ...]) -> None:
    settings = props(tmp_path, f"proxy.ip.allow={value}\n")
    assert settings.forward.client_allow == tuple(net(n) for n in expected)


@pytest.mark.parametrize("value", ["10.1.2.300", "10.*.2.*", "10.1.*", "10.0.0.1/8", "me"])
def test_propertiesBadAllow(tmp_path: Path, value: str) -> None:
    propsError(tmp_path, f"server.port=9000\n\nproxy.ip.allow=127.0.0.1;{value}\n",
               "proxy.ip.allow", 3, value)


@pytest.mark.parametrize(
    "key, field",
    [
        ("proxy.ssl.client.connectTimeout", "connect_timeout"),
        ("proxy.ssl.client.socketTimeout", "read_timeout"),
        ("proxy.ssl.client.connectionRequestTimeout", "pool_wait_timeout"),
    ],
)
def test_propertiesTimeouts(tmp_path: Path, key: str, field: str) -> None:
    assert getattr(props(tmp_path, f"{key}=42\n").upstream, field) == 42.0
    assert getattr(props(tmp_path, f"{key}=0.25\n").upstream, field) == 0.25
    for bad in ["0", "0.0", "-1", "abc", "nan", "inf", "1e3", ""]:
        propsError(tmp_path, f"# t\n{key}={bad}\n", key, 2, "greater than 0", repr(bad))


@pytest.mark.parametrize(
    "key, field",
    [
        ("proxy.httpclient.maxConnPerRoute", "max_connections_per_destination"),
        ("proxy.httpclient.maxConnTotal", "max_connections_total"),
    ],
)
def test_propertiesConnectionLimits(tmp_path: Path, key: str, field: str) -> None:
    assert getattr(props(tmp_path, f"{key}=1\n").upstream, field) == 1
    assert getattr(props(tmp_path, f"{key} = 321\n").upstream, field) == 321
    for bad, problem in [("0", "at least 1"), ("1.5", "integer"), ("-3", "integer"),
                         ("many", "integer"), ("", "integer")]:
        propsError(tmp_path, f"\n\n{key}={bad}\n", key, 3, problem, repr(bad))


def test_propertiesLogFile(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "logs").mkdir()
    (tmp_path / "elsewhere").mkdir()
    path = write(tmp_path / "conf", "logging.file.name=../logs/a.log\n", "application.properties")
    assert config.load(path).logging.access_log == str(tmp_path / "logs" / "a.log")
    absolute = tmp_path / "elsewhere" / "b.log"
    settings = props(tmp_path, f"logging.file.name={absolute}\n")
    assert settings.logging.access_log == str(absolute)
    propsError(tmp_path, "logging.file.name=\n", "logging.file.name", 1, "file name")


UNSUPPORTED = [
    "proxy.httpclient.disableContentCompression",
    "logging.file.total-size-cap",
    "logging.level.com.example.Other",
    "debug",
]


@pytest.mark.parametrize(
    "lines, size, keep",
    [
        ("logging.file.max-size=10MB\n", 10 * 1024**2, 30),
        ("logging.logback.rollingpolicy.max-file-size=512KB\nlogging.logback.rollingpolicy.max-history=7\n",
         512 * 1024, 7),
        ("logging.file.max-size=2048\nlogging.file.max-history=0\n", 2048, 0),
    ],
)
def test_propertiesLogRotationKeys(tmp_path: Path, lines: str, size: int, keep: int) -> None:
    """Spring's rolling-policy keys map onto the proxy's own rotation."""
    settings = props(tmp_path, lines)
    assert (settings.logging.max_size, settings.logging.keep) == (size, keep)


def test_propertiesBadLogSize(tmp_path: Path) -> None:
    propsError(tmp_path, "logging.file.max-size=ten\n", "logging.file.max-size", 1, "size such as 10MB")


@pytest.mark.parametrize("key", UNSUPPORTED)
def test_propertiesNotices(tmp_path: Path, key: str) -> None:
    settings = props(tmp_path, f"server.port=9000\n# x\n{key}={SECRET}\n")
    path = tmp_path / "application.properties"
    assert otherNotices(settings) == (f"{path}:3: {key} is not supported yet and is ignored",)
    assert settings.forward.listen == "tcp:9000"


def test_propertiesReloadShellNotice(tmp_path: Path) -> None:
    # The Java product ran a shell command to renew certificates; we re-read on SIGHUP.
    settings = props(tmp_path, f"server.port=9000\nserver.ssl.reloadShell=sh {SECRET}.sh\n")
    path = tmp_path / "application.properties"
    assert otherNotices(settings) == (
        f"{path}:2: server.ssl.reloadShell is not run: send SIGHUP to re-read the key and trust stores instead",
    )
    assert settings.forward.tls is None


def test_propertiesApplicationNameNotice(tmp_path: Path) -> None:
    settings = props(tmp_path, "spring.application.name=client\n")
    path = tmp_path / "application.properties"
    assert settings.notices == (
        f"{path}:1: spring.application.name has no meaning here and is ignored",
    )


def test_propertiesAllNoticesInOrder(tmp_path: Path) -> None:
    noticed = [*UNSUPPORTED, "server.ssl.reloadShell"]
    text = "".join(f"{key}={SECRET}\n" for key in noticed)
    settings = props(tmp_path, "spring.application.name=client\n" + text)
    keys = ["spring.application.name", *noticed]
    assert len(settings.notices) == len(keys)
    for number, (notice, key) in enumerate(zip(settings.notices, keys), start=1):
        assert notice.startswith(f"{tmp_path / 'application.properties'}:{number}: {key} ")
        assert SECRET not in notice


def test_propertiesDuplicateKey(tmp_path: Path) -> None:
    settings = props(tmp_path, "server.port=9001\nserver.port=9002\nserver.port=9003\n")
    path = tmp_path / "application.properties"
    assert settings.forward.listen == "tcp:9003"
    assert otherNotices(settings) == (
        f"{path}:2: server.port is set again (also at line 1); the last value wins",
        f"{path}:3: server.port is set again (also at line 2); the last value wins",
    )


def test_passwordsNeverShown(tmp_path: Path) -> None:
    # A misspelt password key is an unknown key; its value is not shown.
    error = propsError(tmp_path, f"server.ssl.key-store-pasword={SECRET}\n",
                       "server.ssl.key-store-pasword", 1, "unknown key")
    assert SECRET not in str(error)
    # Nor is it when it cannot even be unescaped.
    error = propsError(tmp_path, f"\nserver.ssl.key-password={SECRET}\\uZZZZ\n",
                       "server.ssl.key-password", 2, "malformed")
    assert SECRET not in str(error)
    # Nor when the store it opens cannot be read.
    error = propsError(
        tmp_path,
        f"server.ssl.enabled=true\nserver.ssl.key-store={tmp_path / 'absent.p12'}\n"
        f"server.ssl.key-store-password={SECRET}\nserver.ssl.key-password={SECRET}\n",
        "server.ssl.key-store", 2, "absent.p12", "cannot read", load=loadMaterial)
    assert SECRET not in str(error)
    # Defence in depth for bad values of any key naming a password.
    assert SECRET not in legacy._shown("some.Password.key", SECRET)
    assert legacy._shown("server.port", "abc") == "'abc'"


# --- application.properties: TLS (server.ssl.*, proxy.ssl.client.*) --------------
#
# The Java product's one key store was both the listener's certificate
# (server.ssl.enabled) and the client certificate for outbound mutual TLS
# (proxy.ssl.client.enabled); its trust store both checked clients
# (client-auth) and verified origins.  Java passwords are literal text.


@dataclass
class Stores:
    dir: Path
    p12: Path  # key + certificate, password SECRET
    pem: Path  # key + certificate, no password
    trustP12: Path  # the certificate alone, password SECRET
    trustPem: Path
    jks: Path  # made by keytool: store password SECRET, key password KEY_SECRET
    certificate: x509.Certificate


KEY_SECRET = "k3y-Pa55-only"
TRUST_SECRET = "tru5t-Pa55"


def _identity():
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
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("proxy.example")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, certificate


def _p12(path: Path, key, certificate, password: str) -> Path:
    path.write_bytes(pkcs12.serialize_key_and_certificates(
        b"proxy", key, certificate, None, serialization.BestAvailableEncryption(password.encode())))
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> Stores:
    d = tmp_path_factory.mktemp("stores")
    key, certificate = _identity()
    p12 = _p12(d / "server.p12", key, certificate, SECRET)
    pem = d / "server.pem"
    pem.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
        + certificate.public_bytes(serialization.Encoding.PEM))
    trustPem = d / "trust.pem"
    trustPem.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    trustP12 = d / "trust.p12"
    trustP12.write_bytes(pkcs12.serialize_key_and_certificates(
        None, None, None, [pkcs12.PKCS12Certificate(certificate, b"ca")],
        serialization.BestAvailableEncryption(TRUST_SECRET.encode())))
    jks = d / "server.jks"
    result = subprocess.run(
        [require_tool("keytool"), "-importkeystore", "-srckeystore", str(p12), "-srcstoretype", "PKCS12",
         "-srcstorepass", SECRET, "-destkeystore", str(jks), "-deststoretype", "JKS",
         "-deststorepass", SECRET, "-destkeypass", KEY_SECRET, "-noprompt"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert jks.read_bytes()[:4] == b"\xfe\xed\xfe\xed"
    return Stores(d, p12, pem, trustP12, trustPem, jks, certificate)


def secret(spec: str) -> str:
    """The password a (mapped) password setting stands for."""
    return resolvePassword(spec) if spec else ""


def test_propertiesTlsEverything(tmp_path: Path, stores: Stores) -> None:
    relative = os.path.relpath(stores.p12, tmp_path)
    settings = props(
        tmp_path,
        "server.port=9443\n"
        "server.ssl.enabled=true\n"
        f"server.ssl.key-store=file:{relative}\n"
        f"server.ssl.key-store-password={SECRET}\n"
        f"server.ssl.key-password={SECRET}\n"
        f"server.ssl.trust-store=file:{stores.trustP12}\n"
        f"server.ssl.trust-store-password={TRUST_SECRET}\n"
        "server.ssl.client-auth=need\n"
        "proxy.ssl.client.enabled=true\n"
        "proxy.ssl.client.validateCertificate=true\n"
        "proxy.ssl.client.tls-version=TLSv1.3\n",
    )
    assert settings.notices == ()
    tls = settings.forward.tls
    assert tls is not None
    assert tls.key_store.path == str(stores.p12)
    assert (secret(tls.key_store.password), secret(tls.key_store.key_password)) == (SECRET, SECRET)
    assert tls.trust_store is not None and tls.trust_store.path == str(stores.trustP12)
    assert secret(tls.trust_store.password) == TRUST_SECRET
    assert (tls.client_auth, tls.min_version) == ("need", "TLSv1.2")
    origin = settings.upstream.tls
    # One key store for both directions, one trust store for clients and origins.
    assert origin.key_store == tls.key_store
    assert origin.trust_store == tls.trust_store
    assert (origin.verify, origin.min_version, origin.max_version) == (True, "TLSv1.3", "TLSv1.3")
    assert settings.upstream.tls_profiles == ()


def test_propertiesTlsSample() -> None:
    # The shipped sample keeps TLS off and the defaults of the Java product.
    settings = config.load(ETC / "application.properties")
    assert settings.forward.tls is None
    assert settings.upstream.tls == config.OriginTLSProfile()


@pytest.mark.parametrize("form", ["file:{relative}", "{relative}", "file:{absolute}", "{absolute}",
                                  "file://{absolute}"])
def test_propertiesTlsStoreLocations(tmp_path: Path, stores: Stores, form: str) -> None:
    """Spring resource locations: file: prefixes; relative to the properties file's directory."""
    (tmp_path / "conf").mkdir(exist_ok=True)
    relative = os.path.relpath(stores.pem, tmp_path / "conf")
    location = form.format(relative=relative, absolute=stores.pem)
    trust = form.format(relative=os.path.relpath(stores.trustPem, tmp_path / "conf"), absolute=stores.trustPem)
    path = write(tmp_path / "conf",
                 f"server.ssl.enabled=true\nserver.ssl.key-store={location}\nserver.ssl.trust-store={trust}\n",
                 "application.properties")
    settings = config.load(path)
    assert settings.forward.tls.key_store.path == str(stores.pem)
    assert settings.upstream.tls.trust_store.path == str(stores.trustPem)


@pytest.mark.parametrize("key, line", [("server.ssl.key-store", 3), ("server.ssl.trust-store", 4)])
def test_propertiesTlsClasspathRefused(tmp_path: Path, stores: Stores, key: str, line: int) -> None:
    values = {"server.ssl.key-store": str(stores.pem), "server.ssl.trust-store": str(stores.trustPem)}
    values[key] = "classpath:keystore/server.jks"
    propsError(
        tmp_path,
        "server.port=9000\nserver.ssl.enabled=true\n"
        f"server.ssl.key-store={values['server.ssl.key-store']}\n"
        f"server.ssl.trust-store={values['server.ssl.trust-store']}\n",
        key, line, "classpath:", "give a file path",
    )


@pytest.mark.parametrize("password", ["env:MYDATAPROXY_TEST_PASSWORD", "file:/etc/hostname", "pass:word",
                                      "plain \u00e9 text"])
def test_propertiesTlsPasswordsAreLiteral(tmp_path: Path, monkeypatch, password: str) -> None:
    """Java passwords are text: "env:X" as a Java password is those five characters, not a variable."""
    monkeypatch.setenv("MYDATAPROXY_TEST_PASSWORD", SECRET)
    key, certificate = _identity()
    store = _p12(tmp_path / "literal.p12", key, certificate, password)
    escaped = password.replace("\u00e9", "\\u00e9")
    settings = props(
        tmp_path,
        f"server.ssl.enabled=true\nserver.ssl.key-store={store}\n"
        f"server.ssl.key-store-password={escaped}\nserver.ssl.key-password={escaped}\n",
    )
    assert secret(settings.forward.tls.key_store.password) == password
    assert secret(settings.forward.tls.key_store.key_password) == password
    # Read as a TOML spec instead, the same text would be a variable or a file: wrong here.
    if password.startswith("env:"):
        assert resolvePassword(password) == SECRET


def test_propertiesTlsKeyPassword(tmp_path: Path, stores: Stores) -> None:
    """server.ssl.key-password opens the private key of a JKS whose store password differs."""
    text = f"server.ssl.enabled=true\nserver.ssl.key-store=file:{stores.jks}\nserver.ssl.key-store-password={SECRET}\n"
    settings = props(tmp_path, text + f"server.ssl.key-password={KEY_SECRET}\n")
    assert secret(settings.forward.tls.key_store.key_password) == KEY_SECRET
    error = propsError(tmp_path, text, "server.ssl.key-store", 2, str(stores.jks), load=loadMaterial)
    assert SECRET not in str(error) and KEY_SECRET not in str(error)


@pytest.mark.parametrize("password, line", [(SECRET + "-wrong", 3), ("", 3)])
def test_propertiesTlsWrongStorePassword(tmp_path: Path, stores: Stores, password: str, line: int) -> None:
    error = propsError(
        tmp_path,
        "server.port=9000\nserver.ssl.enabled=true\n"
        f"server.ssl.key-store=file:{stores.p12}\n"
        f"server.ssl.key-store-password={password}\n",
        "server.ssl.key-store", line, str(stores.p12), "password", load=loadMaterial,
    )
    assert SECRET not in str(error)


def test_propertiesTlsWrongTrustStorePassword(tmp_path: Path, stores: Stores) -> None:
    """The error names the key of the store that failed, not the other one."""
    error = propsError(
        tmp_path,
        "server.ssl.enabled=true\n"
        f"server.ssl.key-store={stores.p12}\n"
        f"server.ssl.key-store-password={SECRET}\n"
        f"server.ssl.trust-store={stores.trustP12}\n"
        f"server.ssl.trust-store-password={SECRET}-wrong\n"
        "server.ssl.client-auth=need\n",
        "server.ssl.trust-store", 4, str(stores.trustP12), "wrong password", load=loadMaterial,
    )
    assert SECRET not in str(error) and TRUST_SECRET not in str(error)


@pytest.mark.parametrize(
    "value, expected",
    [("need", "need"), ("want", "want"), ("none", "none"), ("NEED", "need"), (" Want ", "want"), ("", "none")],
)
def test_propertiesTlsClientAuth(tmp_path: Path, stores: Stores, value: str, expected: str) -> None:
    settings = props(
        tmp_path,
        f"server.ssl.enabled=true\nserver.ssl.key-store={stores.pem}\n"
        f"server.ssl.trust-store={stores.trustPem}\nserver.ssl.client-auth={value}\n",
    )
    tls = settings.forward.tls
    assert tls.client_auth == expected
    # The trust store checks clients only when they are asked for a certificate ...
    assert (tls.trust_store is not None) == (expected != "none")
    # ... and verifies origins in every case.
    assert settings.upstream.tls.trust_store.path == str(stores.trustPem)


def test_propertiesTlsClientAuthErrors(tmp_path: Path, stores: Stores) -> None:
    base = f"server.ssl.enabled=true\nserver.ssl.key-store={stores.pem}\n"
    propsError(tmp_path, base + "server.ssl.client-auth=required\n", "server.ssl.client-auth", 3,
               "must be need, want or none", "'required'")
    for value in ("need", "want"):
        propsError(tmp_path, base + f"server.ssl.client-auth={value}\n", "server.ssl.client-auth", 3,
                   "needs server.ssl.trust-store")


@pytest.mark.parametrize("value", ["true", "TRUE", "on", "yes", "1"])
def test_propertiesTlsEnabled(tmp_path: Path, stores: Stores, value: str) -> None:
    settings = props(tmp_path, f"server.port=9443\nserver.ssl.enabled={value}\nserver.ssl.key-store={stores.pem}\n")
    assert settings.forward.tls == config.ServerTLSSettings(config.StoreRef(str(stores.pem)))
    assert settings.forward.listen == "tcp:9443"
    # The listener's key store is not a client certificate unless asked for.
    assert settings.upstream.tls == config.OriginTLSProfile()
    settings = props(tmp_path, f"proxy.ssl.client.enabled={value}\nserver.ssl.key-store={stores.pem}\n")
    assert settings.forward.tls is None
    assert settings.upstream.tls == config.OriginTLSProfile(key_store=config.StoreRef(str(stores.pem)))


@pytest.mark.parametrize("key, needs", [
    ("server.ssl.enabled", "needs server.ssl.key-store"),
    ("proxy.ssl.client.enabled", "needs server.ssl.key-store"),
])
@pytest.mark.parametrize("value", ["true", "on", "1"])
def test_propertiesTlsEnabledWithoutKeyStore(tmp_path: Path, key: str, needs: str, value: str) -> None:
    # Refusing to start is safer than serving plaintext or sending no certificate.
    propsError(tmp_path, f"server.port=9000\n{key}={value}\n", key, 2, needs)
    propsError(tmp_path, f"server.port=9000\n{key}={value}\nserver.ssl.key-store=\n", key, 2, needs)


@pytest.mark.parametrize("key", ["server.ssl.enabled", "proxy.ssl.client.enabled"])
def test_propertiesTlsDisabled(tmp_path: Path, stores: Stores, key: str) -> None:
    for value in ["false", "False", "off", "no", "0"]:
        settings = props(tmp_path, f"{key}={value}\n")
        assert settings == Settings(source=str(tmp_path / "application.properties"))
        # A key store alone enables nothing.
        settings = props(tmp_path, f"{key}={value}\nserver.ssl.key-store={stores.pem}\n")
        assert settings.forward.tls is None and settings.upstream.tls == config.OriginTLSProfile()
    propsError(tmp_path, f"{key}=maybe\n", key, 1, "must be true or false", "'maybe'")


def test_propertiesTlsValidateCertificateFalse(tmp_path: Path, stores: Stores, capsys) -> None:
    text = (
        f"server.ssl.key-store={stores.pem}\n"
        "proxy.ssl.client.enabled=true\n"
        "\n"
        "proxy.ssl.client.validateCertificate=false\n"
    )
    settings = props(tmp_path, text)
    path = tmp_path / "application.properties"
    origin = settings.upstream.tls
    assert origin.verify is False
    # Unlike the Java product, the client certificate is still sent.
    assert origin.key_store == config.StoreRef(str(stores.pem))
    assert settings.notices == (
        f"{path}:4: proxy.ssl.client.validateCertificate=false: origin certificates are NOT verified"
        " (the client certificate is still sent)",
    )
    # check-config says so too.
    assert cli.checkConfig(str(path)) == 0
    out = capsys.readouterr().out
    assert f"warning: {path}:4: proxy.ssl.client.validateCertificate=false" in out
    assert "WARNING: verify=false" in out
    for value in ("true", "TRUE", "1"):
        settings = props(tmp_path, f"proxy.ssl.client.validateCertificate={value}\n")
        assert settings.upstream.tls.verify is True and settings.notices == ()
    propsError(tmp_path, "\nproxy.ssl.client.validateCertificate=never\n",
               "proxy.ssl.client.validateCertificate", 2, "must be true or false")


@pytest.mark.parametrize(
    "value, versions, dropped",
    [
        ("TLSv1.2", ("TLSv1.2", "TLSv1.2"), ""),
        ("TLSv1.3", ("TLSv1.3", "TLSv1.3"), ""),
        ("TLSv1.2,TLSv1.3", ("TLSv1.2", "TLSv1.3"), ""),
        (" TLSv1.3 , TLSv1.2 ,", ("TLSv1.2", "TLSv1.3"), ""),
        ("TLSv1.1,TLSv1.2", ("TLSv1.2", "TLSv1.2"), "TLSv1.1"),
        ("TLSv1,TLSv1.1,TLSv1.2,TLSv1.3", ("TLSv1.2", "TLSv1.3"), "TLSv1, TLSv1.1"),
    ],
)
def test_propertiesTlsVersions(tmp_path: Path, value: str, versions: tuple[str, str], dropped: str) -> None:
    settings = props(tmp_path, f"server.port=9000\nproxy.ssl.client.tls-version={value}\n")
    assert (settings.upstream.tls.min_version, settings.upstream.tls.max_version) == versions
    path = tmp_path / "application.properties"
    expected = (f"{path}:2: proxy.ssl.client.tls-version: {dropped} not offered (too weak)",) if dropped else ()
    assert otherNotices(settings) == expected


@pytest.mark.parametrize("value", ["TLSv1", "TLSv1,TLSv1.1", "SSLv3", ""])
def test_propertiesTlsVersionsNoneLeft(tmp_path: Path, value: str) -> None:
    propsError(tmp_path, f"server.port=9000\n\nproxy.ssl.client.tls-version={value}\n",
               "proxy.ssl.client.tls-version", 3, "needs TLSv1.2 or TLSv1.3")


def test_propertiesTlsUnreadableStores(tmp_path: Path, stores: Stores) -> None:
    garbage = tmp_path / "garbage.jks"
    garbage.write_bytes(b"\xfe\xed\xfe\xed" + b"\x00" * 7)
    propsError(tmp_path, f"server.ssl.enabled=true\nserver.ssl.key-store={garbage}\n",
               "server.ssl.key-store", 2, str(garbage), load=loadMaterial)
    # A trust store that is read for origins even with the listener in plain text.
    propsError(tmp_path, f"server.port=9000\nserver.ssl.trust-store={tmp_path / 'none.jks'}\n",
               "server.ssl.trust-store", 2, "none.jks", "cannot read", load=loadMaterial)
    # A key store holding no key.
    propsError(tmp_path, f"server.ssl.enabled=true\nserver.ssl.key-store={stores.trustPem}\n",
               "server.ssl.key-store", 2, "no private-key entry", load=loadMaterial)


@pytest.mark.parametrize(
    "key, hint",
    [
        ("server.prot", "did you mean server.port?"),
        ("Server.port", "did you mean server.port?"),
        ("proxy.ip.alow", "did you mean proxy.ip.allow?"),
        ("proxy.ssl.client.connecttimeout", "did you mean proxy.ssl.client.connectTimeout?"),
        ("management.endpoints.web.exposure.include", ""),
        ("logging.level", ""),
    ],
)
def test_propertiesUnknownKey(tmp_path: Path, key: str, hint: str) -> None:
    propsError(tmp_path, f"server.port=9000\n\n{key}=1\n", key, 3, "unknown key", hint)


def test_propertiesUnreadable(tmp_path: Path) -> None:
    loadError(tmp_path / "application.properties", None, None, "cannot read")


def test_propertiesLatin1(tmp_path: Path) -> None:
    # Spring Boot 2 read application.properties as ISO-8859-1.
    path = tmp_path / "application.properties"
    path.write_bytes(b"# \xe9t\xe9\nspring.application.name=caf\xe9\nserver.port=9000\n")
    settings = config.load(path)
    assert settings.forward.listen == "tcp:9000"
    assert len(otherNotices(settings)) == 1


def test_propertiesContinuationInMapping(tmp_path: Path) -> None:
    text = (
        "proxy.ip.allow=10.1.2.3;\\\n"
        "    10.1.*.*;\\\n"
        "    192.0.2.1\n"
        "server.\\u0070ort = 9\\u0030\\u00301\n"
    )
    settings = props(tmp_path, text)
    assert settings.forward.client_allow == (
        net("10.1.2.3/32"), net("10.1.0.0/16"), net("192.0.2.1/32"))
    assert settings.forward.listen == "tcp:9001"
    # Line numbers still count the physical lines of continued entries.
    propsError(tmp_path, text + "bogus=1\n", "bogus", 5, "unknown key")


# --- Issue 7: what start-up would trip on, caught at load ------------------------


@pytest.mark.parametrize(
    "names, problem",
    [
        (["x-a", "Content-Length"], "'Content-Length' cannot be filtered"),
        (["transfer-encoding"], "'transfer-encoding' cannot be filtered"),
        ([" TRANSFER-ENCODING "], "'TRANSFER-ENCODING' cannot be filtered"),
        (["Host", "x-a"], "'Host' cannot be filtered"),
        (["caf\u00e9"], "not a valid header field name (RFC 9110 token)"),
        (["x a"], "not a valid header field name"),
        (["x-a:"], "not a valid header field name"),
        ([""], "not a valid header field name"),
        (["x-\\u0001"], "not a valid header field name"),  # a TOML escape: U+0001
    ],
)
def test_tomlHeaderFilterRefusesFramingAndNonTokens(tmp_path: Path, names: list[str], problem: str) -> None:
    listed = ", ".join(f'"{name}"' for name in names)
    loadError(write(tmp_path, f"[forward]\n\nheader_filter = [{listed}]\n"), "forward.header_filter", 3, problem)


def test_headerFilterDefault() -> None:
    assert not config.ForwardSettings().header_filter & config.PROXY_WRITTEN_FIELDS


def test_tomlHttpPorts(tmp_path: Path) -> None:
    assert config.load(write(tmp_path, "")).forward.http_ports == ((80, 80), (443, 443), (8080, 8080), (8443, 8443))
    settings = config.load(write(tmp_path, '[forward]\nhttp_ports = [443, "1024-65535", 80]\n'))
    assert settings.forward.http_ports == ((80, 80), (443, 443), (1024, 65535))


@pytest.mark.parametrize(
    "value, problem",
    [
        ("[]", "non-empty list"),
        ("80", "non-empty list"),
        ("[0]", "ports run from 1 to 65535"),
        ("[65536]", "ports run from 1 to 65535"),
        ('["90-80"]', "ports run from 1 to 65535, low to high"),
        ('["1-70000"]', "ports run from 1 to 65535"),
        ('["80"]', "neither a port number nor"),
        ('["80-"]', "neither a port number nor"),
        ("[true]", "neither a port number nor"),
        ("[80.0]", "neither a port number nor"),
    ],
)
def test_tomlHttpPortsErrors(tmp_path: Path, value: str, problem: str) -> None:
    loadError(write(tmp_path, f"[forward]\nlisten = 'tcp:1'\nhttp_ports = {value}\n"), "forward.http_ports", 3, problem)


@pytest.mark.parametrize(
    "listen, problem",
    [
        # Each of these started, then failed in bind() with a traceback.
        ("tcp:70000:interface=127.0.0.1", "port 70000 is out of range (0-65535)"),
        ("tcp:-1:interface=127.0.0.1", "port -1 is out of range"),
        ("tcp:9000:interface=localhost", "interface 'localhost' is not an IP address"),
        ("tcp:9000:interface=10.0.0.256", "is not an IP address"),
        ("tcp:9000:bogus=1", "not a valid endpoint description"),
        ("ssl:9443:privateKey=/nonexistent.pem", "not a valid endpoint description"),
        ("systemd:domain=INET:index=7", "not a valid endpoint description"),
    ],
)
def test_tomlListenChecked(tmp_path: Path, listen: str, problem: str) -> None:
    loadError(write(tmp_path, f"[forward]\n# the listener\nlisten = '{listen}'\n"), "forward.listen", 3, problem)


@pytest.mark.parametrize(
    "listen, address",
    [
        ("tcp:0:interface=127.0.0.1", config.ListenAddress("127.0.0.1", 0)),
        ("tcp:65535", config.ListenAddress("", 65535)),
        ("tcp6:9000", config.ListenAddress("::", 9000)),
        ("tcp:9000:interface=\\:\\:1", config.ListenAddress("::1", 9000)),
        ("unix:/run/mydataproxy.sock", None),
    ],
)
def test_parseListen(listen: str, address: config.ListenAddress | None) -> None:
    assert config.parseListen(listen) == address


def test_tomlAccessLogDirectoryMissing(tmp_path: Path) -> None:
    loadError(
        write(tmp_path, '[logging]\n\naccess_log = "logs/access.log"\n'),
        "logging.access_log", 3, f"the directory {tmp_path / 'logs'} does not exist",
    )
    (tmp_path / "logs").write_text("a file, not a directory")
    loadError(
        write(tmp_path, '[logging]\naccess_log = "logs/access.log"\n'),
        "logging.access_log", 2, f"{tmp_path / 'logs'} is not a directory",
    )


def test_propertiesAccessLogDirectoryMissing(tmp_path: Path) -> None:
    propsError(tmp_path, "server.port=9000\nlogging.file.name=../nowhere/proxy.log\n", "logging.file.name", 2,
               f"the directory {tmp_path.parent / 'nowhere'} does not exist")


OPEN = "OPEN PROXY"


@pytest.mark.parametrize(
    "forward, line",
    [
        ('listen = "tcp:9000"', 2),
        ('client_allow = []\nlisten = "tcp:9000:interface=0.0.0.0"', 3),
        ('listen = "tcp6:9000"', 2),
        ('listen = "tcp:9000:interface=192.0.2.10"\nclient_allow = ["0.0.0.0/0"]', 2),
    ],
)
def test_tomlOpenProxyWarning(tmp_path: Path, forward: str, line: int) -> None:
    path = write(tmp_path, f"[forward]\n{forward}\n")
    (notice,) = config.load(path).notices
    assert notice.startswith(f"{path}:{line}: {OPEN}: forward.listen "), notice
    assert "forward.client_allow admits every client and forward.auth_file is not set" in notice


@pytest.mark.parametrize(
    "forward",
    [
        'listen = "tcp:9000:interface=127.0.0.1"',
        "listen = 'tcp:9000:interface=\\:\\:1'",
        'listen = "tcp:9000"\nclient_allow = ["10.0.0.0/8"]',
        'listen = "tcp:9000"\nauth_file = "proxy.htpasswd"',
        'listen = "unix:proxy.sock"',
    ],
)
def test_tomlNotAnOpenProxy(tmp_path: Path, forward: str) -> None:
    (tmp_path / "proxy.htpasswd").write_text("gateway:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n")
    assert config.load(write(tmp_path, f"[forward]\n{forward}\n")).notices == ()


def test_tomlClientCertificatesCloseTheProxy() -> None:
    forward = config.ForwardSettings(
        listen="tcp:9000", tls=config.ServerTLSSettings(config.StoreRef("k.p12"), config.StoreRef("ca.pem"), "need")
    )
    assert not config.isOpenProxy(forward)
    assert config.isOpenProxy(replace(forward, tls=replace(forward.tls, client_auth="want")))


@pytest.mark.parametrize(
    "text, line, bound",
    [
        # The drop-in case: the Java product listened on every interface.
        ("spring.application.name=x\nserver.port=9000\n", 2,
         "server.address is not set, so every interface is listened on (tcp:9000)"),
        ("server.port=9000\nserver.address=0.0.0.0\n", 2,
         "server.address is not a loopback address (tcp:9000:interface=0.0.0.0)"),
        ("server.address=192.0.2.1\nproxy.ip.allow=\n", 1,
         "server.address is not a loopback address (tcp:9000:interface=192.0.2.1)"),
    ],
)
def test_propertiesOpenProxyWarning(tmp_path: Path, text: str, line: int, bound: str) -> None:
    settings = props(tmp_path, text)
    path = tmp_path / "application.properties"
    assert settings.notices[-1] == (
        f"{path}:{line}: {OPEN}: {bound}, proxy.ip.allow admits every client and no client certificate"
        " is required: anyone who can reach the port can use this proxy; set proxy.ip.allow or server.address"
    )
    assert settings.forward.listen.startswith("tcp:9000")


@pytest.mark.parametrize(
    "text",
    ["server.port=9000\nserver.address=127.0.0.1\n", "server.port=9000\nproxy.ip.allow=10.1.*.*\n", "debug=true\n"],
)
def test_propertiesNotAnOpenProxy(tmp_path: Path, text: str) -> None:
    assert not any(OPEN in notice for notice in props(tmp_path, text).notices)


@pytest.mark.parametrize(
    "key",
    ["proxy.ssl.client.connectTimeout", "proxy.ssl.client.socketTimeout", "proxy.ssl.client.connectionRequestTimeout"],
)
def test_propertiesMillisecondTimeoutsWarned(tmp_path: Path, key: str) -> None:
    text = f"server.address=127.0.0.1\n{key}=60000\n"
    settings = props(tmp_path, text)
    path = tmp_path / "application.properties"
    assert settings.notices == (
        f"{path}:2: {key}=60000: 60000 seconds: did you mean milliseconds? (MyData Proxy reads this key in seconds)",
    )
    assert props(tmp_path, f"server.address=127.0.0.1\n{key}=999\n").notices == ()


def test_tomlNotUtf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"# caf\xe9\n")
    loadError(path, None, None, "cannot read", "utf-8")


@pytest.mark.parametrize("name", ["conf.toml", "conf.properties"])
def test_configIsADirectory(tmp_path: Path, name: str) -> None:
    (tmp_path / name).mkdir()
    loadError(tmp_path / name, None, None, "cannot read", "Is a directory")


@pytest.mark.parametrize("name, method", [("a.toml", "read_bytes"), ("a.properties", "read_bytes")])
def test_configUnreadable(tmp_path: Path, monkeypatch, name: str, method: str) -> None:
    # Tests run as root, which chmod cannot lock out: fail the read itself.
    path = write(tmp_path, "", name)

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, method, refuse)
    loadError(path, None, None, "cannot read", "Permission denied")


# --- The shipped samples ---------------------------------------------------------


SAMPLES = sorted([*ETC.glob("*.toml"), *ETC.glob("*.properties")])


def test_samplesExist() -> None:
    assert list(ETC.glob("*.toml")), f"no *.toml sample in {ETC}"
    assert list(ETC.glob("*.properties")), f"no *.properties sample in {ETC}"


@pytest.mark.parametrize("path", SAMPLES, ids=[p.name for p in SAMPLES])
def test_sampleLoads(path: Path) -> None:
    settings = config.load(path)
    assert settings.source == str(path)
    # Samples must be safe to run on a workstation: loopback only.
    address = config.parseListen(settings.forward.listen)
    assert address is not None and address.interface, f"{path.name} listens on all interfaces"
    assert ipaddress.ip_address(address.interface).is_loopback, settings.forward.listen
    assert not any("OPEN PROXY" in notice for notice in settings.notices)


def test_propertiesSampleTellsTheTruthAboutTLS() -> None:
    """Issue 7 item 20: listener TLS and outbound mutual TLS are mapped now."""
    text = (ETC / "application.properties").read_text(encoding="utf-8")
    assert "not supported yet" not in text
    comments = " ".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#"))
    assert "TLS is supported both ways" in comments


def _sampleExamples(text: str) -> set[str]:
    """The dotted keys (and array tables) the sample marks C{# example}."""
    examples, section = set(), ""
    for line in text.splitlines():
        code, _, comment = line.partition("#")
        header = re.fullmatch(r"\s*\[\[?\s*([\w.]+)\s*\]\]?\s*", code)
        if header:
            section = header.group(1)
            if comment.strip() == "example":
                examples.add(section)
        elif "=" in code and comment.strip() == "example":
            examples.add(f"{section}.{code.split('=')[0].strip()}")
    return examples


def test_tomlSampleShowsTheEmbeddedDefaults() -> None:
    """
    Issue 7 item 20: every value etc/mydataproxy.toml sets is the embedded
    default, except where the sample says "# example".
    """
    path = ETC / "mydataproxy.toml"
    text = path.read_text(encoding="utf-8")
    assert 'except on lines marked\n# "# example"' in text
    examples = _sampleExamples(text)
    assert examples == {"forward.client_allow", "egress.rules"}
    loaded, defaults = config.load(path), Settings()
    compared = 0
    for section, table in tomllib.loads(text).items():
        for key, value in table.items():
            if f"{section}.{key}" in examples:
                continue
            ours, theirs = getattr(loaded, section), getattr(defaults, section)
            if isinstance(value, dict):  # [upstream.tls]
                ours, theirs, keys = getattr(ours, key), getattr(theirs, key), list(value)
            else:
                keys = [key]
            for name in keys:
                assert getattr(ours, name) == getattr(theirs, name), f"{section}.{key} {name}"
                compared += 1
    assert compared > 30, "the sample should show (nearly) every key"
