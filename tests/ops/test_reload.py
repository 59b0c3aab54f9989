"""
SIGHUP reloads the whole config file, from a real daemon over loopback
sockets: egress rules, limits, upstream timeouts, logging and listeners are
swapped in one step; a request already admitted finishes on the settings it
started with; a bad config (syntax, validation, key store, port taken)
changes nothing and says why; C{mydataproxy reload} reports the outcome.

Two in-process origins stand for two destinations; configs A and B mirror
each other (A lets origin 1 through and refuses origin 2 by a named deny
rule, B the reverse), so every answer tells which config decided it: the
access line's C{rule=} names the rule, and the rule's name its config.
"""

from __future__ import annotations

import copy
import http.client
import json
import socket
import subprocess
import threading
import time
from dataclasses import dataclass

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509 import load_pem_x509_certificate

from conftest import (
    BIN,
    LOOPBACK,
    RELOAD_FAILED,
    RELOAD_OK,
    RawConnection,
    build_request,
    get_free_port,
    to_toml,
    wait_for_port,
)
from recording_origin import RecordingOrigin

MYDATAPROXY = BIN / "mydataproxy"


@pytest.fixture
def origins():
    """Two recording origins on loopback (closed after the test)."""
    pair = (RecordingOrigin(), RecordingOrigin())
    yield pair
    for each in pair:
        each.close()


def egress(letter: str, allowed: RecordingOrigin, refused: RecordingOrigin) -> dict:
    """
    Config C{letter}'s egress: C{allowed} passes by rule C{<letter>-allow},
    C{refused} is refused by rule C{<letter>-deny}; nothing else passes.
    """
    return {
        "default": "deny",
        "rules": [
            {"name": f"{letter}-allow", "action": "allow", "networks": ["127.0.0.0/8"], "ports": [allowed.port]},
            {"name": f"{letter}-deny", "action": "deny", "ports": [refused.port]},
        ],
    }


def variant(config: dict, **sections) -> dict:
    """A deep copy of C{config} whose sections are updated from C{sections}."""
    fresh = copy.deepcopy(config)
    for section, values in sections.items():
        fresh.setdefault(section, {}).update(values)
    return fresh


def line_of(config: dict, text: str) -> int:
    """The 1-based line of C{config}'s TOML (as the proxy gets it) that starts with C{text}."""
    lines = to_toml(config).splitlines()
    return next(i for i, line in enumerate(lines, 1) if line.startswith(text))


def generation(line: str) -> int:
    """The generation number in a reload outcome line."""
    match = RELOAD_OK.search(line) or RELOAD_FAILED.search(line)
    assert match, f"not a reload outcome line: {line!r}"
    return int(match.group(1))


def get(proxy, origin: RecordingOrigin, path: str, headers=(), port: int | None = None):
    """One absolute-form GET to C{origin} through C{proxy}, on a new connection."""
    with RawConnection(port or proxy.port, timeout=10) as c:
        c.send(build_request("GET", origin.url + path, [("Host", origin.authority), *headers]))
        return c.read_response()


def rule_of(proxy, tag: str) -> str:
    """The C{rule=} of the one access line whose target holds C{tag}."""
    lines = proxy.wait_access_lines(lambda line: tag in line)
    assert len(lines) == 1, lines
    return lines[0].get("rule", "")


def closed_by_peer(connection: RawConnection, timeout: float = 3.0) -> bool:
    """Whether the proxy closes C{connection} within C{timeout} seconds (sending nothing)."""
    connection.settimeout(timeout)
    try:
        return connection.sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def listening_inode(proxy, port: int) -> str:
    """The inode of the proxy's listening socket on C{port} ("" if none)."""
    inodes = [s.inode for s in proxy.tcp_sockets() if s.state == "LISTEN" and s.local[1] == port]
    assert len(inodes) <= 1, inodes
    return inodes[0] if inodes else ""


