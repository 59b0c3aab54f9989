"""
Unit tests of L{mydataproxy.reverse.rewrite}: what a backend is told about
the client (L{clientSide}, L{forwardingFields}) and ProxyPassReverse on the
way back (L{publicURL}, L{publicCookie}, L{publicResponseFields}).  Pure
functions, no I/O.
"""

from __future__ import annotations

import pytest

from mydataproxy.config import RouteBackend, RouteSettings
from mydataproxy.reverse.rewrite import (
    FORWARDING_FIELDS,
    ClientSide,
    clientSide,
    forwardingFields,
    publicCookie,
    publicResponseFields,
    publicURL,
)

GATEWAY = RouteBackend("http", "10.0.1.10", 8080, b"/gateway/")
GATEWAY2 = RouteBackend("http", "10.0.1.11", 8080, b"/gateway/")
DEFAULT_PORT = RouteBackend("http", "app.internal", 80, b"/base/")
SECURE = RouteBackend("https", "portal.internal", 8443, b"/")

API = RouteSettings("api", b"/api/", (GATEWAY, GATEWAY2))
BASE = RouteSettings("base", b"/app/", (DEFAULT_PORT,))
PORTAL = RouteSettings("portal", b"/portal/", (SECURE,))
ROOTED = RouteSettings("rooted", b"/svc", (RouteBackend("http", "app.internal", 80, b"/svc-v1"),))

SIDE = ClientSide("203.0.113.7", b"www.example.com", b"https", b"443")
PORTED = ClientSide("203.0.113.7", b"www.example.com:8443", b"https", b"8443")


def _values(value: bytes | None) -> list[bytes] | None:
    return None if value is None else [value]


def side(
    trusted: bool,
    host: bytes | None = b"127.0.0.1:8080",
    *,
    fhost: bytes | None = None,
    fproto: bytes | None = None,
    fport: bytes | None = None,
    proto: bytes = b"http",
    port: int = 8080,
) -> ClientSide:
    """L{clientSide} of client 203.0.113.7 with the given front fields (one value each)."""
    return clientSide("203.0.113.7", trusted, host, _values(fhost), _values(fproto), _values(fport), proto, port)


# ---------------------------------------------------------------------------
# clientSide
# ---------------------------------------------------------------------------


def test_untrustedPeerGetsOurOwnView() -> None:
    got = side(False, b"pub.example:8443", fhost=b"evil.example", fproto=b"https", fport=b"1")
    assert got == ClientSide("203.0.113.7", b"pub.example:8443", b"http", b"8080")


def test_untrustedPeerOnTLS() -> None:
    got = side(False, b"pub.example", fproto=b"http", proto=b"https", port=8443)
    assert got == ClientSide("203.0.113.7", b"pub.example", b"https", b"8443")


def test_trustedFrontIsBelieved() -> None:
    got = side(True, fhost=b"www.example.com", fproto=b"https", fport=b"443")
    assert got == ClientSide("203.0.113.7", b"www.example.com", b"https", b"443")


def test_trustedFrontsOwnValueIsTheLastOne() -> None:
    """Apache appends to what the client sent: only the last element is the front's."""
    got = clientSide(
        "203.0.113.7", True, b"127.0.0.1:8080",
        [b"evil.example", b"evil2.example, www.example.com"], [b"http, HTTPS"], [b"1,443"], b"http", 8080,
    )
    assert got == ClientSide("203.0.113.7", b"www.example.com", b"https", b"443")


@pytest.mark.parametrize("proto", [b"HTTPS", b"Https", b" https "])
def test_trustedProtoIsCaseInsensitive(proto: bytes) -> None:
    assert side(True, fproto=proto).proto == b"https"


@pytest.mark.parametrize(
    "fhost", [b"", b"evil.example/path", b"a b", b'a"b', b"user@host", b"a\\b", b"host?x", b"host#x", b"caf\xc3\xa9"]
)
def test_garbageForwardedHostIsIgnored(fhost: bytes) -> None:
    assert side(True, b"pub.example", fhost=fhost).host == b"pub.example"


@pytest.mark.parametrize("fproto", [b"", b"ftp", b"ws", b"https2", b"http;x", b"javascript"])
def test_garbageForwardedProtoIsIgnored(fproto: bytes) -> None:
    assert side(True, fproto=fproto, proto=b"http").proto == b"http"


@pytest.mark.parametrize("fport", [b"", b"abc", b"-1", b"443x", b"123456", b"99999", b"65536", b"+443", b" "])
def test_garbageForwardedPortIsIgnored(fport: bytes) -> None:
    """Not a port 1-65535: the port comes from the (believed) host instead."""
    assert side(True, b"pub.example:8443", fport=fport).port == b"8443"


