"""
Tests of the C{[reverse]} section of the TOML loader
(L{mydataproxy.config.toml}): its defaults (some from C{[upstream]} and
C{[limits]}), every validation error (file, line, key and what is wrong),
and the sample C{etc/mydataproxy-reverse.toml}.  Files under tmp_path, no
network.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from mydataproxy import cli, config
from mydataproxy.config import ConfigError, ReverseSettings, RouteBackend, RouteSettings, ServerTLSSettings, StoreRef

ETC = Path(__file__).resolve().parents[2] / "etc"

ROUTE = """\
[[reverse.routes]]
prefix = "/api/"
backends = ["http://127.0.0.1:8001/base/"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mydataproxy.toml"
    path.write_text(text, encoding="utf-8")
    return path


def lineOf(text: str, needle: str, occurrence: int = 0) -> int:
    """The 1-based line of the C{occurrence}th line of C{text} that holds C{needle}."""
    numbers = [number for number, line in enumerate(text.splitlines(), 1) if needle in line]
    return numbers[occurrence]


def loadError(tmp_path: Path, text: str, key: str, line: int | None, *fragments: str) -> ConfigError:
    """Load C{text} from a file, expecting a ConfigError at C{key} and C{line} saying C{fragments}."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    error = info.value
    message = str(error)
    assert (error.source, error.key, error.line) == (str(path), key, line), message
    where = f"{path}:{line}" if line is not None else str(path)
    assert message.startswith(f"{where}: {key}: "), message
    for fragment in fragments:
        assert fragment in message, message
    return error


def reverse(tmp_path: Path, text: str) -> ReverseSettings:
    settings = config.load(write(tmp_path, text))
    assert settings.reverse is not None
    return settings.reverse


# ---------------------------------------------------------------------------
# Defaults
# ---------------------------------------------------------------------------


def test_noReverseSectionNoReverseListener(tmp_path: Path) -> None:
    settings = config.load(write(tmp_path, "[forward]\n"))
    assert settings.reverse is None
    assert settings.forward.enabled


def test_defaults(tmp_path: Path) -> None:
    settings = config.load(write(tmp_path, "[reverse]\n" + ROUTE))
    assert settings.forward.enabled, "forward.enabled defaults to true"
    assert settings.reverse == ReverseSettings(
        listen="tcp:8080:interface=127.0.0.1",
        client_allow=(),
        trusted_proxies=(),
        client_idle_timeout=60.0,
        tls=None,
        routes=(RouteSettings("/api/", b"/api/", (RouteBackend("http", "127.0.0.1", 8001, b"/base/"),)),),
    )
    [route] = settings.reverse.routes
    assert (route.hosts, route.balance, route.preserve_host, route.websocket) == ((), "round_robin", False, True)
    assert (route.connect_timeout, route.read_timeout, route.max_body_bytes) == (60.0, 60.0, 0)
    assert (route.max_concurrent, route.queue_size, route.queue_timeout) == (0, 100, 10.0)
    assert (route.health_check, route.health_interval, route.eject_seconds, route.cookie_domain) == (b"", 10.0, 10.0, b"")


@pytest.mark.parametrize("reverseFirst", [True, False])
def test_routeDefaultsComeFromUpstreamAndLimits(tmp_path: Path, reverseFirst: bool) -> None:
    others = "[upstream]\nconnect_timeout = 3\nread_timeout = 7.5\n\n[limits]\nmax_body_bytes = 1000\n\n"
    routes = "[reverse]\n" + ROUTE + '\n[[reverse.routes]]\nprefix = "/up/"\nbackends = ["http://127.0.0.1:8002/"]\n' \
        "connect_timeout = 1\nread_timeout = 2\nmax_body_bytes = 0\n\n"
    [inherited, own] = reverse(tmp_path, routes + others if reverseFirst else others + routes).routes
    assert (inherited.connect_timeout, inherited.read_timeout, inherited.max_body_bytes) == (3.0, 7.5, 1000)
    assert (own.connect_timeout, own.read_timeout, own.max_body_bytes) == (1.0, 2.0, 0)
    assert isinstance(inherited.connect_timeout, float)


def test_everyKey(tmp_path: Path) -> None:
    (tmp_path / "reverse.p12").write_bytes(b"")
    settings = reverse(
        tmp_path,
        """\
[reverse]
listen = "tcp:8443:interface=127.0.0.2"
client_allow = ["10.0.0.0/8", "::1"]
trusted_proxies = ["127.0.0.1"]
client_idle_timeout = 5

[reverse.tls]
key_store = "reverse.p12"
key_store_password = "env:REVERSE_KS"
min_version = "TLSv1.3"

[[reverse.routes]]
name = "gateway"
prefix = "/api"
backends = ["https://Backend.Internal:8443/gw", "http://[::1]:8001"]
hosts = ["WWW.Example.COM.", "*.example.org"]
balance = "least_connections"
preserve_host = true
websocket = false
connect_timeout = 1.5
read_timeout = 30
max_body_bytes = 1048576
max_concurrent = 50
queue_size = 0
queue_timeout = 2.5
health_check = "/gw/health?deep=1"
health_interval = 0.5
eject_seconds = 30
cookie_domain = ".MyData.Example.com"
""",
    )
    assert settings.listen == "tcp:8443:interface=127.0.0.2"
    assert settings.client_allow == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert settings.trusted_proxies == (ipaddress.ip_network("127.0.0.1/32"),)
    assert settings.client_idle_timeout == 5.0
    assert settings.tls == ServerTLSSettings(
        StoreRef(str(tmp_path / "reverse.p12"), password="env:REVERSE_KS"), min_version="TLSv1.3"
    )
    assert settings.routes == (
        RouteSettings(
            name="gateway",
            prefix=b"/api",
            backends=(RouteBackend("https", "backend.internal", 8443, b"/gw"), RouteBackend("http", "::1", 8001, b"")),
            hosts=("www.example.com", "*.example.org"),
            balance="least_connections",
            preserve_host=True,
            websocket=False,
            connect_timeout=1.5,
            read_timeout=30.0,
            max_body_bytes=1048576,
            max_concurrent=50,
            queue_size=0,
            queue_timeout=2.5,
            health_check=b"/gw/health?deep=1",
            health_interval=0.5,
            eject_seconds=30.0,
            cookie_domain=b"mydata.example.com",
        ),
    )
    assert settings.routes[0].backends[1].url == "http://[::1]:8001"


@pytest.mark.parametrize(
    "prefix, url, backend",
    [
        ("/api/", "http://b.internal", RouteBackend("http", "b.internal", 80, b"/")),
        ("/api/", "http://b.internal/", RouteBackend("http", "b.internal", 80, b"/")),
        ("/api", "http://b.internal", RouteBackend("http", "b.internal", 80, b"")),
        ("/api", "https://b.internal/base", RouteBackend("https", "b.internal", 443, b"/base")),
        ("/", "HTTP://B.Internal:81/", RouteBackend("http", "b.internal", 81, b"/")),
        ("/api/", "http://10.0.0.1:8080/a%20b;v=1/", RouteBackend("http", "10.0.0.1", 8080, b"/a%20b;v=1/")),
    ],
)
def test_backendURLs(tmp_path: Path, prefix: str, url: str, backend: RouteBackend) -> None:
    [route] = reverse(tmp_path, f'[[reverse.routes]]\nprefix = "{prefix}"\nbackends = ["{url}"]\n').routes
    assert route.backends == (backend,)


def test_nameDefaultsToTheFirstHostAndThePrefix(tmp_path: Path) -> None:
    [route] = reverse(
        tmp_path, '[[reverse.routes]]\nprefix = "/p/"\nhosts = ["Partner.Example", "b.example"]\nbackends = ["http://b/"]\n'
    ).routes
    assert route.name == "partner.example/p/"


def test_forwardCanBeTurnedOffWhenReverseRuns(tmp_path: Path) -> None:
    settings = config.load(write(tmp_path, "[forward]\nenabled = false\n\n[reverse]\n" + ROUTE))
    assert not settings.forward.enabled
    assert settings.reverse is not None


def test_sameReversePrefixOnOtherHostsIsFine(tmp_path: Path) -> None:
    text = ROUTE + '\n[[reverse.routes]]\nprefix = "/api/"\nhosts = ["www.example.com"]\nbackends = ["http://b/"]\n'
    assert [route.name for route in reverse(tmp_path, text).routes] == ["/api/", "www.example.com/api/"]


# ---------------------------------------------------------------------------
# Errors: each names the file, the line, the key and what is wrong
# ---------------------------------------------------------------------------


def test_forwardDisabledWithoutReverse(tmp_path: Path) -> None:
    text = "[forward]\nenabled = false\n"
    loadError(tmp_path, text, "forward.enabled", 2, "is false and there is no [reverse] section: nothing to serve")


def test_reverseWithoutRoutes(tmp_path: Path) -> None:
    loadError(tmp_path, "[reverse]\nlisten = \"tcp:8080:interface=127.0.0.1\"\n", "reverse.routes", 1,
              "needs at least one [[reverse.routes]] entry")


def test_routesNotAnArrayOfTables(tmp_path: Path) -> None:
    text = '[reverse]\nroutes = "/api/"\n'
    loadError(tmp_path, text, "reverse.routes", 2, "must be an array of tables ([[reverse.routes]])")


def test_routeNotATable(tmp_path: Path) -> None:
    path = write(tmp_path, '[reverse]\nroutes = ["/api/"]\n')
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert (info.value.source, info.value.key, info.value.problem) == (str(path), "reverse.routes[0]", "must be a table")


def test_unknownReverseKey(tmp_path: Path) -> None:
    text = "[reverse]\nlisten_on = 8080\n" + ROUTE
    loadError(tmp_path, text, "reverse.listen_on", 2, "unknown key")


def test_unknownRouteKey(tmp_path: Path) -> None:
    text = ROUTE + ROUTE.replace("/api/", "/b/") + "backend = \"http://x/\"\n"
    loadError(tmp_path, text, "reverse.routes[1].backend", lineOf(text, "backend ="), "unknown key")


def test_missingPrefix(tmp_path: Path) -> None:
    text = ROUTE + '\n[[reverse.routes]]\nbackends = ["http://b/"]\n'
    loadError(tmp_path, text, "reverse.routes[1]", lineOf(text, "[[reverse.routes]]", 1), "needs prefix")


def test_missingBackends(tmp_path: Path) -> None:
    text = ROUTE + '\n[[reverse.routes]]\nprefix = "/b/"\n'
    loadError(tmp_path, text, "reverse.routes[1]", lineOf(text, "[[reverse.routes]]", 1), "needs backends")


def test_emptyBackends(tmp_path: Path) -> None:
    text = ROUTE + '\n[[reverse.routes]]\nprefix = "/b/"\nbackends = []\n'
    loadError(tmp_path, text, "reverse.routes[1].backends", lineOf(text, "backends = []"), "needs at least one backend URL")


@pytest.mark.parametrize("value", ['"api/"', '"api"', '"http://x/api/"', '""', "3", '"/caf\u00e9/"', '"/a b/"', '"/a?b"', '"/a#b"'])
def test_prefixNotAPath(tmp_path: Path, value: str) -> None:
    text = ROUTE + f'\n[[reverse.routes]]\nprefix = {value}\nbackends = ["http://b/"]\n'
    loadError(tmp_path, text, "reverse.routes[1].prefix", lineOf(text, "prefix = ", 1))


@pytest.mark.parametrize("value", ["/api//", "//api/", "/a/../b/", "/./", "/a/.", "/..", "/a/./b"])
def test_prefixWithEmptyOrDotSegments(tmp_path: Path, value: str) -> None:
    text = ROUTE + f'\n[[reverse.routes]]\nprefix = "{value}"\nbackends = ["http://b/"]\n'
    loadError(tmp_path, text, "reverse.routes[1].prefix", lineOf(text, "prefix = ", 1), "must not hold '//' or dot segments")


@pytest.mark.parametrize(
    "url, fragment",
    [
        ("ftp://b/", "is not an http:// or https:// URL"),
        ("ws://b/", "is not an http:// or https:// URL"),
        ("b.internal/", "is not an http:// or https:// URL"),
        ("http://", "is not an http:// or https:// URL"),
        ("http://b:99999/", "is not an http:// or https:// URL"),
        ("http://b/base/?x=1", "no query"),
        ("http://b/?x", "no query"),
        ("http://b/base/#top", "'http://b/base/#top'"),
        ("http://b/a b/", "only RFC 3986 path characters"),
        ("http://user:secret@b/", "credentials in a backend URL are not supported"),
        ("http://b/base", "end the base path with '/' exactly when the prefix does"),
    ],
)
def test_badBackend(tmp_path: Path, url: str, fragment: str) -> None:
    text = ROUTE + f'\n[[reverse.routes]]\nprefix = "/b/"\nbackends = ["http://ok/", "{url}"]\n'
    loadError(tmp_path, text, "reverse.routes[1].backends", lineOf(text, "backends = ", 1), fragment)


def test_baseWithSlashUnderAPrefixWithout(tmp_path: Path) -> None:
    text = '[[reverse.routes]]\nprefix = "/api"\nbackends = ["http://b/base/"]\n'
    loadError(tmp_path, text, "reverse.routes[0].backends", 3, "end the base path with '/' exactly when the prefix does")


@pytest.mark.parametrize("value", ['"http://b/"', '[""]', "[3]"])
def test_backendsNotAListOfURLs(tmp_path: Path, value: str) -> None:
    text = f'[[reverse.routes]]\nprefix = "/b/"\nbackends = {value}\n'
    loadError(tmp_path, text, "reverse.routes[0].backends", 3)


def test_duplicatePrefix(tmp_path: Path) -> None:
    text = ROUTE + '\n[[reverse.routes]]\nname = "second"\nprefix = "/api/"\nbackends = ["http://b/"]\n'
    loadError(tmp_path, text, "reverse.routes[1].prefix", lineOf(text, "prefix = ", 1),
              "'/api/' is already routed by reverse.routes[0] for the same hosts")


def test_duplicatePrefixForTheSameHostsInAnotherOrderAndSpelling(tmp_path: Path) -> None:
    text = (
        '[[reverse.routes]]\nprefix = "/"\nhosts = ["a.example", "b.example"]\nbackends = ["http://b/"]\n\n'
        '[[reverse.routes]]\nprefix = "/x/"\nbackends = ["http://b/"]\n\n'
        '[[reverse.routes]]\nname = "third"\nprefix = "/"\nhosts = ["B.Example.", "a.example"]\nbackends = ["http://c/"]\n'
    )
    loadError(tmp_path, text, "reverse.routes[2].prefix", lineOf(text, "prefix = ", 2),
              "'/' is already routed by reverse.routes[0] for the same hosts")


def test_duplicateName(tmp_path: Path) -> None:
    text = (
        '[[reverse.routes]]\nname = "api"\nprefix = "/a/"\nbackends = ["http://b/"]\n\n'
        '[[reverse.routes]]\nname = "api"\nprefix = "/b/"\nbackends = ["http://b/"]\n'
    )
    loadError(tmp_path, text, "reverse.routes[1].name", lineOf(text, "name = ", 1),
              "'api' is already the name of reverse.routes[0]")


def test_nameThatIsAnotherRoutesDefaultName(tmp_path: Path) -> None:
    text = '[[reverse.routes]]\nname = "/b/"\nprefix = "/a/"\nbackends = ["http://b/"]\n\n' \
        '[[reverse.routes]]\nprefix = "/b/"\nbackends = ["http://b/"]\n'
    loadError(tmp_path, text, "reverse.routes[1].name", lineOf(text, "[[reverse.routes]]", 1),
              "'/b/' is already the name of reverse.routes[0]")


@pytest.mark.parametrize("value", ['"random"', '"ROUND_ROBIN"', '"least-connections"', "1"])
def test_badBalance(tmp_path: Path, value: str) -> None:
    text = ROUTE + f"balance = {value}\n"
    loadError(tmp_path, text, "reverse.routes[0].balance", lineOf(text, "balance"),
              "must be one of round_robin, least_connections")


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("connect_timeout", "0", "must be at least 0.001"),
        ("read_timeout", '"60"', "must be a number"),
        ("max_body_bytes", "-1", "must be at least 0"),
        ("max_concurrent", "1.5", "must be an integer"),
        ("queue_size", "-1", "must be at least 0"),
        ("queue_timeout", "0", "must be at least 0.001"),
        ("health_interval", "0.05", "must be at least 0.1"),
        ("eject_seconds", "true", "must be a number"),
        ("preserve_host", '"yes"', "must be true or false"),
        ("websocket", "1", "must be true or false"),
        ("name", '""', "must be a non-empty string"),
        ("hosts", '"www.example.com"', "must be a list of strings"),
        ("hosts", '["a b"]', "'a b'"),
        ("health_check", '"health"', "must be a path starting with '/'"),
        ("health_check", '"/a b"', "must be a path starting with '/'"),
        ("cookie_domain", '"not a domain"', "'not a domain'"),
        ("cookie_domain", "3", "must be a non-empty string"),
    ],
)
def test_badRouteValue(tmp_path: Path, key: str, value: str, fragment: str) -> None:
    text = ROUTE + f"{key} = {value}\n"
    loadError(tmp_path, text, f"reverse.routes[0].{key}", lineOf(text, f"{key} = "), fragment)


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("listen", '"tcp:99999"', "port 99999 is out of range"),
        ("listen", '"tcp:8080:interface=localhost"', "is not an IP address"),
        ("listen", '""', "must be a non-empty string"),
        ("client_allow", '["10.0.0.0/33"]', "10.0.0.0/33"),
        ("trusted_proxies", '["10.0.0.1/8"]', "10.0.0.1/8"),
        ("client_idle_timeout", "0", "must be at least 0.001"),
    ],
)
def test_badReverseValue(tmp_path: Path, key: str, value: str, fragment: str) -> None:
    text = f"[reverse]\n{key} = {value}\n\n" + ROUTE
    loadError(tmp_path, text, f"reverse.{key}", 2, fragment)


@pytest.mark.parametrize(
    "header", ["", '[reverse]\nlisten = "tcp:8080:interface=127.0.0.1"\n\n'], ids=["alone", "under [reverse]"]
)
def test_reverseTLSNeedsAKeyStore(tmp_path: Path, header: str) -> None:
    """The error points at the [reverse.tls] table, with or without a [reverse] table above it."""
    text = header + '[reverse.tls]\nmin_version = "TLSv1.3"\n\n' + ROUTE
    loadError(tmp_path, text, "reverse.tls", lineOf(text, "[reverse.tls]"), "needs key_store")


def test_reverseTLSUnknownKey(tmp_path: Path) -> None:
    text = '[reverse.tls]\nkey_store = "k.p12"\nverify = false\n\n' + ROUTE
    loadError(tmp_path, text, "reverse.tls.verify", 3, "unknown key")


def test_checkConfigReportsTheSameError(tmp_path: Path, capsys) -> None:
    """The operator's tool shows the located line, not a traceback."""
    text = ROUTE + "balance = \"random\"\n"
    path = write(tmp_path, text)
    assert cli.main(["check-config", str(path)]) != 0
    captured = capsys.readouterr()
    assert f"{path}:{lineOf(text, 'balance')}: reverse.routes[0].balance: must be one of" in captured.out + captured.err
    assert "Traceback" not in captured.out + captured.err


# ---------------------------------------------------------------------------
# The sample
# ---------------------------------------------------------------------------


def test_reverseSampleLoadsWithTheValuesItShows() -> None:
    path = ETC / "mydataproxy-reverse.toml"
    settings = config.load(path)
    assert settings.forward.listen == "tcp:9000:interface=127.0.0.1"
    assert settings.logging.access_log == "-"
    rev = settings.reverse
    assert rev is not None
    assert rev.listen == "tcp:8080:interface=127.0.0.1"
    address = config.parseListen(rev.listen)
    assert address is not None and ipaddress.ip_address(address.interface).is_loopback
    assert rev.trusted_proxies == (ipaddress.ip_network("127.0.0.1/32"),)
    assert (rev.client_allow, rev.client_idle_timeout, rev.tls) == ((), 60.0, None)
    gateway, portal = rev.routes
    assert gateway == RouteSettings(
        name="gateway",
        prefix=b"/api/",
        backends=(
            RouteBackend("http", "10.0.1.10", 8080, b"/gateway/"),
            RouteBackend("http", "10.0.1.11", 8080, b"/gateway/"),
        ),
        balance="least_connections",
        preserve_host=True,
        connect_timeout=5.0,
        read_timeout=60.0,
        max_body_bytes=10485760,
        max_concurrent=50,
        queue_size=200,
        queue_timeout=10.0,
        health_check=b"/gateway/health",
        health_interval=5.0,
        cookie_domain=b"mydata.example.com",
    )
    assert portal == RouteSettings(
        name="partner portal",
        prefix=b"/",
        backends=(RouteBackend("https", "portal.internal.example", 8443, b"/"),),
        hosts=("partner.mydata.example.com",),
        websocket=True,
    )
