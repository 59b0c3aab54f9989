"""
Unit tests of htpasswd loading, password verification, Basic proxy
credentials and the authenticator's pool and failed-attempt limit
(L{mydataproxy.egress.auth}).
"""

from __future__ import annotations

import base64
import dataclasses
import os
import queue
import shutil
import subprocess
import threading
from pathlib import Path

import bcrypt
import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from mydataproxy.egress import auth
from mydataproxy.egress.auth import Htpasswd, HtpasswdError, ProxyAuthenticator, challenge, parseBasic
from mydataproxy.http.target import Refusal

LONG_TEXT = "a very much longer text to encrypt.  This one even stretches over morethan one line."

# Drepper, "Unix crypt using SHA-256 and SHA-512", test vectors (the outputs
# as stored: salts truncated to 16 characters, rounds raised to 1000).
SPEC_VECTORS = [
    ("Hello world!", "$5$saltstring$5B8vYYiY.CVt1RlTTf8KbXBH3hsxY/GNooZaBBGWEc5"),
    ("Hello world!", "$5$rounds=10000$saltstringsaltst$3xv.VbSHBb41AL9AvLeujZkZRBAwqFMz2.opqey6IcA"),
    ("This is just a test", "$5$rounds=5000$toolongsaltstrin$Un/5jzAHMgOGZ5.mWJpuVolil07guHPvOW8mGRcvxa5"),
    (LONG_TEXT, "$5$rounds=1400$anotherlongsalts$Rx.j8H.h8HjEDGomFU8bDkXm3XIUnzyxf12oP84Bnq1"),
    (
        "we have a short salt string but not a short password",
        "$5$rounds=77777$short$JiO1O3ZpDAxGJeaDIuqCoEFysAe1mZNJRs3pw0KQRd/",
    ),
    ("a short string", "$5$rounds=123456$asaltof16chars..$gP3VQ/6X7UUEW3HkBn2w1/Ptq2jxPyzV/cZKmF/wJvD"),
    ("the minimum number is still observed", "$5$rounds=1000$roundstoolow$yfvwcWrQ8l/K0DAWyuPMDNHpIVlTQebY9l/gL972bIC"),
    (
        "Hello world!",
        "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEdFCoEOfaS35inz1",
    ),
    (
        "Hello world!",
        "$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sbHbbMCVNSnCM/UrjmM0Dp8vOuZeHBy/"
        "YTBmSK6H9qs/y3RnOaw5v.",
    ),
    (
        "This is just a test",
        "$6$rounds=5000$toolongsaltstrin$lQ8jolhgVRVhY4b5pZKaysCLi0QBxGoNeKQzQ3glMhwllF7oGDZxUhx1yxdYcz/"
        "e1JSbq3y6JMxxl8audkUEm0",
    ),
    (
        LONG_TEXT,
        "$6$rounds=1400$anotherlongsalts$POfYwTEok97VWcjxIiSOjiykti.o/pQs.wPvMxQ6Fm7I6IoYN3CmLs66x9t0oSwbtEW7o7Um"
        "JEiDwGqd8p4ur1",
    ),
    (
        "we have a short salt string but not a short password",
        "$6$rounds=77777$short$WuQyW2YR.hBNpjjRhpYD/ifIw05xdfeEyQoMxIXbkvr0gge1a1x3yRULJ5CCaUeOxFmtlcGZelFl5CxtgfiAc0",
    ),
    (
        "a short string",
        "$6$rounds=123456$asaltof16chars..$BtCwjqMJGx5hrJhZywWvt0RLE8uZ4oPwcelCjmw2kSYu.Ec6ycULevoBK25fs2xXgMNrCzI"
        "MVcgEJAstJeonj1",
    ),
    (
        "the minimum number is still observed",
        "$6$rounds=1000$roundstoolow$kUMsbe306n21p9R.FRkW3IGn.S9NPN0x50YhH1xhLsPuWGsUSklZt58jaTfF4ZEQpyUNGc0dqbpBYY"
        "BaHHrsX.",
    ),
    # glibc crypt(3): empty password, empty salt, no rounds= with the default.
    ("", "$5$abc$bBHLwRRW2Li0XKaX13kz/g2fkDil4Jx46aNvd.48MS8"),
    ("", "$6$$/chiBau24cE26QQVW3IfIe68Xu5.JQ4E8Ie7lcRLwqxO5cxGuBhqF2HmTL.zWJ9zjChg3yJYFXeGBQ2y3Ba1d1"),
    # rounds=5000 is the default and may be left out.
    ("This is just a test", "$5$toolongsaltstrin$Un/5jzAHMgOGZ5.mWJpuVolil07guHPvOW8mGRcvxa5"),
]

