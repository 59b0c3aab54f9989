"""
The operator's tools of the C{mydataproxy} command: C{migrate}, C{reload},
C{status}, C{explain}, C{tls-probe}, C{verify-log}; and the systemd unit
and C{etc/bin} wrappers.
"""

from __future__ import annotations

import dataclasses
import gzip
import http.server
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography import x509

from conftest import (
    BIN, TWISTD, DnsServer, RawConnection, default_config, get_free_port, to_toml, wait_for_port,
)
from mydataproxy import cli, config, material
from mydataproxy.config.dump import settingsToToml
from mydataproxy.ops import audit
from mydataproxy.tls.keystore import fingerprint

ROOT = Path(__file__).resolve().parents[1]
ETC = ROOT / "etc"

# A password with what TOML strings must escape, and what they need not.
PASSWORD = 'p"a\\ss wörd\t1'


def comparable(settings: config.Settings) -> config.Settings:
    """The settings without what describes their file."""
    return dataclasses.replace(settings, source="", notices=(), locations=())


def roundTrip(source: Path, tmp_path: Path) -> tuple[config.Settings, config.Settings, str]:
    """Load C{source}, write its TOML, load that: (source's settings, TOML's settings, TOML text)."""
    settings = config.load(source)
    text = settingsToToml(settings)
    out = tmp_path / "migrated.toml"
    out.write_text(text, encoding="utf-8")
    return settings, config.load(out), text


@pytest.fixture(scope="module")
def p12(tls_files, tmp_path_factory) -> Path:
    """The test leaf and its key as a PKCS#12 store locked with L{PASSWORD}."""
    key = serialization.load_pem_private_key(tls_files.key_pem.read_bytes(), None)
    certificate = x509.load_pem_x509_certificate(tls_files.cert_pem.read_bytes())
    path = tmp_path_factory.mktemp("stores") / "client.p12"
    path.write_bytes(pkcs12.serialize_key_and_certificates(
        b"client", key, certificate, None, serialization.BestAvailableEncryption(PASSWORD.encode())))
    return path


def properties(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "conf" / "application.properties"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def javaEscaped(text: str) -> str:
    """C{text} as a .properties value (backslashes doubled, non-ASCII as \\uXXXX)."""
    return "".join(
        "\\\\" if c == "\\" else "\\t" if c == "\t" else c if c.isascii() else f"\\u{ord(c):04x}" for c in text
    )


# --- migrate ---------------------------------------------------------------------


def test_migrateSample(tmp_path: Path) -> None:
    settings, migrated, text = roundTrip(ETC / "application.properties", tmp_path)
    assert comparable(migrated) == comparable(settings)
    assert settings != config.Settings(source=settings.source, notices=settings.notices)
    # Only what differs from the defaults, under a header naming the source.
    assert text.startswith("# MyData Proxy configuration (TOML), written by `mydataproxy migrate`\n")
    assert f"# from {ETC / 'application.properties'}." in text
    body = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert "[forward]" in body and 'client_allow = ["127.0.0.1/32", "::1/128", "10.1.0.0/16"]' in body
    assert "connect_timeout = 10.0" in body
    assert not any(line.startswith(("read_timeout", "listen", "max_connections_total")) for line in body)
    # The source's notices come along as comments.
    assert "#   " + settings.notices[0] in text


def test_migrateEmptyIsHeaderOnly(tmp_path: Path) -> None:
    settings, migrated, text = roundTrip(properties(tmp_path, ""), tmp_path)
    assert comparable(migrated) == comparable(settings) == comparable(config.Settings())
    assert all(line.startswith("#") for line in text.splitlines())


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(
            "server.port=9443\nserver.ssl.enabled=true\nserver.ssl.key-store=file:{relative}\n"
            "server.ssl.key-store-password={password}\nserver.ssl.key-password={password}\n"
            "server.ssl.trust-store=file:{ca}\nserver.ssl.client-auth=need\n"
            "proxy.ssl.client.enabled=true\nproxy.ssl.client.tls-version=TLSv1.3\n",
            id="listener-and-mutual-tls",
        ),
        pytest.param(
            "server.address=::1\nserver.ssl.key-store={p12}\nserver.ssl.key-store-password={password}\n"
            "proxy.ssl.client.enabled=true\nproxy.ssl.client.validateCertificate=false\n"
            "proxy.ssl.client.tls-version=TLSv1.1,TLSv1.2\n",
            id="client-certificate-unverified",
        ),
        pytest.param(
            "server.ssl.enabled=true\nserver.ssl.key-store={p12}\nserver.ssl.key-store-password={password}\n"
            "server.ssl.trust-store={ca}\nserver.ssl.client-auth=want\n",
            id="listener-want",
        ),
        pytest.param(
            "server.port=9001\nproxy.ip.allow=\nproxy.header.filter=host,x-target-host,X-Api-Key\n"
            "logging.file.name=../logs/access.log\nproxy.ssl.client.socketTimeout=2.5\n"
            "proxy.httpclient.maxConnPerRoute=7\nserver.ssl.trust-store={ca}\n",
            id="open-listener-log-file",
        ),
    ],
)
def test_migrateRoundTrip(tmp_path: Path, tls_files, p12: Path, text: str) -> None:
    (tmp_path / "logs").mkdir()
    path = properties(tmp_path, text.format(
        relative=os.path.relpath(p12, tmp_path / "conf"), p12=p12, ca=tls_files.ca_pem,
        password=javaEscaped(PASSWORD),
    ))
    settings, migrated, _ = roundTrip(path, tmp_path)
    assert comparable(migrated) == comparable(settings)
    # The passwords survive the escaping: the stores open from the TOML.
    material.loadMaterial(migrated)


def test_migrateNativeSamples(tmp_path: Path) -> None:
    for sample in ("mydataproxy.toml", "mydataproxy-reverse.toml"):
        settings, migrated, _ = roundTrip(ETC / sample, tmp_path)
        assert comparable(migrated) == comparable(settings), sample


