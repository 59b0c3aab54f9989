#!/usr/bin/env python3
"""
MyData Proxy benchmark: the proxy against direct-to-origin, measured in the
same run, reported as ratios (the machine is small and shared, so absolute
numbers swing; ratios of interleaved runs much less).

    .venv/bin/python bench/run.py [--modes forward,reverse] [--reps 3] [--duration 5] [--tunnels 1000]

What it does:
  - makes sure C{wrk}, C{nginx} and C{curl} (and C{apache2} for the reverse
    mode) are installed (Debian packages);
  - makes a throw-away CA and a server certificate for 127.0.0.1;
  - runs its own nginx (temporary prefix, C{daemon off}, one worker) with
    /small (100 bytes) and /big (10 MiB) over plain HTTP and HTTPS;
  - forward mode: runs the proxy (twistd) on a generated config with the
    access log on and measures, interleaving direct and proxied runs in
    every repetition:
      a. small keep-alive requests (wrk -c50): absolute-form and
         header-routed (x-target-host) against direct;
      b. 10 MiB downloads (wrk -c4) absolute-form against direct;
      c. 10 MiB over TLS: curl through a CONNECT tunnel against curl direct;
      d. proxy RSS per idle CONNECT tunnel (1000 tunnels, fresh proxy);
  - reverse mode: runs the proxy with the forward listener off and one
    reverse route / -> nginx, and Apache httpd (event MPM, mod_proxy_http,
    generated minimal config, C{ProxyPass /}) beside it, both with an access
    log, and measures small keep-alive requests (wrk -c50) and 10 MiB
    downloads (wrk -c4) direct, through ours and through Apache, with the
    CPU time each proxy spent (from /proc) and the connections nginx
    accepted (its stub_status), interleaved in every repetition;
  - prints a table and writes bench/results/latest.json.

Everything listens on 127.0.0.1 only and all traffic stays on loopback.
It exits 0 whatever the numbers are (it is a report, not a test); non-zero
only when the harness itself failed.
"""

from __future__ import annotations

import argparse
import datetime
import grp
import http.client
import ipaddress
import json
import os
import platform
import pwd
import re
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
BIN = Path(sys.executable).parent
TWISTD = BIN / "twistd"
HOST = "127.0.0.1"

SMALL_SIZE = 100
BIG_SIZE = 10 * 1024 * 1024
NOFILE = 65536

TARGETS = {
    "small_ratio_absolute": 0.10,
    "small_p99_ms": 25.0,
    "big_ratio": 0.40,
    "tls_connect_ratio": 0.65,
    "rss_kib_per_tunnel": 4.0,
    "reverse_small_ratio": 0.25,
    "reverse_big_ratio": 0.50,
}

MODES = ("forward", "reverse")
TOOLS = {"wrk": ["wrk"], "nginx": ["nginx-light", "nginx"], "curl": ["curl"]}
# apache2-bin holds the server and its modules without the system service apache2 would start.
REVERSE_TOOLS = {"apache2": ["apache2-bin", "apache2"]}
APACHE_MODULES = Path("/usr/lib/apache2/modules")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class HarnessError(Exception):
    """The benchmark itself could not run (not a missed target)."""


def say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


# ---------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------


def ensure_tools(wanted: dict[str, list[str]]) -> dict[str, str]:
    """Install the C{wanted} tools (name -> Debian packages to try) if they are missing."""
    missing = [tool for tool in wanted if not _which(tool)]
    if missing:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for updated in (False, True):
            if updated:
                say("apt-get install failed; running apt-get update and retrying")
                subprocess.run(["apt-get", "update", "-qq"], env=env, check=False)
            for tool in list(missing):
                for package in wanted[tool]:
                    say(f"installing {package} (for {tool})")
                    r = subprocess.run(["apt-get", "install", "-y", "-qq", package], env=env, check=False)
                    if r.returncode == 0 and _which(tool):
                        missing.remove(tool)
                        break
            if not missing:
                break
    if missing:
        raise HarnessError(f"cannot install required tools: {', '.join(missing)}")
    return {tool: _which(tool) for tool in wanted}