# From the Apache httpd documentation ("Password Formats"), user myName.
APACHE_APR1 = "$apr1$r31.....$HqJZimcKQFAMYayBlzkrA/"
APACHE_SHA1 = "{SHA}VBPuJHI7uixaa6LQGWx4s+5GKNE="
APACHE_BCRYPT = "$2y$05$c4WoMPo3SXsafkva.HHa6uXQZWr7oboPiC2bT/r7q1BB8I2s0BRqC"

REAL_HASHPW = bcrypt.hashpw


def write(tmp_path: Path, *lines: str, name: str = "htpasswd") -> str:
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def load(tmp_path: Path, *lines: str, **kwargs) -> Htpasswd:
    return Htpasswd.load(write(tmp_path, *lines), **kwargs)


def opensslPasswd(*args: str | bytes) -> str:
    """
    Run C{openssl passwd}; missing openssl skips the test, but fails it in CI.
    """
    exe = shutil.which("openssl")
    if exe is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("openssl is required when CI=true")
        pytest.skip("openssl is not installed")
    done = subprocess.run([exe, "passwd", *args], check=True, capture_output=True)
    return done.stdout.decode("ascii").strip()


def bcryptHash(password: bytes, prefix: bytes = b"$2b$") -> str:
    hashed = REAL_HASHPW(password, bcrypt.gensalt(4))
    return (prefix + hashed[4:]).decode("ascii")


@pytest.fixture
def hashpwCalls(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """
    Count bcrypt computations (the slow path) while still doing them.
    """
    calls: list[bytes] = []

    def counting(password: bytes, salt: bytes) -> bytes:
        calls.append(password)
        return REAL_HASHPW(password, salt)

    monkeypatch.setattr(auth.bcrypt, "hashpw", counting)
    return calls


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------------------
# Hash formats
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("password", "hashed"), SPEC_VECTORS)
def test_shaCryptVectors(tmp_path: Path, password: str, hashed: str) -> None:
    db = load(tmp_path, f"u:{hashed}")
    assert db.verify("u", password)
    assert not db.verify("u", password + "!")
    assert not db.verify("u", password[:-1] if password else "x")


@pytest.mark.parametrize("scheme", ["-5", "-6"])
@pytest.mark.parametrize(
    ("salt", "password"),
    [
        ("saltsalt", "a"),
        ("x", "p" * 31),
        ("0123456789abcdef", "q" * 65),
        ("rounds=1001$Zz./", "비밀번호 pässwörd"),
        ("rounds=7777$s", "x" * 200),
    ],
)
def test_shaCryptMatchesOpenssl(tmp_path: Path, scheme: str, salt: str, password: str) -> None:
    hashed = opensslPasswd(scheme, "-salt", salt, password.encode("utf-8"))
    assert hashed.startswith(f"${scheme[1]}$")
    db = load(tmp_path, f"u:{hashed}")
    assert db.verify("u", password)
    assert not db.verify("u", password.upper() + "?")


