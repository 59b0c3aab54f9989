"""
C{[daemon] workers = 2}, end to end with real processes on loopback: the
supervisor binds the forward and reverse listeners once and is the only
process listening on them (it hands the connections to the workers); both
serve; their access lines reach one file
whole; /metrics sums them and /readyz asks each; a worker killed with
SIGKILL is restarted while the other serves; SIGTERM drains every worker, a
second one cuts; SIGHUP puts a new generation in force (under load, with no
failed request), moves a changed listener and the logs, or, for a broken
file or a new generation that dies, keeps the old one; SIGUSR1 reopens the
logs; a supervisor killed with SIGKILL leaves no worker behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import (
    BIN, LOOPBACK, RawConnection, build_request, get_free_port, parse_access_line, process_tcp_sockets,
    socket_inodes, to_toml,
)
from recording_origin import RecordingOrigin
from supervised import admin_socket, alive, requests_counted, samples, start_supervised, unix_get

CLEAN_EXIT = (0, -signal.SIGTERM)


@pytest.fixture
def recording():
    """An origin of this test's own (its requests seen from the origin's side)."""
    server = RecordingOrigin()
    yield server
    server.close()


def get(proxy, origin: RecordingOrigin, path: str) -> tuple[int, bytes]:
    """One request through the forward proxy on a new connection: status and body."""
    with RawConnection(proxy.port, timeout=10) as c:
        c.send(build_request("GET", f"{origin.url}{path}", [("Host", origin.authority), ("Connection", "close")]))
        response = c.read_response()
    return response.status, response.body


def listening_inode(pid: int, port: int) -> str:
    """The inode of the socket process C{pid} listens on C{port} with."""
    found = {s.inode for s in process_tcp_sockets(pid) if s.state == "LISTEN" and s.local[1] == port}
    assert len(found) == 1, f"pid {pid} listens on port {port} with {found}"
    return found.pop()


def test_only_the_supervisor_listens_and_both_workers_serve(proxy_factory, recording) -> None:
    reverse = {"listen": f"tcp:{get_free_port()}:interface={LOOPBACK}",
               "routes": [{"prefix": "/api/", "backends": [recording.url + "/base/"], "name": "api"}]}
    supervised = start_supervised(proxy_factory, reverse=reverse)
    proxy = supervised.proxy
    workers = supervised.workers()
    assert len(workers) == 2
    for port in (proxy.port, proxy.reverse_port):
        bound = listening_inode(supervised.pid, port)
        for pid in workers:
            assert bound not in socket_inodes(pid), f"worker {pid} holds the supervisor's socket for {port}"
            assert not [s for s in process_tcp_sockets(pid) if s.state == "LISTEN"], f"worker {pid} listens"
    with RawConnection(proxy.reverse_port, timeout=10) as c:
        c.send(build_request("GET", "/api/x?q=1", [("Host", "public.example"), ("Connection", "close")]))
        assert c.read_response().status == 200
    assert recording.requests[-1]["target"] == "/base/x?q=1"
    # Long targets: each access line is well past PIPE_BUF (4096), so a
    # line written in pieces would show.
    count = 240
    targets = [f"/long/{n}?pad={'x' * (5000 + n)}" for n in range(count)]
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda target: get(proxy, recording, target), targets))
    assert [status for status, _ in answers] == [200] * count
    lines = proxy.wait_access_lines(lambda line: "/long/" in line, count=count)
    assert len(lines) == count
    every = [line for line in proxy.access_lines() if "/api/x" not in line]
    assert len(every) == count, "a line is split or two are run together"
    logged = sorted(parse_access_line(line)["target"] for line in every)
    assert logged == sorted(f"{recording.url}{target}" for target in targets)
    assert all(parse_access_line(line)["status"] == "200" for line in every)
    per_worker = [requests_counted(unix_get(admin_socket(pid), "/metrics")[1]) for pid in workers]
    assert all(n > 0 for n in per_worker), f"requests by worker: {per_worker}: one worker served nothing"
    assert sum(per_worker) == count + 1  # and the reverse request
    assert requests_counted(supervised.metrics()) == count + 1
    states = samples(supervised.metrics())
    assert states[("mydataproxy_workers", (("state", "ready"),))] == 2


def test_a_killed_worker_is_restarted_while_the_other_serves(proxy_factory, recording) -> None:
    supervised = start_supervised(proxy_factory)
    proxy = supervised.proxy
    for n in range(10):
        assert get(proxy, recording, f"/before/{n}")[0] == 200
    before = requests_counted(supervised.metrics())
    victim, survivor = supervised.workers()
    os.kill(victim, signal.SIGKILL)
    statuses = [get(proxy, recording, f"/meanwhile/{n}")[0] for n in range(20)]
    assert statuses == [200] * 20, "requests failed while a worker was down"
    pids = supervised.wait_ready(2, other_than=(victim,))
    assert survivor in pids and victim not in pids
    assert not alive(victim)
    assert "exited unexpectedly (killed by signal 9 (SIGKILL)); restarting it in 0.5 s" in proxy.output()
    text = supervised.metrics()
    assert samples(text)[("mydataproxy_worker_restarts_total", ())] == 1
    # The killed worker's count, as last scraped, stays in the total.
    assert requests_counted(text) >= before + 20


def test_sigterm_drains_every_worker_and_exits(proxy_factory, recording) -> None:
    supervised = start_supervised(proxy_factory, daemon={"shutdown_timeout": 10.0})
    proxy = supervised.proxy
    workers = supervised.workers()
    slow = RawConnection(proxy.port, timeout=15)
    slow.send(build_request("GET", f"{recording.url}/delay/1500/held", [("Host", recording.authority)]))
    recording.wait_for("held")
    started = time.monotonic()
    proxy.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    readyz = supervised.readyz()
    assert readyz.status_code == 503 and "draining" in readyz.text
    assert slow.read_response().status == 200, "the request in flight did not finish"
    assert proxy.proc.wait(10) in CLEAN_EXIT
    assert time.monotonic() - started < 8
    assert not any(alive(pid) for pid in workers)
    lines = [line for line in proxy.access_lines() if "/delay/1500/held" in line]
    assert len(lines) == 1 and "status=200" in lines[0]


def test_sighup_puts_a_new_generation_in_force_and_a_broken_file_changes_nothing(proxy_factory, recording) -> None:
    supervised = start_supervised(proxy_factory)
    proxy = supervised.proxy
    assert get(proxy, recording, "/gen1")[0] == 200
    old = supervised.workers()
    bound = listening_inode(supervised.pid, proxy.port)
    config = {section: dict(values) for section, values in proxy.config.items()}
    config["egress"] = {"rules": [
        {"name": "no origin", "action": "deny", "ports": [recording.port]},
        *proxy.config["egress"]["rules"],
    ]}
    line = proxy.reload(config)
    assert "reload: generation 2 in force" in line, line
    assert get(proxy, recording, "/gen2")[0] == 403
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in old):
        assert time.monotonic() < deadline, "the old generation did not exit"
        time.sleep(0.05)
    new = supervised.wait_ready(2, other_than=tuple(old))
    assert listening_inode(supervised.pid, proxy.port) == bound, "an unchanged listener was bound anew"
    logged = proxy.wait_access_lines(lambda line: "/gen2" in line)
    assert logged and logged[0].get("rule") == "egress.rules[0] no origin"
    # A broken file changes nothing.
    line = proxy.reload(to_toml(config) + "\n[egress\n")
    assert "reload failed, still on generation 2:" in line and str(proxy.config_path) in line, line
    assert supervised.workers() == new
    assert get(proxy, recording, "/still")[0] == 403
    assert supervised.readyz().status_code == 200


def test_workers_exit_when_the_supervisor_is_killed(proxy_factory, recording) -> None:
    supervised = start_supervised(proxy_factory)
    proxy = supervised.proxy
    workers = supervised.workers()
    directory = os.path.dirname(admin_socket(workers[0]))
    proxy.proc.send_signal(signal.SIGKILL)
    proxy.proc.wait(5)
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in workers):
        assert time.monotonic() < deadline, f"workers {[p for p in workers if alive(p)]} outlived their supervisor"
        time.sleep(0.05)
    assert proxy.output().count("the supervisor is gone: stopping") == 2
    assert not os.path.exists(directory), "the supervisor's directory was left behind"
    with pytest.raises(OSError):
        socket.create_connection((LOOPBACK, proxy.port), timeout=1).close()


def test_metrics_and_readiness_come_from_every_worker(proxy_factory, recording) -> None:
    supervised = start_supervised(proxy_factory)
    workers = supervised.workers()
    threads = [threading.Thread(target=get, args=(supervised.proxy, recording, f"/m/{n}")) for n in range(30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    public = samples(supervised.metrics())
    private = [samples(unix_get(admin_socket(pid), "/metrics")[1]) for pid in workers]
    key = ("mydataproxy_request_duration_seconds_count", (("mode", "absolute"),))
    assert public[key] == sum(each.get(key, 0) for each in private) == 30
    assert ("mydataproxy_build_info", ()) not in public  # info families keep their labels
    assert len([k for k in public if k[0] == "mydataproxy_build_info"]) == 1
    os.kill(workers[0], signal.SIGSTOP)
    try:
        # A stopped worker cannot answer: not ready, and said so.
        deadline = time.monotonic() + 6
        while supervised.readyz().status_code == 200:
            assert time.monotonic() < deadline, "a worker that does not answer still counts as ready"
            time.sleep(0.1)
        assert f"pid {workers[0]}" in supervised.readyz().text
    finally:
        os.kill(workers[0], signal.SIGCONT)
    supervised.wait_ready(2)


def test_a_second_sigterm_cuts_at_once(proxy_factory, recording) -> None:
    supervised = start_supervised(proxy_factory, daemon={"shutdown_timeout": 30.0})
    proxy = supervised.proxy
    slow = RawConnection(proxy.port, timeout=15)
    slow.send(build_request("GET", f"{recording.url}/delay/20000/cut", [("Host", recording.authority)]))
    recording.wait_for("cut")
    proxy.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert proxy.alive(), "the first SIGTERM did not drain"
    started = time.monotonic()
    proxy.proc.send_signal(signal.SIGTERM)
    assert proxy.proc.wait(10) in CLEAN_EXIT
    assert time.monotonic() - started < 4
    lines = proxy.wait_access_lines(lambda line: "/delay/20000/cut" in line)
    assert len(lines) == 1 and lines[0].get("rule") == "daemon.shutdown_timeout", lines


def test_a_new_generation_that_dies_before_it_is_ready_changes_nothing(proxy_factory, recording) -> None:
    supervised = start_supervised(proxy_factory)
    proxy = supervised.proxy
    old = supervised.workers()
    config = {section: dict(values) for section, values in proxy.config.items()}
    config["egress"] = {"rules": [{"name": "no origin", "action": "deny", "ports": [recording.port]},
                                  *proxy.config["egress"]["rules"]]}
    proxy.write_config(config)
    mark = len(proxy.output())
    proxy.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while not (new := [pid for pid in supervised.workers() if pid not in old]):
        assert time.monotonic() < deadline, "no new worker was started"
        time.sleep(0.005)
    os.kill(new[0], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while "reload failed, still on generation 1: worker" not in proxy.output()[mark:]:
        assert time.monotonic() < deadline, proxy.output()[mark:]
        time.sleep(0.05)
    assert f"(pid {new[0]}, generation 2) ended (killed by signal 9 (SIGKILL)) before it was ready" in proxy.output()
    assert get(proxy, recording, "/old-rules")[0] == 200
    deadline = time.monotonic() + 5
    while supervised.workers() != old:
        assert time.monotonic() < deadline, f"the new generation is still running: {supervised.workers()}"
        time.sleep(0.05)
    assert supervised.readyz().status_code == 200


def test_a_changed_listener_moves_and_the_old_port_closes(proxy_factory, recording) -> None:
    supervised = start_supervised(proxy_factory)
    proxy = supervised.proxy
    old_port = proxy.port
    config = {section: dict(values) for section, values in proxy.config.items()}
    config["forward"]["listen"] = f"tcp:{get_free_port()}:interface={LOOPBACK}"
    assert "reload: generation 2 in force" in proxy.reload(config)
    assert proxy.port != old_port
    assert get(proxy, recording, "/moved")[0] == 200
    deadline = time.monotonic() + 5
    while True:
        try:
            socket.create_connection((LOOPBACK, old_port), timeout=1).close()
        except OSError:
            break
        assert time.monotonic() < deadline, "the old listener still accepts"
        time.sleep(0.05)


def test_logs_follow_a_reload_and_sigusr1(proxy_factory, recording, tmp_path) -> None:
    """
    The workers' events reach the error log; a reload moves the access log
    (the old generation's file keeps an intact hash chain: one writer for
    both workers); SIGUSR1 reopens a file renamed away.
    """
    error_log = tmp_path / "error.log"
    supervised = start_supervised(proxy_factory, logging={"error_log": str(error_log), "tamper_evident": True})
    proxy = supervised.proxy
    assert get(proxy, recording, "/first")[0] == 200
    first_log = proxy.access_log
    deadline = time.monotonic() + 5
    while "worker 1] configuration from" not in error_log.read_text():
        assert time.monotonic() < deadline, "the workers' events did not reach the error log"
        time.sleep(0.05)
    config = {section: dict(values) for section, values in proxy.config.items()}
    config["logging"] = {**proxy.config["logging"], "access_log": str(tmp_path / "second.log")}
    assert "reload: generation 2 in force" in proxy.reload(config)
    assert get(proxy, recording, "/second")[0] == 200
    assert proxy.wait_access_lines(lambda line: "/second" in line)
    assert not any("/second" in line for line in first_log.read_text().splitlines())
    verified = subprocess.run([str(BIN / "mydataproxy"), "verify-log", str(first_log)], capture_output=True, text=True)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    moved = tmp_path / "second.log.1"
    proxy.access_log.rename(moved)
    mark = len(proxy.output())
    proxy.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 5
    while "SIGUSR1: reopening the log files" not in proxy.output()[mark:]:
        assert time.monotonic() < deadline, "SIGUSR1 was not taken"
        time.sleep(0.05)
    assert get(proxy, recording, "/third")[0] == 200
    assert proxy.wait_access_lines(lambda line: "/third" in line)
    assert "/third" not in moved.read_text()


#: The load's pace: a pause between two requests of a client, and a bound on them all.
PAUSE = 0.005
MAX_REQUESTS = 8000


def test_reloads_under_load_fail_no_request(proxy_factory, recording) -> None:
    """
    Clients on new connections and on keep-alive ones while the supervisor
    puts three new generations in force: every request answered 200.  A
    request on a reused keep-alive connection that the proxy closed before
    any byte of an answer (an idle connection an old worker closed as it
    drained) is sent again once on a new connection, as HTTP clients do
    (RFC 9112 9.3.1).
    """
    import http.client

    supervised = start_supervised(proxy_factory)
    proxy = supervised.proxy
    stop = threading.Event()
    outcomes: list[object] = []

    def fresh(n: int) -> None:
        while not stop.wait(PAUSE) and len(outcomes) < MAX_REQUESTS:
            try:
                outcomes.append(get(proxy, recording, f"/load/fresh/{n}")[0])
            except OSError as e:
                outcomes.append(e)

    def kept(n: int) -> None:
        connection = http.client.HTTPConnection(LOOPBACK, proxy.port, timeout=10)
        while not stop.wait(PAUSE) and len(outcomes) < MAX_REQUESTS:
            for attempt in (1, 2):
                reused = connection.sock is not None
                try:
                    connection.request("GET", f"{recording.url}/load/kept/{n}", headers={"Host": recording.authority})
                    response = connection.getresponse()
                    response.read()
                except ConnectionError as e:
                    connection.close()
                    if reused and attempt == 1:
                        continue
                    outcomes.append(e)
                except (OSError, http.client.HTTPException) as e:
                    connection.close()
                    outcomes.append(e)
                else:
                    outcomes.append(response.status)
                break
        connection.close()

    threads = [threading.Thread(target=f, args=(n,)) for n in range(2) for f in (fresh, kept)]
    for thread in threads:
        thread.start()
    try:
        for generation in range(2, 5):
            config = {section: dict(values) for section, values in proxy.config.items()}
            config["upstream"] = {**proxy.config["upstream"], "read_timeout": 20.0 + generation}
            assert f"reload: generation {generation} in force" in proxy.reload(config)
            time.sleep(0.2)
    finally:
        stop.set()
        for thread in threads:
            thread.join(15)
    failed = [o for o in outcomes if o != 200]
    assert len(outcomes) < MAX_REQUESTS, "the load ended before the reloads did"
    assert len(outcomes) > 100 and not failed, f"{len(failed)} of {len(outcomes)} failed: {failed[:5]}"


def test_mydataproxy_reload_reports_the_supervisors_outcome(proxy_factory, recording) -> None:
    supervised = start_supervised(proxy_factory, pidfile=True)
    proxy = supervised.proxy
    assert int(proxy.pidfile.read_text()) == supervised.pid

    def reload() -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "mydataproxy"), "reload", "--pidfile", str(proxy.pidfile), "--timeout", "20"],
                              capture_output=True, text=True, timeout=30)

    config = {section: dict(values) for section, values in proxy.config.items()}
    config["upstream"] = {**proxy.config["upstream"], "read_timeout": 7.0}
    proxy.write_config(config)
    done = reload()
    assert done.returncode == 0 and "reload: generation 2 in force" in done.stdout, done
    proxy.write_config(to_toml(config).replace("read_timeout = 7.0", "read_timeout = -1"))
    done = reload()
    assert done.returncode == 1, done
    assert "reload failed, still on generation 2:" in done.stderr and "read_timeout" in done.stderr, done
