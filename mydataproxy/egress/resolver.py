"""
Name resolution for origins: asynchronous DNS with a TTL cache.

Twisted's default resolver runs C{getaddrinfo} in the reactor's thread pool,
where a slow DNS server can take every thread; C{twisted.names} speaks DNS
on the reactor itself.  The hosts file is consulted first, then the
configured (or C{/etc/resolv.conf}) servers; answers are cached for their
TTL, capped at C{max_ttl}.
"""

from __future__ import annotations

import functools
import socket

import txaio
from twisted.internet import defer, error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IReactorTime
from twisted.names import client, dns, hosts
from twisted.names import error as dnserror
from twisted.python.failure import Failure

from mydataproxy.config import ResolverSettings

txaio.use_twisted()
log = txaio.make_logger()

CACHE_ENTRIES = 4096


@functools.lru_cache(maxsize=4096)
def _isLiteral(host: str) -> bool:
    # Twisted's checks walk the string in Python; the answer never changes.
    return isIPAddress(host) or isIPv6Address(host)


class ResolutionTimeout(error.DNSLookupError):
    """No DNS answer in time."""


class Resolver:
    """Resolves host names to address lists, once per TTL."""

    def __init__(self, reactor, settings: ResolverSettings) -> None:
        self._clock: IReactorTime = reactor
        self._settings = settings
        servers = list(settings.servers) or None
        self._hosts = hosts.Resolver(file=settings.hosts_file)
        self._dns = client.Resolver(
            resolv=None if servers else "/etc/resolv.conf",
            servers=servers,
            timeout=(settings.timeout,),
            reactor=reactor,
        )
        self._cache: dict[str, tuple[float, list[str]]] = {}
        self._pending: dict[str, list[defer.Deferred]] = {}

    def known(self, host: str) -> list[str] | None:
        """The addresses of C{host} if known without asking (an IP literal or
        a fresh cache entry), else L{None}."""
        if _isLiteral(host):
            return [host]
        cached = self._cache.get(host)
        if cached is not None and cached[0] > self._clock.seconds():
            return cached[1]
        return None

    def resolve(self, host: str) -> defer.Deferred:
        """
        The addresses of C{host} (an IP literal is its own answer).

        @return: Deferred firing with a non-empty list of address strings,
            or failing with L{error.DNSLookupError} (L{ResolutionTimeout}
            when no server answered in time).
        """
        addresses = self.known(host)
        if addresses is not None:
            return defer.succeed(addresses)
        waiting = self._pending.get(host)
        d: defer.Deferred = defer.Deferred()
        if waiting is not None:
            waiting.append(d)
            return d
        self._pending[host] = [d]
        # Like "hosts: files dns": a name the hosts file knows is not asked of DNS.
        self._lookup(self._hosts, host).addCallback(self._fromHostsFile, host)
        return d

    @staticmethod
    def _lookup(resolver, host: str) -> defer.Deferred:
        lookups = [resolver.lookupAddress(host), resolver.lookupIPV6Address(host)]
        return defer.DeferredList(lookups, consumeErrors=True).addCallback(_addresses)

    def _fromHostsFile(self, found: tuple[list[str], list[int], list[Failure]], host: str) -> None:
        if found[0]:
            self._answered(found, host)
        else:
            self._lookup(self._dns, host).addCallback(self._answered, host)

    def _answered(self, found: tuple[list[str], list[int], list[Failure]], host: str) -> None:
        addresses, ttls, failures = found
        waiting = self._pending.pop(host)
        if addresses:
            ttl = min(min(ttls), self._settings.max_ttl)
            if ttl > 0:
                if len(self._cache) >= CACHE_ENTRIES:
                    self._cache.clear()
                self._cache[host] = (self._clock.seconds() + ttl, addresses)
            for d in waiting:
                d.callback(addresses)
            return
        timedOut = all(f.check(dnserror.DNSQueryTimeoutError, defer.TimeoutError) for f in failures) and failures
        reason = ResolutionTimeout(host) if timedOut else error.DNSLookupError(host)
        for d in waiting:
            d.errback(reason)


def _addresses(results: list[tuple[bool, object]]) -> tuple[list[str], list[int], list[Failure]]:
    """The A and AAAA answers of lookups, their TTLs, and the failures."""
    addresses: list[str] = []
    ttls: list[int] = []
    failures: list[Failure] = []
    for ok, result in results:
        if not ok:
            failures.append(result)
            continue
        for record in result[0]:
            if record.type == dns.A:
                address = socket.inet_ntop(socket.AF_INET, record.payload.address)
            elif record.type == dns.AAAA:
                address = socket.inet_ntop(socket.AF_INET6, record.payload.address)
            else:
                continue
            if address not in addresses:
                addresses.append(address)
                ttls.append(record.ttl)
    return addresses, ttls, failures