@pytest.mark.parametrize(
    ("salt", "password"),
    [
        ("r31.....", ""),
        ("r31.....", "myPassword"),
        ("ab", "0123456789abcdef"),
        ("Xr4ilOzQ", "0123456789abcdefg" * 3),
        ("a", "pässwörd 비밀"),
    ],
)
def test_apr1MatchesOpenssl(tmp_path: Path, salt: str, password: str) -> None:
    hashed = opensslPasswd("-apr1", "-salt", salt, password.encode("utf-8"))
    db = load(tmp_path, f"u:{hashed}")
    assert db.verify("u", password)
    assert not db.verify("u", password + "x")


def test_apacheDocumentationExamples(tmp_path: Path) -> None:
    db = load(tmp_path, f"md5:{APACHE_APR1}", f"sha:{APACHE_SHA1}", f"bcrypt:{APACHE_BCRYPT}")
    for user in ("md5", "sha", "bcrypt"):
        assert db.verify(user, "myPassword")
        assert not db.verify(user, "mypassword")
        assert not db.verify(user, "")


@pytest.mark.parametrize("prefix", [b"$2b$", b"$2a$", b"$2y$"])
def test_bcrypt(tmp_path: Path, prefix: bytes) -> None:
    db = load(tmp_path, f"u:{bcryptHash('s3cret €'.encode(), prefix)}")
    assert db.verify("u", "s3cret €")
    assert not db.verify("u", "s3cret")
    assert not db.verify("u", "s3cret € ")


def test_bcryptLongPasswordsAreTruncatedLikeApache(tmp_path: Path) -> None:
    password = "p" * 72
    db = load(tmp_path, f"u:{bcryptHash(password.encode())}")
    assert db.verify("u", password + "anything after byte 72")
    assert not db.verify("u", "p" * 71)


def test_sha1(tmp_path: Path) -> None:
    db = load(tmp_path, "u:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=")
    assert db.verify("u", "password")
    assert not db.verify("u", "Password")


# ---------------------------------------------------------------------------
# Users
# ---------------------------------------------------------------------------


def test_unknownUserCostsAHashComputation(tmp_path: Path, hashpwCalls: list[bytes]) -> None:
    db = load(tmp_path, f"alice:{bcryptHash(b'pw')}")
    assert not db.verify("mallory", "pw")
    assert not db.verify("Alice", "pw")
    assert hashpwCalls == [b"pw", b"pw"]


def test_dummyHashIsOfTheCommonestKind(tmp_path: Path, hashpwCalls: list[bytes]) -> None:
    db = load(
        tmp_path,
        f"old:{APACHE_APR1}",
        f"a:{bcryptHash(b'x')}",
        f"b:{bcryptHash(b'y')}",
    )
    assert not db.verify("nobody", "x")
    assert hashpwCalls == [b"x"]


def test_emptyFileHasNoUsers(tmp_path: Path) -> None:
    db = load(tmp_path, "# nobody yet")
    assert not db.verify("", "")
    assert not db.verify("alice", "pw")


def test_usersAreDistinct(tmp_path: Path) -> None:
    db = load(tmp_path, f"alice:{APACHE_APR1}", "bob:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=")
    assert db.verify("alice", "myPassword")
    assert not db.verify("alice", "password")
    assert db.verify("bob", "password")
    assert not db.verify("bob", "myPassword")