def _which(tool: str) -> str | None:
    # nginx and apache2 live in /usr/sbin, which may not be on a non-root PATH.
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/local/sbin")


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, NOFILE), max(hard, NOFILE)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def clean_env() -> dict[str, str]:
    """The environment without proxy variables, so curl goes where it is told."""
    return {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise HarnessError(f"{what} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise HarnessError(f"{what} did not listen on {HOST}:{port} within {timeout:.0f} s")


def stop_process(proc: subprocess.Popen | None, what: str) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        say(f"{what} (pid {proc.pid}) ignored SIGTERM; killing it")
        proc.kill()
        proc.wait(timeout=5)


# ---------------------------------------------------------------------------
# Certificates
# ---------------------------------------------------------------------------


def make_certs(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    before, after = now - datetime.timedelta(days=1), now + datetime.timedelta(days=7)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mydataproxy bench CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(before)
        .not_valid_after(after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(before)
        .not_valid_after(after)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    ca_path, cert_path, key_path = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    for p in (ca_path, cert_path, key_path):
        p.chmod(0o644)  # nginx reads the key as root; the files die with the temp dir
    return ca_path, cert_path, key_path


# ---------------------------------------------------------------------------
# nginx origin
# ---------------------------------------------------------------------------


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {prefix}/nginx.pid;
error_log {prefix}/nginx-error.log warn;

events {{
    worker_connections 8192;
    multi_accept on;
}}

http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    client_header_timeout 120s;
    default_type application/octet-stream;
    types {{ }}
    client_body_temp_path {prefix}/tmp/client_body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;

    server {{
        listen {host}:{http_port} backlog=4096;
        root {prefix}/www;
        location = /status {{ stub_status; }}
    }}

    server {{
        listen {host}:{https_port} ssl backlog=4096;
        root {prefix}/www;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:bench:1m;
    }}
}}
"""


class Nginx:
    def __init__(self, binary: str, prefix: Path, cert: Path, key: Path) -> None:
        self.binary = binary
        self.prefix = prefix
        self.cert = cert
        self.key = key
        self.http_port = free_port()
        self.https_port = free_port()
        self.status_queries = 0
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        www = self.prefix / "www"
        (self.prefix / "tmp").mkdir(parents=True, exist_ok=True)
        www.mkdir(parents=True, exist_ok=True)
        (www / "small").write_bytes(b"s" * (SMALL_SIZE - 1) + b"\n")
        with open(www / "big", "wb") as f:
            f.write(os.urandom(BIG_SIZE))
        # The worker may run as "nobody": let it read what it serves.
        for p in (self.prefix, www, www / "small", www / "big"):
            p.chmod(0o755 if p.is_dir() else 0o644)
        conf = self.prefix / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                nofile=resource.getrlimit(resource.RLIMIT_NOFILE)[0], prefix=self.prefix, host=HOST, http_port=self.http_port,
                https_port=self.https_port, cert=self.cert, key=self.key,
            )
        )
        self.proc = subprocess.Popen(
            [self.binary, "-p", str(self.prefix), "-c", str(conf), "-e", str(self.prefix / "nginx-error.log")],
            stdin=subprocess.DEVNULL,
            stdout=open(self.prefix / "nginx.out", "wb"),
            stderr=subprocess.STDOUT,
            preexec_fn=_child_limits,
        )
        try:
            wait_port(self.http_port, self.proc, "nginx")
            wait_port(self.https_port, self.proc, "nginx")
        except HarnessError:
            raise HarnessError(f"{self.tail()}\nnginx failed to start") from None

    def tail(self) -> str:
        out = []
        for name in ("nginx.out", "nginx-error.log"):
            p = self.prefix / name
            if p.exists():
                out.append(p.read_text(errors="replace")[-2000:])
        return "\n".join(out)

    def counters(self) -> tuple[int, int]:
        """Connections accepted and requests served so far (stub_status), less these queries."""
        self.status_queries += 1
        conn = http.client.HTTPConnection(HOST, self.http_port, timeout=10)
        try:
            conn.request("GET", "/status")
            text = conn.getresponse().read().decode()
        finally:
            conn.close()
        m = re.search(r"^\s*(\d+) (\d+) (\d+)\s*$", text, re.M)
        if not m:
            raise HarnessError(f"nginx stub_status unreadable: {text!r}")
        return int(m.group(1)) - self.status_queries, int(m.group(3)) - self.status_queries

    def stop(self) -> None:
        # SIGQUIT is nginx's graceful shutdown; SIGTERM its fast one.
        stop_process(self.proc, "nginx")


def _child_limits() -> None:
    raise_nofile()


# ---------------------------------------------------------------------------
# The proxy
# ---------------------------------------------------------------------------


class Proxy:
    def __init__(self, directory: Path, name: str, connect_ports: list[int], upstream_conns=(200, 500)) -> None:
        self.directory = directory
        self.name = name
        self.port = free_port()
        self.config = directory / f"{name}.toml"
        self.access_log = directory / f"{name}-access.log"
        self.output = directory / f"{name}-twistd.log"
        self.connect_ports = connect_ports
        self.upstream_conns = upstream_conns
        self.proc: subprocess.Popen | None = None

    def config_text(self) -> str:
        """The forward proxy's TOML config."""
        per_destination, total = self.upstream_conns
        return (
            "[forward]\n"
            f'listen = "tcp:{self.port}:interface={HOST}"\n'
            f"connect_ports = [{', '.join(str(p) for p in [443, *self.connect_ports])}]\n"
            # nginx listens on ephemeral ports, outside the default http_ports.
            f"http_ports = [{', '.join(str(p) for p in [80, 443, *self.connect_ports])}]\n"
            "\n[upstream]\n"
            f"max_connections_per_destination = {per_destination}\n"
            f"max_connections_total = {total}\n"
            # 1,000 idle tunnels come from one client address.
            "\n[limits]\n"
            "max_connections_per_client = 4096\n"
            "\n[logging]\n"
            f"access_log = {json.dumps(str(self.access_log))}\n"
            # The SSRF guard refuses loopback unless a rule names it; the
            # benchmark origins live there.
            "\n[[egress.rules]]\n"
            'name = "benchmark origins"\n'
            'action = "allow"\n'
            'networks = ["127.0.0.0/8"]\n'
        )

    def start(self) -> None:
        self.config.write_text(self.config_text())
        self.proc = subprocess.Popen(
            [str(TWISTD), "-n", "--pidfile=", "mydataproxy", "--config", str(self.config)],
            cwd=str(self.directory),
            stdin=subprocess.DEVNULL,
            stdout=open(self.output, "wb"),
            stderr=subprocess.STDOUT,
            env=clean_env(),
            preexec_fn=_child_limits,
        )
        try:
            wait_port(self.port, self.proc, f"proxy {self.name}")
        except HarnessError as e:
            raise HarnessError(f"{self.output_text()[-3000:]}\n{e}") from None

    def rss_kib(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise HarnessError("no VmRSS in /proc status")

    def open_fds(self) -> int:
        assert self.proc is not None
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def output_text(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""

    def stop(self) -> None:
        stop_process(self.proc, f"proxy {self.name}")

    def problems(self) -> dict:
        """What the proxy said that a clean run should not: tracebacks, errors, warnings, non-2xx."""
        text = self.output_text()
        lines = text.splitlines()
        bad = [l for l in lines if re.search(r"Traceback|Unhandled|\[-\] .*(error|Error|ERROR)|\bwarn|\bcritical|\berror\b", l, re.I)]
        statuses: dict[str, int] = {}
        total = 0
        if self.access_log.exists():
            with open(self.access_log, errors="replace") as f:
                for line in f:
                    total += 1
                    m = re.search(r" status=(\d+) ", line)
                    key = m.group(1) if m else "?"
                    statuses[key] = statuses.get(key, 0) + 1
        # twistd writes a traceback as a head line and tab-indented lines after it.
        tracebacks: dict[str, str] = {}
        i = 0
        while i < len(lines):
            if lines[i].startswith("\tTraceback"):
                block = [lines[i - 1]] if i else []
                while i < len(lines) and lines[i].startswith("\t"):
                    block.append(lines[i])
                    i += 1
                body = "\n".join(block[1:])
                tracebacks.setdefault(re.sub(r"0x[0-9a-f]+|\d+", "N", body), "\n".join(block))
            else:
                i += 1
        exceptions: dict[str, int] = {}
        for l in lines:
            m = re.match(r"\s*((?:builtins|[\w.]+)\.\w*(?:Error|Exception)\w*):? ?(.*)", l)
            if m:
                key = f"{m.group(1)}: {m.group(2)[:120]}"
                exceptions[key] = exceptions.get(key, 0) + 1
        return {
            "exceptions": exceptions,
            "tracebacks": list(tracebacks.values())[:5],
            "log_lines": len(lines),
            "suspicious_log_lines": len(bad),
            "suspicious_samples": _dedupe(bad)[:15],
            "access_log_lines": total,
            "access_log_statuses": statuses,
            "exit_code": self.proc.returncode if self.proc else None,
        }


class ReverseProxy(Proxy):
    """The proxy with the forward listener off and one reverse route C{/} -> C{backend}."""

    def __init__(self, directory: Path, name: str, backend: str) -> None:
        super().__init__(directory, name, [])
        self.backend = backend

    def config_text(self) -> str:
        per_destination, total = self.upstream_conns
        return (
            "[forward]\n"
            "enabled = false\n"
            "\n[reverse]\n"
            f'listen = "tcp:{self.port}:interface={HOST}"\n'
            "\n[[reverse.routes]]\n"
            'name = "bench"\n'
            'prefix = "/"\n'
            f"backends = [{json.dumps(self.backend)}]\n"
            "\n[upstream]\n"
            f"max_connections_per_destination = {per_destination}\n"
            f"max_connections_total = {total}\n"
            "\n[logging]\n"
            f"access_log = {json.dumps(str(self.access_log))}\n"
        )


def _dedupe(lines: list[str]) -> list[str]:
    seen, out = set(), []
    for l in lines:
        key = re.sub(r"^\S+ \S+ ", "", l)  # drop twistd's timestamp
        key = re.sub(r"\d+", "N", key)
        if key not in seen:
            seen.add(key)
            out.append(l)
    return out


# ---------------------------------------------------------------------------
# Apache httpd (mod_proxy), the peer of the reverse mode
# ---------------------------------------------------------------------------


# Debian's apache2.conf and mpm_event.conf values, except the client
# keep-alive: no per-connection request cap (Debian: 100), as nginx and ours.
APACHE_CONF = """\
ServerRoot "{prefix}"
DefaultRuntimeDir "{prefix}"
PidFile "{prefix}/apache.pid"
Mutex file:{prefix} default
ServerName {host}
Listen {host}:{port}
{user}
LoadModule mpm_event_module {modules}/mod_mpm_event.so
LoadModule authn_core_module {modules}/mod_authn_core.so
LoadModule authz_core_module {modules}/mod_authz_core.so
LoadModule proxy_module {modules}/mod_proxy.so
LoadModule proxy_http_module {modules}/mod_proxy_http.so

StartServers 2
MinSpareThreads 25
MaxSpareThreads 75
ThreadLimit 64
ThreadsPerChild 25
MaxRequestWorkers 150
MaxConnectionsPerChild 0

Timeout 300
KeepAlive On
MaxKeepAliveRequests 0
KeepAliveTimeout 120

ErrorLog "{prefix}/error.log"
LogLevel warn
LogFormat "%h %l %u %t \\"%r\\" %>s %O \\"%{{Referer}}i\\" \\"%{{User-Agent}}i\\"" combined
CustomLog "{prefix}/access.log" combined

# mod_proxy_http keeps its backend connections alive and reuses them (the
# default; disablereuse=Off said out loud).
ProxyRequests Off
ProxyPass / http://{host}:{backend_port}/ disablereuse=Off
"""


class Apache:
    """Apache httpd in the foreground, event MPM, ProxyPass / to the origin."""

    def __init__(self, binary: str, prefix: Path, backend_port: int) -> None:
        self.binary = binary
        self.prefix = prefix
        self.backend_port = backend_port
        self.port = free_port()
        self.access_log = prefix / "access.log"
        self.error_log = prefix / "error.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.prefix.mkdir(parents=True, exist_ok=True)
        self.prefix.chmod(0o755)
        if not (APACHE_MODULES / "mod_proxy_http.so").exists():
            raise HarnessError(f"no mod_proxy_http.so in {APACHE_MODULES}")
        conf = self.prefix / "apache.conf"
        conf.write_text(APACHE_CONF.format(
            prefix=self.prefix, host=HOST, port=self.port, user=_apache_user(),
            modules=APACHE_MODULES, backend_port=self.backend_port,
        ))
        self.proc = subprocess.Popen(
            [self.binary, "-d", str(self.prefix), "-f", str(conf), "-DFOREGROUND"],
            stdin=subprocess.DEVNULL,
            stdout=open(self.prefix / "apache.out", "wb"),
            stderr=subprocess.STDOUT,
            env=clean_env(),
            preexec_fn=_child_limits,
        )
        try:
            wait_port(self.port, self.proc, "apache2")
        except HarnessError as e:
            raise HarnessError(f"{self.tail()}\n{e}") from None

    def tail(self) -> str:
        out = []
        for name in ("apache.out", "error.log"):
            p = self.prefix / name
            if p.exists():
                out.append(p.read_text(errors="replace")[-2000:])
        return "\n".join(out)

    def problems(self) -> dict:
        """The access log's statuses and what the error log said."""
        statuses: dict[str, int] = {}
        total = 0
        if self.access_log.exists():
            with open(self.access_log, errors="replace") as f:
                for line in f:
                    total += 1
                    m = re.search(r'" (\d{3}) ', line)
                    key = m.group(1) if m else "?"
                    statuses[key] = statuses.get(key, 0) + 1
        errors = self.error_log.read_text(errors="replace").splitlines() if self.error_log.exists() else []
        return {
            "access_log_lines": total,
            "access_log_statuses": statuses,
            "error_log_lines": len(errors),
            "error_log_samples": _dedupe(errors)[:15],
            "exit_code": self.proc.returncode if self.proc else None,
        }

    def stop(self) -> None:
        stop_process(self.proc, "apache2")


def _apache_user() -> str:
    # Started as root, Apache's children must switch to someone; as anyone
    # else they stay who they are and the directives would only warn.
    if os.geteuid() != 0:
        return ""
    for user, group in (("www-data", "www-data"), ("nobody", "nogroup")):
        try:
            pwd.getpwnam(user)
            grp.getgrnam(group)
        except KeyError:
            continue
        return f"User {user}\nGroup {group}"
    raise HarnessError("no www-data or nobody user for Apache's children")


def cpu_seconds(pid: int) -> float:
    """
    User + system CPU time of C{pid} and its descendants so far, from /proc:
    the live ones' own times plus the times of the children they reaped.
    """
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                text = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue  # gone meanwhile
            fields = text[text.rindex(")") + 2:].split()
            # fields[1] is the parent pid; [11:15] utime, stime, cutime, cstime
            stats[int(entry)] = (int(fields[1]), sum(int(f) for f in fields[11:15]))
    if pid not in stats:
        raise HarnessError(f"process {pid} is gone")
    tree, total, frontier = {pid}, 0, [pid]
    while frontier:
        parent = frontier.pop()
        total += stats[parent][1]
        children = [p for p, (ppid, _) in stats.items() if ppid == parent and p not in tree]
        tree.update(children)
        frontier.extend(children)
    return total / CLOCK_TICKS


# ---------------------------------------------------------------------------
# wrk
# ---------------------------------------------------------------------------


WRK_DONE = """
done = function(summary, latency, requests)
  io.write(string.format(
    'BENCHJSON {"requests": %d, "bytes": %d, "duration_us": %d, ' ..
    '"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d, ' ..
    '"p50_us": %d, "p99_us": %d, "max_us": %d}\\n',
    summary.requests, summary.bytes, summary.duration,
    summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.status, summary.errors.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def wrk_script(directory: Path, name: str, path: str | None) -> Path:
    script = directory / f"{name}.lua"
    head = f'wrk.path = "{path}"\n' if path else ""
    script.write_text(head + WRK_DONE)
    return script


def run_wrk(wrk: str, url: str, script: Path, connections: int, duration: float,
            headers: list[str] = (), timeout: str = "10s") -> dict:
    cmd = [wrk, "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency",
           f"--timeout={timeout}", "-s", str(script)]
    for h in headers:
        cmd += ["-H", h]
    cmd.append(url)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    m = re.search(r"^BENCHJSON (\{.*\})$", r.stdout, re.M)
    if r.returncode != 0 or not m:
        raise HarnessError(f"wrk failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout}\n{r.stderr}")
    data = json.loads(m.group(1))
    seconds = data["duration_us"] / 1e6
    # Only 2xx/3xx answers count: a proxy answering 502 fast is not fast.
    data["rps"] = (data["requests"] - data["status"]) / seconds
    data["rps_all"] = data["requests"] / seconds
    data["mbps"] = data["bytes"] / seconds / 1e6
    data["p99_ms"] = data["p99_us"] / 1000
    data["p50_ms"] = data["p50_us"] / 1000
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", r.stdout)
    data["non2xx"] = int(non2xx.group(1)) if non2xx else 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", r.stdout)
    data["socket_errors"] = sum(int(x) for x in sock.groups()) if sock else 0
    data["raw"] = r.stdout.strip()
    return data


# ---------------------------------------------------------------------------
# curl (TLS downloads)
# ---------------------------------------------------------------------------


def curl_tls(curl: str, url: str, ca: Path, duration: float, proxy_port: int | None,
             per_invocation: int = 10) -> dict:
    """
    Download C{url} repeatedly for about C{duration} seconds (at least one
    batch), C{per_invocation} downloads per curl process over one reused
    connection (and so one tunnel when proxied).  Throughput is the sum of
    bytes over the sum of curl's own transfer times, so process start-up is
    not counted for either side.
    """
    cmd = [curl, "-sS", "--fail", "--cacert", str(ca), "--noproxy", "",
           "-w", "%{http_code} %{size_download} %{time_total}\\n"]
    if proxy_port is not None:
        cmd += ["-p", "-x", f"http://{HOST}:{proxy_port}"]
    for _ in range(per_invocation):
        cmd += [url, "-o", "/dev/null"]
    total_bytes, total_time, downloads, bad, invocations = 0, 0.0, 0, [], 0
    env = clean_env()
    started = time.monotonic()
    while downloads == 0 or time.monotonic() - started < duration:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        invocations += 1
        if r.returncode != 0:
            first = (r.stderr.strip().splitlines() or [""])[0]
            message = f"curl exited {r.returncode}: {first[:300]}"
            if proxy_port is None:
                raise HarnessError(f"direct TLS download failed: {message}")
            return {"error": message, "mbps": float("nan"), "downloads": downloads, "bad": bad,
                    "invocations": invocations}
        for line in r.stdout.split("\n"):
            if not line.strip():
                continue
            code, size, seconds = line.split()
            if code != "200" or int(size) != BIG_SIZE:
                bad.append(line)
            total_bytes += int(size)
            total_time += float(seconds)
            downloads += 1
    return {
        "downloads": downloads,
        "invocations": invocations,
        "bytes": total_bytes,
        "seconds": total_time,
        "mbps": total_bytes / total_time / 1e6 if total_time else 0.0,
        "bad": bad,
        "wall": time.monotonic() - started,
    }


# ---------------------------------------------------------------------------
# Idle tunnels
# ---------------------------------------------------------------------------


def open_tunnels(proxy_port: int, dest_port: int, count: int, batch: int = 100) -> tuple[list[socket.socket], list[str]]:
    """Open C{count} CONNECT tunnels, batch by batch; return the sockets and any failures."""
    request = f"CONNECT {HOST}:{dest_port} HTTP/1.1\r\nHost: {HOST}:{dest_port}\r\n\r\n".encode()
    opened: list[socket.socket] = []
    failures: list[str] = []
    sel = selectors.DefaultSelector()
    try:
        for start in range(0, count, batch):
            pending: dict[socket.socket, bytes] = {}
            for _ in range(min(batch, count - start)):
                s = socket.create_connection((HOST, proxy_port), timeout=10)
                s.sendall(request)
                s.setblocking(False)
                pending[s] = b""
                sel.register(s, selectors.EVENT_READ)
            deadline = time.monotonic() + 15
            while pending and time.monotonic() < deadline:
                for key, _ in sel.select(timeout=1):
                    s = key.fileobj
                    try:
                        chunk = s.recv(4096)
                    except BlockingIOError:
                        continue
                    except OSError as e:
                        chunk = b""
                        failures.append(f"recv: {e}")
                    pending[s] += chunk
                    head = pending[s]
                    if b"\r\n\r\n" in head or not chunk:
                        sel.unregister(s)
                        del pending[s]
                        status = head.split(b"\r\n", 1)[0].decode(errors="replace")
                        if chunk and re.match(r"HTTP/1\.[01] 200", status):
                            opened.append(s)
                        else:
                            failures.append(status or "closed without answer")
                            s.close()
            for s in list(pending):
                failures.append("no answer within 15 s")
                sel.unregister(s)
                s.close()
    finally:
        sel.close()
    return opened, failures


def measure_tunnels(directory: Path, nginx: Nginx, count: int, rep: int) -> dict:
    """RSS growth of a fresh proxy holding C{count} idle tunnels to nginx's plain port."""
    proxy = Proxy(directory, f"proxy-tunnels-{rep}", [nginx.https_port, nginx.http_port])
    proxy.start()
    sockets: list[socket.socket] = []
    try:
        # Warm-up: the first tunnels pay for lazily built code and buffers.
        warm, warm_failures = open_tunnels(proxy.port, nginx.http_port, 20)
        for s in warm:
            s.close()
        time.sleep(1.0)
        before = proxy.rss_kib()
        fds_before = proxy.open_fds()
        sockets, failures = open_tunnels(proxy.port, nginx.http_port, count)
        time.sleep(1.0)
        after = proxy.rss_kib()
        fds_after = proxy.open_fds()
        opened = len(sockets)
        # Are they still alive after the wait?  A closed tunnel reads EOF.
        alive = 0
        for s in sockets:
            try:
                if s.recv(1) != b"":
                    alive += 1  # unexpected bytes, but open
            except BlockingIOError:
                alive += 1
            except OSError:
                pass
        return {
            "rss_before_kib": before,
            "rss_after_kib": after,
            "opened": opened,
            "alive_after_wait": alive,
            "failures": warm_failures + failures,
            "fds_before": fds_before,
            "fds_after": fds_after,
            "kib_per_tunnel": (after - before) / opened if opened else float("nan"),
            "problems": None,
        }
    finally:
        for s in sockets:
            s.close()
        time.sleep(0.5)
        proxy.stop()
        _tunnel_problems[rep] = proxy.problems()


_tunnel_problems: dict[int, dict] = {}


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


def median(values: list[float]) -> float:
    values = [v for v in values if v is not None and v == v]
    return statistics.median(values) if values else float("nan")


def run(args: argparse.Namespace, work: Path) -> dict:
    tools = ensure_tools(dict(TOOLS, **(REVERSE_TOOLS if "reverse" in args.modes else {})))
    raise_nofile()
    say(f"tools: {tools}; RLIMIT_NOFILE={resource.getrlimit(resource.RLIMIT_NOFILE)}")

    ca, cert, key = make_certs(work)
    nginx = Nginx(tools["nginx"], work / "nginx", cert, key)
    result: dict = {}
    try:
        nginx.start()
        say(f"nginx on http {nginx.http_port}, https {nginx.https_port}")
        if "forward" in args.modes:
            result["forward"] = run_forward(args, work, tools, nginx, ca)
        if "reverse" in args.modes:
            result["reverse"] = run_reverse(args, work, tools, nginx)
    finally:
        nginx.stop()
    result["nginx_errors"] = nginx.tail()[-2000:]
    return result


def run_forward(args: argparse.Namespace, work: Path, tools: dict[str, str], nginx: Nginx, ca: Path) -> dict:
    """The forward mode: absolute-form, x-target-host, CONNECT + TLS, idle tunnels."""
    proxy: Proxy | None = None
    try:
        proxy = Proxy(work, "proxy", [nginx.https_port, nginx.http_port])
        proxy.start()
        say(f"proxy on {proxy.port} (pid {proxy.proc.pid}), access log {proxy.access_log}")

        origin = f"http://{HOST}:{nginx.http_port}"
        scripts = {
            "plain": wrk_script(work, "plain", None),
            "abs_small": wrk_script(work, "abs_small", f"{origin}/small"),
            "abs_big": wrk_script(work, "abs_big", f"{origin}/big"),
        }
        proxy_url = f"http://{HOST}:{proxy.port}"
        tls_url = f"https://{HOST}:{nginx.https_port}/big"

        # Sanity: each form answers once before we time anything.
        sanity = sanity_checks(tools["curl"], origin, proxy.port, tls_url, ca)
        for name, verdict in sanity.items():
            say(f"sanity {name}: {verdict}")

        d = args.duration
        runs: dict[str, list[dict]] = {k: [] for k in (
            "small_direct", "small_absolute", "small_header",
            "big_direct", "big_absolute", "tls_direct", "tls_connect")}
        # Short warm-up so the first repetition does not pay for cold caches.
        warm = run_wrk(tools["wrk"], proxy_url + "/small", scripts["abs_small"], 50, 1)
        run_wrk(tools["wrk"], f"{origin}/small", scripts["plain"], 50, 1)

        for rep in range(1, args.reps + 1):
            say(f"repetition {rep}/{args.reps}")
            runs["small_direct"].append(run_wrk(tools["wrk"], f"{origin}/small", scripts["plain"], 50, d))
            runs["small_absolute"].append(run_wrk(tools["wrk"], proxy_url + "/", scripts["abs_small"], 50, d))
            runs["small_header"].append(run_wrk(
                tools["wrk"], proxy_url + "/small", scripts["plain"], 50, d,
                headers=[f"x-target-host: {origin}"]))
            runs["big_direct"].append(run_wrk(tools["wrk"], f"{origin}/big", scripts["plain"], 4, d, timeout="30s"))
            runs["big_absolute"].append(run_wrk(tools["wrk"], proxy_url + "/", scripts["abs_big"], 4, d, timeout="30s"))
            runs["tls_direct"].append(curl_tls(tools["curl"], tls_url, ca, d, None))
            runs["tls_connect"].append(curl_tls(tools["curl"], tls_url, ca, d, proxy.port))
            for name in runs:
                r = runs[name][-1]
                if r.get("error"):
                    extra = f"ERROR {r['error']}"
                elif name.startswith("small"):
                    extra = f"{r['rps']:.0f} req/s p99 {r['p99_ms']:.1f} ms"
                else:
                    extra = f"{r['mbps']:.0f} MB/s"
                flags = {k: r[k] for k in ("non2xx", "socket_errors") if r.get(k)}
                say(f"  {name:15s} {extra}{' ' + str(flags) if flags else ''}")

        main_rss = proxy.rss_kib()
        proxy.stop()
        main_problems = proxy.problems()
        # Every request a client saw completed should have its access line
        # (a CONNECT tunnel is one line, whatever went through it).
        completed = (
            warm["requests"]
            + sum(r["requests"] for k in ("small_absolute", "small_header", "big_absolute") for r in runs[k])
            + sum(r.get("invocations", 0) for r in runs["tls_connect"])
            + len(sanity)
        )
        main_problems["access_accounting"] = access_accounting(completed, main_problems["access_log_lines"])
        proxy = None

        tunnels = []
        for rep in range(1, args.reps + 1):
            say(f"idle tunnels {rep}/{args.reps}: {args.tunnels}")
            t = measure_tunnels(work, nginx, args.tunnels, rep)
            t["problems"] = _tunnel_problems.get(rep)
            say(f"  {t['opened']} opened, RSS {t['rss_before_kib']} -> {t['rss_after_kib']} KiB, "
                f"{t['kib_per_tunnel']:.2f} KiB/tunnel, fds {t['fds_before']} -> {t['fds_after']}, "
                f"{len(t['failures'])} failures")
            tunnels.append(t)
    finally:
        if proxy is not None:
            proxy.stop()

    return summarise(args, runs, tunnels, main_problems, main_rss, sanity)


def access_accounting(completed: int, logged: int) -> dict:
    """Requests the clients saw completed against the access lines written for them."""
    return {
        "completed_by_clients": completed,
        "logged": logged,
        "missing": max(0, completed - logged),
        "extra (requests cut off when wrk stopped, or failures)": max(0, logged - completed),
    }


def run_reverse(args: argparse.Namespace, work: Path, tools: dict[str, str], nginx: Nginx) -> dict:
    """The reverse mode: nginx direct, through our reverse listener, through Apache's mod_proxy."""
    ours = ReverseProxy(work, "reverse", f"http://{HOST}:{nginx.http_port}/")
    apache = Apache(tools["apache2"], work / "apache", nginx.http_port)
    try:
        ours.start()
        say(f"reverse proxy on {ours.port} (pid {ours.proc.pid}), access log {ours.access_log}")
        apache.start()
        say(f"apache2 on {apache.port} (pid {apache.proc.pid}), access log {apache.access_log}")
        # Who is measured: the port wrk talks to, and the process tree whose CPU time counts.
        peers = {
            "direct": (nginx.http_port, nginx.proc.pid),
            "ours": (ours.port, ours.proc.pid),
            "apache": (apache.port, apache.proc.pid),
        }
        sanity = reverse_sanity(tools["curl"], {who: port for who, (port, _) in peers.items()})
        for name, verdict in sanity.items():
            say(f"sanity {name}: {verdict}")

        script = wrk_script(work, "reverse", None)
        warm = {who: run_wrk(tools["wrk"], f"http://{HOST}:{port}/small", script, 50, 1)
                for who, (port, _) in peers.items()}
        runs: dict[str, list[dict]] = {f"{size}_{who}": [] for size in ("small", "big") for who in peers}
        for rep in range(1, args.reps + 1):
            say(f"reverse repetition {rep}/{args.reps}")
            # The two proxies swap places every repetition, so neither always follows direct.
            order = ("direct", "ours", "apache") if rep % 2 else ("direct", "apache", "ours")
            for size, connections, timeout in (("small", 50, "10s"), ("big", 4, "30s")):
                for who in order:
                    port, pid = peers[who]
                    r = measured_wrk(tools["wrk"], f"http://{HOST}:{port}/{size}", script, connections,
                                     args.duration, timeout, pid, nginx)
                    runs[f"{size}_{who}"].append(r)
                    flags = {k: r[k] for k in ("non2xx", "socket_errors") if r.get(k)}
                    say(f"  {size}_{who:7s} {r['rps']:,.0f} req/s, p99 {r['p99_ms']:.1f} ms, "
                        f"{r['per_cpu_s']:,.0f} req/CPU-s ({r['cpu_s']:.2f} CPU-s), "
                        f"nginx accepted {r['backend_accepts']} connections{' ' + str(flags) if flags else ''}")
        ours_rss = ours.rss_kib()
        ours.stop()
        apache.stop()
        ours_problems = ours.problems()
        apache_problems = apache.problems()
        for who, problems in (("ours", ours_problems), ("apache", apache_problems)):
            completed = (warm[who]["requests"] + sum(r["requests"] for k in (f"small_{who}", f"big_{who}") for r in runs[k])
                         + sum(1 for name in sanity if name.startswith(who)))
            problems["access_accounting"] = access_accounting(completed, problems["access_log_lines"])
    finally:
        ours.stop()
        apache.stop()
    return summarise_reverse(runs, sanity, ours_problems, ours_rss, apache_problems, apache)


def measured_wrk(wrk: str, url: str, script: Path, connections: int, duration: float, timeout: str,
                 pid: int, nginx: Nginx) -> dict:
    """C{run_wrk}, with the CPU time C{pid}'s process tree spent and what nginx saw meanwhile."""
    cpu_before = cpu_seconds(pid)
    accepts_before, requests_before = nginx.counters()
    r = run_wrk(wrk, url, script, connections, duration, timeout=timeout)
    r["cpu_s"] = cpu_seconds(pid) - cpu_before
    accepts_after, requests_after = nginx.counters()
    r["backend_accepts"] = accepts_after - accepts_before
    r["backend_requests"] = requests_after - requests_before
    good = r["requests"] - r["status"]
    r["per_cpu_s"] = good / r["cpu_s"] if r["cpu_s"] > 0 else float("nan")
    return r


def reverse_sanity(curl: str, ports: dict[str, int]) -> dict:
    """One /small and one /big request to each peer, checked for status and size."""
    out = {}
    for who, port in ports.items():
        for path, size in (("small", SMALL_SIZE), ("big", BIG_SIZE)):
            cmd = [curl, "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download}", f"http://{HOST}:{port}/{path}"]
            r = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=60)
            got, expected = r.stdout.strip(), f"200 {size}"
            out[f"{who} /{path}"] = ("ok" if r.returncode == 0 and got == expected else
                                     f"FAILED: curl rc={r.returncode}, got {got!r}, expected {expected!r}: {r.stderr.strip()[:200]}")
    return out


def summarise_reverse(runs: dict[str, list[dict]], sanity: dict, ours_problems: dict, ours_rss: int,
                      apache_problems: dict, apache: Apache) -> dict:
    """The reverse table: each measure direct, ours and Apache, with the ratios and the targets."""
    def med(name: str, key: str) -> float:
        return median([r.get(key) for r in runs[name]])

    def ratio(num: str, den: str, key: str) -> float:
        # Median of per-repetition ratios: the runs of a repetition were back to back.
        return median([a[key] / b[key] for a, b in zip(runs[num], runs[den]) if b.get(key)])

    rows = []

    def row(metric: str, size: str, key: str, unit: str, to_direct: bool, target: str, passed) -> None:
        values = {who: med(f"{size}_{who}", key) for who in ("direct", "ours", "apache")}
        ratios = {
            "ours_ratio": ratio(f"{size}_ours", f"{size}_direct", key) if to_direct else None,
            "apache_ratio": ratio(f"{size}_apache", f"{size}_direct", key) if to_direct else None,
            "vs_apache": ratio(f"{size}_ours", f"{size}_apache", key) if unit != "ms" else None,
        }
        measured = passed(ratios) if passed else None
        if passed is None:
            verdict = "-"
        elif measured != measured:
            verdict = "ERROR"
        else:
            verdict = "PASS" if measured else "MISS"
        rows.append({"metric": metric, "unit": unit, **values, **ratios, "target": target, "verdict": verdict,
                     "pass": verdict == "PASS"})

    def at_least(share: float):
        return lambda r: r["ours_ratio"] >= share if r["ours_ratio"] == r["ours_ratio"] else float("nan")

    def ahead(r: dict):
        return r["vs_apache"] > 1 if r["vs_apache"] == r["vs_apache"] else float("nan")

    small, big = TARGETS["reverse_small_ratio"], TARGETS["reverse_big_ratio"]
    row("small keep-alive, wrk -c50 (req/s)", "small", "rps", "req/s", True, f">= {small:.2f} x direct", at_least(small))
    row("small, requests per proxy CPU-second", "small", "per_cpu_s", "req/s", False, "ours > Apache", ahead)
    row("small p99 latency (ms)", "small", "p99_ms", "ms", False, "-", None)
    row("10 MiB, wrk -c4 (req/s)", "big", "rps", "req/s", True, f">= {big:.2f} x direct", at_least(big))
    row("10 MiB (MB/s)", "big", "mbps", "MB/s", True, "-", None)
    row("10 MiB, requests per proxy CPU-second", "big", "per_cpu_s", "req/s", False, "-", None)
    row("10 MiB p99 latency (ms)", "big", "p99_ms", "ms", False, "-", None)

    backend = {
        name: {
            "accepts": med(name, "backend_accepts"),
            "requests_per_connection": median([r["backend_requests"] / r["backend_accepts"]
                                               for r in rs if r["backend_accepts"]]),
            "cpu_s": med(name, "cpu_s"),
        }
        for name, rs in runs.items()
    }
    return {
        "rows": rows,
        "errors": client_errors(runs),
        "sanity": sanity,
        "per_run": backend,
        "ours_rss_after_load_kib": ours_rss,
        "ours_problems": ours_problems,
        "apache_problems": apache_problems,
        "apache_errors": apache.tail()[-2000:],
        "runs": {k: [_strip(r) for r in v] for k, v in runs.items()},
        "wrk_output_sample": {k: v[-1].get("raw", "") for k, v in runs.items() if v and "raw" in v[-1]},
    }


def sanity_checks(curl: str, origin: str, proxy_port: int, tls_url: str, ca: Path) -> dict:
    env = clean_env()
    checks = {
        "absolute": [curl, "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download}", "--noproxy", "",
                     "-x", f"http://{HOST}:{proxy_port}", f"{origin}/small"],
        "header": [curl, "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download}", "--noproxy", "",
                   "-H", f"x-target-host: {origin}", f"http://{HOST}:{proxy_port}/small"],
        "connect": [curl, "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download}", "--noproxy", "",
                    "--cacert", str(ca), "-p", "-x", f"http://{HOST}:{proxy_port}", tls_url],
    }
    out = {}
    expected = {"absolute": f"200 {SMALL_SIZE}", "header": f"200 {SMALL_SIZE}", "connect": f"200 {BIG_SIZE}"}
    for name, cmd in checks.items():
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
        got = r.stdout.strip()
        ok = r.returncode == 0 and got == expected[name]
        out[name] = "ok" if ok else f"FAILED: curl rc={r.returncode}, got {got!r}, expected {expected[name]!r}: {r.stderr.strip()[:200]}"
    return out


def summarise(args, runs, tunnels, main_problems, main_rss, sanity) -> dict:
    def med(name: str, key: str) -> float:
        return median([r.get(key) for r in runs[name]])

    def ratio_median(num: str, den: str, key: str) -> float:
        # Median of per-repetition ratios: each pair was measured back to back.
        return median([a[key] / b[key] for a, b in zip(runs[num], runs[den]) if b.get(key)])

    rows = []

    def row(metric, direct, proxied, ratio, target, passed, unit):
        measured = ratio if ratio is not None else proxied
        verdict = "ERROR" if measured != measured else ("PASS" if passed else "MISS")
        rows.append({"metric": metric, "direct": direct, "proxy": proxied, "ratio": ratio,
                     "target": target, "pass": verdict == "PASS", "verdict": verdict, "unit": unit})

    r_abs = ratio_median("small_absolute", "small_direct", "rps")
    row("small keep-alive, absolute-form (req/s)", med("small_direct", "rps"), med("small_absolute", "rps"),
        r_abs, ">= 0.10", r_abs >= TARGETS["small_ratio_absolute"], "req/s")
    p99 = med("small_absolute", "p99_ms")
    row("small p99 latency, absolute-form (ms)", med("small_direct", "p99_ms"), p99, None,
        "<= 25 ms", p99 <= TARGETS["small_p99_ms"], "ms")
    r_hdr = ratio_median("small_header", "small_direct", "rps")
    row("small keep-alive, x-target-host (req/s)", med("small_direct", "rps"), med("small_header", "rps"),
        r_hdr, ">= 0.10", r_hdr >= TARGETS["small_ratio_absolute"], "req/s")
    p99h = med("small_header", "p99_ms")
    row("small p99 latency, x-target-host (ms)", med("small_direct", "p99_ms"), p99h, None,
        "<= 25 ms", p99h <= TARGETS["small_p99_ms"], "ms")
    r_big = ratio_median("big_absolute", "big_direct", "mbps")
    row("10 MiB downloads, wrk -c4 (MB/s)", med("big_direct", "mbps"), med("big_absolute", "mbps"),
        r_big, ">= 0.40", r_big >= TARGETS["big_ratio"], "MB/s")
    r_tls = ratio_median("tls_connect", "tls_direct", "mbps")
    row("10 MiB TLS via CONNECT, curl (MB/s)", med("tls_direct", "mbps"), med("tls_connect", "mbps"),
        r_tls, ">= 0.65", r_tls >= TARGETS["tls_connect_ratio"], "MB/s")
    per_tunnel = median([t["kib_per_tunnel"] for t in tunnels])
    row(f"RSS per idle CONNECT tunnel (KiB, {args.tunnels} tunnels)", None, per_tunnel, None,
        "<= 4 KiB", per_tunnel <= TARGETS["rss_kib_per_tunnel"], "KiB")

    return {
        "rows": rows,
        "errors": client_errors(runs),
        "sanity": sanity,
        "proxy_rss_after_load_kib": main_rss,
        "proxy_problems": main_problems,
        "tunnels": tunnels,
        "runs": {k: [_strip(r) for r in v] for k, v in runs.items()},
        "wrk_output_sample": {k: v[-1].get("raw", "") for k, v in runs.items() if v and "raw" in v[-1]},
    }


def client_errors(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """What the clients saw go wrong, summed over the repetitions of each measurement."""
    errors = {}
    for name, rs in runs.items():
        e = {}
        for r in rs:
            for k in ("non2xx", "socket_errors", "timeout", "connect", "read", "write"):
                if k in r:
                    e[k] = e.get(k, 0) + r[k]
            if r.get("bad"):
                e["bad_downloads"] = e.get("bad_downloads", 0) + len(r["bad"])
            if r.get("error"):
                e["failed_runs"] = e.get("failed_runs", 0) + 1
                e["last_error"] = r["error"]
        errors[name] = e
    return errors


def _strip(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "raw"}


def _git_head() -> str:
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "mydataproxy", "twisted"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except Exception:
        return "?"


def fmt(value, unit) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value != value:
        return "nan"
    if unit == "req/s":
        return f"{value:,.0f}"
    if unit == "MB/s":
        return f"{value:,.1f}"
    return f"{value:.2f}"


def print_table(table: list[tuple]) -> None:
    """Rows of cells, the first one the head; the first column left-aligned, the others right."""
    widths = [max(len(str(line[i])) for line in table) for i in range(len(table[0]))]
    for i, line in enumerate(table):
        cells = [str(c).ljust(w) if j == 0 else str(c).rjust(w) for j, (c, w) in enumerate(zip(line, widths))]
        print("  ".join(cells))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def print_report(result: dict) -> None:
    print()
    print(f"MyData Proxy benchmark ({result['args']['reps']} reps x {result['args']['duration']} s, "
          f"medians; git {result['git']}; {result['machine']['cpus']} CPUs)")
    if "forward" in result:
        print_forward(result["forward"])
    if "reverse" in result:
        print_reverse(result["reverse"])


def print_forward(result: dict) -> None:
    print()
    print("forward proxy")
    head = ("metric", "direct", "proxy", "ratio", "target", "result")
    print_table([head] + [
        (r["metric"], fmt(r["direct"], r["unit"]), fmt(r["proxy"], r["unit"]),
         "-" if r["ratio"] is None else f"{r['ratio']:.3f}", r["target"], r["verdict"])
        for r in result["rows"]
    ])
    print()
    print("sanity (one request of each form through the proxy):")
    for name, verdict in result["sanity"].items():
        print(f"  {name:15s} {verdict}")
    print_client_errors(result["errors"])
    print_proxy_problems("proxy (load run)", result["proxy_problems"], result["proxy_rss_after_load_kib"])
    for t in result["tunnels"]:
        tp = t["problems"] or {}
        print(f"tunnels: opened {t['opened']}, alive after wait {t['alive_after_wait']}, failures {len(t['failures'])}"
              f"{' ' + str(sorted(set(t['failures']))[:3]) if t['failures'] else ''}; "
              f"access statuses {tp.get('access_log_statuses')}; suspicious log lines {tp.get('suspicious_log_lines')}")
        for exc, n in (tp.get("exceptions") or {}).items():
            print(f"    {n} x {exc}")
    print()


def print_reverse(result: dict) -> None:
    def ratio(value) -> str:
        return "-" if value is None else f"{value:.3f}"

    print()
    print("reverse proxy: direct to nginx, through ours (one process), through Apache mod_proxy (event MPM)")
    head = ("metric", "direct", "ours", "ours/direct", "Apache", "Apache/direct", "ours/Apache", "target", "result")
    print_table([head] + [
        (r["metric"], fmt(r["direct"], r["unit"]), fmt(r["ours"], r["unit"]), ratio(r["ours_ratio"]),
         fmt(r["apache"], r["unit"]), ratio(r["apache_ratio"]), ratio(r["vs_apache"]), r["target"], r["verdict"])
        for r in result["rows"]
    ])
    print("  (per CPU-second: the proxy's process tree, from /proc; for direct, nginx's own)")
    print()
    print("per run (medians): CPU seconds of the measured process tree; connections nginx accepted; requests per connection:")
    for name, b in result["per_run"].items():
        print(f"  {name:12s} {b['cpu_s']:6.2f} CPU-s  {b['accepts']:6.0f} connections  "
              f"{b['requests_per_connection']:10,.0f} requests/connection")
    print("sanity (one request of each size to each):")
    for name, verdict in result["sanity"].items():
        print(f"  {name:15s} {verdict}")
    print_client_errors(result["errors"])
    print_proxy_problems("ours", result["ours_problems"], result["ours_rss_after_load_kib"])
    a = result["apache_problems"]
    acc = a["access_accounting"]
    print(f"Apache: access log {a['access_log_lines']} lines for {acc['completed_by_clients']} requests the clients "
          f"completed (missing {acc['missing']}), statuses {a['access_log_statuses']}; "
          f"{a['error_log_lines']} error log lines")
    for line in a["error_log_samples"][:8]:
        print(f"    {line[:200]}")
    print()


def print_client_errors(errors: dict[str, dict]) -> None:
    print("errors seen by the clients (summed over reps):")
    for name, e in errors.items():
        nonzero = {k: v for k, v in e.items() if v}
        print(f"  {name:15s} {nonzero if nonzero else 'none'}")


def print_proxy_problems(label: str, p: dict, rss_kib: int) -> None:
    a = p["access_accounting"]
    print(f"{label}: access log {p['access_log_lines']} lines for {a['completed_by_clients']} requests/tunnels "
          f"the clients completed (missing {a['missing']}), statuses {p['access_log_statuses']}; "
          f"{p['suspicious_log_lines']} suspicious log lines; RSS after load {rss_kib} KiB")
    for exc, n in p["exceptions"].items():
        print(f"    {n} x {exc}")
    if p["tracebacks"]:
        print("  first traceback (all distinct ones are in the JSON, under tracebacks):")
        for line in p["tracebacks"][0].splitlines()[-14:]:
            print(f"    {line.rstrip()[:200]}")
    for line in [l for l in p["suspicious_samples"] if "Traceback" not in l and "Unhandled Error" not in l][:8]:
        print(f"    {line[:200]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="repetitions per measurement (default 3)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run (default 5)")
    parser.add_argument("--tunnels", type=int, default=1000, help="idle tunnels for the RSS measure (default 1000)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated modes to run, of {', '.join(MODES)} (default all)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, configs)")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.duration <= 0 or args.tunnels < 1:
        parser.error("--reps, --duration and --tunnels must be positive")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(args.modes) - set(MODES))
    if unknown or not args.modes:
        parser.error(f"--modes takes some of {', '.join(MODES)}; got {', '.join(unknown) or 'none'}")

    def terminated(signum, frame):
        raise SystemExit(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminated)
    work = Path(tempfile.mkdtemp(prefix="mydataproxy-bench-"))
    work.chmod(0o755)
    started = time.monotonic()
    try:
        result = run(args, work)
    except HarnessError as e:
        say(f"harness failed: {e}")
        return 2
    except Exception:
        traceback.print_exc()
        say("harness failed")
        return 2
    finally:
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": _git_head(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_at_end": os.getloadavg()},
        "args": {"modes": args.modes, "reps": args.reps, "duration": args.duration, "tunnels": args.tunnels},
        **result,
        "elapsed_seconds": round(time.monotonic() - started, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "latest.json"
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print_report(result)
    say(f"results in {out.relative_to(ROOT)}; {result['elapsed_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
