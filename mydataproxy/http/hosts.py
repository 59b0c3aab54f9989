"""
Host names and IP literals in one canonical form, so that rules compare what
a connection really reaches rather than how a client chose to spell it.

  - names: lower-case, no trailing dot, IDNA (punycode) for non-ASCII labels;
  - IPv4 literals in every notation C{inet_aton} and browsers accept (decimal
    C{2130706433}, octal C{0177.0.0.1}, hex C{0x7f.1}, short forms
    C{127.1}): the dotted-quad text;
  - IPv6 literals: compressed text; IPv4-mapped ones become the IPv4 text.
"""

from __future__ import annotations

import functools
import ipaddress
import re

import idna

_NUMBER = re.compile(r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*")
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


def _legacyIPv4(parts: list[str]) -> str:
    """inet_aton's reading of 1 to 4 numeric parts; the last fills the rest."""
    if len(parts) > 4 or not all(_NUMBER.fullmatch(p) for p in parts):
        raise ValueError("invalid IPv4 address")
    numbers = [int(p, 0) if not (p.startswith("0") and p[1:2].isdigit()) else int(p, 8) for p in parts]
    *leading, last = numbers
    if any(n > 255 for n in leading) or last >= 256 ** (5 - len(numbers)):
        raise ValueError("invalid IPv4 address")
    value = last
    for index, number in enumerate(leading):
        value += number << (8 * (3 - index))
    return str(ipaddress.IPv4Address(value))


@functools.lru_cache(maxsize=4096)
def normaliseHost(host: str) -> str:
    """
    The canonical text of C{host} (without brackets for IPv6).

    @raise ValueError: If C{host} is neither a valid name nor an IP literal.
    """
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if ":" in host:
        if "%" in host:
            raise ValueError("IPv6 zone identifiers are not allowed")
        address = ipaddress.IPv6Address(host)
        return str(address.ipv4_mapped or address)
    if host.endswith(".") and not host.endswith(".."):
        host = host[:-1]
    labels = host.split(".")
    if labels[-1] and _NUMBER.fullmatch(labels[-1]):
        # Ends in a number: an IPv4 address, whatever else it looks like.
        return _legacyIPv4(labels)
    if not host.isascii():
        try:
            ascii = idna.encode(host, uts46=True).decode("ascii")
        except idna.IDNAError as e:
            raise ValueError(f"invalid international host name: {e}") from None
        # Mapping may reveal an IP literal ("１２７。０。０。１").
        return normaliseHost(ascii)
    host = host.lower()
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in host.split(".")):
        raise ValueError("invalid host name")
    return host


def hostMatches(patterns: tuple[str, ...], host: str) -> bool:
    """Does normalised C{host} match one of C{patterns} (exact, or C{*.suffix}
    for names below the suffix)?"""
    return any(host.endswith(p[1:]) if p.startswith("*.") else host == p for p in patterns)