def test_commentsBlankLinesAndLineEndings(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    path.write_bytes(
        b"# users\r\n\r\n   \n\talice:" + APACHE_APR1.encode() + b"  \r\n  # bob:x\nbob:" + APACHE_SHA1.encode()
    )
    db = Htpasswd.load(str(path))
    assert db.verify("alice", "myPassword")
    assert db.verify("bob", "myPassword")
    assert not db.verify("# bob", "x")


def test_htpasswdIsImmutableAndItsReprHidesHashes(tmp_path: Path) -> None:
    db = load(tmp_path, f"alice:{APACHE_APR1}")
    with pytest.raises(dataclasses.FrozenInstanceError):
        db.path = "elsewhere"  # type: ignore[misc]
    assert "HqJZimcKQFAMYayBlzkrA" not in repr(db)
    assert "r31" not in repr(db)


# ---------------------------------------------------------------------------
# Malformed files
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("alice", "expected user:hash"),
        (":$apr1$r31.....$HqJZimcKQFAMYayBlzkrA/", "expected user:hash"),
        ("alice:hunter2secret", "unsupported password scheme"),
        ("alice:", "unsupported password scheme"),
        ("alice:rl0uE6Ja4Tf6Q", "crypt(3) DES"),
        ("alice:$1$saltsalt$qjXMvbEw8oaL.CzflDugX/", "unsupported password scheme"),
        ("alice:$2y$05$c4WoMPo3SXsafkva.HHa6uXQZWr7oboPiC2bT/r7q1BB8I2s0BRq", "malformed bcrypt"),
        ("alice:$2y$03$c4WoMPo3SXsafkva.HHa6uXQZWr7oboPiC2bT/r7q1BB8I2s0BRqC", "malformed bcrypt"),
        ("alice:$2y$05$c4WoMPo3SXsafkva.HHa6zXQZWr7oboPiC2bT/r7q1BB8I2s0BRqC", "malformed bcrypt"),
        ("alice:$2x$05$c4WoMPo3SXsafkva.HHa6uXQZWr7oboPiC2bT/r7q1BB8I2s0BRqC", "malformed bcrypt"),
        ("alice:$5$rounds=999$roundstoolow$yfvwcWrQ8l/K0DAWyuPMDNHpIVlTQebY9l/gL972bIC", "malformed SHA-256-crypt"),
        ("alice:$5$rounds=01000$roundstoolow$yfvwcWrQ8l/K0DAWyuPMDNHpIVlTQebY9l/gL972bIC", "malformed SHA-256-crypt"),
        ("alice:$5$toolongsaltstring$Un/5jzAHMgOGZ5.mWJpuVolil07guHPvOW8mGRcvxa5", "malformed SHA-256-crypt"),
        ("alice:$6$saltstring$5B8vYYiY.CVt1RlTTf8KbXBH3hsxY/GNooZaBBGWEc5", "malformed SHA-512-crypt"),
        ("alice:$apr1$r31.....X$HqJZimcKQFAMYayBlzkrA/", "malformed Apache MD5"),
        ("alice:$apr1$r31.....$HqJZimcKQFAMYayBlzkrA", "malformed Apache MD5"),
        ("alice:{SHA}VBPuJHI7uixaa6LQGWx4s+5GKNE", "malformed {SHA}"),
    ],
)
def test_badEntryNamesFileAndLineButNotTheHash(tmp_path: Path, entry: str, problem: str) -> None:
    path = write(tmp_path, "# header", "", f"bob:{APACHE_SHA1}", entry, "carol:" + APACHE_APR1)
    with pytest.raises(HtpasswdError) as caught:
        Htpasswd.load(path)
    error = caught.value
    assert (error.path, error.line) == (path, 4)
    assert problem in error.problem
    assert str(error) == f"{path}, line 4: {error.problem}"
    secret = entry.partition(":")[2]
    for text in (str(error), repr(error)):
        if len(secret) > 5:
            assert secret not in text
            assert secret[-8:] not in text
        assert "VBPuJHI7" not in text


def test_duplicateUser(tmp_path: Path) -> None:
    path = write(tmp_path, f"alice:{APACHE_APR1}", f"alice:{APACHE_SHA1}")
    with pytest.raises(HtpasswdError, match=r"line 2: duplicate user 'alice'"):
        Htpasswd.load(path)