@pytest.mark.parametrize(
    "fhost, fproto, port",
    [
        (b"www.example.com:8443", None, b"8443"),
        (b"www.example.com", b"https", b"443"),
        (b"www.example.com", b"http", b"80"),
        (b"www.example.com", None, b"80"),
        (b"[2001:db8::1]:9443", b"https", b"9443"),
        (b"[2001:db8::1]", b"https", b"443"),
    ],
)
def test_trustedPortComesFromTheHostWithoutXForwardedPort(fhost: bytes, fproto: bytes | None, port: bytes) -> None:
    assert side(True, fhost=fhost, fproto=fproto).port == port


def test_trustedWithoutFieldsUsesTheRequestsHost() -> None:
    assert side(True, b"127.0.0.1:8080") == ClientSide("203.0.113.7", b"127.0.0.1:8080", b"http", b"8080")


def test_originIsSchemeAndPublicAuthority() -> None:
    assert PORTED.origin == b"https://www.example.com:8443"
    assert side(True, fhost=b"www.example.com", fproto=b"https").origin == b"https://www.example.com"


# ---------------------------------------------------------------------------
# forwardingFields
# ---------------------------------------------------------------------------


def test_forwardingFields() -> None:
    assert forwardingFields(SIDE) == [
        (b"X-Forwarded-For", b"203.0.113.7"),
        (b"X-Forwarded-Host", b"www.example.com"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Forwarded-Port", b"443"),
        (b"Forwarded", b'for=203.0.113.7;proto=https;host="www.example.com"'),
    ]


def test_forwardedQuotesAnIPv6Client() -> None:
    fields = dict(forwardingFields(ClientSide("2001:db8::7", b"[2001:db8::1]:8443", b"http", b"8443")))
    assert fields[b"X-Forwarded-For"] == b"2001:db8::7"
    assert fields[b"Forwarded"] == b'for="[2001:db8::7]";proto=http;host="[2001:db8::1]:8443"'


def test_forwardedHasNoHostWhenThereIsNone() -> None:
    fields = dict(forwardingFields(ClientSide("192.0.2.1", b"", b"http", b"8080")))
    assert fields[b"Forwarded"] == b"for=192.0.2.1;proto=http"


def test_everyFieldWeWriteIsOneWeDropFromTheClient() -> None:
    names = {name.lower() for name, _ in forwardingFields(SIDE)}
    assert names <= FORWARDING_FIELDS
    assert b"x-real-ip" in FORWARDING_FIELDS


# ---------------------------------------------------------------------------
# publicURL
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "route, value, public",
    [
        (API, b"http://10.0.1.10:8080/gateway/x?y=1", b"https://www.example.com/api/x?y=1"),
        (API, b"http://10.0.1.11:8080/gateway/", b"https://www.example.com/api/"),
        (API, b"http://10.0.1.10:8080/gateway/a%2Fb;c?d=/gateway/#frag", b"https://www.example.com/api/a%2Fb;c?d=/gateway/#frag"),
        (BASE, b"http://app.internal/base/x", b"https://www.example.com/app/x"),
        (BASE, b"http://app.internal:80/base/x", b"https://www.example.com/app/x"),
        (BASE, b"HTTP://APP.Internal/base/x", b"https://www.example.com/app/x"),
        (BASE, b"http://app.internal./base/x", b"https://www.example.com/app/x"),
        (PORTAL, b"https://portal.internal:8443/login", b"https://www.example.com/portal/login"),
        (PORTAL, b"https://portal.internal:8443", b"https://www.example.com/portal/"),
        (PORTAL, b"https://portal.internal:8443?x=1", b"https://www.example.com/portal/?x=1"),
        (PORTAL, b"HTTPS://PORTAL.INTERNAL:8443/a", b"https://www.example.com/portal/a"),
        (ROOTED, b"http://app.internal/svc-v1", b"https://www.example.com/svc"),
        (ROOTED, b"http://app.internal/svc-v1?x", b"https://www.example.com/svc?x"),
        (ROOTED, b"http://app.internal/svc-v1/y", b"https://www.example.com/svc/y"),
    ],
)
def test_absoluteURLOfABackendBecomesPublic(route: RouteSettings, value: bytes, public: bytes) -> None:
    assert publicURL(value, route, SIDE) == public


def test_publicAuthorityKeepsItsPort() -> None:
    assert publicURL(b"http://10.0.1.10:8080/gateway/x", API, PORTED) == b"https://www.example.com:8443/api/x"