def refused(port: int) -> bool:
    """Whether a connection to C{port} on loopback is refused."""
    try:
        socket.create_connection((LOOPBACK, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


# ---------------------------------------------------------------------------
# 1. Reload under load
# ---------------------------------------------------------------------------

#: Requests each client thread sends at most (the loop ends with the reloads).
MAX_REQUESTS_PER_THREAD = 5000
#: A client's pause between two requests, in seconds (a steady load, not a flood).
PAUSE = 0.001
CLIENT_THREADS = 4
#: Requests a client sends on one keep-alive connection before opening another.
KEEPALIVE_BATCH = 5
#: Time each configuration stays in force between two reloads, in seconds.
DWELL = 0.12


@dataclass
class Answer:
    """One request of the client loop, as the client saw it."""

    tag: str
    origin: int  # 0: origin 1, 1: origin 2
    sent: float
    done: float
    status: int
    body: bytes


def client_loop(proxy, origins, number: int, stop: threading.Event, answers: list, failures: list,
                retried: list) -> None:
    """
    Requests alternating between the two origins, in keep-alive batches of
    L{KEEPALIVE_BATCH}, then one on a connection of its own (C{Connection:
    close}), until C{stop} is set or L{MAX_REQUESTS_PER_THREAD} were sent.

    A request on a reused keep-alive connection that the proxy closes before
    any byte of an answer (an idle connection closed by a reload) is sent
    again once on a new connection, as HTTP clients do (RFC 9112 9.3.1); its
    tag goes to C{retried}.  Any other error is a failure.
    """
    connection = http.client.HTTPConnection(LOOPBACK, proxy.port, timeout=10)
    try:
        for n in range(MAX_REQUESTS_PER_THREAD):
            if stop.is_set():
                return
            which = n % 2
            origin = origins[which]
            headers = {"Host": origin.authority}
            if n % (KEEPALIVE_BATCH + 1) == KEEPALIVE_BATCH:
                headers["Connection"] = "close"
            for attempt in "ab":
                tag = f"t{number}-{n}{attempt}"
                reused = connection.sock is not None
                sent = time.monotonic()
                try:
                    connection.request("GET", f"{origin.url}/load/{tag}", headers=headers)
                    response = connection.getresponse()
                    body = response.read()
                except ConnectionError as e:
                    connection.close()
                    if reused and attempt == "a":
                        retried.append(tag)
                        continue
                    failures.append(f"{tag}: {e!r} on a {'reused' if reused else 'new'} connection")
                    break
                except (OSError, http.client.HTTPException) as e:
                    connection.close()
                    failures.append(f"{tag}: {e!r} on a {'reused' if reused else 'new'} connection")
                    break
                answers.append(Answer(tag, which, sent, time.monotonic(), response.status, body))
                break
            time.sleep(PAUSE)
    finally:
        connection.close()


def test_twenty_reloads_under_load_fail_no_request_and_each_answer_follows_a_config_in_force(
    proxy_factory, origins
) -> None:
    """
    20 reloads cycling broken, B, broken, A while four clients loop: no
    request fails (every answer is the origin's 200 or the proxy's own 403),
    and every answer is the one of a config in force while it was in flight.

    The check, per request sent at C{t0} and answered at C{t1}: generation
    C{g} was swapped in somewhere between its SIGHUP (C{s_g}) and the moment
    its outcome line was seen (C{o_g}), and ruled until generation C{g+1}
    was; so C{g} may have decided the request exactly when C{s_g < t1} and
    C{o_(g+1) > t0}.  The answer's config (from its access line's rule, which
    must match the status: allow and 200, deny and 403) must be one of those.
    Failed reloads must never show: no answer may come from the broken
    config's rule.
    """
    one, two = origins
    proxy = proxy_factory(egress=egress("a", one, two), daemon={"shutdown_timeout": 1.0})
    configs = {
        "a": proxy.config,
        "b": variant(proxy.config, egress=egress("b", two, one)),
        # It would let both through, were any of it applied before the
        # bad limit was found.
        "broken": variant(
            proxy.config,
            egress={"default": "deny", "rules": [{"name": "broken-allow", "action": "allow", "networks": ["127.0.0.0/8"]}]},
            limits={"max_header_bytes": "lots"},
        ),
    }
    stop = threading.Event()
    answers: list[Answer] = []
    failures: list[str] = []
    retried: list[str] = []
    clients = [
        threading.Thread(target=client_loop, args=(proxy, origins, i, stop, answers, failures, retried), daemon=True)
        for i in range(CLIENT_THREADS)
    ]
    for client in clients:
        client.start()
    # Generation 1 (config a) was in force from the start.
    swaps = [(float("-inf"), float("-inf"), "a")]
    outcomes = []
    try:
        time.sleep(DWELL)
        for letter in ["broken", "b", "broken", "a"] * 5:
            signalled = time.monotonic()
            line = proxy.reload(configs[letter])
            outcomes.append((letter, line))
            if RELOAD_OK.search(line):
                swaps.append((signalled, time.monotonic(), letter))
            time.sleep(DWELL)
    finally:
        stop.set()
        for client in clients:
            client.join(15)
    assert not any(client.is_alive() for client in clients), "a client loop did not end"

    expected = 1
    for letter, line in outcomes:
        if letter == "broken":
            assert RELOAD_FAILED.search(line) and generation(line) == expected, (letter, line)
            assert "limits.max_header_bytes" in line, line
        else:
            expected += 1
            assert RELOAD_OK.search(line) and generation(line) == expected, (letter, line)
    assert proxy.alive()

    assert not failures, f"{len(failures)} of {len(answers) + len(failures)} requests failed: {failures[:10]}"
    assert len(answers) >= 200, f"only {len(answers)} requests were answered: the load was too light"
    assert max(a.sent for a in answers) > swaps[-1][1], "the clients stopped before the last reload"
    reached = {r["target"].rsplit("/", 1)[-1] for o in origins for r in o.requests}
    admitted_then_dropped = [tag for tag in retried if tag in reached]
    assert not admitted_then_dropped, f"requests admitted, then cut without an answer: {admitted_then_dropped}"

    lines = proxy.wait_access_lines(lambda line: "/load/" in line, count=len(answers), timeout=10)
    rules: dict[str, list[str]] = {}
    for line in lines:
        rules.setdefault(line["target"].rsplit("/", 1)[-1], []).append(line.get("rule", ""))
    seen = {"a": 0, "b": 0}
    wrong = []
    for answer in answers:
        assert answer.status in (200, 403), f"{answer.tag}: {answer.status} {answer.body[:200]!r}"
        found = rules.get(answer.tag, [])
        assert len(found) == 1, f"{answer.tag}: access lines with rules {found}"
        rule = found[0]
        name = rule.rsplit(" ", 1)[-1]
        letter, _, action = name.partition("-")
        assert letter in seen and action in ("allow", "deny"), f"{answer.tag}: decided by {rule!r}"
        assert (action == "allow") == (answer.status == 200), f"{answer.tag}: {answer.status} by {rule!r}"
        # Config a allows origin 1, config b origin 2.
        assert (answer.origin == 0) == ((letter == "a") == (action == "allow")), f"{answer.tag}: {rule!r}"
        if answer.status == 200:
            assert json.loads(answer.body)["target"].endswith(answer.tag), answer.body
        possible = {
            swaps[g][2]
            for g in range(len(swaps))
            if swaps[g][0] < answer.done and (g + 1 == len(swaps) or swaps[g + 1][1] > answer.sent)
        }
        if letter not in possible:
            wrong.append(f"{answer.tag}: config {letter}, in force then: {sorted(possible)}")
        seen[letter] += 1
    assert not wrong, f"{len(wrong)} answers from a config not in force while they were in flight: {wrong[:10]}"
    assert seen["a"] > 20 and seen["b"] > 20, f"answers per config: {seen}"


# ---------------------------------------------------------------------------
# 2. Admitted requests keep their settings
# ---------------------------------------------------------------------------


def test_a_request_admitted_before_a_reload_finishes_on_its_settings(proxy_factory, origins) -> None:
    """
    Admitted under read_timeout 30, reloaded to read_timeout 1 while the
    origin takes 3 s: still 200, and its connection closes after the answer;
    an idle keep-alive connection is closed by the reload (after the drain's
    grace); a new request gets the new timeout (504).
    """
    one, _ = origins
    proxy = proxy_factory(egress=egress("a", *origins), upstream={"read_timeout": 30.0},
                          daemon={"shutdown_timeout": 1.0})
    with RawConnection(proxy.port, timeout=10) as idle, RawConnection(proxy.port, timeout=10) as busy:
        idle.send(build_request("GET", f"{one.url}/idle", [("Host", one.authority)]))
        assert idle.read_response().status == 200
        busy.send(build_request("GET", f"{one.url}/delay/3000/held", [("Host", one.authority)]))
        one.wait_for("/delay/3000/held")
        started = time.monotonic()
        line = proxy.reload(variant(proxy.config, upstream={"read_timeout": 1.0}))
        assert RELOAD_OK.search(line) and generation(line) == 2, line

        fresh = get(proxy, one, "/delay/3000/new")
        assert fresh.status == 504, f"a request after the reload did not get read_timeout 1: {fresh.status}"
        assert time.monotonic() - started < 2.9, "the new request waited as long as the old timeout would"
        # Within the drain's grace (its client might have had a request on the way).
        assert closed_by_peer(idle), "an idle keep-alive connection open at the reload stayed open"

        held = busy.read_response()
        assert held.status == 200, f"the admitted request lost its settings: {held.status} {held.body[:200]!r}"
        assert json.loads(held.body)["target"] == "/delay/3000/held"
        assert closed_by_peer(busy), "the connection busy at the reload stayed open after its answer"


# ---------------------------------------------------------------------------
# 3. Listeners
# ---------------------------------------------------------------------------


def test_listeners_rebind_start_and_stop_and_an_unchanged_one_keeps_its_socket(proxy_factory, origins) -> None:
    """
    Adding the admin listener by a reload keeps the forward listener's very
    socket (same inode, no connection attempt failing meanwhile) and starts admin;
    changing forward.listen binds the new port and closes the old; removing
    admin stops it.
    """
    one, _ = origins
    proxy = proxy_factory(egress=egress("a", *origins), daemon={"shutdown_timeout": 1.0})
    first = proxy.port
    inode = listening_inode(proxy, first)
    assert inode, "no listening socket found for the forward listener"
    admin = get_free_port()

    stop = threading.Event()
    connects = {"ok": 0, "failed": 0}

    def connect_loop() -> None:
        for _ in range(2000):
            if stop.is_set():
                return
            try:
                socket.create_connection((LOOPBACK, first), timeout=2).close()
                connects["ok"] += 1
            except OSError:
                connects["failed"] += 1
            time.sleep(0.002)

    connector = threading.Thread(target=connect_loop, daemon=True)
    connector.start()
    try:
        time.sleep(0.1)
        line = proxy.reload(variant(proxy.config, admin={"listen": f"tcp:{admin}:interface={LOOPBACK}"}))
        time.sleep(0.1)
    finally:
        stop.set()
        connector.join(10)
    assert RELOAD_OK.search(line), line
    assert connects["failed"] == 0 and connects["ok"] > 10, f"connections to the unchanged listener: {connects}"
    assert listening_inode(proxy, first) == inode, "the unchanged forward listener was bound anew"
    assert wait_for_port(admin, 5.0, proxy.proc), "the admin listener added by the reload does not listen"
    assert requests.get(f"http://{LOOPBACK}:{admin}/healthz", timeout=5).status_code == 200

    second = get_free_port()
    line = proxy.reload(variant(proxy.config, forward={"listen": f"tcp:{second}:interface={LOOPBACK}"}))
    assert RELOAD_OK.search(line), line
    assert get(proxy, one, "/on-the-new-port", port=second).status == 200
    assert refused(first), "the old forward port still accepts connections"
    assert listening_inode(proxy, second) not in ("", inode)

    line = proxy.reload({section: values for section, values in proxy.config.items() if section != "admin"})
    assert RELOAD_OK.search(line), line
    assert refused(admin), "the admin listener removed by the reload still accepts connections"
    assert get(proxy, one, "/still-served", port=second).status == 200


# ---------------------------------------------------------------------------
# 4. Bad configs change nothing
# ---------------------------------------------------------------------------


def p12_with_password(tls_files, path, password: bytes) -> str:
    """The test leaf and its key as a PKCS#12 store at C{path}, under C{password}."""
    key = serialization.load_pem_private_key(tls_files.key_pem.read_bytes(), None)
    certificate = load_pem_x509_certificate(tls_files.cert_pem.read_bytes())
    path.write_bytes(pkcs12.serialize_key_and_certificates(
        b"client", key, certificate, None, serialization.BestAvailableEncryption(password)))
    return str(path)


#: The (wrong) key store password of the bad config: never to be logged.
PASSWORD = "not-the-password-5e1f"


def test_a_bad_config_of_any_kind_changes_nothing_and_says_why(proxy_factory, origins, tls_files, tmp_path) -> None:
    """
    A syntax error, a validation error, a key store with the wrong password
    and a port already taken each leave generation 1 in force (origin 1 is
    still allowed by rule a-allow, where every bad config would refuse it),
    keep the daemon running and log C{reload failed, still on generation 1}
    with where and why; a good config after them is generation 2.
    """
    one, two = origins
    proxy = proxy_factory(egress=egress("a", one, two), daemon={"shutdown_timeout": 1.0})
    first = proxy.port
    good = variant(proxy.config, egress=egress("b", two, one))
    path = str(proxy.config_path)

    invalid = variant(good, limits={"max_header_bytes": "lots"})
    store = p12_with_password(tls_files, tmp_path / "client.p12", b"right")
    taken = socket.socket()
    taken.bind((LOOPBACK, 0))
    taken.listen(1)
    try:
        bad = [
            ("syntax", to_toml(good) + "[limits\nmax_header_bytes = 1000\n", [path, "not valid TOML"]),
            ("validation", invalid,
             [f"{path}:{line_of(invalid, 'max_header_bytes')}: limits.max_header_bytes: ", "lots"]),
            ("key store", variant(good, upstream={"tls": {"key_store": store, "key_store_password": PASSWORD}}),
             [f"{path}:", "upstream.tls", "client.p12", "password"]),
            ("port taken", variant(good, forward={"listen": f"tcp:{taken.getsockname()[1]}:interface={LOOPBACK}"}),
             [str(taken.getsockname()[1])]),
        ]
        for n, (kind, config, fragments) in enumerate(bad):
            line = proxy.reload(config)
            assert RELOAD_FAILED.search(line) and generation(line) == 1, f"{kind}: {line}"
            for fragment in fragments:
                assert fragment in line, f"{kind}: {fragment!r} not in {line!r}"
            assert PASSWORD not in proxy.output(), f"{kind}: the key store password reached the log"
            assert proxy.alive(), f"{kind}: the daemon died"
            response = get(proxy, one, f"/after-bad-{n}")
            assert response.status == 200, f"{kind}: the old config is not in force: {response.status}"
            assert rule_of(proxy, f"/after-bad-{n}").endswith("a-allow"), kind
    finally:
        taken.close()
    assert listening_inode(proxy, first), "the forward listener was lost"

    line = proxy.reload(good)
    assert RELOAD_OK.search(line) and generation(line) == 2, line
    assert get(proxy, one, "/after-good").status == 403
    assert rule_of(proxy, "/after-good").endswith("b-deny")


# ---------------------------------------------------------------------------
# 5. Logging and limits
# ---------------------------------------------------------------------------


def test_logging_and_limits_are_reloaded(proxy_factory, origins, tmp_path) -> None:
    """
    A new access_log (in JSON) takes the lines of requests after the reload,
    the old file none of them; new max_header_bytes and max_body_bytes apply
    to new requests (431, 413) where the old ones let them through.
    """
    one, _ = origins
    proxy = proxy_factory(egress=egress("a", *origins), daemon={"shutdown_timeout": 1.0})
    old_log = proxy.access_log
    pad = [("X-Pad", "p" * 3000)]

    def post(tag: str, size: int):
        with RawConnection(proxy.port, timeout=10) as c:
            c.send(build_request("POST", f"{one.url}/{tag}", [("Host", one.authority)], body=b"b" * size))
            return c.read_response()

    assert get(proxy, one, "/before-pad", pad).status == 200
    assert post("before-body", 4000).status == 200
    assert proxy.wait_access_lines(lambda line: "/before-body" in line)

    new_log = tmp_path / "access-new.log"
    line = proxy.reload(variant(
        proxy.config,
        logging={"access_log": str(new_log), "format": "json"},
        limits={"max_header_bytes": 2048, "max_body_bytes": 1000},
    ))
    assert RELOAD_OK.search(line), line
    assert get(proxy, one, "/after-pad", pad).status == 431
    assert post("after-body", 4000).status == 413
    assert get(proxy, one, "/after-plain").status == 200

    deadline = time.monotonic() + 5
    while True:
        text = new_log.read_text() if new_log.exists() else ""
        if text.count("\n") >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    # A refused head has no target in its line ("-"), only its status.
    records = [json.loads(line) for line in text.splitlines()]
    statuses = sorted((r["status"], r["target"].rsplit("/", 1)[-1]) for r in records)
    assert statuses == [(200, "after-plain"), (413, "after-body"), (431, "-")], records
    old = old_log.read_text()
    assert "/before-pad" in old and "/after-" not in old, old


# ---------------------------------------------------------------------------
# 6. mydataproxy reload
# ---------------------------------------------------------------------------


def test_the_reload_command_reports_success_and_failure(proxy_factory, origins) -> None:
    """
    C{mydataproxy reload --pidfile P} waits for the outcome: exit 0 and
    C{reload: generation 2 in force from <config>}, then exit 1 and the
    error for a bad config; the daemon's outcome file C{P.reload} agrees.
    """
    one, two = origins
    proxy = proxy_factory(pidfile=True, egress=egress("a", one, two), daemon={"shutdown_timeout": 1.0})
    deadline = time.monotonic() + 5
    while not proxy.pidfile.exists():
        assert time.monotonic() < deadline, "twistd wrote no pidfile"
        time.sleep(0.05)
    outcome = proxy.pidfile.with_name(proxy.pidfile.name + ".reload")

    def run() -> subprocess.CompletedProcess:
        return subprocess.run([str(MYDATAPROXY), "reload", "--pidfile", str(proxy.pidfile)],
                              capture_output=True, text=True, timeout=30)

    good = variant(proxy.config, egress=egress("b", two, one))
    proxy.write_config(good)
    done = run()
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert f"reload: generation 2 in force from {proxy.config_path}" in done.stdout, done.stdout
    report = json.loads(outcome.read_text())
    assert report["pid"] == proxy.pid and report["generation"] == 2 and report["ok"] is True, report
    assert "generation 2" in report["message"] and report["time"], report
    assert get(proxy, one, "/after-command").status == 403

    invalid = variant(good, limits={"max_header_bytes": "lots"})
    proxy.write_config(invalid)
    done = run()
    said = done.stdout + done.stderr
    assert done.returncode == 1, said
    assert "reload failed, still on generation 2" in said, said
    assert f"{proxy.config_path}:{line_of(invalid, 'max_header_bytes')}: limits.max_header_bytes: " in said, said
    report = json.loads(outcome.read_text())
    assert report["pid"] == proxy.pid and report["generation"] == 2 and report["ok"] is False, report
    assert "limits.max_header_bytes" in report["message"], report
    assert proxy.alive()
    assert get(proxy, one, "/after-failure").status == 403