def test_invalidUtf8(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    path.write_bytes(b"alice:" + APACHE_APR1.encode() + b"\nb\xffb:" + APACHE_SHA1.encode() + b"\n")
    with pytest.raises(HtpasswdError) as caught:
        Htpasswd.load(str(path))
    assert caught.value.line == 2
    assert "UTF-8" in str(caught.value)
    assert "VBPuJHI7" not in str(caught.value)


def test_unreadableFile(tmp_path: Path) -> None:
    path = str(tmp_path / "missing")
    with pytest.raises(HtpasswdError) as caught:
        Htpasswd.load(path)
    assert caught.value.line is None
    assert str(caught.value) == f"{path}: No such file or directory"


# ---------------------------------------------------------------------------
# Verification cache
# ---------------------------------------------------------------------------


def test_goodCredentialsAreCached(tmp_path: Path, hashpwCalls: list[bytes]) -> None:
    db = load(tmp_path, f"alice:{bcryptHash(b'pw')}")
    assert db.verify("alice", "pw")
    assert db.verify("alice", "pw")
    assert db.verify("alice", "pw")
    assert len(hashpwCalls) == 1


def test_wrongPasswordIsNeverServedFromCache(tmp_path: Path, hashpwCalls: list[bytes]) -> None:
    db = load(tmp_path, f"alice:{bcryptHash(b'pw')}", f"bob:{bcryptHash(b'other')}")
    assert db.verify("alice", "pw")
    assert not db.verify("alice", "pw ")
    assert not db.verify("alice", "PW")
    assert not db.verify("bob", "pw")
    assert not db.verify("nobody", "pw")
    assert hashpwCalls == [b"pw", b"pw ", b"PW", b"pw", b"pw"]


def test_failuresAreNotCached(tmp_path: Path, hashpwCalls: list[bytes]) -> None:
    db = load(tmp_path, f"alice:{bcryptHash(b'pw')}")
    assert not db.verify("alice", "nope")
    assert not db.verify("alice", "nope")
    assert len(hashpwCalls) == 2


def test_cacheEntriesExpire(tmp_path: Path, hashpwCalls: list[bytes]) -> None:
    clock = FakeClock()
    db = load(tmp_path, f"alice:{bcryptHash(b'pw')}", clock=clock)
    assert db.verify("alice", "pw")
    clock.now += auth.CACHE_TTL - 1
    assert db.verify("alice", "pw")
    assert len(hashpwCalls) == 1
    clock.now += 1
    assert db.verify("alice", "pw")
    assert len(hashpwCalls) == 2
    clock.now += 1
    assert db.verify("alice", "pw")
    assert len(hashpwCalls) == 2


def test_cacheIsBoundedLeastRecentlyUsedFirst(
    tmp_path: Path, hashpwCalls: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth, "CACHE_SIZE", 2)
    db = load(tmp_path, *(f"{u}:{bcryptHash(u.encode())}" for u in ("a", "b", "c")))
    assert db.verify("a", "a") and db.verify("b", "b")
    assert db.verify("a", "a")  # a is now the most recently used
    assert db.verify("c", "c")  # evicts b
    del hashpwCalls[:]
    assert db.verify("a", "a") and db.verify("c", "c")
    assert hashpwCalls == []
    assert db.verify("b", "b")
    assert hashpwCalls == [b"b"]


def test_reloadedFileDoesNotHonourOldCache(tmp_path: Path) -> None:
    path = write(tmp_path, f"alice:{bcryptHash(b'old')}")
    before = Htpasswd.load(path)
    assert before.verify("alice", "old")
    write(tmp_path, f"alice:{bcryptHash(b'new')}")
    after = Htpasswd.load(path)
    assert not after.verify("alice", "old")
    assert after.verify("alice", "new")


# ---------------------------------------------------------------------------
# parseBasic
# ---------------------------------------------------------------------------


def basic(credentials: bytes, scheme: bytes = b"Basic") -> bytes:
    return scheme + b" " + base64.b64encode(credentials)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (basic(b"alice:secret"), ("alice", "secret")),
        (basic(b"alice:secret", b"bAsIc"), ("alice", "secret")),
        (b"  " + basic(b"alice:secret").replace(b" ", b"   ") + b" \t", ("alice", "secret")),
        (basic(b"alice:a:b:c"), ("alice", "a:b:c")),
        (basic(b"alice:"), ("alice", "")),
        (basic(b":pw"), ("", "pw")),
        (basic("사용자:비밀 번호".encode()), ("사용자", "비밀 번호")),
        (basic(b"j\xfcrgen:p\xe4ss"), ("jürgen", "päss")),
    ],
)
def test_parseBasic(value: bytes, expected: tuple[str, str]) -> None:
    assert parseBasic(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"Basic",
        b"Basic ",
        basic(b"alicesecret"),
        basic(b"alice:secret", b"Bearer"),
        basic(b"alice:secret", b"Digest"),
        b"Basicx " + base64.b64encode(b"a:b"),
        b"Basic\t" + base64.b64encode(b"a:b"),
        b"Basic YWxpY2U6cw",  # missing padding
        b"Basic YWxpY2U6cx==",  # non-canonical trailing bits
        b"Basic YWxpY2U6cw==YQ==",  # data after padding
        b"Basic YWxp Y2U6cw==",
        b"Basic YWxpY2U6cw==\n",
        b"Basic YWxp\nY2U6cw==",
        b"Basic !!!!",
        b"Basic YW-pY2U6cw==",  # URL-safe alphabet
        basic(b"al\nice:pw"),
        basic(b"alice:p\x00w"),
        basic(b"alice:pw\x7f"),
        basic(b"alice:p\x85w"),  # C1 control after the Latin-1 fallback
    ],
)
def test_parseBasicRejects(value: bytes) -> None:
    assert parseBasic(value) is None