@pytest.mark.parametrize(
    "route, value",
    [
        (API, b"http://10.0.1.12:8080/gateway/x"),
        (API, b"http://10.0.1.10:8081/gateway/x"),
        (API, b"http://10.0.1.10/gateway/x"),
        (API, b"https://10.0.1.10:8080/gateway/x"),
        (API, b"http://www.example.com/gateway/x"),
        (API, b"http://10.0.1.10:8080/other/x"),
        (API, b"http://10.0.1.10:8080/gatewayx/y"),
        (API, b"http://10.0.1.10:8080"),
        (API, b"http://user@10.0.1.10:8080/gateway/x"),
        (BASE, b"http://app.internal:8080/base/x"),
        (BASE, b"https://app.internal/base/x"),
        (BASE, b"http://app.internal.evil/base/x"),
        (PORTAL, b"http://portal.internal:8443/login"),
        (PORTAL, b"https://portal.internal/login"),
        (ROOTED, b"http://app.internal/svc-v1x"),
        (API, b"ftp://10.0.1.10:8080/gateway/x"),
        (API, b"mailto:someone@10.0.1.10"),
        (API, b"gateway/x"),
        (API, b"?page=2"),
        (API, b"#top"),
        (API, b""),
        (API, b"//10.0.1.10:8080/elsewhere"),
        (API, b"http://[::1/gateway/x"),
    ],
)
def test_otherURLsAreUntouched(route: RouteSettings, value: bytes) -> None:
    assert publicURL(value, route, SIDE) == value


@pytest.mark.parametrize(
    "route, value, public",
    [
        (API, b"/gateway/x?y=1", b"/api/x?y=1"),
        (API, b"/gateway/", b"/api/"),
        (BASE, b"/base/login?next=/base/home", b"/app/login?next=/base/home"),
        (PORTAL, b"/x", b"/portal/x"),
        (PORTAL, b"/", b"/portal/"),
        (ROOTED, b"/svc-v1", b"/svc"),
        (ROOTED, b"/svc-v1?x", b"/svc?x"),
    ],
)
def test_absolutePathUnderTheBaseBecomesPublic(route: RouteSettings, value: bytes, public: bytes) -> None:
    assert publicURL(value, route, SIDE) == public


@pytest.mark.parametrize(
    "route, value",
    [(API, b"/other/x"), (API, b"/gatewayx"), (API, b"/"), (BASE, b"/bas"), (ROOTED, b"/svc-v1x")],
)
def test_absolutePathOutsideTheBaseIsUntouched(route: RouteSettings, value: bytes) -> None:
    assert publicURL(value, route, SIDE) == value


# ---------------------------------------------------------------------------
# publicCookie
# ---------------------------------------------------------------------------

COOKIE_DOMAIN = RouteSettings("api", b"/api/", (GATEWAY, GATEWAY2), cookie_domain=b"mydata.example.com")


@pytest.mark.parametrize(
    "route, value, public",
    [
        (API, b"SID=1; Path=/gateway/", b"SID=1; Path=/api/"),
        (API, b"SID=1; Path=/gateway/sub; HttpOnly", b"SID=1; Path=/api/sub; HttpOnly"),
        (API, b"SID=1; path=/gateway/", b"SID=1; Path=/api/"),
        (API, b"SID=1; PATH = /gateway/x ", b"SID=1; Path=/api/x"),
        (PORTAL, b"SID=1; Path=/", b"SID=1; Path=/portal/"),
        (ROOTED, b"SID=1; Path=/svc-v1", b"SID=1; Path=/svc"),
        (ROOTED, b"SID=1; Path=/svc-v1/x", b"SID=1; Path=/svc/x"),
    ],
)
def test_cookiePathUnderTheBaseBecomesThePrefix(route: RouteSettings, value: bytes, public: bytes) -> None:
    assert publicCookie(value, route) == public


def test_cookiePathOfTheBaseWithoutItsSlashBecomesThePrefix() -> None:
    """
    Tomcat's default: the session cookie of context C{/gateway} has
    C{Path=/gateway}; behind C{/api/} the browser must send it to C{/api/...}.
    """
    assert publicCookie(b"JSESSIONID=ABC; Path=/gateway; HttpOnly", API) == b"JSESSIONID=ABC; Path=/api; HttpOnly"


@pytest.mark.parametrize(
    "route, value",
    [
        (API, b"SID=1; Path=/other/"),
        (API, b"SID=1; Path=/"),
        (API, b"SID=1; Path=/gatewayx"),
        (API, b"SID=1; Path"),
        (API, b"SID=1; Path="),
        (API, b"SID=1; Domain=other.example; Path=/x; Secure"),
        (API, b"SID=1; Domain=10.0.1.100"),
        (BASE, b"SID=1; Domain=internal"),
        (API, b"SID=1"),
        (API, b"SID=/gateway/x"),
        (API, b"Path=/gateway/"),
    ],
)
def test_otherCookiesAreUntouched(route: RouteSettings, value: bytes) -> None:
    assert publicCookie(value, route) == value


