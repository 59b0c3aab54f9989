"""
Tests for L{mydataproxy.config} (TOML) and L{mydataproxy.legacy} (the Java
product's application.properties).  Pure unit tests: files under tmp_path, no
network.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from mydataproxy import config, legacy
from mydataproxy.config import ConfigError, Settings

ETC = Path(__file__).resolve().parent.parent / "etc"
SECRET = "s3cr3t-Pa55"


def write(tmp_path: Path, text: str, name: str = "mydataproxy.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def loadError(path: Path, key: str | None, line: int | None, *fragments: str) -> ConfigError:
    """Load C{path}, expecting a ConfigError located at C{key} and C{line}."""
    with pytest.raises(ConfigError) as info:
        config.load(path)
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
header_filter = ["Host", " X-Secret ", "x-target-host"]
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
    settings = config.load(path)
    assert settings.source == str(path)
    assert settings.notices == ()
    assert settings.forward == config.ForwardSettings(
        listen="tcp:8123:interface=127.0.0.1",
        client_allow=(
            net("10.1.0.0/16"), net("192.0.2.7/32"), net("::1/128"), net("10.2.0.0/16"),
        ),
        connect_ports=frozenset({443, 8443}),
        header_filter=frozenset({b"host", b"x-secret", b"x-target-host"}),
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
    assert settings.logging.access_log == "-"


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
    ],
)
def test_tomlErrors(tmp_path: Path, text: str, key: str, line: int, fragment: str) -> None:
    loadError(write(tmp_path, text), key, line, fragment)


def test_tomlSyntaxError(tmp_path: Path) -> None:
    loadError(write(tmp_path, "[forward\n"), None, None, "not valid TOML")


def test_tomlUnreadable(tmp_path: Path) -> None:
    loadError(tmp_path / "missing.toml", None, None, "cannot read")


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


def propsError(tmp_path: Path, text: str, key: str | None, line: int | None,
               *fragments: str) -> ConfigError:
    return loadError(write(tmp_path, text, "application.properties"), key, line, *fragments)


def test_propertiesEverything(tmp_path: Path) -> None:
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
        header_filter=frozenset({b"host", b"x-target-host", b"x-forwarded-for", b"x-real-ip"}),
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
    from twisted.internet import endpoints, reactor

    settings = props(tmp_path, text)
    assert settings.forward.listen == listen
    endpoint = endpoints.serverFromString(reactor, listen)
    assert endpoint._interface == interface  # type: ignore[attr-defined]
    assert endpoint._port == int(listen.split(":")[1])  # type: ignore[attr-defined]


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
        ("host,x-target-host", {b"host", b"x-target-host"}),
        ("", {b"host", b"x-target-host"}),
        ("Cookie", {b"host", b"x-target-host", b"cookie"}),
        (" X-A ,, x-b,", {b"host", b"x-target-host", b"x-a", b"x-b"}),
        ("X-TARGET-HOST", {b"host", b"x-target-host"}),
    ],
)
def test_propertiesHeaderFilter(tmp_path: Path, value: str, expected: set[bytes]) -> None:
    settings = props(tmp_path, f"proxy.header.filter={value}\n")
    assert settings.forward.header_filter == frozenset(expected)


@pytest.mark.parametrize("value", ["x-a,bad header", "x-a;x-b", "caf\\u00e9"])
def test_propertiesBadHeaderFilter(tmp_path: Path, value: str) -> None:
    propsError(tmp_path, f"\nproxy.header.filter={value}\n", "proxy.header.filter", 2,
               "not a valid header name")


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
    path = write(tmp_path / "conf", "logging.file.name=../logs/a.log\n", "application.properties")
    assert config.load(path).logging.access_log == str(tmp_path / "logs" / "a.log")
    absolute = tmp_path / "elsewhere" / "b.log"
    settings = props(tmp_path, f"logging.file.name={absolute}\n")
    assert settings.logging.access_log == str(absolute)
    propsError(tmp_path, "logging.file.name=\n", "logging.file.name", 1, "file name")


UNSUPPORTED = [
    "server.ssl.key-store",
    "server.ssl.key-store-password",
    "server.ssl.key-password",
    "server.ssl.trust-store",
    "server.ssl.trust-store-password",
    "server.ssl.client-auth",
    "server.ssl.reloadShell",
    "proxy.ssl.client.validateCertificate",
    "proxy.ssl.client.tls-version",
    "proxy.httpclient.disableContentCompression",
    "logging.file.max-size",
    "logging.level.root",
    "logging.level.org.apache.http",
    "logging.level.httpclient.wire",
    "debug",
]


@pytest.mark.parametrize("key", UNSUPPORTED)
def test_propertiesNotices(tmp_path: Path, key: str) -> None:
    settings = props(tmp_path, f"server.port=9000\n# x\n{key}={SECRET}\n")
    path = tmp_path / "application.properties"
    assert settings.notices == (f"{path}:3: {key} is not supported yet and is ignored",)
    assert settings.forward.listen == "tcp:9000"


def test_propertiesApplicationNameNotice(tmp_path: Path) -> None:
    settings = props(tmp_path, "spring.application.name=client\n")
    path = tmp_path / "application.properties"
    assert settings.notices == (
        f"{path}:1: spring.application.name has no meaning here and is ignored",
    )


def test_propertiesAllNoticesInOrder(tmp_path: Path) -> None:
    text = "".join(f"{key}={SECRET}\n" for key in UNSUPPORTED)
    settings = props(tmp_path, "spring.application.name=client\n" + text)
    keys = ["spring.application.name", *UNSUPPORTED]
    assert len(settings.notices) == len(keys)
    for number, (notice, key) in enumerate(zip(settings.notices, keys), start=1):
        assert notice.startswith(f"{tmp_path / 'application.properties'}:{number}: {key} ")
        assert SECRET not in notice


def test_propertiesDuplicateKey(tmp_path: Path) -> None:
    settings = props(tmp_path, "server.port=9001\nserver.port=9002\nserver.port=9003\n")
    path = tmp_path / "application.properties"
    assert settings.forward.listen == "tcp:9003"
    assert settings.notices == (
        f"{path}:2: server.port is set again (also at line 1); the last value wins",
        f"{path}:3: server.port is set again (also at line 2); the last value wins",
    )


def test_passwordsNeverShown(tmp_path: Path) -> None:
    # Notices name the key, never the value.
    settings = props(
        tmp_path,
        f"server.ssl.key-store-password={SECRET}\n"
        f"server.ssl.key-password  :  {SECRET}\n"
        f"server.ssl.trust-store-password {SECRET}\n",
    )
    assert len(settings.notices) == 3
    assert not any(SECRET in notice for notice in settings.notices)
    # A misspelt password key is an unknown key; its value is not shown.
    error = propsError(tmp_path, f"server.ssl.key-store-pasword={SECRET}\n",
                       "server.ssl.key-store-pasword", 1, "unknown key")
    assert SECRET not in str(error)
    # Nor is it when it cannot even be unescaped.
    error = propsError(tmp_path, f"\nserver.ssl.key-password={SECRET}\\uZZZZ\n",
                       "server.ssl.key-password", 2, "malformed")
    assert SECRET not in str(error)
    # Defence in depth for bad values of any key naming a password.
    assert SECRET not in legacy._shown("some.Password.key", SECRET)
    assert legacy._shown("server.port", "abc") == "'abc'"


@pytest.mark.parametrize("key, fragment", [
    ("server.ssl.enabled", "serve plaintext where TLS is expected"),
    ("proxy.ssl.client.enabled", "without the client certificate"),
])
@pytest.mark.parametrize("value", ["true", "TRUE", "on", "yes", "1"])
def test_propertiesTlsRefused(tmp_path: Path, key: str, fragment: str, value: str) -> None:
    propsError(tmp_path, f"server.port=9000\n{key}={value}\n", key, 2, "refusing to start",
               fragment)


@pytest.mark.parametrize("key", ["server.ssl.enabled", "proxy.ssl.client.enabled"])
def test_propertiesTlsDisabled(tmp_path: Path, key: str) -> None:
    for value in ["false", "False", "off", "no", "0"]:
        settings = props(tmp_path, f"{key}={value}\n")
        assert settings == Settings(source=str(tmp_path / "application.properties"))
    propsError(tmp_path, f"{key}=maybe\n", key, 1, "must be true or false", "'maybe'")


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
    assert len(settings.notices) == 1


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
    from twisted.internet import endpoints, reactor

    endpoint = endpoints.serverFromString(reactor, settings.forward.listen)
    interface = getattr(endpoint, "_interface", "")
    assert interface, f"{path.name} listens on all interfaces"
    assert ipaddress.ip_address(interface).is_loopback, settings.forward.listen
