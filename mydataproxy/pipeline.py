"""
The admission of one request, shared by every listener.

A listener speaks its protocol (HTTP/1.1 forward, CONNECT, reverse routes)
and asks one L{RequestPipeline}, built by the service, what may happen:

  - L{RequestPipeline.clientOf}: which client a request comes from (the
    socket peer, or a trusted proxy's X-Forwarded-For hop);
  - L{RequestPipeline.admitClient}: the client allow-list (403) and the rate
    limit (429), before any target work;
  - L{RequestPipeline.checkTarget}: what is decided on the target alone,
    synchronously (the HTTP port list, 403);
  - L{RequestPipeline.decideNow}: the admitted L{Destination} when it can be
    decided on the spot (the address is known and authentication is off),
    without a Deferred, else L{None};
  - L{RequestPipeline.admit}: the whole way otherwise: authentication (407),
    the CONNECT port list (403), rules decided on the name before DNS (403),
    resolution (502, 504) and the egress policy on the addresses (403).

Every refusal is a L{Refusal} carrying its status, reason and the rule
(setting) that decided it.  The pipeline knows neither HTTP/1.1 framing nor
sockets: it sees a client address, credentials (the C{Proxy-Authorization}
values), the client certificate's subject and a parsed L{Target} (whose
mode says how it was asked for).  The upstream connection itself is made to
the returned destination's addresses, and nothing else, by the upstream pool
or the tunnel's checked connect.

May import L{mydataproxy.egress}, L{mydataproxy.http} and
L{mydataproxy.config}; imported by the listeners and the service.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from twisted.internet import defer

from mydataproxy.config import Settings
from mydataproxy.egress.auth import ProxyAuthenticator
from mydataproxy.egress.limits import RateLimiter
from mydataproxy.egress.policy import (
    ClientAccess, Decision, EgressPolicy, Request as PolicyRequest, connectAllowed, httpPortAllowed,
)
from mydataproxy.egress.resolver import Resolver
from mydataproxy.http.target import Destination, Mode, Refusal, Target

__all__ = ["RequestPipeline", "Refusal"]

# Bound of decideNow's memory of decisions: a flood of distinct targets only empties it.
MAX_CACHED_DECISIONS = 4096


class RequestPipeline:
    """
    Who may go where: client access, rate, authentication, target checks,
    egress rules, DNS and the guard on the resolved addresses.

    @ivar access: The client allow-list (L{ClientAccess}).
    @ivar egress: The destination rules and guard (L{EgressPolicy}).
    @ivar rate: The per-client rate limit (L{RateLimiter}).
    @ivar resolver: Resolves target hosts (L{Resolver} or a double with
        C{known} and C{resolve}).
    @ivar authenticator: Checks proxy credentials, or L{None} when
        authentication is off.
    """

    def __init__(
        self,
        settings: Settings,
        resolver: Resolver,
        authenticator: ProxyAuthenticator | None,
        reactor,
    ) -> None:
        self.settings = settings
        self.access = ClientAccess(settings.forward)
        self.egress = EgressPolicy(settings.egress)
        self.rate = RateLimiter(settings.limits, reactor)
        self.resolver = resolver
        self.authenticator = authenticator
        self.reactor = reactor
        # What decideNow admitted, by target and client certificate, with the
        # addresses it was decided on: a policy decision depends on nothing
        # else, and the settings never change under a pipeline (a reload
        # builds a new one).
        self._decided: dict[tuple, tuple[list[str], Destination]] = {}
        self._httpPorts: dict[int, Decision] = {}

    # The client

    def clientOf(self, peer: str, forwardedFor: Sequence[bytes] | None) -> str:
        """
        The address a request comes from: C{peer} (the socket peer's
        address), or the X-Forwarded-For hop to believe when the peer is a
        trusted proxy (see L{ClientAccess.clientAddress}).
        """
        return self.access.clientAddress(peer, forwardedFor)

    def admitClient(self, client: str, access: ClientAccess | None = None) -> None:
        """
        The checks before any target work: client allow-list and rate.

        @param client: The client's address (see L{clientOf}).
        @param access: The listener's allow-list, if not the forward one
            (the rate limit is per client, across listeners).
        @raise Refusal: 403 when the allow-list refuses C{client}, 429 (with
            C{Retry-After}) when it is over its rate.
        """
        decision = (access or self.access).allowed(client)
        if not decision.allowed:
            raise Refusal(403, "client address not allowed", decision.rule)
        if self.rate.enabled:
            wait = self.rate.retryAfter(client)
            if wait is not None:
                raise Refusal(
                    429, "too many requests", "limits.requests_per_second",
                    fields=[(b"Retry-After", b"%d" % wait)],
                )

    # The target

    def checkTarget(self, target: Target) -> None:
        """
        What is decided on C{target} alone, before anything else is asked:
        a request that is not a CONNECT may only go to an HTTP port.

        @raise Refusal: 403 for a port outside C{forward.http_ports}.
        """
        if target.mode is not Mode.CONNECT:
            port = target.destination.port
            decision = self._httpPorts.get(port)
            if decision is None:
                decision = self._httpPorts[port] = httpPortAllowed(self.settings.forward, port)
            if not decision.allowed:
                raise Refusal(403, f"port {port} is not allowed (cross-protocol request)", decision.rule)

    def decideNow(self, target: Target, certificate: str) -> Destination | None:
        """
        The common case, decided on the spot with no Deferred: authentication
        is off and the target's addresses are known (an IP literal or a fresh
        cache entry).

        @param certificate: The client certificate's subject ('' if none).
        @return: The admitted L{Destination}, or L{None} when it can't be
            decided now (then call L{admit}).
        @raise Refusal: 403 when the policy refuses it.
        """
        if self.authenticator is not None:
            return None
        destination = target.destination
        known = self.resolver.known(destination.host)
        if known is None:
            return None
        key = (target.mode, destination.scheme, destination.host, destination.port, certificate)
        cached = self._decided.get(key)
        if cached is not None and cached[0] == known:
            return cached[1]
        if target.mode is Mode.CONNECT:
            self._checkConnectPort(target)
        decided = self._decide(known, target, None, certificate)
        if len(self._decided) >= MAX_CACHED_DECISIONS:
            self._decided.clear()
        self._decided[key] = (list(known), decided)
        return decided

    def admit(
        self, credentials: list[bytes] | None, target: Target, certificate: str, client: str
    ) -> defer.Deferred:
        """
        Authenticate, check a CONNECT port, then route: the L{Destination}
        C{target} may use.

        @param credentials: The C{Proxy-Authorization} values, or L{None}.
        @param certificate: The client certificate's subject ('' if none).
        @param client: The client's address (failed authentications are
            limited per client).
        @return: Deferred firing with the L{Destination} carrying the
            addresses the policy allows, or failing with a L{Refusal} (407,
            403) or a resolution error.
        """

        def authenticated(user: str | None) -> defer.Deferred:
            if target.mode is Mode.CONNECT:
                self._checkConnectPort(target)
            return self._route(target, user, certificate)

        if self.authenticator is None:
            return defer.maybeDeferred(authenticated, None)
        return self.authenticator.authenticate(credentials, client).addCallback(authenticated)

    # Inside

    def _checkConnectPort(self, target: Target) -> None:
        port = target.destination.port
        decision = connectAllowed(self.settings.forward, port)
        if not decision.allowed:
            raise Refusal(403, f"CONNECT to port {port} is not allowed", decision.rule)

    def _route(self, target: Target, user: str | None, certificate: str) -> defer.Deferred:
        """
        Refuse on the name if the rules can, else resolve C{target}'s host
        once and let the egress policy pick the addresses it may use.
        """
        destination = target.destination
        refused = self.egress.refusedByName(
            PolicyRequest(target.mode.value, destination.host, destination.port, user, certificate)
        )
        if refused is not None:
            # Decided without asking DNS: the name of a refused destination
            # never leaves the closed network.
            return defer.fail(Refusal(403, "destination not allowed", refused.rule))
        return self.resolver.resolve(destination.host).addCallback(self._decide, target, user, certificate)

    def _decide(self, addresses: list[str], target: Target, user: str | None, certificate: str) -> Destination:
        """
        The L{Destination} for C{target} with the C{addresses} the egress
        policy lets it use.

        @raise Refusal: 403 when it may use none of them.
        """
        destination = target.destination
        request = PolicyRequest(target.mode.value, destination.host, destination.port, user, certificate)
        allowed, decision = self.egress.decide(request, addresses)
        if not allowed:
            raise Refusal(403, "destination not allowed", decision.rule)
        return replace(destination, addresses=tuple(allowed), rule=decision.rule)