@pytest.mark.parametrize(
    "value, public",
    [
        (b"SID=1; Domain=10.0.1.10; Path=/gateway/", b"SID=1; Path=/api/"),
        (b"SID=1; Domain=10.0.1.11", b"SID=1"),
        (b"SID=1; Path=/gateway/; domain=10.0.1.10; Secure", b"SID=1; Path=/api/; Secure"),
    ],
)
def test_cookieDomainOfABackendIsRemoved(value: bytes, public: bytes) -> None:
    assert publicCookie(value, API) == public


@pytest.mark.parametrize(
    "value, public",
    [
        (b"SID=1; Domain=10.0.1.10; Path=/gateway/", b"SID=1; Domain=mydata.example.com; Path=/api/"),
        (b"SID=1; domain=.10.0.1.11", b"SID=1; Domain=mydata.example.com"),
    ],
)
def test_cookieDomainOfABackendBecomesCookieDomain(value: bytes, public: bytes) -> None:
    assert publicCookie(value, COOKIE_DOMAIN) == public


@pytest.mark.parametrize("domain", [b"app.internal", b".app.internal", b"APP.Internal", b".App.INTERNAL"])
def test_cookieDomainIsComparedWithoutCaseOrLeadingDot(domain: bytes) -> None:
    assert publicCookie(b"SID=1; Domain=" + domain + b"; Secure", BASE) == b"SID=1; Secure"


def test_cookieAttributesOtherThanPathAndDomainAreByteExact() -> None:
    value = (
        b"SID=a=b%3Bc; Expires=Wed, 21 Oct 2026 07:28:00 GMT; Max-Age=3600;Secure;  HttpOnly; "
        b"SameSite=Lax; Path=/gateway/x; Partitioned; X-Odd=\"q;\""
    )
    assert publicCookie(value, API) == (
        b"SID=a=b%3Bc; Expires=Wed, 21 Oct 2026 07:28:00 GMT; Max-Age=3600;Secure;  HttpOnly; "
        b"SameSite=Lax; Path=/api/x; Partitioned; X-Odd=\"q;\""
    )


def test_cookieValueThatLooksLikeAnAttributeIsUntouched() -> None:
    assert publicCookie(b"next=Path=/gateway/x; Path=/gateway/", API) == b"next=Path=/gateway/x; Path=/api/"


# ---------------------------------------------------------------------------
# publicResponseFields
# ---------------------------------------------------------------------------


def test_publicResponseFields() -> None:
    fields = [
        (b"Content-Type", b"text/html"),
        (b"Location", b"http://10.0.1.10:8080/gateway/next?a=1"),
        (b"content-location", b"/gateway/doc"),
        (b"uri", b"http://10.0.1.11:8080/gateway/u"),
        (b"Set-Cookie", b"a=1; Path=/gateway/"),
        (b"set-cookie", b"b=2; Domain=10.0.1.10; Path=/elsewhere"),
        (b"Link", b"<http://10.0.1.10:8080/gateway/l>; rel=next"),
        (b"Refresh", b"0; url=/gateway/x"),
        (b"X-Location", b"/gateway/x"),
    ]
    assert publicResponseFields(fields, API, SIDE) == [
        (b"Content-Type", b"text/html"),
        (b"Location", b"https://www.example.com/api/next?a=1"),
        (b"content-location", b"/api/doc"),
        (b"uri", b"https://www.example.com/api/u"),
        (b"Set-Cookie", b"a=1; Path=/api/"),
        (b"set-cookie", b"b=2; Path=/elsewhere"),
        (b"Link", b"<http://10.0.1.10:8080/gateway/l>; rel=next"),
        (b"Refresh", b"0; url=/gateway/x"),
        (b"X-Location", b"/gateway/x"),
    ]


def test_publicResponseFieldsKeepsRepeatedFieldsAndOrder() -> None:
    fields = [(b"Set-Cookie", b"a=1; Path=/gateway/a"), (b"X", b"1"), (b"Set-Cookie", b"b=2; Path=/gateway/b")]
    assert publicResponseFields(fields, API, SIDE) == [
        (b"Set-Cookie", b"a=1; Path=/api/a"), (b"X", b"1"), (b"Set-Cookie", b"b=2; Path=/api/b"),
    ]