# ---------------------------------------------------------------------------
# challenge
# ---------------------------------------------------------------------------


def test_challenge() -> None:
    assert challenge("MyData Proxy") == b'Basic realm="MyData Proxy", charset="UTF-8"'


def test_challengeEscapesQuotedString() -> None:
    assert challenge('a "b" \\c') == b'Basic realm="a \\"b\\" \\\\c", charset="UTF-8"'
    assert challenge("프록시") == 'Basic realm="프록시", charset="UTF-8"'.encode("utf-8")


@pytest.mark.parametrize("realm", ["a\r\nSet-Cookie: x", "a\nb", "a\x00", "a\x7f"])
def test_challengeRefusesControlCharacters(realm: str) -> None:
    with pytest.raises(ValueError):
        challenge(realm)


# ---------------------------------------------------------------------------
# ProxyAuthenticator: dedicated bounded pool, failed-attempt limit
# ---------------------------------------------------------------------------


class ImmediateReactor(MemoryReactorClock):
    """A clock whose C{callFromThread} runs at once (the fake pool has no threads)."""

    def callFromThread(self, f, *args, **kwargs) -> None:
        f(*args, **kwargs)


class FakePool:
    """Holds submitted checks until the test runs them."""

    def __init__(self) -> None:
        self.work: list = []
        self.running = False

    def start(self) -> None:
        self.running = True

    def stop(self) -> None:
        self.running = False

    def callInThreadWithCallback(self, onResult, f, *args, **kwargs) -> None:
        self.work.append((onResult, f, args, kwargs))

    def runAll(self) -> None:
        work, self.work = self.work, []
        for onResult, f, args, kwargs in work:
            try:
                result = f(*args, **kwargs)
            except Exception:  # noqa: BLE001 - handed over as ThreadPool does
                onResult(False, Failure())
            else:
                onResult(True, result)


@dataclasses.dataclass
class Outcome:
    user: str | None = None
    refusal: Refusal | None = None

    @property
    def status(self) -> int | None:
        return self.refusal.status if self.refusal is not None else None

    def field(self, name: bytes) -> bytes | None:
        return dict(self.refusal.fields).get(name) if self.refusal is not None else None


def outcome(d) -> Outcome:
    """What C{d} fired with so far (nothing yet: both None)."""
    seen = Outcome()

    def refused(failure):
        failure.trap(Refusal)
        seen.refusal = failure.value

    d.addCallbacks(lambda user: setattr(seen, "user", user), refused)
    return seen


def credentials(user: str, password: str) -> list[bytes]:
    return [b"Basic " + base64.b64encode(f"{user}:{password}".encode())]