def test_migrateEveryKind(tmp_path: Path, p12: Path, tls_files) -> None:
    """Settings of every kind the model has: tables, arrays of tables, inherited TLS profiles."""
    source = tmp_path / "in.toml"
    source.write_text(f"""
[forward]
listen = "tcp:9443:interface=\\\\:\\\\:1"
http_ports = [80, "8000-8099", 443]
connect_ports = [443, 8443]
trusted_proxies = ["10.0.0.0/8"]
auth_file = "users.htpasswd"
auth_realm = "Bank \\"proxy\\""
[forward.tls]
key_store = "{p12}"
key_store_password = "env:KS"
client_auth = "want"
trust_store = "{tls_files.ca_pem}"
[reverse]
listen = "tcp:8081:interface=127.0.0.1"
[reverse.tls]
key_store = "{p12}"
key_store_password = "file:/run/pass"
[[reverse.routes]]
prefix = "/api/"
hosts = ["API.example.com."]
backends = ["http://[::1]:8080/gw/", "https://10.0.0.1/gw/"]
read_timeout = 60.0
max_body_bytes = 1000
[[reverse.routes]]
prefix = "/app"
backends = ["http://10.0.0.2:8080"]
[egress]
default = "deny"
guard = false
[[egress.rules]]
action = "allow"
networks = ["10.0.0.0/8"]
modes = ["connect", "header"]
users = ["alice"]
[[egress.rules]]
name = "banks"
action = "allow"
hosts = ["*.bank.example"]
ports = [443]
client_certificates = ["CN=gateway,O=Example Bank"]
[resolver]
servers = ["10.0.0.53", "[::1]:5353"]
timeout = 1.5
[limits]
max_body_bytes = 1048576
requests_per_second = 20
[upstream]
connect_timeout = 3
[upstream.tls]
trust_store = "{tls_files.ca_pem}"
min_version = "TLSv1.3"
[[upstream.tls.profiles]]
name = "bank"
hosts = ["*.bank.example"]
key_store = "{p12}"
key_store_password = "pass:x"
key_alias = "client"
pins = ["{'AB' * 32}"]
serial_number = "1234567890"
[[upstream.tls.profiles]]
hosts = ["legacy.example"]
verify = false
min_version = "TLSv1.2"
[logging]
format = "json"
time = "local"
keep = 3
error_log = ""
[admin]
""", encoding="utf-8")
    (tmp_path / "users.htpasswd").write_text("alice:{SHA}x\n")
    settings, migrated, text = roundTrip(source, tmp_path)
    assert comparable(migrated) == comparable(settings)
    # Written once, where the loader looks for them: the route's read_timeout
    # equals [upstream]'s and is left out; its body limit is not.
    assert "max_body_bytes = 1000" in text and "read_timeout" not in text
    assert text.count('name = "bank"') == 1 and "name = \"egress.rules" not in text
    assert "\n[admin]\n" in text


