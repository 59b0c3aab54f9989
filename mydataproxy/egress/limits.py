"""
Per-client bounds: open connections and request rate.
"""

from __future__ import annotations

import math
from collections import OrderedDict

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol

from mydataproxy.config import LimitSettings

RATE_CLIENTS = 65536


class ConnectionCounter:
    """Counts open client connections, in total and per client address."""

    def __init__(self, settings: LimitSettings) -> None:
        self._total = settings.max_connections
        self._perClient = settings.max_connections_per_client
        self.open = 0
        self._byClient: dict[str, int] = {}

    def admit(self, client: str) -> str | None:
        """Count a new connection, or say which limit refuses it."""
        if self.open >= self._total:
            return "limits.max_connections"
        count = self._byClient.get(client, 0)
        if count >= self._perClient:
            return "limits.max_connections_per_client"
        self.open += 1
        self._byClient[client] = count + 1
        return None

    def release(self, client: str) -> None:
        """An admitted connection closed."""
        self.open -= 1
        count = self._byClient[client] - 1
        if count:
            self._byClient[client] = count
        else:
            del self._byClient[client]


class RateLimiter:
    """
    A token bucket per client address: C{requests_per_second} sustained,
    C{burst} at once (default: one second's worth).
    """

    def __init__(self, settings: LimitSettings, clock: IReactorTime) -> None:
        self.rate = settings.requests_per_second
        self.burst = float(settings.burst or max(1, math.ceil(self.rate)))
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def retryAfter(self, client: str) -> int | None:
        """
        Take a token for C{client}; L{None} if there was one, else the
        whole seconds to wait (for C{Retry-After}).
        """
        now = self._clock.seconds()
        tokens, then = self._buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        if len(self._buckets) >= RATE_CLIENTS:
            self._buckets.popitem(last=False)
        if tokens >= 1:
            self._buckets[client] = (tokens - 1, now)
            return None
        self._buckets[client] = (tokens, now)
        return max(1, math.ceil((1 - tokens) / self.rate))


class RefusedConnection(Protocol):
    """Answers a connection beyond the limits with one response, then closes."""

    def __init__(self, response: bytes) -> None:
        self.response = response

    def connectionMade(self) -> None:
        self.transport.write(self.response)
        self.transport.loseConnection()