@pytest.fixture
def authenticator(tmp_path: Path) -> tuple[ProxyAuthenticator, FakePool, ImmediateReactor]:
    users = [f"user{i}:{bcryptHash(f'pw{i}'.encode())}" for i in range(3)]
    pool = FakePool()
    reactor = ImmediateReactor()
    a = ProxyAuthenticator(load(tmp_path, *users), "Test Realm", reactor, pool)
    a.start()
    return a, pool, reactor


def test_authenticatorChecksInItsOwnPoolThenCaches(authenticator) -> None:
    a, pool, _ = authenticator
    first = outcome(a.authenticate(credentials("user0", "pw0"), "10.0.0.1"))
    assert first == Outcome() and len(pool.work) == 1, "the check must wait for the pool"
    pool.runAll()
    assert first.user == "user0"
    again = outcome(a.authenticate(credentials("user0", "pw0"), "10.0.0.1"))
    assert again.user == "user0" and not pool.work, "a cached success is answered at once"


def test_authenticatorChallengesMissingOrUnparsableCredentials(authenticator) -> None:
    a, pool, _ = authenticator
    for given in (None, [b"Bearer abc"], [b"Basic !!!"]):
        seen = outcome(a.authenticate(given, "10.0.0.1"))
        assert seen.status == 407
        assert seen.field(b"Proxy-Authenticate") == b'Basic realm="Test Realm", charset="UTF-8"'
    assert not pool.work
    # Not failures: a client without credentials is never locked out.
    for _ in range(2 * auth.FAILURE_LIMIT):
        assert outcome(a.authenticate(None, "10.0.0.1")).status == 407


def test_burstOfWrongPasswordsGets429WhileAnotherClientAuthenticates(authenticator) -> None:
    a, pool, reactor = authenticator
    for attempt in range(auth.FAILURE_LIMIT):
        seen = outcome(a.authenticate(credentials("user0", f"guess{attempt}"), "10.0.0.66"))
        pool.runAll()
        assert seen.status == 407, attempt
    assert a.failed == auth.FAILURE_LIMIT
    reactor.advance(10)
    locked = outcome(a.authenticate(credentials("user0", "guess-more"), "10.0.0.66"))
    assert locked.status == 429
    assert locked.field(b"Retry-After") == b"%d" % (auth.FAILURE_WINDOW - 10)
    assert not pool.work, "a locked client costs no hash"
    # The right password does not help the locked client (no oracle)...
    assert outcome(a.authenticate(credentials("user0", "pw0"), "10.0.0.66")).status == 429
    # ...while another client is served as ever.
    other = outcome(a.authenticate(credentials("user0", "pw0"), "10.0.0.7"))
    pool.runAll()
    assert other.user == "user0"
    assert a.limited == 2
    # When the window has passed, the client may try again.
    reactor.advance(auth.FAILURE_WINDOW - 10)
    retried = outcome(a.authenticate(credentials("user1", "pw1"), "10.0.0.66"))
    pool.runAll()
    assert retried.user == "user1"


def test_parallelGuessesAreCountedBeforeTheyFinish(authenticator) -> None:
    a, pool, _ = authenticator
    pending = [outcome(a.authenticate(credentials("user0", f"g{i}"), "10.0.0.66"))
               for i in range(auth.FAILURE_LIMIT)]
    assert len(pool.work) == auth.FAILURE_LIMIT
    assert outcome(a.authenticate(credentials("user0", "g-next"), "10.0.0.66")).status == 429
    pool.runAll()
    assert [p.status for p in pending] == [407] * auth.FAILURE_LIMIT