def test_migrateCommand(tmp_path: Path, p12: Path, capsys) -> None:
    path = properties(tmp_path, f"server.ssl.key-store={p12}\nserver.ssl.key-store-password=secret\n"
                                "proxy.ssl.client.enabled=true\nspring.application.name=x\n")
    out = tmp_path / "out.toml"
    assert cli.main(["migrate", str(path), "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0] == f"wrote {out}"
    assert "pass: literals" in captured.out
    assert "warning: " in captured.err and "spring.application.name" in captured.err
    # The passwords it holds are not for everyone.
    assert stat.S_IMODE(out.stat().st_mode) & 0o007 == 0
    assert comparable(config.load(out)) == comparable(config.load(path))
    # An existing file is kept unless --force.
    out.write_text("# mine\n")
    assert cli.main(["migrate", str(path), "-o", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert out.read_text() == "# mine\n"
    assert cli.main(["migrate", str(path), "-o", str(out), "--force"]) == 0
    assert comparable(config.load(out)) == comparable(config.load(path))
    # Without -o: standard output.
    capsys.readouterr()
    assert cli.main(["migrate", str(path)]) == 0
    assert capsys.readouterr().out == out.read_text()


def test_migrateRefusesWhatDoesNotLoadBack(tmp_path: Path, monkeypatch, capsys) -> None:
    """A writer that lost a setting is caught before anything is written."""
    path = properties(tmp_path, "server.port=9001\nserver.address=127.0.0.1\nproxy.ip.allow=10.0.0.0/8\n")
    lossy = lambda settings: "\n".join(
        line for line in settingsToToml(settings).splitlines() if not line.startswith("client_allow")
    )
    monkeypatch.setattr(cli, "settingsToToml", lossy)
    out = tmp_path / "out.toml"
    assert cli.main(["migrate", str(path), "-o", str(out)]) == 2
    assert "loads to other settings (forward)" in capsys.readouterr().err
    assert not out.exists()
    monkeypatch.setattr(cli, "settingsToToml", lambda settings: "[forward]\nlisten = 3\n")
    assert cli.main(["migrate", str(path), "-o", str(out)]) == 2
    assert "does not load" in capsys.readouterr().err
    assert not out.exists()


def test_migrateBadSource(tmp_path: Path, capsys) -> None:
    path = properties(tmp_path, "server.prot=9000\n")
    assert cli.main(["migrate", str(path)]) == 2
    assert "unknown key" in capsys.readouterr().err


# --- reload ----------------------------------------------------------------------


class PidfileProxy:
    """C{twistd -n --pidfile=FILE mydataproxy}: the proxy as operators start it."""

    def __init__(self, workdir: Path, dns: DnsServer) -> None:
        self.pidfile = workdir / "twistd.pid"
        self.port = get_free_port()
        self.config = workdir / "mydataproxy.toml"
        self.config.write_text(to_toml(default_config(self.port, workdir / "access.log", [443], dns)))
        self.outputPath = workdir / "twistd.out"
        with open(self.outputPath, "wb") as output:
            self.proc = subprocess.Popen(
                [str(TWISTD), "-n", f"--pidfile={self.pidfile}", "mydataproxy", "--config", str(self.config)],
                cwd=workdir, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        assert wait_for_port(self.port, 10.0, self.proc), self.output()

    def output(self) -> str:
        return self.outputPath.read_text(errors="replace")

    def waitOutput(self, text: str, count: int = 1, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while self.output().count(text) < count:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                return False
            time.sleep(0.05)
        return True

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)


@pytest.fixture
def pidfile_proxy(tmp_path: Path, dns_server):
    proxy = PidfileProxy(tmp_path, dns_server)
    yield proxy
    proxy.stop()


def mydataproxy(*argv: str) -> subprocess.CompletedProcess:
    """The installed C{mydataproxy} command."""
    return subprocess.run([str(BIN / "mydataproxy"), *argv], capture_output=True, text=True, timeout=30)


def test_reloadRunningProxy(pidfile_proxy: PidfileProxy) -> None:
    """Each reload waits for the proxy's word: the generation now in force."""
    assert pidfile_proxy.pidfile.read_text().strip() == str(pidfile_proxy.proc.pid)
    for generation in (2, 3):
        result = mydataproxy("reload", "--pidfile", str(pidfile_proxy.pidfile))
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"reload: generation {generation} in force from {pidfile_proxy.config}\n"
    # Still serving after both.
    assert wait_for_port(pidfile_proxy.port, 2.0, pidfile_proxy.proc)
    pidfile_proxy.stop()
    # twistd removes its pidfile on the way out.
    result = mydataproxy("reload", "--pidfile", str(pidfile_proxy.pidfile))
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: no pidfile {pidfile_proxy.pidfile}") and result.stderr.count("\n") == 1


def test_reloadReportsABadConfig(pidfile_proxy: PidfileProxy) -> None:
    """A config the proxy refuses: exit 1 with its file:line: key: problem; the old one serves on."""
    good = pidfile_proxy.config.read_text()
    pidfile_proxy.config.write_text(good + "\n[limits]\nmax_header_bytes = -1\n")
    line = pidfile_proxy.config.read_text().splitlines().index("max_header_bytes = -1") + 1
    result = mydataproxy("reload", "--pidfile", str(pidfile_proxy.pidfile))
    assert result.returncode == 1
    assert result.stderr == (
        f"reload failed, still on generation 1: {pidfile_proxy.config}:{line}: limits.max_header_bytes: "
        "must be at least 1024, not -1\n"
    )
    assert wait_for_port(pidfile_proxy.port, 2.0, pidfile_proxy.proc)
    pidfile_proxy.config.write_text(good)
    result = mydataproxy("reload", "--pidfile", str(pidfile_proxy.pidfile))
    assert (result.returncode, result.stdout) == (0, f"reload: generation 2 in force from {pidfile_proxy.config}\n")


def test_reloadWithoutAnAnswer(tmp_path: Path, capsys, monkeypatch) -> None:
    """A process that takes the signal but never writes its outcome: an error after --timeout."""
    stand_in = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGHUP, "
                                 "signal.SIG_IGN); time.sleep(30)", "mydataproxy"])
    try:
        pidfile = tmp_path / "twistd.pid"
        pidfile.write_text(f"{stand_in.pid}\n")
        time.sleep(0.3)
        assert cli.main(["reload", "--pidfile", str(pidfile), "--timeout", "0.5"]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: SIGHUP sent to MyData Proxy (pid {stand_in.pid}), but it wrote no outcome")
        assert stand_in.poll() is None
    finally:
        stand_in.kill()
        stand_in.wait()


def test_reloadDefaultPidfile(pidfile_proxy: PidfileProxy) -> None:
    """Without --pidfile: twistd's default, twistd.pid in the working directory."""
    result = subprocess.run([str(BIN / "mydataproxy"), "reload"], cwd=pidfile_proxy.pidfile.parent,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("reload: generation 2 in force"), result.stdout


def test_reloadStalePidfile(tmp_path: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    pidfile = tmp_path / "twistd.pid"
    pidfile.write_text(f"{gone.pid}\n")
    result = mydataproxy("reload", "--pidfile", str(pidfile))
    assert result.returncode == 1
    assert result.stderr == f"error: no process {gone.pid}: stale pidfile {pidfile}, the proxy is not running\n"


def test_reloadRefusesAnotherProgram(tmp_path: Path) -> None:
    """A pid reused by another program is not signalled: SIGHUP would end it."""
    other = subprocess.Popen(["sleep", "30"])
    try:
        pidfile = tmp_path / "twistd.pid"
        pidfile.write_text(f"{other.pid}\n")
        result = mydataproxy("reload", "--pidfile", str(pidfile))
        assert result.returncode == 1
        assert result.stderr.startswith(f"error: process {other.pid} (sleep 30) is not MyData Proxy"), result.stderr
        time.sleep(0.2)
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


@pytest.mark.parametrize("content", ["", "twistd\n", "0\n", "-5\n"])
def test_reloadGarbledPidfile(tmp_path: Path, content: str, capsys) -> None:
    pidfile = tmp_path / "twistd.pid"
    pidfile.write_text(content)
    assert cli.main(["reload", "--pidfile", str(pidfile)]) == 1
    assert capsys.readouterr().err.startswith(f"error: {pidfile} does not hold a process id")


def test_reloadNotPermitted(pidfile_proxy: PidfileProxy, monkeypatch, capsys) -> None:
    """A proxy run by another user (the tests may run as root: os.kill is made to refuse)."""

    def refuse(pid: int, signum: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(cli.os, "kill", refuse)
    assert cli.main(["reload", "--pidfile", str(pidfile_proxy.pidfile)]) == 1
    err = capsys.readouterr().err
    assert err == f"error: not allowed to signal process {pidfile_proxy.proc.pid} (run this as its user, or root)\n"
    assert not pidfile_proxy.waitOutput("SIGHUP", timeout=0.5)


# --- status ----------------------------------------------------------------------

# What /metrics of mydataproxy.ops.metrics looks like (prometheus_client's text).
METRICS = """\
# HELP mydataproxy_requests_total Requests answered, by mode, method class and status
# TYPE mydataproxy_requests_total counter
mydataproxy_requests_total{method="safe",mode="absolute",status="200"} 5.0
mydataproxy_requests_total{method="connect",mode="connect",status="403"} 2.0
mydataproxy_requests_total{method="unsafe",mode="header",status="502"} 1.0
mydataproxy_requests_total{method="safe",mode="header",status="none"} 0.0
# HELP mydataproxy_refusals_total Requests and connections the proxy refused, by the rule that decided
# TYPE mydataproxy_refusals_total counter
mydataproxy_refusals_total{rule="forward.connect_ports"} 2.0
mydataproxy_refusals_total{rule="egress.default"} 3.0
# HELP mydataproxy_client_connections Client connections open, by listener
# TYPE mydataproxy_client_connections gauge
mydataproxy_client_connections{listener="forward"} 4.0
mydataproxy_client_connections{listener="reverse"} 1.0
# HELP mydataproxy_tunnels Tunnels open (CONNECT, websocket), by listener
# TYPE mydataproxy_tunnels gauge
mydataproxy_tunnels{listener="forward"} 2.0
mydataproxy_tunnels{listener="reverse"} 0.0
# HELP mydataproxy_upstream_pool_connections Upstream connections, in use (or opening) and idle
# TYPE mydataproxy_upstream_pool_connections gauge
mydataproxy_upstream_pool_connections{state="in_use"} 3.0
mydataproxy_upstream_pool_connections{state="idle"} 7.0
# HELP mydataproxy_upstream_pool_rejected_total Requests refused a connection (503)
# TYPE mydataproxy_upstream_pool_rejected_total counter
mydataproxy_upstream_pool_rejected_total 1.0
# HELP mydataproxy_queue_depth Requests waiting for a turn, by queue
# TYPE mydataproxy_queue_depth gauge
mydataproxy_queue_depth{queue="upstream pool"} 6.0
mydataproxy_queue_depth{queue="api"} 9.0
# HELP mydataproxy_upstream_tls_failures_total Failed TLS handshakes with origins, by destination and check
# TYPE mydataproxy_upstream_tls_failures_total counter
mydataproxy_upstream_tls_failures_total{check="pin",destination="bank"} 2.0
# HELP mydataproxy_dns_failures_total Names that did not resolve
# TYPE mydataproxy_dns_failures_total counter
mydataproxy_dns_failures_total{kind="not_found"} 2.0
mydataproxy_dns_failures_total{kind="timeout"} 1.0
# HELP mydataproxy_log_lines_dropped_total Log lines not written
# TYPE mydataproxy_log_lines_dropped_total counter
mydataproxy_log_lines_dropped_total{log="access",why="dropped"} 11.0
mydataproxy_log_lines_dropped_total{log="access",why="lost"} 4.0
mydataproxy_log_lines_dropped_total{log="error",why="lost"} 1.0
# HELP mydataproxy_certificate_expiry_seconds Seconds until a certificate expires
# TYPE mydataproxy_certificate_expiry_seconds gauge
mydataproxy_certificate_expiry_seconds{store="forward.tls",subject="CN=proxy"} 8640000.0
mydataproxy_certificate_expiry_seconds{store="upstream.tls",subject="CN=client"} 1728000.0
# HELP mydataproxy_build_info The running version
# TYPE mydataproxy_build_info gauge
mydataproxy_build_info{python="3.11.2",twisted="26.10.0",version="1.2.3"} 1.0
# HELP process_start_time_seconds Start time of the process since unix epoch in seconds.
# TYPE process_start_time_seconds gauge
process_start_time_seconds {start}
"""


class StandIn:
    """
    An admin listener stand-in on a real loopback socket: C{answers} maps a
    path to (status, body); other paths get 404.
    """

    def __init__(self, answers: dict[str, tuple[int, str]]) -> None:
        self.answers = answers
        self.paths: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.paths.append(self.path)
                code, body = outer.answers.get(self.path, (404, "not found\n"))
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stand_in():
    started: list[StandIn] = []

    def start(ready: tuple[int, str] = (200, "ready\n"), metrics: str | None = None) -> StandIn:
        text = METRICS.replace("{start}", repr(time.time() - 3 * 86400 - 4 * 3600 - 5 * 60 - 6))
        server = StandIn({"/healthz": (200, "ok\n"), "/readyz": ready,
                          "/metrics": (200, text if metrics is None else metrics)})
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def test_statusReady(stand_in, capsys) -> None:
    server = stand_in()
    assert cli.main(["status", "--admin", server.url]) == 0
    out = capsys.readouterr().out
    assert sorted(server.paths) == ["/healthz", "/metrics", "/readyz"]
    lines = out.splitlines()
    assert lines[0] == f"MyData Proxy 1.2.3 at {server.url}: up, ready"
    assert "  uptime:         3d 4h 5m 6s" in lines or "  uptime:         3d 4h 5m 7s" in lines, out
    expected = [
        "  listeners:      forward: 4 connections, 2 tunnels; reverse: 1 connections, 0 tunnels",
        "  requests:       8 (2xx 5, 4xx 2, 5xx 1)",
        "  refusals:       5 (most: egress.default 3, forward.connect_ports 2)",
        "  upstream pool:  3 in use, 7 idle, 6 waiting, 1 refused (503)",
        "  TLS failures:   2",
        "  DNS failures:   3",
        "  log lines:      11 dropped, 5 lost",
        "  next expiry:    CN=client (upstream.tls) in 20 days",
    ]
    for line in expected:
        assert line in lines, out


def test_statusNotReady(stand_in, capsys) -> None:
    server = stand_in(ready=(503, "listener reverse is not bound\n\ndraining\n"))
    assert cli.main(["status", "--admin", server.url + "/"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"MyData Proxy 1.2.3 at {server.url}: up, NOT READY (503)"
    assert lines[1:3] == ["  not ready:      listener reverse is not bound", "  not ready:      draining"]


def test_statusWithoutMetrics(stand_in, capsys) -> None:
    """Up and ready with /metrics missing or garbled: the verdict stands, counters are left out."""
    server = stand_in(metrics="this is { not prometheus\n")
    assert cli.main(["status", "--admin", server.url]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"MyData Proxy at {server.url}: up, ready\n"
    assert "not Prometheus text" in captured.err
    server.answers.pop("/metrics")
    assert cli.main(["status", "--admin", server.url]) == 0
    assert capsys.readouterr().out == f"MyData Proxy at {server.url}: up, ready\n"


def test_statusUnreachable(closed_port: int, capsys) -> None:
    assert cli.main(["status", "--admin", f"http://127.0.0.1:{closed_port}"]) == 2
    out = capsys.readouterr().out
    assert out.startswith(f"down: the admin listener at http://127.0.0.1:{closed_port} does not answer (")
    assert "refused" in out


def test_statusWedged(monkeypatch, capsys) -> None:
    """A listener that accepts (the kernel's backlog) but never answers: a wedged reactor."""
    monkeypatch.setattr(cli, "STATUS_TIMEOUT", 0.5)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        started = time.monotonic()
        assert cli.main(["status", "--admin", url]) == 2
        assert time.monotonic() - started < 5
    assert capsys.readouterr().out.startswith(f"down: the admin listener at {url} does not answer (")


def test_statusUnhealthy(stand_in, capsys) -> None:
    server = stand_in()
    server.answers["/healthz"] = (500, "wedged\n")
    assert cli.main(["status", "--admin", server.url]) == 2
    assert capsys.readouterr().out == f"down: {server.url}/healthz answered 500\n"


def test_statusFromConfig(stand_in, tmp_path: Path, capsys) -> None:
    server = stand_in()
    port = server.server.server_address[1]
    path = tmp_path / "mydataproxy.toml"
    path.write_text(f'[admin]\nlisten = "tcp:{port}:interface=127.0.0.1"\n')
    assert cli.main(["status", "--config", str(path)]) == 0
    assert capsys.readouterr().out.startswith(f"MyData Proxy 1.2.3 at http://127.0.0.1:{port}: up, ready\n")
    path.write_text("[forward]\n")
    assert cli.main(["status", "--config", str(path)]) == 2
    assert capsys.readouterr().err == f"error: {path} has no [admin] section: the admin listener is not running\n"


def test_statusIgnoresProxyVariables(stand_in, closed_port: int) -> None:
    """The admin listener is asked directly, whatever http_proxy says."""
    server = stand_in()
    env = dict(os.environ, http_proxy=f"http://127.0.0.1:{closed_port}", HTTP_PROXY=f"http://127.0.0.1:{closed_port}")
    env.pop("no_proxy", None)
    env.pop("NO_PROXY", None)
    result = subprocess.run([str(BIN / "mydataproxy"), "status", "--admin", server.url], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "up, ready" in result.stdout


@pytest.mark.parametrize("listen, url", [
    (None, "http://127.0.0.1:9100"),
    ("tcp:9200", "http://127.0.0.1:9200"),
    ("tcp:9200:interface=0.0.0.0", "http://127.0.0.1:9200"),
    ("tcp:9200:interface=\\\\:\\\\:", "http://[::1]:9200"),
    ("tcp6:9200:interface=\\\\:\\\\:1", "http://[::1]:9200"),
    ("tcp:9200:interface=10.0.0.5", "http://10.0.0.5:9200"),
])
def test_adminURL(tmp_path: Path, listen: str | None, url: str) -> None:
    if listen is None:
        assert cli.adminURL(None) == url
        return
    path = tmp_path / "mydataproxy.toml"
    path.write_text(f'[admin]\nlisten = "{listen}"\n')
    assert cli.adminURL(config.load(path)) == url


# --- explain ---------------------------------------------------------------------


def explainVerdict(*argv: str) -> tuple[int, str, list[str]]:
    """Run C{mydataproxy explain ARGV}: (exit status, its verdict line, its step lines)."""
    result = mydataproxy("explain", *argv)
    lines = result.stdout.splitlines()
    assert lines and lines[-1].startswith("verdict: "), result.stdout + result.stderr
    return result.returncode, lines[-1].removeprefix("verdict: "), lines[1:-1]


def proxyVerdict(proxy, method: str, target: str, headers: dict[str, str]) -> str:
    """
    What the running proxy answers C{method target}: C{allowed} and the
    request target the origin saw (for a 200; C{/echo} echoes it), else the
    refusal as C{explain} words it (status, reason, rule), from the response
    and the proxy's log line.
    """
    before = proxy.output().count("\n")
    fields = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    host = target.split("/")[2] if "://" in target else target
    with RawConnection(proxy.port) as connection:
        connection.send(f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n{fields}Connection: close\r\n\r\n".encode())
        response = connection.read_head() if method == "CONNECT" else connection.read_response(method)
    if response.status == 200:
        return "allowed " + (response.json()["uri"] if method != "CONNECT" else "tunnel")
    deadline = time.monotonic() + 5
    while True:
        lines = [line for line in proxy.output().splitlines()[before:] if f" {method} " in line]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(lines) == 1, proxy.output()[-2000:]
    # "<time> [<logger>] <status> <method> <target> [from <client>]: <reason> (refused by <rule>)"
    reason = lines[0].split("] ", 1)[1].split(": ", 1)[1]
    return f"{response.status} {reason}"


@pytest.fixture
def ruled_proxy(proxy_factory, dns_server):
    """A proxy with a denying rule before the test origins' rule, trusting X-Forwarded-For from loopback."""
    return proxy_factory(
        forward={"client_allow": ["127.0.0.0/8", "::1/128"], "trusted_proxies": ["127.0.0.1/32"]},
        egress={"rules": [
            {"name": "no evil", "action": "deny", "hosts": ["evil.example"]},
            {"name": "test origins", "action": "allow", "networks": ["127.0.0.0/8", "::1/128"]},
        ]},
    )


def test_explainAgreesWithTheProxy(ruled_proxy, origin, tls_origin, tcp_origin, dns_server) -> None:
    dns_server.set("explain-named.test", ["127.0.0.1"])
    dns_server.set("explain-private.test", ["10.255.0.1"])
    http = f"http://127.0.0.1:{origin.port}"
    # What the origin saw, from the proxy; what explain says, from its "to URL via ..." verdict.
    cases = [
        ("GET", f"{http}/echo", {}, "allowed /echo"),
        ("GET", "http://127.0.0.1:25/", {}, "403 port 25 is not allowed (cross-protocol request) (refused by forward.http_ports)"),
        ("GET", f"http://evil.example:{origin.port}/", {}, "403 destination not allowed (refused by egress.rules[0] no evil)"),
        ("GET", f"http://explain-named.test:{origin.port}/echo?a=%20", {}, "allowed /echo?a=%20"),
        ("GET", f"http://explain-private.test:{origin.port}/", {},
         "403 destination not allowed (refused by egress.guard (private (RFC 1918) 10.0.0.0/8))"),
        ("GET", f"http://explain-missing.test:{origin.port}/", {}, "502 cannot resolve host explain-missing.test"),
        ("GET", f"https://127.0.0.1:{tls_origin.port}/echo", {}, "allowed /echo"),
        ("GET", "/echo", {"x-target-host": f"{http}/base"}, "allowed /base/echo"),
        ("GET", "/echo", {}, "403 you have to include x-target-host header"),
        ("GET", f"{http}/", {"X-Forwarded-For": "10.9.9.9"},
         "403 client address not allowed (refused by forward.client_allow (no match))"),
        ("CONNECT", f"127.0.0.1:{tcp_origin.port}", {}, "allowed tunnel"),
        ("CONNECT", "127.0.0.1:8443", {}, "403 CONNECT to port 8443 is not allowed (refused by forward.connect_ports)"),
    ]
    for method, target, headers, expected in cases:
        options = [arg for name, value in headers.items() for arg in ("--header", f"{name}={value}")]
        status, verdict, steps = explainVerdict("--config", str(ruled_proxy.config_path), *options, method, target)
        answered = proxyVerdict(ruled_proxy, method, target, headers)
        assert answered == expected, (method, target, ruled_proxy.output()[-2000:])
        if expected.startswith("allowed "):
            seen = expected.removeprefix("allowed ")
            if seen == "tunnel":
                assert verdict == f"allowed, a tunnel to 127.0.0.1 port {tcp_origin.port}"
            else:
                url = verdict.removeprefix("allowed, to ").partition(" via ")[0]
                assert status == 0 and "/" + url.split("/", 3)[3] == seen, (verdict, steps)
        else:
            assert (status, verdict) == (1, expected), (method, target, steps)
    # A refused name never reached DNS, from either; an allowed name did, from both.
    assert dns_server.queries("evil.example") == []
    assert len(dns_server.queries("explain-named.test")) >= 2


def test_explainSteps(ruled_proxy, origin, tls_origin, dns_server) -> None:
    """What explain says besides its verdict: the rules, whether DNS was asked, TLS profile and pool key."""
    config_ = str(ruled_proxy.config_path)
    dns_server.set("explain-steps.test", ["127.0.0.1"])
    status, verdict, steps = explainVerdict("--config", config_, "GET", f"http://explain-steps.test:{origin.port}/a?b")
    assert status == 0 and verdict == f"allowed, to http://explain-steps.test:{origin.port}/a?b via 127.0.0.1"
    assert steps == [
        "  client:       127.0.0.1: allowed (forward.client_allow 127.0.0.0/8)",
        f"  target:       absolute: http://explain-steps.test:{origin.port}/a?b",
        f"  port:         allowed (forward.http_ports {origin.port})",
        "  auth:         off (forward.auth_file is not set)",
        "  DNS:          asked for explain-steps.test (resolver.hosts_file, then DNS): 127.0.0.1",
        "  egress:       127.0.0.1: allowed (egress.rules[1] test origins)",
        f"  pool key:     scheme=http host=explain-steps.test port={origin.port} addresses=127.0.0.1",
    ]
    _, _, steps = explainVerdict("--config", config_, "GET", f"http://evil.example:{origin.port}/")
    assert steps[-1] == "  DNS:          not asked: the rules refuse this name whatever it resolves to"
    _, verdict, steps = explainVerdict("--config", config_, "GET", f"https://127.0.0.1:{tls_origin.port}/")
    assert "  DNS:          not needed (127.0.0.1 is an IP address)" in steps
    assert "  TLS profile:  upstream.tls: TLSv1.2-TLSv1.3, trust=system" in steps
    assert steps[-1] == f"  pool key:     scheme=https host=127.0.0.1 port={tls_origin.port} addresses=127.0.0.1"
    _, verdict, _ = explainVerdict("--config", config_, "--header", f"x-target-host: http://127.0.0.1:{origin.port}/base/",
                                   "GET", "/v1?x")
    assert verdict == f"allowed, to http://127.0.0.1:{origin.port}/base/v1?x via 127.0.0.1"
    # The client it is asked for, and the X-Forwarded-For hop a trusted proxy vouches for.
    status, verdict, _ = explainVerdict("--config", config_, "--client", "10.1.2.3", "GET", f"http://127.0.0.1:{origin.port}/")
    assert (status, verdict) == (1, "403 client address not allowed (refused by forward.client_allow (no match))")


def test_explainUsersAndProfiles(tmp_path: Path, p12: Path, monkeypatch) -> None:
    """Rules on users (--user is taken as authenticated) and TLS profiles by host, decided without DNS."""
    htpasswd = tmp_path / "users"
    htpasswd.write_text("alice:{SHA}qUqP5cyxm6YcTAhz05Hph5gvu9M=\n")
    path = tmp_path / "mydataproxy.toml"
    path.write_text(f"""
[forward]
auth_file = "{htpasswd}"
[egress]
default = "deny"
[[egress.rules]]
name = "alice to 192.0.2.10"
action = "allow"
users = ["alice"]
networks = ["192.0.2.10/32"]
[[upstream.tls.profiles]]
name = "bank"
hosts = ["192.0.2.10"]
key_store = "{p12}"
key_store_password = "env:EXPLAIN_PASSWORD"
serial_number = "1234567890"
""")
    monkeypatch.setenv("EXPLAIN_PASSWORD", PASSWORD)
    status, verdict, steps = explainVerdict("--config", str(path), "--user", "alice", "GET", "https://192.0.2.10/x")
    assert (status, verdict) == (0, "allowed, to https://192.0.2.10/x via 192.0.2.10")
    assert "  auth:         'alice', assumed (no password is checked here)" in steps
    assert "  egress:       192.0.2.10: allowed (egress.rules[0] alice to 192.0.2.10)" in steps
    profile = next(step for step in steps if step.startswith("  TLS profile:"))
    assert profile.startswith("  TLS profile:  upstream.tls.profiles[0] bank: hosts=192.0.2.10,")
    assert f"client certificate from {p12}" in profile and "serialNumber=1234567890" in profile
    status, verdict, steps = explainVerdict("--config", str(path), "--user", "bob", "GET", "https://192.0.2.10/x")
    # Not named by a rule for bob: the SSRF guard's documentation range.
    assert (status, verdict) == (1, "403 destination not allowed (refused by egress.guard (documentation 192.0.2.0/24))")
    status, verdict, steps = explainVerdict("--config", str(path), "GET", "https://192.0.2.10/x")
    assert (status, verdict) == (1, "407 proxy authentication required (refused by forward.auth_file)")
    assert steps[-1] == "  auth:         refused: no credentials (--user takes the request as authenticated)"


def test_explainReverseAgreesWithTheProxy(reverse_factory, origin) -> None:
    proxy = reverse_factory(
        [
            {"name": "api", "prefix": "/api/", "backends": [origin.url + "/base/"]},
            {"name": "portal", "prefix": "/", "hosts": ["portal.example"], "backends": [origin.url + "/p/"]},
        ],
        reverse={"client_allow": ["127.0.0.0/8"]},
    )
    config_ = str(proxy.config_path)
    cases = [
        ("/api/echo%2Fx?q=%20", None, f"route api to {origin.url}/base/echo%2Fx?q=%20", "/base/echo%2Fx?q=%20"),
        ("/echo", "portal.example", f"route portal to {origin.url}/p/echo", "/p/echo"),
        ("/echo", "other.example", None, "404 no route for /echo on other.example (refused by reverse.routes)"),
        ("/api/../etc", None, None, "400 bad request: dot segment in the path"),
    ]
    for path, host, route, expected in cases:
        options = ["--host", host] if host else []
        status, verdict, _ = explainVerdict("--config", config_, "--reverse", *options, "GET", path)
        with RawConnection(proxy.reverse_port) as connection:
            connection.send(f"GET {path} HTTP/1.1\r\nHost: {host or 'localhost'}\r\nConnection: close\r\n\r\n".encode())
            response = connection.read_response()
        if route is not None:
            assert (status, verdict) == (0, f"allowed, {route}")
            assert (response.status, response.json()["uri"]) == (200, expected)
        else:
            assert (status, verdict) == (1, expected)
            assert f"{response.status} {response.body.decode().strip()}" == expected.partition(" (refused by")[0]
    status, verdict, _ = explainVerdict("--config", config_, "--reverse", "--client", "10.0.0.1", "GET", "/api/x")
    assert (status, verdict) == (1, "403 client address not allowed (refused by reverse.client_allow (no match))")


def test_explainBadArguments(tmp_path: Path) -> None:
    path = tmp_path / "mydataproxy.toml"
    path.write_text("[forward]\n")
    for argv, message in [
        (["--header", "x-target-host", "GET", "/"], "give NAME=VALUE"),
        (["--reverse", "GET", "/"], "has no [reverse] section"),
        (["GET", "http://127.0.0.1/", "--config", str(tmp_path / "absent.toml")], "cannot read"),
    ]:
        result = mydataproxy("explain", "--config", str(path), *argv)
        assert result.returncode == 2 and message in result.stderr, result.stderr


# --- etc/systemd and etc/bin ---------------------------------------------------------

UNIT = ETC / "systemd" / "mydataproxy.service"


def unitEntries(text: str) -> dict[str, list[tuple[str, str]]]:
    """A unit file's (key, value) entries by section, in order (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        key, separator, value = line.partition("=")
        assert separator and current is not None, raw
        current.append((key.strip(), value.strip()))
    return sections


def test_systemdUnit(tmp_path: Path) -> None:
    """The unit's required keys; and systemd's own verdict, where systemd-analyze is installed."""
    text = UNIT.read_text()
    sections = unitEntries(text)
    service = dict(sections["Service"])
    assert service["User"] == "mydataproxy" and service["Restart"] == "on-failure"
    for key, value in [("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"),
                       ("PrivateTmp", "yes"), ("CapabilityBoundingSet", ""), ("AmbientCapabilities", "")]:
        assert service[key] == value, key
    assert service["ReadWritePaths"].lstrip("-").split() == ["/mnt/proxy/log"]
    pidfile = f"/run/{service['RuntimeDirectory']}/twistd.pid"
    reload = service["ExecReload"].split()
    assert Path(reload[0]).name == "mydataproxy" and reload[1:] == ["reload", "--pidfile", pidfile]
    start = service["ExecStart"].split()
    assert Path(start[0]).name == "twistd" and start[1:4] == ["-n", f"--pidfile={pidfile}", "mydataproxy"]
    assert start[4] == "--config" and len(start) == 6
    assert dict(sections["Install"])["WantedBy"] == "multi-user.target"
    # An empty CapabilityBoundingSet= is the last word on capabilities.
    capabilities = [value for key, value in sections["Service"] if key == "CapabilityBoundingSet"]
    assert capabilities == [""]
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return  # Machines without systemd (CI containers): the keys above are the test.
    # verify wants the programs to exist: point them at this checkout's.
    unit = tmp_path / "mydataproxy.service"
    unit.write_text(text.replace(start[0], str(TWISTD)).replace(reload[0], str(BIN / "mydataproxy")))
    result = subprocess.run([analyze, "verify", str(unit)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr


def script(name: str, env: dict[str, str], *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(ETC / "bin" / name), *argv], env=env, capture_output=True, text=True,
                          timeout=60)


@pytest.fixture
def wrapper_env(tmp_path: Path, dns_server):
    """The etc/bin wrappers' environment: a proxy config, pidfile and console in tmp_path."""
    port = get_free_port()
    configPath = tmp_path / "mydataproxy.toml"
    configPath.write_text(to_toml(default_config(port, tmp_path / "access.log", [443], dns_server)))
    env = dict(os.environ, MYDATAPROXY_CONFIG=str(configPath), MYDATAPROXY_PIDFILE=str(tmp_path / "run" / "p.pid"),
               MYDATAPROXY_CONSOLE=str(tmp_path / "run" / "console.log"), MYDATAPROXY_HOME=str(ROOT))
    started: list[int] = []
    yield env, port, started
    for pid in started:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_wrappersStartStatusStop(wrapper_env) -> None:
    env, port, started = wrapper_env
    result = script("start.sh", env)
    assert result.returncode == 0, result.stdout + result.stderr
    pid = int(result.stdout.split("(pid ")[1].split(")")[0])
    started.append(pid)
    assert wait_for_port(port, 5.0)
    assert Path(env["MYDATAPROXY_PIDFILE"]).read_text().strip() == str(pid)
    again = script("start.sh", env)
    assert (again.returncode, again.stdout) == (1, f"MyData Proxy is already running (pid {pid})\n")
    status = script("sp.sh", env)
    assert status.returncode == 0
    assert status.stdout.startswith(f"MyData Proxy is running (pid {pid}, RSS ")
    assert "has no [admin] section" in status.stdout
    # The reload command finds it through the same pidfile.
    assert mydataproxy("reload", "--pidfile", env["MYDATAPROXY_PIDFILE"]).returncode == 0
    stop = script("kill.sh", env)
    assert (stop.returncode, stop.stdout) == (0, f"MyData Proxy (pid {pid}) stopped\n")
    assert not Path(f"/proc/{pid}/cmdline").exists() or Path(f"/proc/{pid}/cmdline").read_bytes() == b""
    console = Path(env["MYDATAPROXY_CONSOLE"]).read_text()
    assert "reload: generation 2 in force" in console and "SIGTERM: stopping" in console
    assert script("sp.sh", env).returncode == 3
    assert script("kill.sh", env).stdout.startswith("MyData Proxy is not running")


def test_wrapperStartRefusesABadConfig(wrapper_env) -> None:
    env, _, _ = wrapper_env
    Path(env["MYDATAPROXY_CONFIG"]).write_text("[forward]\nlisten = 9000\n")
    result = script("start.sh", env)
    assert result.returncode == 2
    assert "forward.listen" in result.stderr
    assert not Path(env["MYDATAPROXY_PIDFILE"]).exists()


def test_wrapperKillEscalates(wrapper_env) -> None:
    """A proxy that does not stop within MYDATAPROXY_STOP_TIMEOUT is killed."""
    env, _, started = wrapper_env
    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)",
         "mydataproxy"])
    started.append(stubborn.pid)
    pidfile = Path(env["MYDATAPROXY_PIDFILE"])
    pidfile.parent.mkdir()
    pidfile.write_text(f"{stubborn.pid}\n")
    time.sleep(0.2)
    result = script("kill.sh", dict(env, MYDATAPROXY_STOP_TIMEOUT="1"))
    assert (result.returncode, result.stdout) == (1, f"MyData Proxy (pid {stubborn.pid}) did not stop within 1 s: killed\n")
    assert stubborn.wait(5) == -signal.SIGKILL
    assert not pidfile.exists()


def test_wrappersLeaveOtherProgramsAlone(wrapper_env) -> None:
    """A pidfile whose number now belongs to another program: not running, never signalled."""
    env, _, started = wrapper_env
    other = subprocess.Popen(["sleep", "30"])
    started.append(other.pid)
    pidfile = Path(env["MYDATAPROXY_PIDFILE"])
    pidfile.parent.mkdir()
    pidfile.write_text(f"{other.pid}\n")
    assert script("sp.sh", env).returncode == 3
    assert script("kill.sh", env).stdout.startswith("MyData Proxy is not running")
    time.sleep(0.2)
    assert other.poll() is None


# --- verify-log ------------------------------------------------------------------


def chainedLog(directory: Path, lines: int, files: int) -> list[Path]:
    """
    A tamper-evident log as the writer leaves it: C{files - 1} rotated files
    (gzipped but the newest, named by time stamp) and the current one, one
    chain through all; oldest first.
    """
    chain = audit.HashChain()
    current = directory / "access.host.log"
    paths = [directory / f"access.host.log.20261201-00000{i}.000000{'.gz' if i < files - 2 else ''}"
             for i in range(files - 1)] + [current]
    for index, path in enumerate(paths):
        text = "".join(chain.apply(f"2026-12-01T00:00:0{index}Z client=127.0.0.1 n={index}.{n}\n")
                       for n in range(lines))
        path.write_bytes(gzip.compress(text.encode()) if path.suffix == ".gz" else text.encode())
    return paths


def test_verifyLogIntact(tmp_path: Path, capsys) -> None:
    paths = chainedLog(tmp_path, 5, 4)
    # The order a shell glob gives (the current file first) is put right.
    glob = sorted(str(p) for p in paths)
    assert glob[0] == str(paths[-1])
    assert cli.main(["verify-log", *glob]) == 0
    assert capsys.readouterr().out == "verify-log: 20 lines in 4 files: the chain is intact\n"


def test_verifyLogTampered(tmp_path: Path, capsys) -> None:
    paths = chainedLog(tmp_path, 5, 4)
    current = paths[-1]
    lines = current.read_text().splitlines(keepends=True)
    # One line removed, one edited.
    current.write_text(lines[0] + lines[2] + lines[3].replace("client=127.0.0.1", "client=10.0.0.1") + lines[4])
    assert cli.main(["verify-log", *map(str, paths)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == [
        f"{current}:2: chain broken: a line before it was removed or reordered, or this one altered",
        f"{current}:3: chain broken: a line before it was removed or reordered, or this one altered",
        "verify-log: 19 lines in 4 files: 2 problems",
    ]


def test_verifyLogMissingFile(tmp_path: Path, capsys) -> None:
    paths = chainedLog(tmp_path, 3, 4)
    paths[1].unlink()
    # Given by a glob, the file is simply not there: the gap shows where the next one starts.
    assert cli.main(["verify-log", *map(str, [p for p in paths if p.exists()])]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{paths[2]}:1: chain broken: a line before it was removed or reordered, or this one altered"
    # Named on the command line, it cannot be read.
    assert cli.main(["verify-log", *map(str, paths)]) == 1
    assert capsys.readouterr().out.splitlines()[0].startswith(f"{paths[1]}: cannot be read")


# --- tls-probe -------------------------------------------------------------------


class TLS12Origin:
    """A loopback TLS server that speaks TLS 1.2 at most (Python's ssl), for version refusals."""

    def __init__(self, tls_files) -> None:
        import ssl

        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.maximum_version = ssl.TLSVersion.TLSv1_2
        self.context.load_cert_chain(tls_files.cert_pem, tls_files.key_pem)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            try:
                with self.context.wrap_socket(connection, server_side=True) as tls:
                    tls.recv(1)
            except OSError:
                pass

    def stop(self) -> None:
        self.listener.close()


@pytest.fixture
def tls12_origin(tls_files):
    server = TLS12Origin(tls_files)
    yield server
    server.stop()


def probe(config_: Path, url: str, ca_pem: Path) -> tuple[int, str, list[str]]:
    """Run C{mydataproxy tls-probe}: (exit status, verdict, the other lines)."""
    result = subprocess.run([str(BIN / "mydataproxy"), "tls-probe", "--config", str(config_), url],
                            env=dict(os.environ, SSL_CERT_FILE=str(ca_pem)), capture_output=True, text=True, timeout=60)
    lines = result.stdout.splitlines()
    assert lines and lines[-1].startswith("verdict: "), result.stdout + result.stderr
    return result.returncode, lines[-1].removeprefix("verdict: "), lines[1:-1]


def test_tlsProbeAgreesWithTheProxy(proxy_factory, proxy, tls_origin, untrusted_tls_origin, wrong_name_tls_origin,
                                    tls12_origin, tls_files, ca_pem) -> None:
    """Each failure kind, in the words of the proxy's own 502 for the same origin."""
    wrong = "AB:" * 31 + "AB"
    checked = proxy_factory(upstream={"tls": {"profiles": [
        {"name": "pinned", "hosts": ["localhost"], "pins": [wrong], "min_version": "TLSv1.3"},
        {"name": "registered", "hosts": ["127.0.0.1"], "serial_number": "1234567890"},
    ]}})
    leaf = x509.load_pem_x509_certificate(tls_files.cert_pem.read_bytes())
    cases = [
        (proxy, f"https://127.0.0.1:{tls_origin.port}", None),
        (checked, f"https://127.0.0.1:{untrusted_tls_origin.port}", "untrusted issuer"),
        (checked, f"https://127.0.0.1:{wrong_name_tls_origin.port}", "hostname mismatch"),
        (checked, f"https://localhost:{tls_origin.port}",
         f"certificate pin mismatch ({fingerprint(leaf)} is not pinned)"),
        (checked, f"https://127.0.0.1:{tls_origin.port}", "subject serialNumber is not 1234567890"),
        (checked, f"https://localhost:{tls12_origin.port}", "TLS version not accepted"),
    ]
    for running, url, problem in cases:
        status, verdict, lines = probe(running.config_path, url, ca_pem)
        with RawConnection(running.port) as connection:
            connection.send(f"GET {url}/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            response = connection.read_response()
        if problem is None:
            assert (status, response.status) == (0, 200), lines
            assert verdict == "OK, the handshake and every check of upstream.tls passed"
            continue
        where = url.removeprefix("https://")
        assert (status, verdict) == (1, f"502 TLS with {where} failed: {problem}"), lines
        assert f"{response.status} {response.body.decode().strip()}" == verdict, url


def test_tlsProbeShowsWhatTheOriginPresents(proxy_factory, untrusted_tls_origin, untrusted_tls_files, tls_origin,
                                            tls_files, ca_pem) -> None:
    leaf = x509.load_pem_x509_certificate(tls_files.cert_pem.read_bytes())
    running = proxy_factory(upstream={"tls": {"profiles": [
        {"name": "pinned", "hosts": ["127.0.0.1"], "pins": [fingerprint(leaf)], "min_version": "TLSv1.3"},
    ]}})
    status, verdict, lines = probe(running.config_path, f"127.0.0.1:{tls_origin.port}", ca_pem)
    assert status == 0, lines
    assert lines[0].startswith("  profile:      upstream.tls.profiles[0] pinned: hosts=127.0.0.1, TLSv1.3-TLSv1.3")
    assert lines[1] == "  address:      127.0.0.1"
    assert lines[2].startswith("  version:      TLSv1.3, TLS_")
    assert "  [0] subject:      CN=localhost" in lines
    assert f"      SHA-256:      {fingerprint(leaf)}" in lines
    assert lines[-1] == "  pins:         matched (1 configured)"
    # An untrusted origin: its chain is shown from a second look, without verifying.
    status, verdict, lines = probe(running.config_path, f"https://127.0.0.1:{untrusted_tls_origin.port}", ca_pem)
    assert (status, verdict) == (1, f"502 TLS with 127.0.0.1:{untrusted_tls_origin.port} failed: untrusted issuer")
    assert any(line.endswith("(seen without verifying)") for line in lines), lines
    assert "      issuer:       CN=Untrusted Test CA" in lines


def test_tlsProbeUnreachable(tmp_path: Path, closed_port: int, ca_pem) -> None:
    path = tmp_path / "mydataproxy.toml"
    path.write_text("")
    status, verdict, _ = probe(path, f"https://127.0.0.1:{closed_port}", ca_pem)
    assert (status, verdict) == (1, f"502 connection refused by 127.0.0.1:{closed_port}")
    result = mydataproxy("tls-probe", "http://127.0.0.1/")
    assert result.returncode == 2 and "speaks to https://" in result.stderr


def test_statusOfARunningProxy(proxy_factory, origin) -> None:
    """End to end: the daemon's own admin listener ([admin] wired in by the service)."""
    port = get_free_port()
    running = proxy_factory(admin={"listen": f"tcp:{port}:interface=127.0.0.1"})
    assert wait_for_port(port, 10.0), running.output()[-2000:]
    for _ in range(3):
        with RawConnection(running.port) as connection:
            connection.send(f"GET {origin.url}/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            assert connection.read_response().status == 200
    result = mydataproxy("status", "--config", str(running.config_path))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("MyData Proxy ") and lines[0].endswith(f"at http://127.0.0.1:{port}: up, ready")
    assert any(line.startswith("  requests:       3 (2xx 3)") for line in lines), result.stdout
