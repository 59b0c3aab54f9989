"""
Proxy authentication (RFC 9110 section 11, RFC 7617 Basic) against an Apache
htpasswd file.

Accepted hashes: bcrypt (C{$2y$}, C{$2b$}, C{$2a$}), SHA-256-crypt (C{$5$}) and
SHA-512-crypt (C{$6$}) after Drepper's "Unix crypt using SHA-256 and SHA-512",
Apache MD5 (C{$apr1$}) and the legacy, weak C{{SHA}}.  Plaintext and crypt(3)
DES entries are refused when the file is loaded.

L{ProxyAuthenticator} is what a listener asks: it checks hashes in a small
thread pool of its own with a bounded queue (503 beyond it), remembers
successes, and limits failed attempts per client (429), so neither a flood of
logins nor a password-guessing client can take the reactor's time.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import re
import secrets
import math
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from functools import partial
from threading import Lock
from types import MappingProxyType
from typing import Callable, Mapping

import bcrypt
import txaio
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mydataproxy.http.target import Refusal

txaio.use_twisted()
log = txaio.make_logger()

# Successful verifications remembered per loaded file, and for how long.
CACHE_SIZE = 1024
CACHE_TTL = 300.0

# Hash checks run in this many threads of the authenticator's own pool, with
# at most AUTH_QUEUE more waiting (a wait of AUTH_QUEUE / AUTH_THREADS checks:
# 1.3 s at bcrypt cost 10); beyond that, 503 with Retry-After.
AUTH_THREADS = 2
AUTH_QUEUE = 32
BUSY_RETRY_AFTER = 1
# Failed attempts allowed per client address in a window of this many
# seconds; then 429 with Retry-After until the window ends.  At most
# FAILURE_CLIENTS addresses are remembered (the oldest forgotten first).
FAILURE_LIMIT = 10
FAILURE_WINDOW = 60.0
FAILURE_CLIENTS = 65536

_Check = Callable[[bytes], bool]

_ITOA64 = b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# The order in which each algorithm's final digest bytes are encoded, taken
# three at a time (most significant first).
_MD5_ORDER = (0, 6, 12, 1, 7, 13, 2, 8, 14, 3, 9, 15, 4, 10, 5, 11)
_SHA256_ORDER = (
    0, 10, 20, 21, 1, 11, 12, 22, 2, 3, 13, 23, 24, 4, 14, 15,
    25, 5, 6, 16, 26, 27, 7, 17, 18, 28, 8, 9, 19, 29, 31, 30,
)  # fmt: skip
_SHA512_ORDER = (
    0, 21, 42, 22, 43, 1, 44, 2, 23, 3, 24, 45, 25, 46, 4, 47,
    5, 26, 6, 27, 48, 28, 49, 7, 50, 8, 29, 9, 30, 51, 31, 52,
    10, 53, 11, 32, 12, 33, 54, 34, 55, 13, 56, 14, 35, 15, 36, 57,
    37, 58, 16, 59, 17, 38, 18, 39, 60, 40, 61, 19, 62, 20, 41, 63,
)  # fmt: skip

# The last salt character carries 2 significant bits, the last checksum one 4.
_BCRYPT = re.compile(
    r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$"
    r"[./A-Za-z0-9]{21}[.Oeu][./A-Za-z0-9]{30}[.CGKOSWaeimquy26]"
)
_SHA_CRYPT = re.compile(r"\$([56])\$(?:rounds=([1-9][0-9]{3,8})\$)?([!-#%-~]{0,16})\$([./0-9A-Za-z]+)")
_APR1 = re.compile(r"\$apr1\$([!-#%-~]{0,8})\$([./0-9A-Za-z]{22})")
_SHA1 = re.compile(r"\{SHA\}([A-Za-z0-9+/]{27}=)")
_DES = re.compile(r"[./0-9A-Za-z]{13}")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


class HtpasswdError(Exception):
    """
    An htpasswd file could not be read or has an entry that cannot be used.

    @ivar path: the file.
    @ivar line: the 1-based line number, or L{None} for the file as a whole.
    @ivar problem: what is wrong; never contains a hash or password.
    """

    def __init__(self, path: str, line: int | None, problem: str) -> None:
        super().__init__(path, line, problem)
        self.path = path
        self.line = line
        self.problem = problem

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}, line {self.line}"
        return f"{where}: {self.problem}"


def _encode64(digest: bytes, order: tuple[int, ...]) -> bytes:
    """
    The crypt(3) base-64 text of C{digest}'s bytes taken in C{order}.
    """
    out = bytearray()
    for start in range(0, len(order), 3):
        group = order[start : start + 3]
        value = int.from_bytes(bytes(digest[i] for i in group), "big")
        for _ in range(len(group) + 1):
            out.append(_ITOA64[value & 63])
            value >>= 6
    return bytes(out)


def _repeat(data: bytes, length: int) -> bytes:
    return (data * (length // len(data) + 1))[:length]


def _shaCrypt(sha512: bool, password: bytes, salt: bytes, rounds: int) -> bytes:
    """
    The checksum part of a SHA-256-crypt or SHA-512-crypt hash.
    """
    new = hashlib.sha512 if sha512 else hashlib.sha256
    size = len(password)
    b = new(password + salt + password).digest()
    ctx = new(password + salt + _repeat(b, size))
    n = size
    while n:
        ctx.update(b if n & 1 else password)
        n >>= 1
    a = ctx.digest()
    p = _repeat(new(password * size).digest(), size)
    s = new(salt * (16 + a[0])).digest()[: len(salt)]
    c = a
    for i in range(rounds):
        ctx = new(p if i & 1 else c)
        if i % 3:
            ctx.update(s)
        if i % 7:
            ctx.update(p)
        ctx.update(c if i & 1 else p)
        c = ctx.digest()
    return _encode64(c, _SHA512_ORDER if sha512 else _SHA256_ORDER)


def _apr1(password: bytes, salt: bytes) -> bytes:
    """
    The checksum part of an Apache MD5 (C{$apr1$}) hash.
    """
    final = hashlib.md5(password + salt + password).digest()
    ctx = hashlib.md5(password + b"$apr1$" + salt + _repeat(final, len(password)))
    n = len(password)
    while n:
        ctx.update(b"\0" if n & 1 else password[:1])
        n >>= 1
    final = ctx.digest()
    for i in range(1000):
        ctx = hashlib.md5(password if i & 1 else final)
        if i % 3:
            ctx.update(salt)
        if i % 7:
            ctx.update(password)
        ctx.update(final if i & 1 else password)
        final = ctx.digest()
    return _encode64(final, _MD5_ORDER)


def _checkBcrypt(stored: bytes, password: bytes) -> bool:
    # bcrypt reads at most 72 bytes, as Apache's does; the package refuses more.
    return hmac.compare_digest(bcrypt.hashpw(password[:72], stored), stored)


def _checkShaCrypt(sha512: bool, salt: bytes, rounds: int, checksum: bytes, password: bytes) -> bool:
    return hmac.compare_digest(_shaCrypt(sha512, password, salt, rounds), checksum)


def _checkApr1(salt: bytes, checksum: bytes, password: bytes) -> bool:
    return hmac.compare_digest(_apr1(password, salt), checksum)


def _checkSha1(digest: bytes, password: bytes) -> bool:
    return hmac.compare_digest(hashlib.sha1(password).digest(), digest)


def _parseHash(hashed: str) -> tuple[str, _Check]:
    """
    Validate one htpasswd hash.

    @return: a label for its algorithm and cost, and a function telling
        whether a password matches it.
    @raise ValueError: with a message that does not contain the hash.
    """
    if hashed.startswith("$2"):
        if not (match := _BCRYPT.fullmatch(hashed)):
            raise ValueError("malformed bcrypt hash")
        return f"bcrypt/{match[1]}", partial(_checkBcrypt, hashed.encode("ascii"))
    if hashed.startswith(("$5$", "$6$")):
        sha512 = hashed[1] == "6"
        name = "SHA-512-crypt" if sha512 else "SHA-256-crypt"
        match = _SHA_CRYPT.fullmatch(hashed)
        if not match or len(match[4]) != (86 if sha512 else 43):
            raise ValueError(f"malformed {name} hash")
        rounds = int(match[2] or 5000)
        check = partial(_checkShaCrypt, sha512, match[3].encode("ascii"), rounds, match[4].encode("ascii"))
        return f"{name}/{rounds}", check
    if hashed.startswith("$apr1$"):
        if not (match := _APR1.fullmatch(hashed)):
            raise ValueError("malformed Apache MD5 ($apr1$) hash")
        return "apr1", partial(_checkApr1, match[1].encode("ascii"), match[2].encode("ascii"))
    if hashed.startswith("{SHA}"):
        if not (match := _SHA1.fullmatch(hashed)):
            raise ValueError("malformed {SHA} hash")
        return "sha1", partial(_checkSha1, binascii.a2b_base64(match[1]))
    if _DES.fullmatch(hashed):
        raise ValueError("unsupported password scheme: crypt(3) DES")
    raise ValueError("unsupported password scheme (plaintext or unknown hash)")


@dataclass(frozen=True, eq=False)
class Htpasswd:
    """
    The users and password hashes of one htpasswd file, as loaded.  Reloading
    the file means calling L{Htpasswd.load} again; the new object starts with
    an empty verification cache, so a changed file never honours old results.

    @ivar path: the file this was loaded from.
    """

    path: str
    _checks: Mapping[str, _Check] = field(repr=False)
    _dummy: _Check | None = field(repr=False)
    _clock: Callable[[], float] = field(repr=False)
    _cacheKey: bytes = field(default_factory=lambda: secrets.token_bytes(32), init=False, repr=False)
    _cache: OrderedDict[tuple[str, bytes], float] = field(default_factory=OrderedDict, init=False, repr=False)
    _lock: Lock = field(default_factory=Lock, init=False, repr=False)

    @classmethod
    def load(cls, path: str, clock: Callable[[], float] = time.monotonic) -> Htpasswd:
        """
        Read an htpasswd file: C{user:hash} lines, blank lines and C{#} comments.

        @param path: the file.
        @param clock: seconds on a monotonic clock, for cache expiry.
        @return: the loaded file.
        @raise HtpasswdError: if the file cannot be read or any entry is bad.
        """
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise HtpasswdError(path, None, e.strerror or type(e).__name__) from None
        checks: dict[str, _Check] = {}
        kinds: dict[str, str] = {}
        for number, raw in enumerate(data.splitlines(), 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise HtpasswdError(path, number, "not valid UTF-8") from None
            if not line or line.startswith("#"):
                continue
            user, colon, hashed = line.partition(":")
            if not colon or not user:
                raise HtpasswdError(path, number, "expected user:hash")
            if user in checks:
                raise HtpasswdError(path, number, f"duplicate user {user!r}")
            try:
                kinds[user], checks[user] = _parseHash(hashed)
            except ValueError as e:
                raise HtpasswdError(path, number, str(e)) from None
        # Unknown users are checked against a hash of the file's commonest
        # kind, so they take as long as most real users do.
        dummy = None
        if kinds:
            commonest = Counter(kinds.values()).most_common(1)[0][0]
            dummy = checks[next(u for u, k in kinds.items() if k == commonest)]
        return cls(path, MappingProxyType(checks), dummy, clock)

    def credentialKey(self, user: str, password: str) -> tuple[str, bytes]:
        """
        A key standing for these credentials (the password as a keyed
        digest, never in clear), equal for equal credentials.
        """
        secret = password.encode("utf-8", "surrogatepass")
        return (user, hmac.digest(self._cacheKey, secret, "sha256"))

    def recentlyVerified(self, user: str, password: str) -> bool:
        """
        Whether L{verify} accepted these credentials within C{CACHE_TTL}:
        cheap enough for the reactor thread, unlike a bcrypt check.
        """
        key = self.credentialKey(user, password)
        with self._lock:
            verifiedAt = self._cache.get(key)
            if verifiedAt is not None and self._clock() - verifiedAt < CACHE_TTL:
                self._cache.move_to_end(key)
                return True
        return False

    def verify(self, user: str, password: str) -> bool:
        """
        Whether C{password} is C{user}'s.  Safe to call from threads (for
        instance through C{deferToThread}, since bcrypt blocks for a while).

        @param user: the user name.
        @param password: the password as given.
        @return: C{True} only if the user exists and the password matches.
        """
        if self.recentlyVerified(user, password):
            return True
        secret = password.encode("utf-8", "surrogatepass")
        key = self.credentialKey(user, password)
        now = self._clock()
        check = self._checks.get(user)
        if check is None:
            if self._dummy is not None:
                self._dummy(secret)
            return False
        if not check(secret):
            return False
        with self._lock:
            self._cache[key] = now
            self._cache.move_to_end(key)
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return True


def parseBasic(headerValue: bytes) -> tuple[str, str] | None:
    """
    Parse a C{Proxy-Authorization} value with the C{Basic} scheme.

    @param headerValue: the field value.
    @return: the user and password (UTF-8, else Latin-1 decoded), or L{None}
        for another scheme, bad base-64, a missing colon or control characters.
    """
    scheme, _, token = headerValue.strip(b" \t").partition(b" ")
    token = token.lstrip(b" ")
    if scheme.lower() != b"basic" or not token:
        return None
    try:
        raw = binascii.a2b_base64(token, strict_mode=True)
    except binascii.Error:
        return None
    if binascii.b2a_base64(raw, newline=False) != token:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    user, colon, password = text.partition(":")
    if not colon or _CONTROL.search(text):
        return None
    return user, password


def challenge(realm: str) -> bytes:
    """
    The C{Proxy-Authenticate} value asking for Basic credentials.

    @param realm: the protection space shown to users.
    @return: C{Basic realm="...", charset="UTF-8"} with the realm escaped.
    @raise ValueError: if the realm contains control characters.
    """
    if _CONTROL.search(realm):
        raise ValueError("realm contains control characters")
    quoted = realm.replace("\\", "\\\\").replace('"', '\\"')
    return f'Basic realm="{quoted}", charset="UTF-8"'.encode("utf-8")


class _Failures:
    """One client's failed attempts in the current window."""

    __slots__ = ("since", "count")

    def __init__(self, since: float) -> None:
        self.since = since
        self.count = 0