def test_successesAreNotCountedAsFailures(authenticator, tmp_path: Path) -> None:
    _, pool, reactor = authenticator
    many = [f"u{i}:{bcryptHash(b'right')}" for i in range(2 * auth.FAILURE_LIMIT)]
    a = ProxyAuthenticator(Htpasswd.load(write(tmp_path, *many, name="many")), "r", reactor, pool)
    for i in range(2 * auth.FAILURE_LIMIT):
        seen = outcome(a.authenticate(credentials(f"u{i}", "right"), "10.0.0.1"))
        pool.runAll()
        assert seen.user == f"u{i}", i
    assert not a._failures, "clients without failures are not remembered"


def test_identicalCredentialsShareOneCheck(authenticator, hashpwCalls: list[bytes]) -> None:
    a, pool, _ = authenticator
    # A gateway opening many connections at once with the same credentials.
    waiting = [outcome(a.authenticate(credentials("user2", "pw2"), "10.0.0.1")) for _ in range(50)]
    assert len(pool.work) == 1
    pool.runAll()
    assert {w.user for w in waiting} == {"user2"}
    assert hashpwCalls == [b"pw2"]
    # A shared wrong guess counts against every client that sent it.
    guesses = [outcome(a.authenticate(credentials("user2", "nope"), client))
               for client in ("10.0.0.1", "10.0.0.2")]
    pool.runAll()
    assert [g.status for g in guesses] == [407, 407]
    for i in range(auth.FAILURE_LIMIT - 1):
        outcome(a.authenticate(credentials("user2", f"more{i}"), "10.0.0.2"))
        pool.runAll()
    assert outcome(a.authenticate(credentials("user2", "pw2"), "10.0.0.2")).status == 429


def test_queueIsBoundedWith503(authenticator) -> None:
    a, pool, _ = authenticator
    bound = auth.AUTH_THREADS + auth.AUTH_QUEUE
    queued = [outcome(a.authenticate(credentials("user0", f"x{i}"), f"10.1.{i // 200}.{i % 200}"))
              for i in range(bound)]
    assert len(pool.work) == bound
    busy = outcome(a.authenticate(credentials("user1", "pw1"), "10.0.0.9"))
    assert busy.status == 503 and busy.refusal.reason == "authentication busy"
    assert busy.field(b"Retry-After") == b"%d" % auth.BUSY_RETRY_AFTER
    assert a.busy == 1
    pool.runAll()
    assert all(q.status == 407 for q in queued)
    served = outcome(a.authenticate(credentials("user1", "pw1"), "10.0.0.9"))
    pool.runAll()
    assert served.user == "user1"


def test_aCheckThatRaisesIsA500AndNotCounted(tmp_path: Path) -> None:
    class Broken(Htpasswd):
        def verify(self, user: str, password: str) -> bool:
            raise RuntimeError("bug")

    pool = FakePool()
    a = ProxyAuthenticator(Broken.load(write(tmp_path, f"alice:{bcryptHash(b'pw')}")), "r", ImmediateReactor(), pool)
    for i in range(auth.FAILURE_LIMIT + 1):
        seen = outcome(a.authenticate(credentials("alice", f"p{i}"), "10.0.0.1"))
        pool.runAll()
        assert seen.status == 500, i


def test_realPoolRunsChecksOffTheCallingThread(tmp_path: Path) -> None:
    """With the default pool: checks run in a "proxy-auth" thread; stop() joins it."""
    handed: queue.Queue = queue.Queue()

    class ThreadedReactor(MemoryReactorClock):
        def callFromThread(self, f, *args, **kwargs) -> None:
            handed.put((f, args, kwargs, threading.current_thread().name))

    a = ProxyAuthenticator(load(tmp_path, f"alice:{bcryptHash(b'pw')}"), "r", ThreadedReactor())
    a.start()
    try:
        seen = outcome(a.authenticate(credentials("alice", "pw"), "10.0.0.1"))
        f, args, kwargs, thread = handed.get(timeout=10)
        assert "proxy-auth" in thread, thread
        assert seen == Outcome(), "the result must come back through callFromThread"
        f(*args, **kwargs)
        assert seen.user == "alice"
    finally:
        a.stop()
    assert not [t for t in threading.enumerate() if "proxy-auth" in t.name]
