"""
Unit tests of request-target parsing (L{mydataproxy.http.target}): the three
request forms, their refusals, and how targets are shown and addressed.
Pure functions only: no reactor, no sockets.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mydataproxy.http.target import (
    MISSING_TARGET_HOST,
    Mode,
    Refusal,
    Target,
    parseAuthority,
    parseTarget,
    parseURL,
)
from mydataproxy.http.target import Destination


def refusal(method: bytes, uri: bytes, targetHosts: list[bytes] | None = None) -> Refusal:
    """The L{Refusal} that parseTarget raises (failing the test if none)."""
    with pytest.raises(Refusal) as info:
        parseTarget(method, uri, targetHosts)
    return info.value


# ---------------------------------------------------------------------------
# Absolute-form
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri, destination, path",
    [
        (b"http://example.com/a/b?c=d", Destination("http", "example.com", 80), b"/a/b?c=d"),
        (b"https://example.com/", Destination("https", "example.com", 443), b"/"),
        (b"http://example.com:8080/x", Destination("http", "example.com", 8080), b"/x"),
        (b"https://example.com:80/x", Destination("https", "example.com", 80), b"/x"),
        (b"http://10.0.0.1:65535/", Destination("http", "10.0.0.1", 65535), b"/"),
        (b"http://[::1]:8080/v6", Destination("http", "::1", 8080), b"/v6"),
        (b"https://[2001:DB8::0:1]/", Destination("https", "2001:db8::1", 443), b"/"),
        (b"HTTP://EXAMPLE.COM/Path", Destination("http", "example.com", 80), b"/Path"),
        (b"HtTpS://Api.Example.COM:8443/Q", Destination("https", "api.example.com", 8443), b"/Q"),
        (b"http://example.com", Destination("http", "example.com", 80), b"/"),
        (b"http://example.com:81", Destination("http", "example.com", 81), b"/"),
        (b"http://example.com?x=1", Destination("http", "example.com", 80), b"/?x=1"),
        (b"http://example.com:81?x=1&y", Destination("http", "example.com", 81), b"/?x=1&y"),
        (b"http://example.com:/p", Destination("http", "example.com", 80), b"/p"),
    ],
)
def test_absoluteForm(uri: bytes, destination: Destination, path: bytes) -> None:
    target = parseTarget(b"GET", uri, None)
    assert target == Target(Mode.ABSOLUTE, destination, path)


@pytest.mark.parametrize(
    "rawPath",
    [
        b"/a%2Fb",
        b"/a%2fb/%2E%2E/c",
        b"/matrix;p=1;q=2/x",
        b"/a+b?q=c+d&e=%20f",
        b"/%7Euser//double//slashes/",
        b"/a/./b/../c",
        b"/?",
        b"/path?a=1&a=2&b=%26",
    ],
)
def test_absoluteFormKeepsRawPathBytes(rawPath: bytes) -> None:
    target = parseTarget(b"POST", b"http://example.com:8080" + rawPath, None)
    assert target.path == rawPath
    assert target.destination == Destination("http", "example.com", 8080)


def test_absoluteFormTargetTakesPrecedenceOverXTargetHost() -> None:
    """An absolute-form request goes where its target says, header or not."""
    target = parseTarget(b"GET", b"http://a.example/x", [b"https://b.example/base"])
    assert target == Target(Mode.ABSOLUTE, Destination("http", "a.example", 80), b"/x")


@pytest.mark.parametrize(
    "uri, fragment",
    [
        (b"http://example.com/a#frag", "fragment"),
        (b"http://example.com#frag", "fragment"),
        (b"http://example.com/?q#f", "fragment"),
        (b"ftp://example.com/", "only http"),
        (b"ws://example.com/", "only http"),
        (b"http:/example.com/", "unsupported request target form"),
        (b"example.com/path", "unsupported request target form"),
        (b"*", "unsupported request target form"),
        (b"", "unsupported request target form"),
        (b"http:///path", "invalid host name"),
        (b"http://exa mple.com/", "invalid host name"),
        (b"http://exa_mple!.com/", "invalid host name"),
        (b"http://ex%61mple.com/", "invalid host name"),
        (b"http://-example.com/", "invalid host name"),
        (b"http://caf\xc3\xa9..example/", "invalid host"),
        (b"http://example.com:0/", "invalid port"),
        (b"http://example.com:65536/", "invalid port"),
        (b"http://example.com:abc/", "invalid port"),
        (b"http://example.com:-1/", "invalid port"),
        (b"http://example.com:+80/", "invalid port"),
        (b"http://example.com:000080/", "invalid port"),
        (b"http://example.com:80:80/", "invalid port"),
        (b"http://[::1/", "unterminated IPv6 literal"),
        (b"http://[not-v6]/", "invalid IPv6 literal"),
        (b"http://[10.0.0.1]/", "invalid IPv6 literal"),
        (b"http://[::1]x/", "malformed authority"),
        (b"http://::1/", "invalid host name"),
    ],
)
def test_absoluteFormRefusals(uri: bytes, fragment: str) -> None:
    r = refusal(b"GET", uri)
    assert r.status == 400
    assert fragment in r.reason
    assert str(r) == r.reason


def test_asteriskFormIsRefusedForOptionsToo() -> None:
    r = refusal(b"OPTIONS", b"*")
    assert (r.status, r.reason) == (400, "unsupported request target form")


# ---------------------------------------------------------------------------
# Header-routed (origin-form + x-target-host)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header, uri, destination, path",
    [
        (b"https://api.example.com", b"/v1/x", Destination("https", "api.example.com", 443), b"/v1/x"),
        (b"http://api.example.com:8080", b"/", Destination("http", "api.example.com", 8080), b"/"),
        (b"https://api.example.com/base", b"/v1/x", Destination("https", "api.example.com", 443), b"/base/v1/x"),
        (b"https://api.example.com/base/", b"/v1/x", Destination("https", "api.example.com", 443), b"/base/v1/x"),
        (b"https://api.example.com/", b"/v1/x", Destination("https", "api.example.com", 443), b"/v1/x"),
        (b"https://api.example.com/a/b/", b"/", Destination("https", "api.example.com", 443), b"/a/b/"),
        (b"  https://API.Example.com:8443/Base  ", b"/x", Destination("https", "api.example.com", 8443), b"/Base/x"),
        (b"HTTP://[::1]:9000/b", b"/x?y=1", Destination("http", "::1", 9000), b"/b/x?y=1"),
        (
            b"https://api.example.com/base",
            b"/a%2Fb;c=d/e+f?q=%20+x&q=2",
            Destination("https", "api.example.com", 443),
            b"/base/a%2Fb;c=d/e+f?q=%20+x&q=2",
        ),
    ],
)
def test_headerRouted(header: bytes, uri: bytes, destination: Destination, path: bytes) -> None:
    assert parseTarget(b"GET", uri, [header]) == Target(Mode.HEADER, destination, path)


def test_headerRoutedMissingHeaderIs403WithJavaText() -> None:
    for hosts in (None, []):
        r = refusal(b"GET", b"/v1/x", hosts)
        assert r.status == 403
        assert r.reason == "you have to include x-target-host header"
        assert r.reason == MISSING_TARGET_HOST


def test_headerRoutedTwoHeadersIs400() -> None:
    r = refusal(b"GET", b"/x", [b"https://a.example", b"https://a.example"])
    assert r.status == 400
    assert "more than one x-target-host" in r.reason


@pytest.mark.parametrize(
    "header, fragment",
    [
        (b"https://a.example/base?x=1", "query or fragment"),
        (b"https://a.example?x=1", "query or fragment"),
        (b"https://a.example/base#f", "fragment"),
        (b"ftp://a.example", "only http"),
        (b"a.example", "only http"),
        (b"//a.example/", "only http"),
        (b"", "only http"),
        (b"https://a.example:0", "invalid port"),
        (b"https://a example", "invalid host name"),
    ],
)
def test_headerRoutedBadHeaderIs400(header: bytes, fragment: str) -> None:
    r = refusal(b"GET", b"/x", [header])
    assert r.status == 400
    assert fragment in r.reason


def test_headerRoutedFragmentInRequestTargetIs400() -> None:
    """
    An origin-form target has no fragment (RFC 9112 3.2.1); absolute-form
    targets with one are refused, so header-routed ones must be too rather
    than forwarding C{#frag} to the origin.
    """
    r = refusal(b"GET", b"/a#frag", [b"https://a.example"])
    assert r.status == 400


# ---------------------------------------------------------------------------
# CONNECT (authority-form)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri, destination",
    [
        (b"example.com:443", Destination("tcp", "example.com", 443)),
        (b"EXAMPLE.com:8443", Destination("tcp", "example.com", 8443)),
        (b"10.1.2.3:1", Destination("tcp", "10.1.2.3", 1)),
        (b"[::1]:8080", Destination("tcp", "::1", 8080)),
        (b"[2001:DB8:0:0::1]:65535", Destination("tcp", "2001:db8::1", 65535)),
    ],
)
def test_connect(uri: bytes, destination: Destination) -> None:
    target = parseTarget(b"CONNECT", uri, None)
    assert target == Target(Mode.CONNECT, destination, b"")


def test_connectIgnoresXTargetHost() -> None:
    target = parseTarget(b"CONNECT", b"a.example:443", [b"https://b.example"])
    assert target.destination == Destination("tcp", "a.example", 443)


@pytest.mark.parametrize(
    "uri, fragment",
    [
        (b"example.com", "port is required"),
        (b"example.com:", "port is required"),
        (b"[::1]", "port is required"),
        (b"[::1]:", "port is required"),
        (b"example.com:0", "invalid port"),
        (b"example.com:65536", "invalid port"),
        (b"example.com:abc", "invalid port"),
        (b"example.com:99999999999999999999", "invalid port"),
        (b"example.com:443/", "invalid port"),
        (b"[::1]:0", "invalid port"),
        (b"[::1]:65536", "invalid port"),
        (b"u:p@example.com:443", "userinfo"),
        (b"http://example.com:443", "invalid port"),
        (b"/path", "invalid host name"),
        (b"*", "invalid host name"),
        (b"", "invalid host name"),
        (b"[::1:443", "unterminated"),
    ],
)
def test_connectRefusals(uri: bytes, fragment: str) -> None:
    r = refusal(b"CONNECT", uri)
    assert r.status == 400
    assert fragment in r.reason


def test_connectMethodIsCaseSensitive() -> None:
    """Only C{CONNECT} is authority-form; C{connect} is just another method."""
    r = refusal(b"connect", b"example.com:443")
    assert (r.status, r.reason) == (400, "unsupported request target form")


# ---------------------------------------------------------------------------
# Host validation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authority",
    [
        b"example.com\n",
        b"example.com\n:443",
        b"exa\nmple.com",
        b"example.com\r",
        b"example.com\x00",
        b"example.com ",
        b"\texample.com",
    ],
)
def test_hostWithControlOrSpaceIsRefused(authority: bytes) -> None:
    with pytest.raises(Refusal) as info:
        parseAuthority(authority, 443)
    assert info.value.status == 400


@pytest.mark.parametrize(
    "authority",
    [b"[::1%eth0 x]:443", b"[::1%\r\nX-Injected: 1]:443", b"[fe80::1%25\x00]:443"],
)
def test_ipv6LiteralWithSpaceOrControlCharacterIsRefused(authority: bytes) -> None:
    """The host becomes the upstream C{Host} value; it must not carry CTLs or spaces."""
    with pytest.raises(Refusal) as info:
        parseAuthority(authority, None)
    assert info.value.status == 400


def test_parseAuthorityDefaultPort() -> None:
    assert parseAuthority(b"Example.COM", 80) == ("example.com", 80)
    assert parseAuthority(b"[::1]", 443) == ("::1", 443)
    assert parseAuthority(b"a", 1) == ("a", 1)
    assert parseAuthority(b"under_score.example:08080", None) == ("under_score.example", 8080)


def test_parseURL() -> None:
    assert parseURL(b"https://h.example:444/a?b") == (Destination("https", "h.example", 444), b"/a?b")
    assert parseURL(b"http://h.example") == (Destination("http", "h.example", 80), b"")
    assert parseURL(b"http://h.example?q") == (Destination("http", "h.example", 80), b"?q")


# ---------------------------------------------------------------------------
# Target.display and Destination.authority
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, uri, hosts, display",
    [
        (b"GET", b"http://example.com/a?b=1", None, "http://example.com/a?b=1"),
        (b"GET", b"HTTP://Example.com:80/", None, "http://example.com/"),
        (b"GET", b"https://example.com:443/x", None, "https://example.com/x"),
        (b"GET", b"http://example.com:8080", None, "http://example.com:8080/"),
        (b"GET", b"https://[::1]:8443/x", None, "https://[::1]:8443/x"),
        (b"GET", b"http://[::1]/x", None, "http://[::1]/x"),
        (b"GET", b"/v1/x?y", [b"https://api.example.com/base/"], "https://api.example.com/base/v1/x?y"),
        (b"GET", b"/x", [b"http://api.example.com:8080"], "http://api.example.com:8080/x"),
        (b"CONNECT", b"example.com:443", None, "example.com:443"),
        (b"CONNECT", b"Example.com:8443", None, "example.com:8443"),
        (b"CONNECT", b"[::1]:8080", None, "[::1]:8080"),
        (b"CONNECT", b"10.0.0.1:22", None, "10.0.0.1:22"),
    ],
)
def test_display(method: bytes, uri: bytes, hosts, display: str) -> None:
    assert parseTarget(method, uri, hosts).display == display


def test_displayOfNonASCIIPathDoesNotRaise() -> None:
    target = Target(Mode.ABSOLUTE, Destination("http", "h.example", 80), b"/caf\xc3\xa9")
    assert target.display == "http://h.example/caf\ufffd\ufffd"


@pytest.mark.parametrize(
    "destination, authority",
    [
        (Destination("http", "example.com", 80), b"example.com"),
        (Destination("http", "example.com", 443), b"example.com:443"),
        (Destination("https", "example.com", 443), b"example.com"),
        (Destination("https", "example.com", 80), b"example.com:80"),
        (Destination("http", "example.com", 8080), b"example.com:8080"),
        (Destination("http", "::1", 80), b"[::1]"),
        (Destination("https", "2001:db8::1", 443), b"[2001:db8::1]"),
        (Destination("http", "::1", 8080), b"[::1]:8080"),
        (Destination("http", "10.0.0.1", 81), b"10.0.0.1:81"),
    ],
)
def test_destinationAuthority(destination: Destination, authority: bytes) -> None:
    assert destination.authority == authority
    assert str(destination) == f"{destination.scheme}://{authority.decode()}"


# ---------------------------------------------------------------------------
# Property: parseTarget never raises anything but Refusal
# ---------------------------------------------------------------------------

_PIECES = st.sampled_from(
    [
        b"http://", b"https://", b"HTTP://", b"ftp://", b"://", b"[", b"]", b"::1", b":", b"@",
        b"/", b"?", b"#", b"%", b"%25", b"*", b".", b"-", b"_", b"a", b"example.com", b"0",
        b"80", b"443", b"65535", b"65536", b"99999", b"\n", b"\r", b" ", b"\x00", b"\xff",
        b"\xc3\xa9", b"1.2.3.4", b"fe80::1",
    ]
)
_STRUCTURED = st.lists(_PIECES | st.binary(max_size=4), max_size=10).map(b"".join)
_NOISE = st.binary(max_size=40) | _STRUCTURED

# Mostly well-formed parts, sometimes perturbed, so that valid targets of
# every form are generated as well as near-misses.
_HOST = st.sampled_from(
    [b"example.com", b"A.Example.COM", b"h", b"10.0.0.1", b"under_score", b"[::1]", b"[2001:DB8::1]",
     b"[::ffff:1.2.3.4]", b"", b"[]", b"[::1", b"a..b", b"-a", b"xn--caf-dma.example"]
) | st.from_regex(rb"\A[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}\Z") | st.binary(max_size=6)
_PORT = st.one_of(
    st.just(b""),
    st.integers(0, 70000).map(lambda n: b":%d" % n),
    st.binary(max_size=6).map(lambda b: b":" + b),
)
_AUTHORITY = st.builds(
    lambda u, h, p: u + h + p,
    st.sampled_from([b""] * 15 + [b"u@", b"u:p@"]),
    st.sampled_from([b"example.com", b"h", b"10.0.0.1", b"[::1]", b"[2001:DB8::1]"]) | _HOST,
    st.sampled_from([b"", b":443", b":8080"]) | _PORT,
)
_PATH = st.one_of(
    st.just(b""),
    st.from_regex(rb"\A(/[A-Za-z0-9%;+=&._~-]{0,8}){0,4}(\?[A-Za-z0-9%;+=&/?._~-]{0,10})?\Z"),
    _NOISE,
)
_SCHEME = st.sampled_from([b"http://", b"https://", b"HTTPS://", b"hTtP://"] * 3 + [b"ftp://", b"http:/", b""])
_URL = st.builds(lambda s, a, p: s + a + p, _SCHEME, _AUTHORITY, _PATH)
_ORIGIN = _PATH.map(lambda p: b"/" + p.lstrip(b"/"))
_ANY_URI = st.one_of(_URL, _ORIGIN, _AUTHORITY, st.just(b"*"), _NOISE)
_ODD_METHODS = st.sampled_from([b"connect", b"", b"CONNECT ", b"GET\n"]) | st.binary(max_size=8)
_HOSTS = st.none() | _URL.map(lambda u: [u]) | st.lists(_URL | _NOISE, max_size=3)


@st.composite
def _requests(draw) -> tuple[bytes, bytes, list[bytes] | None]:
    """(method, uri, x-target-host values): mostly one of the three forms, sometimes anything."""
    form = draw(st.sampled_from(["absolute", "header", "connect", "anything"]))
    if form == "absolute":
        return draw(st.sampled_from([b"GET", b"POST", b"HEAD"])), draw(_URL), draw(_HOSTS)
    if form == "header":
        return draw(st.sampled_from([b"GET", b"PUT"])), draw(_ORIGIN), draw(_HOSTS)
    if form == "connect":
        return b"CONNECT", draw(_AUTHORITY), draw(_HOSTS)
    method = draw(st.sampled_from([b"GET", b"CONNECT"]) | _ODD_METHODS)
    return method, draw(_ANY_URI), draw(_HOSTS)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=_requests())
def test_parseTargetReturnsSaneTargetOrRefuses(request) -> None:
    method, uri, hosts = request
    try:
        target = parseTarget(method, uri, hosts)
    except Refusal as r:
        assert r.status in (400, 403)
        assert isinstance(r.reason, str) and r.reason
        if r.status == 403:
            assert r.reason == MISSING_TARGET_HOST
        return
    assert isinstance(target, Target)
    if method == b"CONNECT":
        assert target.mode is Mode.CONNECT
        assert target.path == b""
        assert target.destination.scheme == "tcp"
    else:
        assert target.mode in (Mode.ABSOLUTE, Mode.HEADER)
        assert target.path.startswith(b"/")
        assert target.destination.scheme in ("http", "https")
    assert 1 <= target.destination.port <= 65535
    assert isinstance(target.display, str)
    assert isinstance(target.destination.authority, bytes)


@pytest.mark.parametrize(
    "uri, host",
    [
        (b"http://u:p@example.com/", "example.com"),
        (b"http://u@Example.COM./", "example.com"),
        (b"http://@127.1/", "127.0.0.1"),
        (b"http://a@b@2130706433/", "127.0.0.1"),
        (b"http://0x7f.0.0.1:8080/", "127.0.0.1"),
        (b"http://[::ffff:169.254.169.254]/", "169.254.169.254"),
        (b"http://caf\xc3\xa9.example/", "xn--caf-dma.example"),
    ],
)
def test_absoluteFormHostsAreNormalisedAndUserinfoDropped(uri: bytes, host: str) -> None:
    target = parseTarget(b"GET", uri, None)
    assert target.destination.host == host
    assert b"@" not in target.path


def test_headerRoutedUserinfoIsDropped() -> None:
    target = parseTarget(b"GET", b"/x", [b"https://u:p@A.Example"])
    assert (target.destination.host, target.path) == ("a.example", b"/x")


def test_oneDestinationServesEveryRequestToAnAuthority() -> None:
    first = parseTarget(b"GET", b"http://Origin.Example:8080/a", None).destination
    second = parseTarget(b"GET", b"/b", [b"http://Origin.Example:8080"]).destination
    assert second is first
    assert first.authority == b"origin.example:8080"
    # Another spelling of the same origin is the same destination.
    assert parseTarget(b"GET", b"http://origin.example.:8080/", None).destination == first


def test_anAuthorityWithCredentialsIsNotRemembered() -> None:
    first = parseTarget(b"GET", b"http://u:secret@remembered.example/", None).destination
    second = parseTarget(b"GET", b"http://u:secret@remembered.example/", None).destination
    assert first == second and first is not second