class ProxyAuthenticator:
    """
    Proxy authentication for one listener against one L{Htpasswd}.

    Cached successes are answered at once; other checks run in a dedicated
    pool of C{AUTH_THREADS} threads with at most C{AUTH_QUEUE} more waiting
    (beyond that: 503), identical credentials checked at the same time share
    one check, and a client with C{FAILURE_LIMIT} failed attempts within
    C{FAILURE_WINDOW} seconds gets 429 until its window ends, for every
    request that needs authentication (a cache hit too: otherwise the cache
    would answer unlimited guesses).  A check in progress counts as a
    failure until it succeeds, so parallel guesses are bounded as well.

    @ivar busy: requests refused with 503 so far.
    @ivar limited: requests refused with 429 so far.
    @ivar failed: failed hash checks so far.
    """

    def __init__(self, htpasswd: Htpasswd, realm: str, reactor, pool: ThreadPool | None = None) -> None:
        """
        @param htpasswd: the users.
        @param realm: the realm of the C{Proxy-Authenticate} challenge.
        @param reactor: provides C{seconds} and C{callFromThread}.
        @param pool: where hashes are checked (default: a new pool of
            C{AUTH_THREADS} threads); L{start} and L{stop} run it.
        @raise ValueError: if the realm contains control characters.
        """
        self.htpasswd = htpasswd
        self._challenge = [(b"Proxy-Authenticate", challenge(realm))]
        self._reactor = reactor
        self._pool = pool if pool is not None else ThreadPool(0, AUTH_THREADS, "proxy-auth")
        self._checking = 0
        self._waiters: dict[tuple[str, bytes], list[tuple[str, Deferred]]] = {}
        self._failures: OrderedDict[str, _Failures] = OrderedDict()
        self.busy = 0
        self.limited = 0
        self.failed = 0

    def start(self) -> None:
        """Start the check threads."""
        self._pool.start()

    def stop(self) -> None:
        """Stop the check threads (waits for the checks running now)."""
        self._pool.stop()

    def authenticate(self, credentials: list[bytes] | None, client: str) -> Deferred:
        """
        The user a request's C{Proxy-Authorization} values prove.

        @param credentials: the field's values, or L{None} if absent.
        @param client: the client's address, for the failed-attempt limit.
        @return: a Deferred (already fired for cached credentials) firing
            with the user name, or failing with a L{Refusal}: 407 with a
            challenge, 429 or 503 with C{Retry-After}.
        """
        parsed = parseBasic(credentials[0]) if credentials else None
        if parsed is None:
            return fail(self.authenticationRequired())
        user, password = parsed
        wait = self._lockedFor(client)
        if wait:
            self.limited += 1
            return fail(
                Refusal(
                    429,
                    "too many failed authentication attempts",
                    f"forward.auth_file: {FAILURE_LIMIT} failures in {FAILURE_WINDOW:.0f} s",
                    fields=[(b"Retry-After", b"%d" % wait)],
                )
            )
        if self.htpasswd.recentlyVerified(user, password):
            return succeed(user)
        key = self.htpasswd.credentialKey(user, password)
        result: Deferred = Deferred()
        waiters = self._waiters.get(key)
        if waiters is not None:
            waiters.append((client, result))
            return result
        if self._checking >= AUTH_THREADS + AUTH_QUEUE:
            self.busy += 1
            return fail(
                Refusal(
                    503,
                    "authentication busy",
                    f"forward.auth_file: {AUTH_THREADS + AUTH_QUEUE} checks in progress",
                    fields=[(b"Retry-After", b"%d" % BUSY_RETRY_AFTER)],
                )
            )
        self._waiters[key] = [(client, result)]
        self._checking += 1
        charged = self._charge(client)
        deferToThreadPool(self._reactor, self._pool, self.htpasswd.verify, user, password).addBoth(
            self._checked, key, user, client, charged
        )
        return result

    def authenticationRequired(self) -> Refusal:
        """The 407 refusal, with this listener's challenge."""
        return Refusal(407, "proxy authentication required", "forward.auth_file", fields=self._challenge)

    def _checked(
        self, outcome: bool | Failure, key: tuple[str, bytes], user: str, client: str, charged: _Failures
    ) -> None:
        self._checking -= 1
        waiters = self._waiters.pop(key)
        if isinstance(outcome, Failure):
            # A bug, not the client's fault: not counted against it.
            log.failure("checking the password of {user!r} failed", outcome, user=user)
            self._refund(client, charged)
            for _, result in waiters:
                result.errback(Refusal(500, "authentication failed", "forward.auth_file"))
            return
        if outcome:
            self._refund(client, charged)
        else:
            self.failed += 1
        for waiter, result in waiters:
            if outcome:
                result.callback(user)
                continue
            if waiter != client:
                self._charge(waiter)
            result.errback(self.authenticationRequired())

    def _lockedFor(self, client: str) -> int:
        """Seconds C{client} must wait before trying again; 0 if it may."""
        failures = self._failures.get(client)
        if failures is None or failures.count < FAILURE_LIMIT:
            return 0
        remaining = failures.since + FAILURE_WINDOW - self._reactor.seconds()
        if remaining <= 0:
            del self._failures[client]
            return 0
        return max(1, math.ceil(remaining))

    def _charge(self, client: str) -> _Failures:
        """Count a failure against C{client}; the window it went into."""
        now = self._reactor.seconds()
        failures = self._failures.get(client)
        if failures is None or now - failures.since >= FAILURE_WINDOW:
            failures = self._failures[client] = _Failures(now)
            self._failures.move_to_end(client)
            if len(self._failures) > FAILURE_CLIENTS:
                self._failures.popitem(last=False)
        failures.count += 1
        return failures

    def _refund(self, client: str, charged: _Failures) -> None:
        """Take back a failure counted in advance (the check did not fail)."""
        charged.count -= 1
        if not charged.count and self._failures.get(client) is charged:
            del self._failures[client]
