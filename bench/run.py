#!/usr/bin/env python3
"""
MyData Proxy benchmark: the proxy against direct-to-origin and against a peer
proxy (Squid in the forward mode, Apache httpd in the reverse one), measured
in the same run, reported as ratios (the machine is small and shared, so
absolute numbers swing; ratios of interleaved runs much less).

    .venv/bin/python bench/run.py [--modes forward,workers,reload,reverse] [--reps 3] [--duration 5]
                                  [--tunnels 1000] [--reloads 10]

What it does:
  - makes sure C{wrk}, C{nginx} and C{curl} (C{squid} for the forward mode,
    C{apache2} for the reverse one) are installed (Debian packages);
  - makes a throw-away CA and a server certificate for 127.0.0.1;
  - runs its own nginx (temporary prefix, C{daemon off}, one worker) with
    /small (100 bytes), /medium (64 KiB) and /big (10 MiB) over plain HTTP
    and HTTPS;
  - forward mode: runs the proxy (twistd, one process) and Squid (its own
    process on a generated minimal config: C{workers 1}, no cache, access
    log on, keep-alive to the origin) and measures, interleaving direct,
    ours and Squid in every repetition, with the CPU time of each one's
    process tree (from /proc):
      a. small keep-alive requests (wrk -t2 -c50), absolute-form, and
         header-routed (x-target-host, ours only);
      b. small requests with C{Connection: close};
      c. 64 KiB and 10 MiB responses;
      d. 10 MiB over TLS: curl through a CONNECT tunnel against curl direct;
      e. RSS per idle CONNECT tunnel (fresh processes, ours and Squid);
  - workers mode: the proxy with C{[daemon] workers = 2} against
    C{workers = 1}, small keep-alive requests, req/s and requests per
    CPU-second of the whole process tree;
  - reload mode: load through the proxy (wrk, keep-alive and
    C{Connection: close}) while it gets SIGHUP N times, alternating two
    valid configs; requests completed and failed;
  - reverse mode: the proxy with the forward listener off and one reverse
    route / -> nginx, and Apache httpd (event MPM, mod_proxy_http) beside
    it, small keep-alive requests and 10 MiB downloads, direct, through
    ours and through Apache;
  - prints tables and writes bench/results/latest.json.

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
from typing import Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
BIN = Path(sys.executable).parent
TWISTD = BIN / "twistd"
HOST = "127.0.0.1"

SMALL_SIZE = 100
MEDIUM_SIZE = 64 * 1024
BIG_SIZE = 10 * 1024 * 1024
SIZES = {"small": SMALL_SIZE, "medium": MEDIUM_SIZE, "big": BIG_SIZE}
NOFILE = 65536

TARGETS = {
    # issue 12: at least Squid's, one process each, same run
    "small_per_cpu_vs_squid": 1.0,
    "small_p99_vs_squid": 1.0,
    "close_per_cpu_vs_squid": 1.0,
    "medium_per_cpu_vs_squid": 1.0,
    # issue 12: no regression where we lead
    "big_ratio": 0.38,
    "tls_connect_ratio": 0.73,
    "rss_kib_per_tunnel": 3.2,
    # issue 11: per CPU-second must not drop with workers; reloads fail nothing
    "workers_per_cpu_ratio": 1.0,
    "reverse_small_ratio": 0.25,
    "reverse_big_ratio": 0.50,
}

MODES = ("forward", "workers", "reload", "reverse")
TOOLS = {"wrk": ["wrk"], "nginx": ["nginx-light", "nginx"], "curl": ["curl"]}
# Only the package: if its postinst starts the system squid (on 3128), the bench leaves it alone.
FORWARD_TOOLS = {"squid": ["squid"]}
# apache2-bin holds the server and its modules without the system service apache2 would start.
REVERSE_TOOLS = {"apache2": ["apache2-bin", "apache2"]}
APACHE_MODULES = Path("/usr/lib/apache2/modules")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

#: The name of the egress rule that lets the proxy reach the loopback origins.
RULE = "benchmark-origins"
#: The daemon's reload outcome lines (SIGHUP).
RELOAD_OK = re.compile(r"reload: generation (\d+) in force from (.+)$", re.M)
RELOAD_FAILED = re.compile(r"reload failed, still on generation (\d+): (.+)$", re.M)

WORKERS_METHOD = (
    "wrk -t2 -c50, small keep-alive absolute-form requests, through a proxy with [daemon] workers = 2 "
    "and one with workers = 1, alternately in every repetition; requests per CPU-second count the "
    "user + system time of the whole process tree (supervisor and workers, from /proc). This machine's "
    "{cpus} cores are shared by wrk (2 threads), nginx (1 worker) and the proxy, so req/s cannot show "
    "issue 11's 1.6x (that needs cores of the load generator's own); per CPU-second must not drop."
)


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
    # nginx, squid and apache2 live in /usr/sbin, which may not be on a non-root PATH.
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


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------


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


def _child_limits() -> None:
    raise_nofile()


def process_tree(pid: int) -> dict[int, int]:
    """
    C{pid} and its descendants, each with the clock ticks (user + system) it
    spent so far: its own and those of the children it reaped, so a child
    that ended mid-run still counts, once, in its parent.
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
    tree, frontier = {pid: stats[pid][1]}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, (ppid, _) in stats.items() if ppid == parent and p not in tree]
        tree.update((p, stats[p][1]) for p in children)
        frontier.extend(children)
    return tree


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of C{pid} and its descendants so far (see L{process_tree})."""
    return sum(process_tree(pid).values()) / CLOCK_TICKS


def rss_kib(pid: int) -> int:
    """The resident set of process C{pid} (not its children), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise HarnessError(f"no VmRSS in /proc/{pid}/status")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


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
    """The origin: nginx serving /small, /medium and /big over HTTP and HTTPS."""

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
        (www / "medium").write_bytes(os.urandom(MEDIUM_SIZE))
        with open(www / "big", "wb") as f:
            f.write(os.urandom(BIG_SIZE))
        # The worker may run as "nobody": let it read what it serves.
        for p in (self.prefix, www, *(www / name for name in SIZES)):
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

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

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


# ---------------------------------------------------------------------------
# The proxy
# ---------------------------------------------------------------------------


class Proxy:
    """
    Our proxy, C{twistd -n mydataproxy} on a generated config: the access log
    on (a file), the egress policy and the SSRF guard on (one rule allows the
    loopback origins), C{[daemon] workers} as given.
    """

    def __init__(self, directory: Path, name: str, connect_ports: list[int], workers: int = 1,
                 upstream_conns: tuple[int, int] = (200, 500)) -> None:
        self.directory = directory
        self.name = name
        self.port = free_port()
        self.config = directory / f"{name}.toml"
        self.access_log = directory / f"{name}-access.log"
        self.output = directory / f"{name}-twistd.log"
        self.connect_ports = connect_ports
        self.workers = workers
        self.upstream_conns = upstream_conns
        #: The name of the egress rule that allows the origins (a reload changes it).
        self.rule = RULE
        self.proc: subprocess.Popen | None = None

    def config_text(self) -> str:
        """The forward proxy's TOML config."""
        return (
            "[forward]\n"
            f'listen = "tcp:{self.port}:interface={HOST}"\n'
            f"connect_ports = [{', '.join(str(p) for p in [443, *self.connect_ports])}]\n"
            # nginx listens on ephemeral ports, outside the default http_ports.
            f"http_ports = [{', '.join(str(p) for p in [80, 443, *self.connect_ports])}]\n"
            + self.common_config()
            # The SSRF guard refuses loopback unless a rule names it; the
            # benchmark origins live there.
            + "\n[[egress.rules]]\n"
            f"name = {json.dumps(self.rule)}\n"
            'action = "allow"\n'
            'networks = ["127.0.0.0/8"]\n'
        )

    def common_config(self) -> str:
        """The sections every bench proxy shares: upstream pool, limits, access log, daemon."""
        per_destination, total = self.upstream_conns
        return (
            "\n[upstream]\n"
            f"max_connections_per_destination = {per_destination}\n"
            f"max_connections_total = {total}\n"
            # 1,000 idle tunnels come from one client address.
            "\n[limits]\n"
            "max_connections_per_client = 4096\n"
            "\n[logging]\n"
            f"access_log = {json.dumps(str(self.access_log))}\n"
            "\n[daemon]\n"
            f"workers = {self.workers}\n"
            # Nothing is in flight when the bench stops a proxy: no need to wait 30 s.
            "shutdown_timeout = 2.0\n"
        )

    def write_config(self) -> None:
        """Write the config file in one rename, so a reload never reads half of it."""
        fresh = self.config.with_name(self.config.name + ".new")
        fresh.write_text(self.config_text())
        fresh.replace(self.config)

    def start(self) -> None:
        self.write_config()
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

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def output_text(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""

    def stop(self) -> None:
        stop_process(self.proc, f"proxy {self.name}")

    def problems(self) -> dict:
        """What the proxy said that a clean run should not: tracebacks, errors, warnings, non-2xx."""
        text = self.output_text()
        lines = text.splitlines()
        bad = [l for l in lines if re.search(r"Traceback|Unhandled|\[-\] .*(error|Error|ERROR)|\bwarn|\bcritical|\berror\b", l, re.I)]
        statuses, total = access_statuses(self.access_log, r" status=(\d+) ")
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
        return (
            "[forward]\n"
            "enabled = false\n"
            "\n[reverse]\n"
            f'listen = "tcp:{self.port}:interface={HOST}"\n'
            "\n[[reverse.routes]]\n"
            'name = "bench"\n'
            'prefix = "/"\n'
            f"backends = [{json.dumps(self.backend)}]\n"
            + self.common_config()
        )


def access_statuses(path: Path, pattern: str) -> tuple[dict[str, int], int]:
    """The statuses in the access log at C{path} (C{pattern} captures one), and its line count."""
    statuses: dict[str, int] = {}
    total = 0
    if path.exists():
        with open(path, errors="replace") as f:
            for line in f:
                total += 1
                m = re.search(pattern, line)
                key = m.group(1) if m else "?"
                statuses[key] = statuses.get(key, 0) + 1
    return statuses, total


def _dedupe(lines: list[str]) -> list[str]:
    seen, out = set(), []
    for l in lines:
        key = re.sub(r"^\S+ \S+ ", "", l)  # drop the timestamp
        key = re.sub(r"\d+", "N", key)
        if key not in seen:
            seen.add(key)
            out.append(l)
    return out


# ---------------------------------------------------------------------------
# Peer proxies: Squid (forward), Apache httpd mod_proxy (reverse)
# ---------------------------------------------------------------------------


class PeerServer:
    """
    A peer proxy in the foreground, on a generated minimal config in a
    directory of its own (config, pid, logs), on a loopback port of its own:
    never the system service, never its port.
    """

    #: Its name in messages and file names.
    what = ""
    #: Captures the status in one of its access lines.
    status_pattern = ""
    #: The error log's lines that count as problems (all, if empty).
    error_pattern = ""

    def __init__(self, binary: str, prefix: Path) -> None:
        self.binary = binary
        self.prefix = prefix
        self.port = free_port()
        self.access_log = prefix / "access.log"
        self.error_log = prefix / "error.log"
        self.proc: subprocess.Popen | None = None

    def config_text(self) -> str:
        raise NotImplementedError

    def command(self, conf: Path) -> list[str]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Make the directory, readable (and writable) by whoever the server runs as."""
        self.prefix.mkdir(parents=True, exist_ok=True)
        self.prefix.chmod(0o755)

    def start(self) -> None:
        self.prepare()
        conf = self.prefix / f"{self.what}.conf"
        conf.write_text(self.config_text())
        self.proc = subprocess.Popen(
            self.command(conf),
            stdin=subprocess.DEVNULL,
            stdout=open(self.prefix / f"{self.what}.out", "wb"),
            stderr=subprocess.STDOUT,
            env=clean_env(),
            preexec_fn=_child_limits,
        )
        try:
            wait_port(self.port, self.proc, self.what)
        except HarnessError as e:
            raise HarnessError(f"{self.tail()}\n{e}") from None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def tail(self) -> str:
        out = []
        for p in (self.prefix / f"{self.what}.out", self.error_log):
            if p.exists():
                out.append(p.read_text(errors="replace")[-2000:])
        return "\n".join(out)

    def problems(self) -> dict:
        """The access log's statuses and what the error log said."""
        statuses, total = access_statuses(self.access_log, self.status_pattern)
        errors = self.error_log.read_text(errors="replace").splitlines() if self.error_log.exists() else []
        if self.error_pattern:
            errors = [l for l in errors if re.search(self.error_pattern, l)]
        return {
            "access_log_lines": total,
            "access_log_statuses": statuses,
            "error_log_lines": len(errors),
            "error_log_samples": _dedupe(errors)[:15],
            "exit_code": self.proc.returncode if self.proc else None,
        }

    def stop(self) -> None:
        stop_process(self.proc, self.what)


# The same minimal config as the other peers: access log on (Squid's default
# module, a logfile-daemon helper, counted in Squid's process tree),
# keep-alive both ways, no caching, one process; and, for a clean run, no
# ICMP pinger, no netdb file, DNS (never needed: the targets are addresses)
# only to loopback, a 1 s shutdown instead of 30 s.
SQUID_CONF = """\
workers 1
http_port {host}:{port}
visible_hostname mydataproxy-bench-squid
pid_filename {prefix}/squid.pid
cache_log {prefix}/error.log
access_log daemon:{prefix}/access.log squid
logfile_rotate 0
coredump_dir {prefix}
{user}
max_filedescriptors {nofile}
pinger_enable off
netdb_filename none
dns_nameservers {host}
udp_incoming_address {host}
udp_outgoing_address {host}
cache deny all
client_persistent_connections on
server_persistent_connections on
shutdown_lifetime 1 second
http_access allow localhost
http_access deny all
"""


SQUID_SETUP = ("Squid (Debian's squid, its own squid -N on a generated config): workers 1, cache deny all, "
               "access log on (its logfile-daemon helper counted in its CPU time), keep-alive to clients and "
               "to the origin")


class Squid(PeerServer):
    """Squid (Debian's package) as a forward proxy: C{squid -N}, one process (C{workers 1})."""

    what = "squid"
    status_pattern = r" [A-Z_]+/(\d{3}) "
    error_pattern = r"WARNING|ERROR|FATAL|assertion"

    def config_text(self) -> str:
        user = _service_user(("proxy", "proxy"), ("nobody", "nogroup"))
        return SQUID_CONF.format(
            host=HOST, port=self.port, prefix=self.prefix, nofile=NOFILE,
            user=f"cache_effective_user {user[0]}" if user else "",
        )

    def prepare(self) -> None:
        super().prepare()
        user = _service_user(("proxy", "proxy"), ("nobody", "nogroup"))
        if user:
            # Squid writes its logs and pid file as the user it switched to.
            shutil.chown(self.prefix, *user)

    def command(self, conf: Path) -> list[str]:
        return [self.binary, "-N", "-f", str(conf)]


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


APACHE_SETUP = ("Apache httpd (Debian's apache2-bin, -DFOREGROUND on a generated config): event MPM, "
                "mod_proxy_http ProxyPass /, backend connections reused, combined access log on")


class Apache(PeerServer):
    """Apache httpd in the foreground, event MPM, ProxyPass / to the origin."""

    what = "apache2"
    status_pattern = r'" (\d{3}) '

    def __init__(self, binary: str, prefix: Path, backend_port: int) -> None:
        super().__init__(binary, prefix)
        self.backend_port = backend_port

    def config_text(self) -> str:
        if not (APACHE_MODULES / "mod_proxy_http.so").exists():
            raise HarnessError(f"no mod_proxy_http.so in {APACHE_MODULES}")
        # Started as root, Apache's children must switch to someone; as anyone
        # else they stay who they are and the directives would only warn.
        user = _service_user(("www-data", "www-data"), ("nobody", "nogroup"))
        return APACHE_CONF.format(
            prefix=self.prefix, host=HOST, port=self.port, user=f"User {user[0]}\nGroup {user[1]}" if user else "",
            modules=APACHE_MODULES, backend_port=self.backend_port,
        )

    def command(self, conf: Path) -> list[str]:
        return [self.binary, "-d", str(self.prefix), "-f", str(conf), "-DFOREGROUND"]


def _service_user(*candidates: tuple[str, str]) -> tuple[str, str] | None:
    """The first (user, group) of C{candidates} that exists when we run as root; L{None} otherwise."""
    if os.geteuid() != 0:
        return None
    for user, group in candidates:
        try:
            pwd.getpwnam(user)
            grp.getgrnam(group)
        except KeyError:
            continue
        return user, group
    raise HarnessError(f"none of the users {', '.join(u for u, _ in candidates)} exists")


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


def wrk_script(directory: Path, name: str, path: str | None = None, close: bool = False) -> Path:
    """
    A wrk script that reports as JSON; C{path} (e.g. an absolute URL, for a
    forward proxy) replaces the URL's path, and C{close} adds
    C{Connection: close} to every request.
    """
    script = directory / f"{name}.lua"
    head = f'wrk.path = "{path}"\n' if path else ""
    if close:
        head += 'wrk.headers["Connection"] = "close"\n'
    script.write_text(head + WRK_DONE)
    return script


class Wrk:
    """One wrk run, started in the background; L{result} waits for it and parses its report."""

    def __init__(self, wrk: str, url: str, script: Path, connections: int, duration: float, threads: int = 1,
                 headers: tuple[str, ...] = (), timeout: str = "10s") -> None:
        self.duration = duration
        self.cmd = [wrk, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency",
                    f"--timeout={timeout}", "-s", str(script)]
        for h in headers:
            self.cmd += ["-H", h]
        self.cmd.append(url)
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def running(self) -> bool:
        return self.proc.poll() is None

    def result(self) -> dict:
        try:
            stdout, stderr = self.proc.communicate(timeout=self.duration + 60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise HarnessError(f"wrk did not finish: {' '.join(self.cmd)}") from None
        m = re.search(r"^BENCHJSON (\{.*\})$", stdout, re.M)
        if self.proc.returncode != 0 or not m:
            raise HarnessError(f"wrk failed ({self.proc.returncode}): {' '.join(self.cmd)}\n{stdout}\n{stderr}")
        data = json.loads(m.group(1))
        seconds = data["duration_us"] / 1e6
        # Only 2xx/3xx answers count: a proxy answering 502 fast is not fast.
        data["rps"] = (data["requests"] - data["status"]) / seconds
        data["rps_all"] = data["requests"] / seconds
        data["mbps"] = data["bytes"] / seconds / 1e6
        data["p99_ms"] = data["p99_us"] / 1000
        data["p50_ms"] = data["p50_us"] / 1000
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", stdout)
        data["non2xx"] = int(non2xx.group(1)) if non2xx else 0
        sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", stdout)
        data["socket_errors"] = sum(int(x) for x in sock.groups()) if sock else 0
        data["raw"] = stdout.strip()
        return data


def run_wrk(wrk: str, url: str, script: Path, connections: int, duration: float, threads: int = 1,
            headers: tuple[str, ...] = (), timeout: str = "10s") -> dict:
    """One wrk run, waited for."""
    return Wrk(wrk, url, script, connections, duration, threads, headers, timeout).result()


def measured_wrk(wrk: str, url: str, script: Path, connections: int, duration: float, pid: int, nginx: Nginx,
                 threads: int = 1, headers: tuple[str, ...] = (), timeout: str = "10s") -> dict:
    """
    L{run_wrk}, with the CPU time C{pid}'s process tree spent (in all and
    per process), the requests per CPU-second, and what nginx saw meanwhile.
    """
    before = process_tree(pid)
    accepts_before, requests_before = nginx.counters()
    r = run_wrk(wrk, url, script, connections, duration, threads, headers, timeout)
    after = process_tree(pid)
    accepts_after, requests_after = nginx.counters()
    r["cpu_s"] = (sum(after.values()) - sum(before.values())) / CLOCK_TICKS
    r["cpu_s_by_process"] = {str(p): (ticks - before.get(p, 0)) / CLOCK_TICKS for p, ticks in after.items()}
    r["backend_accepts"] = accepts_after - accepts_before
    r["backend_requests"] = requests_after - requests_before
    good = r["requests"] - r["status"]
    r["per_cpu_s"] = good / r["cpu_s"] if r["cpu_s"] > 0 else float("nan")
    return r


def describe_wrk(name: str, r: dict) -> str:
    """One progress line for a measured wrk run."""
    flags = {k: r[k] for k in ("non2xx", "socket_errors") if r.get(k)}
    return (f"  {name:14s} {r['rps']:9,.0f} req/s {r['mbps']:7,.0f} MB/s  p99 {r['p99_ms']:6.1f} ms  "
            f"{r['per_cpu_s']:8,.0f} req/CPU-s ({r['cpu_s']:.2f} CPU-s)  "
            f"nginx accepted {r['backend_accepts']}{' ' + str(flags) if flags else ''}")


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


def measure_tunnels(server: Proxy | PeerServer, dest_port: int, count: int) -> dict:
    """
    RSS growth of C{server} (started here, fresh, and stopped) holding
    C{count} idle tunnels to C{dest_port}, after a 20-tunnel warm-up (the
    first tunnels pay for lazily built code and buffers).
    """
    server.start()
    sockets: list[socket.socket] = []
    try:
        warm, warm_failures = open_tunnels(server.port, dest_port, 20)
        for s in warm:
            s.close()
        time.sleep(1.0)
        before, fds_before = rss_kib(server.pid), open_fds(server.pid)
        sockets, failures = open_tunnels(server.port, dest_port, count)
        time.sleep(1.0)
        after, fds_after = rss_kib(server.pid), open_fds(server.pid)
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
        result = {
            "rss_before_kib": before,
            "rss_after_kib": after,
            "opened": len(sockets),
            "alive_after_wait": alive,
            "failures": warm_failures + failures,
            "fds_before": fds_before,
            "fds_after": fds_after,
            "kib_per_tunnel": (after - before) / len(sockets) if sockets else float("nan"),
        }
    finally:
        for s in sockets:
            s.close()
        time.sleep(0.5)
        server.stop()
    result["problems"] = server.problems()
    return result


# ---------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------


def median(values: list[float | None]) -> float:
    values = [v for v in values if v is not None and v == v]
    return statistics.median(values) if values else float("nan")


def _missing(value: float | None) -> bool:
    return value is None or value != value


class Comparison:
    """
    The rows of a side-by-side table: direct, ours and a peer proxy, each
    the median over the repetitions, with the medians of the per-repetition
    ratios (the runs of a repetition were back to back).  C{runs} holds the
    runs by C{<measure>_<who>}, C{who} being C{direct}, C{ours} or C{peer}.
    """

    def __init__(self, runs: dict[str, list[dict]], peer: str) -> None:
        self.runs = runs
        self.names = {"direct": "direct", "ours": "ours", "peer": peer}
        self.rows: list[dict] = []

    def _runs(self, measure: str, who: str) -> list[dict]:
        return self.runs.get(f"{measure}_{self.names[who]}", [])

    def value(self, measure: str, who: str, key: str) -> float | None:
        runs = self._runs(measure, who)
        return median([r.get(key) for r in runs]) if runs else None

    def ratio(self, measure: str, num: str, den: str, key: str, den_measure: str | None = None) -> float | None:
        a, b = self._runs(measure, num), self._runs(den_measure or measure, den)
        if not a or not b:
            return None
        return median([x.get(key, float("nan")) / y[key] for x, y in zip(a, b) if y.get(key)])

    def row(self, metric: str, measure: str, key: str, unit: str, to_direct: bool = True, target: str = "-",
            check: tuple[str, str, float] | None = None, direct_measure: str | None = None) -> None:
        """
        A row of C{key} in the runs of C{measure} (the direct column from
        C{direct_measure}'s, if given); C{check} is (column, C{">="} or
        C{"<="}, threshold).
        """
        base = direct_measure or measure
        self.add(
            metric, unit,
            direct=self.value(base, "direct", key), ours=self.value(measure, "ours", key),
            peer=self.value(measure, "peer", key),
            ours_ratio=self.ratio(measure, "ours", "direct", key, base) if to_direct else None,
            peer_ratio=self.ratio(measure, "peer", "direct", key, base) if to_direct else None,
            vs_peer=self.ratio(measure, "ours", "peer", key),
            target=target, check=check,
        )

    def add(self, metric: str, unit: str, direct: float | None, ours: float | None, peer: float | None,
            ours_ratio: float | None, peer_ratio: float | None, vs_peer: float | None, target: str = "-",
            check: tuple[str, str, float] | None = None) -> None:
        row = {"metric": metric, "unit": unit, "direct": direct, "ours": ours, "peer": peer,
               "ours_ratio": ours_ratio, "peer_ratio": peer_ratio, "vs_peer": vs_peer, "target": target}
        row["verdict"] = verdict(row[check[0]], check[1], check[2]) if check else "-"
        row["pass"] = row["verdict"] == "PASS"
        self.rows.append(row)


def verdict(value: float | None, op: str, threshold: float) -> str:
    """PASS or MISS as C{value} is C{op} (C{">="} or C{"<="}) C{threshold}; ERROR when it was not measured."""
    if _missing(value):
        return "ERROR"
    return "PASS" if (value >= threshold if op == ">=" else value <= threshold) else "MISS"


def per_run(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """For each measured wrk run: CPU seconds, connections nginx accepted, requests per connection (medians)."""
    return {
        name: {
            "cpu_s": median([r["cpu_s"] for r in rs]),
            "accepts": median([r["backend_accepts"] for r in rs]),
            "requests_per_connection": median([r["backend_requests"] / r["backend_accepts"]
                                               for r in rs if r["backend_accepts"]]),
        }
        for name, rs in runs.items() if rs and "cpu_s" in rs[0]
    }


def access_accounting(completed: int, logged: int) -> dict:
    """Requests the clients saw completed against the access lines written for them."""
    return {
        "completed_by_clients": completed,
        "logged": logged,
        "missing": max(0, completed - logged),
        "extra (requests cut off when wrk stopped, or failures)": max(0, logged - completed),
    }


def completed_by(who: str, runs: dict[str, list[dict]], extra: int = 0) -> int:
    """
    The requests and tunnels the clients completed through C{who}: wrk's
    completed requests, one tunnel per curl process, plus C{extra}.
    """
    total = extra
    for name, rs in runs.items():
        if name.endswith(f"_{who}"):
            total += sum(r.get("requests", r.get("invocations", 0)) for r in rs)
    return total


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


def curl_checks(curl: str, checks: dict[str, tuple[list[str], str]]) -> dict[str, str]:
    """Run each curl command (C{-w '%{http_code} %{size_download}'} added); C{ok} when it printed what was expected."""
    out = {}
    for name, (args, expected) in checks.items():
        cmd = [curl, "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download}", "--noproxy", "", *args]
        r = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=60)
        got = r.stdout.strip()
        out[name] = ("ok" if r.returncode == 0 and got == expected else
                     f"FAILED: curl rc={r.returncode}, got {got!r}, expected {expected!r}: {r.stderr.strip()[:200]}")
        say(f"sanity {name}: {out[name]}")
    return out


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


def run(args: argparse.Namespace, work: Path) -> dict:
    wanted = dict(TOOLS)
    if "forward" in args.modes:
        wanted.update(FORWARD_TOOLS)
    if "reverse" in args.modes:
        wanted.update(REVERSE_TOOLS)
    tools = ensure_tools(wanted)
    raise_nofile()
    say(f"tools: {tools}; RLIMIT_NOFILE={resource.getrlimit(resource.RLIMIT_NOFILE)}")

    ca, cert, key = make_certs(work)
    nginx = Nginx(tools["nginx"], work / "nginx", cert, key)
    result: dict = {}
    try:
        nginx.start()
        say(f"nginx on http {nginx.http_port}, https {nginx.https_port}")
        for mode in MODES:
            if mode in args.modes:
                result[mode] = RUNNERS[mode](args, work, tools, nginx, ca)
    finally:
        nginx.stop()
    result["nginx_errors"] = nginx.tail()[-2000:]
    return result


#: The forward measures: name -> (nginx path, Connection: close, wrk threads, connections, timeout).
FORWARD_MEASURES = {
    "small": ("small", False, 2, 50, "10s"),
    "close": ("small", True, 2, 50, "10s"),
    "medium": ("medium", False, 2, 50, "10s"),
    "big": ("big", False, 1, 4, "30s"),
}


def run_forward(args: argparse.Namespace, work: Path, tools: dict[str, str], nginx: Nginx, ca: Path) -> dict:
    """The forward mode: direct, ours and Squid, every measure interleaved per repetition; then idle tunnels."""
    ports = [nginx.https_port, nginx.http_port]
    ours = Proxy(work, "proxy", ports)
    squid = Squid(tools["squid"], work / "squid")
    origin = f"http://{HOST}:{nginx.http_port}"
    tls_url = f"https://{HOST}:{nginx.https_port}/big"
    try:
        ours.start()
        say(f"proxy on {ours.port} (pid {ours.pid}), access log {ours.access_log}")
        squid.start()
        say(f"squid on {squid.port} (pid {squid.pid}), access log {squid.access_log}")
        # Who is measured: the port wrk talks to, the process tree whose CPU time counts.
        peers = {"direct": (nginx.http_port, nginx.pid), "ours": (ours.port, ours.pid),
                 "squid": (squid.port, squid.pid)}

        sanity = {}
        for who, port in (("ours", ours.port), ("squid", squid.port)):
            via = ["-x", f"http://{HOST}:{port}"]
            checks = {f"{who} absolute {path}": ([*via, f"{origin}/{path}"], f"200 {size}")
                      for path, size in SIZES.items()}
            checks[f"{who} connect"] = (["--cacert", str(ca), "-p", *via, tls_url], f"200 {BIG_SIZE}")
            if who == "ours":
                checks["ours x-target-host"] = (["-H", f"x-target-host: {origin}", f"http://{HOST}:{port}/small"],
                                                f"200 {SMALL_SIZE}")
            sanity.update(curl_checks(tools["curl"], checks))

        # The URL wrk is given and the script that makes its request, per measure and peer.
        targets: dict[tuple[str, str], tuple[str, Path]] = {}
        for measure, (path, close, _, _, _) in FORWARD_MEASURES.items():
            suffix = "_close" if close else ""
            targets[measure, "direct"] = (f"{origin}/{path}", wrk_script(work, f"direct{suffix}", close=close))
            absolute = wrk_script(work, f"absolute_{path}{suffix}", f"{origin}/{path}", close)
            for who in ("ours", "squid"):
                targets[measure, who] = (f"http://{HOST}:{peers[who][0]}/", absolute)
        plain = targets["small", "direct"][1]

        # Short warm-up so the first repetition does not pay for cold caches.
        warm = {who: run_wrk(tools["wrk"], *targets["small", who], 50, 1, threads=2)["requests"] for who in peers}
        runs: dict[str, list[dict]] = {f"{m}_{who}": [] for m in FORWARD_MEASURES for who in peers}
        runs["header_ours"] = []
        runs.update({f"tls_{who}": [] for who in peers})
        d = args.duration
        for rep in range(1, args.reps + 1):
            say(f"forward repetition {rep}/{args.reps}")
            # The two proxies swap places every repetition, so neither always follows direct.
            order = ("direct", "ours", "squid") if rep % 2 else ("direct", "squid", "ours")
            for measure, (_, _, threads, connections, timeout) in FORWARD_MEASURES.items():
                for who in order:
                    url, script = targets[measure, who]
                    r = measured_wrk(tools["wrk"], url, script, connections, d, peers[who][1], nginx,
                                     threads=threads, timeout=timeout)
                    runs[f"{measure}_{who}"].append(r)
                    say(describe_wrk(f"{measure}_{who}", r))
                if measure == "small":
                    r = measured_wrk(tools["wrk"], f"http://{HOST}:{ours.port}/small", plain, 50, d, ours.pid,
                                     nginx, threads=2, headers=(f"x-target-host: {origin}",))
                    runs["header_ours"].append(r)
                    say(describe_wrk("header_ours", r))
            for who in order:
                r = curl_tls(tools["curl"], tls_url, ca, d, None if who == "direct" else peers[who][0])
                runs[f"tls_{who}"].append(r)
                say(f"  tls_{who:10s} " + (f"ERROR {r['error']}" if r.get("error") else f"{r['mbps']:9,.0f} MB/s"))

        ours_rss = rss_kib(ours.pid)
        ours.stop()
        squid.stop()
        problems = {"ours": ours.problems(), "squid": squid.problems()}
        checked = {who: sum(1 for name in sanity if name.startswith(who)) for who in problems}
        for who, p in problems.items():
            # Every request a client saw completed should have its access
            # line (a CONNECT tunnel is one line, whatever went through it).
            p["access_accounting"] = access_accounting(completed_by(who, runs, warm[who] + checked[who]),
                                                       p["access_log_lines"])
    finally:
        ours.stop()
        squid.stop()

    tunnels: dict[str, list[dict]] = {"ours": [], "squid": []}
    for rep in range(1, args.reps + 1):
        for who in tunnels:
            server = (Proxy(work, f"tunnels-{rep}", ports) if who == "ours"
                      else Squid(tools["squid"], work / f"squid-tunnels-{rep}"))
            t = measure_tunnels(server, nginx.http_port, args.tunnels)
            say(f"idle tunnels {rep}/{args.reps}, {who}: {t['opened']} opened, RSS {t['rss_before_kib']} -> "
                f"{t['rss_after_kib']} KiB, {t['kib_per_tunnel']:.2f} KiB/tunnel, "
                f"fds {t['fds_before']} -> {t['fds_after']}, {len(t['failures'])} failures")
            tunnels[who].append(t)
    return summarise_forward(args, runs, tunnels, problems, ours_rss, sanity)


def summarise_forward(args: argparse.Namespace, runs: dict[str, list[dict]], tunnels: dict[str, list[dict]],
                      problems: dict[str, dict], ours_rss: int, sanity: dict) -> dict:
    """The forward table: each measure direct, ours and Squid, with the ratios and issue 12's targets."""
    t = Comparison(runs, "squid")
    at_least_squid = ">= Squid"
    t.row("small keep-alive, wrk -t2 -c50 (req/s)", "small", "rps", "req/s")
    t.row("  requests per proxy CPU-second", "small", "per_cpu_s", "req/s",
          target=f"{at_least_squid} (aim 1.5x)", check=("vs_peer", ">=", TARGETS["small_per_cpu_vs_squid"]))
    t.row("  p99 latency (ms)", "small", "p99_ms", "ms", target="<= Squid",
          check=("vs_peer", "<=", TARGETS["small_p99_vs_squid"]))
    t.row("x-target-host, wrk -t2 -c50 (req/s; ours only)", "header", "rps", "req/s", direct_measure="small")
    t.row("  requests per proxy CPU-second", "header", "per_cpu_s", "req/s", direct_measure="small")
    t.row("Connection: close, wrk -t2 -c50 (req/s)", "close", "rps", "req/s")
    t.row("  requests per proxy CPU-second", "close", "per_cpu_s", "req/s", target=at_least_squid,
          check=("vs_peer", ">=", TARGETS["close_per_cpu_vs_squid"]))
    t.row("64 KiB, wrk -t2 -c50 (req/s)", "medium", "rps", "req/s")
    t.row("  requests per proxy CPU-second", "medium", "per_cpu_s", "req/s", target=at_least_squid,
          check=("vs_peer", ">=", TARGETS["medium_per_cpu_vs_squid"]))
    big = TARGETS["big_ratio"]
    t.row("10 MiB, wrk -t1 -c4 (MB/s)", "big", "mbps", "MB/s", target=f">= {big:.2f} x direct",
          check=("ours_ratio", ">=", big))
    t.row("  requests per proxy CPU-second", "big", "per_cpu_s", "req/s")
    tls = TARGETS["tls_connect_ratio"]
    t.row("10 MiB TLS via CONNECT, curl (MB/s)", "tls", "mbps", "MB/s", target=f">= {tls:.2f} x direct TLS",
          check=("ours_ratio", ">=", tls))
    per_tunnel = {who: median([x["kib_per_tunnel"] for x in ts]) for who, ts in tunnels.items()}
    ceiling = TARGETS["rss_kib_per_tunnel"]
    t.add(f"RSS per idle CONNECT tunnel (KiB, {args.tunnels})", "KiB", None, per_tunnel["ours"], per_tunnel["squid"],
          None, None, per_tunnel["ours"] / per_tunnel["squid"] if per_tunnel["squid"] else None,
          target=f"<= {ceiling} KiB", check=("ours", "<=", ceiling))
    return {
        "peer_label": "Squid",
        "peer_setup": SQUID_SETUP,
        "rows": t.rows,
        "errors": client_errors(runs),
        "sanity": sanity,
        "per_run": per_run(runs),
        "ours_rss_after_load_kib": ours_rss,
        "ours_problems": problems["ours"],
        "peer_problems": problems["squid"],
        "tunnels": tunnels,
        "runs": {k: [_strip(r) for r in v] for k, v in runs.items()},
        "wrk_output_sample": {k: v[-1].get("raw", "") for k, v in runs.items() if v and "raw" in v[-1]},
    }


def run_workers(args: argparse.Namespace, work: Path, tools: dict[str, str], nginx: Nginx, ca: Path) -> dict:
    """Issue 11's scaling: workers = 2 against workers = 1, alternately, small keep-alive requests."""
    ports = [nginx.https_port, nginx.http_port]
    proxies = {n: Proxy(work, f"workers-{n}", ports, workers=n) for n in (1, 2)}
    method = WORKERS_METHOD.format(cpus=os.cpu_count())
    origin = f"http://{HOST}:{nginx.http_port}"
    script = wrk_script(work, "absolute_small", f"{origin}/small")
    runs: dict[str, list[dict]] = {f"workers_{n}": [] for n in proxies}
    try:
        for n, proxy in proxies.items():
            try:
                proxy.start()
            except HarnessError as e:
                # The product failed, not the harness: report it and go on.
                say(f"workers = {n}: the proxy did not start: {e}")
                return {"method": method, "error": f"workers = {n}: the proxy did not start: {e}"[-4000:]}
            tree = process_tree(proxy.pid)
            say(f"workers = {n}: proxy on {proxy.port}, pid {proxy.pid}, {len(tree)} processes in its tree")
        url = {n: f"http://{HOST}:{proxy.port}/" for n, proxy in proxies.items()}
        warm = {n: run_wrk(tools["wrk"], url[n], script, 50, 1, threads=2)["requests"] for n in proxies}
        for rep in range(1, args.reps + 1):
            say(f"workers repetition {rep}/{args.reps}")
            for n in ((1, 2) if rep % 2 else (2, 1)):
                r = measured_wrk(tools["wrk"], url[n], script, 50, args.duration, proxies[n].pid, nginx, threads=2)
                runs[f"workers_{n}"].append(r)
                say(describe_wrk(f"workers_{n}", r) + "; CPU-s by process: "
                    + ", ".join(f"{s:.2f}" for s in r["cpu_s_by_process"].values()))
        for proxy in proxies.values():
            proxy.stop()
        problems = {}
        for n, proxy in proxies.items():
            p = proxy.problems()
            p["access_accounting"] = access_accounting(completed_by(str(n), runs, warm[n]), p["access_log_lines"])
            problems[str(n)] = p
    finally:
        for proxy in proxies.values():
            proxy.stop()

    def ratio(key: str) -> float:
        return median([two[key] / one[key] for one, two in zip(runs["workers_1"], runs["workers_2"]) if one.get(key)])

    # How evenly the workers shared the load: the busiest one's part of the workers' CPU time (1/2 is even).
    supervisor = str(proxies[2].pid)
    shares = []
    for r in runs["workers_2"]:
        spent = [s for p, s in r["cpu_s_by_process"].items() if p != supervisor]
        shares.append(max(spent) / sum(spent) if len(spent) > 1 and sum(spent) > 0 else float("nan"))
    floor = TARGETS["workers_per_cpu_ratio"]
    rows = []
    for metric, key, unit, check in (
        ("small keep-alive, wrk -t2 -c50 (req/s)", "rps", "req/s", None),
        ("requests per proxy CPU-second", "per_cpu_s", "req/s", (">=", floor)),
        ("p99 latency (ms)", "p99_ms", "ms", None),
        ("CPU seconds of the process tree per run", "cpu_s", "s", None),
    ):
        r = ratio(key)
        rows.append({"metric": metric, "unit": unit, "one": median([x[key] for x in runs["workers_1"]]),
                     "two": median([x[key] for x in runs["workers_2"]]), "ratio": r,
                     "target": f"two/one >= {floor:.2f}" if check else "-",
                     "verdict": verdict(r, *check) if check else "-"})
    return {
        "method": method,
        "rows": rows,
        "processes": {n: len(runs[f"workers_{n}"][0]["cpu_s_by_process"]) for n in proxies},
        "busiest_worker_share": shares,
        "cpu_s_by_process": {f"workers_{n}": [list(r["cpu_s_by_process"].values()) for r in runs[f"workers_{n}"]]
                             for n in proxies},
        "errors": client_errors(runs),
        "problems": problems,
        "runs": {k: [_strip(r) for r in v] for k, v in runs.items()},
    }


def run_reload(args: argparse.Namespace, work: Path, tools: dict[str, str], nginx: Nginx, ca: Path) -> dict:
    """
    Issue 11's reload under load: two wrk (keep-alive, and C{Connection:
    close}) through the proxy while it gets C{--reloads} SIGHUPs, spread over
    the load, alternating two valid configs whose egress rules differ by
    name (so the access lines tell which generation admitted each request);
    each SIGHUP waits for the daemon's outcome line before the next.
    """
    proxy = Proxy(work, "reload", [nginx.https_port, nginx.http_port])
    rules = (f"{RULE}-a", f"{RULE}-b")
    proxy.rule = rules[0]
    origin = f"http://{HOST}:{nginx.http_port}"
    duration = max(2 * args.duration, 4.0)
    loads: dict[str, Wrk] = {}
    reloads = []
    try:
        proxy.start()
        say(f"reload: proxy on {proxy.port} (pid {proxy.pid}); {args.reloads} SIGHUPs over {duration:.0f} s of load")
        url = f"http://{HOST}:{proxy.port}/"
        loads = {
            "keep-alive": Wrk(tools["wrk"], url, wrk_script(work, "reload_keepalive", f"{origin}/small"), 20, duration),
            "close": Wrk(tools["wrk"], url, wrk_script(work, "reload_close", f"{origin}/small", close=True), 10,
                         duration),
        }
        started = time.monotonic()
        interval = duration / (args.reloads + 1)
        for i in range(args.reloads):
            time.sleep(max(0.0, started + interval * (i + 1) - time.monotonic()))
            proxy.rule = rules[(i + 1) % 2]
            proxy.write_config()
            reloads.append(send_reload(proxy, under_load=all(w.running() for w in loads.values())))
            last = reloads[-1]
            say(f"  SIGHUP {i + 1}: {last['outcome']} in {last['seconds']:.2f} s{'' if last['under_load'] else ' (the load had ended)'}")
        results = {name: w.result() for name, w in loads.items()}
        proxy.stop()
    finally:
        for w in loads.values():
            if w.running():
                w.proc.kill()
        proxy.stop()
    problems = proxy.problems()
    problems["access_accounting"] = access_accounting(sum(r["requests"] for r in results.values()),
                                                      problems["access_log_lines"])
    # rule="egress.rules[0] <name>": the rule's place, then its name.
    by_rule, _ = access_statuses(proxy.access_log, r' rule="?(?:\S+ )?([^" ]+)')
    failed = sum(r["non2xx"] + r["socket_errors"] for r in results.values())
    reloaded = sum(1 for r in reloads if r["outcome"].startswith("generation"))
    for name, r in results.items():
        say(f"  load {name}: {r['requests']} requests completed, {r['non2xx']} non-2xx, "
            f"{r['socket_errors']} socket errors ({r['rps']:,.0f} req/s)")
    return {
        "method": f"wrk -t1 -c20 keep-alive and wrk -t1 -c10 Connection: close, small absolute-form requests, "
                  f"{duration:.0f} s, while the proxy got {args.reloads} SIGHUPs (every {interval:.2f} s at the "
                  f"earliest, each after the previous one's outcome line) alternating two valid configs "
                  f"(egress rule {rules[0]} / {rules[1]})",
        "requests_completed": sum(r["requests"] for r in results.values()),
        "failed": failed,
        "reloads": reloads,
        "reloads_in_force": reloaded,
        "reloads_under_load": sum(1 for r in reloads if r["under_load"]),
        "access_lines_by_rule": by_rule,
        "verdict": "PASS" if failed == 0 and reloaded == args.reloads == sum(1 for r in reloads if r["under_load"])
                   else "MISS",
        "loads": {name: _strip(r) for name, r in results.items()},
        "errors": {name: {k: r[k] for k in ("non2xx", "connect", "read", "write", "timeout")} for name, r in
                   results.items()},
        "problems": problems,
    }


def send_reload(proxy: Proxy, under_load: bool, timeout: float = 10.0) -> dict:
    """SIGHUP C{proxy} and wait for its outcome line (in force, or failed) in twistd's output."""
    mark = len(proxy.output_text())
    sent = time.monotonic()
    os.kill(proxy.pid, signal.SIGHUP)
    while time.monotonic() - sent < timeout:
        text = proxy.output_text()[mark:]
        ok, failed = RELOAD_OK.search(text), RELOAD_FAILED.search(text)
        if ok or failed:
            outcome = f"generation {ok.group(1)} in force" if ok else f"FAILED: {failed.group(2)[:300]}"
            return {"outcome": outcome, "seconds": time.monotonic() - sent, "under_load": under_load}
        if proxy.proc.poll() is not None:
            raise HarnessError(f"the proxy exited ({proxy.proc.returncode}) after SIGHUP:\n{text[-3000:]}")
        time.sleep(0.02)
    return {"outcome": f"no outcome line within {timeout:.0f} s", "seconds": timeout, "under_load": under_load}


def run_reverse(args: argparse.Namespace, work: Path, tools: dict[str, str], nginx: Nginx, ca: Path) -> dict:
    """The reverse mode: nginx direct, through our reverse listener, through Apache's mod_proxy."""
    ours = ReverseProxy(work, "reverse", f"http://{HOST}:{nginx.http_port}/")
    apache = Apache(tools["apache2"], work / "apache", nginx.http_port)
    try:
        ours.start()
        say(f"reverse proxy on {ours.port} (pid {ours.pid}), access log {ours.access_log}")
        apache.start()
        say(f"apache2 on {apache.port} (pid {apache.pid}), access log {apache.access_log}")
        peers = {"direct": (nginx.http_port, nginx.pid), "ours": (ours.port, ours.pid),
                 "apache": (apache.port, apache.pid)}
        sanity = curl_checks(tools["curl"], {
            f"{who} /{path}": ([f"http://{HOST}:{port}/{path}"], f"200 {SIZES[path]}")
            for who, (port, _) in peers.items() for path in ("small", "big")
        })

        script = wrk_script(work, "reverse")
        warm = {who: run_wrk(tools["wrk"], f"http://{HOST}:{port}/small", script, 50, 1, threads=2)["requests"]
                for who, (port, _) in peers.items()}
        runs: dict[str, list[dict]] = {f"{size}_{who}": [] for size in ("small", "big") for who in peers}
        for rep in range(1, args.reps + 1):
            say(f"reverse repetition {rep}/{args.reps}")
            order = ("direct", "ours", "apache") if rep % 2 else ("direct", "apache", "ours")
            for size, threads, connections, timeout in (("small", 2, 50, "10s"), ("big", 1, 4, "30s")):
                for who in order:
                    port, pid = peers[who]
                    r = measured_wrk(tools["wrk"], f"http://{HOST}:{port}/{size}", script, connections,
                                     args.duration, pid, nginx, threads=threads, timeout=timeout)
                    runs[f"{size}_{who}"].append(r)
                    say(describe_wrk(f"{size}_{who}", r))
        ours_rss = rss_kib(ours.pid)
        ours.stop()
        apache.stop()
        problems = {"ours": ours.problems(), "apache": apache.problems()}
        for who, p in problems.items():
            checked = sum(1 for name in sanity if name.startswith(who))
            p["access_accounting"] = access_accounting(completed_by(who, runs, warm[who] + checked),
                                                       p["access_log_lines"])
    finally:
        ours.stop()
        apache.stop()

    t = Comparison(runs, "apache")
    small, big = TARGETS["reverse_small_ratio"], TARGETS["reverse_big_ratio"]
    t.row("small keep-alive, wrk -t2 -c50 (req/s)", "small", "rps", "req/s", target=f">= {small:.2f} x direct",
          check=("ours_ratio", ">=", small))
    t.row("  requests per proxy CPU-second", "small", "per_cpu_s", "req/s", to_direct=False, target=">= Apache",
          check=("vs_peer", ">=", 1.0))
    t.row("  p99 latency (ms)", "small", "p99_ms", "ms", to_direct=False)
    t.row("10 MiB, wrk -t1 -c4 (req/s)", "big", "rps", "req/s", target=f">= {big:.2f} x direct",
          check=("ours_ratio", ">=", big))
    t.row("  MB/s", "big", "mbps", "MB/s")
    t.row("  requests per proxy CPU-second", "big", "per_cpu_s", "req/s", to_direct=False)
    t.row("  p99 latency (ms)", "big", "p99_ms", "ms", to_direct=False)
    return {
        "peer_label": "Apache",
        "peer_setup": APACHE_SETUP,
        "rows": t.rows,
        "errors": client_errors(runs),
        "sanity": sanity,
        "per_run": per_run(runs),
        "ours_rss_after_load_kib": ours_rss,
        "ours_problems": problems["ours"],
        "peer_problems": problems["apache"],
        "peer_errors": apache.tail()[-2000:],
        "runs": {k: [_strip(r) for r in v] for k, v in runs.items()},
        "wrk_output_sample": {k: v[-1].get("raw", "") for k, v in runs.items() if v and "raw" in v[-1]},
    }


RUNNERS: dict[str, Callable[[argparse.Namespace, Path, dict[str, str], Nginx, Path], dict]] = {
    "forward": run_forward,
    "workers": run_workers,
    "reload": run_reload,
    "reverse": run_reverse,
}


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


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


def fmt_ratio(value) -> str:
    return "-" if value is None else ("nan" if value != value else f"{value:.3f}")


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
    printers = {"forward": lambda r: print_comparison(
                    "forward proxy: direct to nginx, through ours (one process), through Squid (workers 1)", r),
                "workers": print_workers, "reload": print_reload,
                "reverse": lambda r: print_comparison(
                    "reverse proxy: direct to nginx, through ours (one process), through Apache mod_proxy "
                    "(event MPM)", r)}
    for mode in MODES:
        if mode in result:
            printers[mode](result[mode])


def print_comparison(title: str, result: dict) -> None:
    peer = result["peer_label"]
    print()
    print(title)
    head = ("metric", "direct", "ours", "ours/direct", peer, f"{peer}/direct", f"ours/{peer}", "target", "result")
    print_table([head] + [
        (r["metric"], fmt(r["direct"], r["unit"]), fmt(r["ours"], r["unit"]), fmt_ratio(r["ours_ratio"]),
         fmt(r["peer"], r["unit"]), fmt_ratio(r["peer_ratio"]), fmt_ratio(r["vs_peer"]), r["target"], r["verdict"])
        for r in result["rows"]
    ])
    print("  (per CPU-second: user + system time of each one's process tree, from /proc; for direct, nginx's own)")
    print(f"  {peer}: {result['peer_setup']}")
    print()
    print("per run (medians): CPU seconds of the measured process tree; connections nginx accepted; "
          "requests per connection:")
    for name, b in result["per_run"].items():
        per_connection = b["requests_per_connection"]
        print(f"  {name:14s} {b['cpu_s']:6.2f} CPU-s  {b['accepts']:7.0f} connections  "
              f"{'-' if _missing(per_connection) else f'{per_connection:,.0f}':>10s} requests/connection")
    print("sanity (one request each):")
    for name, v in result["sanity"].items():
        print(f"  {name:24s} {v}")
    print_client_errors(result["errors"])
    print_proxy_problems("ours", result["ours_problems"], result["ours_rss_after_load_kib"])
    print_peer_problems(peer, result["peer_problems"])
    for who, ts in result.get("tunnels", {}).items():
        for t in ts:
            tp = t["problems"]
            print(f"tunnels ({who}): opened {t['opened']}, alive after wait {t['alive_after_wait']}, "
                  f"failures {len(t['failures'])}{' ' + str(sorted(set(t['failures']))[:3]) if t['failures'] else ''}; "
                  f"access statuses {tp.get('access_log_statuses')}")
            for exc, n in (tp.get("exceptions") or {}).items():
                print(f"    {n} x {exc}")
    print()


def print_workers(result: dict) -> None:
    print()
    print("workers (issue 11): [daemon] workers = 2 against workers = 1")
    print(f"  how: {result['method']}")
    if "error" in result:
        print(f"  ERROR: {result['error']}")
        print()
        return
    head = ("metric", "workers = 1", "workers = 2", "two/one", "target", "result")
    print_table([head] + [(r["metric"], fmt(r["one"], r["unit"]), fmt(r["two"], r["unit"]), fmt_ratio(r["ratio"]),
                           r["target"], r["verdict"]) for r in result["rows"]])
    print(f"  processes in each tree: {result['processes']}; CPU-s by process, last run: "
          + "; ".join(f"{name}: " + ", ".join(f"{s:.2f}" for s in per[-1]) for name, per in result["cpu_s_by_process"].items()))
    print("  the busiest worker's share of the workers' CPU time, per run (0.50 is even): "
          + ", ".join(fmt_ratio(s) for s in result["busiest_worker_share"]))
    print_client_errors(result["errors"])
    for n, p in result["problems"].items():
        print_proxy_problems(f"workers = {n}", p, None)
    print()


def print_reload(result: dict) -> None:
    print()
    print("reload under load (issue 11)")
    print(f"  how: {result['method']}")
    seconds = [r["seconds"] for r in result["reloads"]]
    print(f"  requests completed {result['requests_completed']:,}, failed {result['failed']} "
          f"(wrk non-2xx + socket errors; target 0): {result['verdict']}")
    print(f"  reloads in force {result['reloads_in_force']}/{len(result['reloads'])}, under load "
          f"{result['reloads_under_load']}; SIGHUP to outcome line: median {median(seconds):.2f} s, "
          f"max {max(seconds, default=float('nan')):.2f} s")
    for r in result["reloads"]:
        if not r["outcome"].startswith("generation"):
            print(f"    {r['outcome']}")
    print(f"  access lines by egress rule: {result['access_lines_by_rule']}")
    for name, e in result["errors"].items():
        print(f"  {name:10s} {e}")
    print_proxy_problems("proxy", result["problems"], None)
    print()


def print_client_errors(errors: dict[str, dict]) -> None:
    print("errors seen by the clients (summed over reps):")
    for name, e in errors.items():
        nonzero = {k: v for k, v in e.items() if v}
        print(f"  {name:14s} {nonzero if nonzero else 'none'}")


def print_proxy_problems(label: str, p: dict, rss: int | None) -> None:
    a = p["access_accounting"]
    print(f"{label}: access log {p['access_log_lines']} lines for {a['completed_by_clients']} requests/tunnels "
          f"the clients completed (missing {a['missing']}), statuses {p['access_log_statuses']}; "
          f"{p['suspicious_log_lines']} suspicious log lines; exit {p['exit_code']}"
          + (f"; RSS after load {rss} KiB" if rss is not None else ""))
    for exc, n in p["exceptions"].items():
        print(f"    {n} x {exc}")
    if p["tracebacks"]:
        print("  first traceback (all distinct ones are in the JSON, under tracebacks):")
        for line in p["tracebacks"][0].splitlines()[-14:]:
            print(f"    {line.rstrip()[:200]}")
    for line in [l for l in p["suspicious_samples"] if "Traceback" not in l and "Unhandled Error" not in l][:8]:
        print(f"    {line[:200]}")


def print_peer_problems(label: str, p: dict) -> None:
    acc = p["access_accounting"]
    print(f"{label}: access log {p['access_log_lines']} lines for {acc['completed_by_clients']} requests/tunnels "
          f"the clients completed (missing {acc['missing']}), statuses {p['access_log_statuses']}; "
          f"{p['error_log_lines']} warnings or errors logged; exit {p['exit_code']}")
    for line in p["error_log_samples"][:8]:
        print(f"    {line[:200]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="repetitions per measurement (default 3)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run (default 5)")
    parser.add_argument("--tunnels", type=int, default=1000, help="idle tunnels for the RSS measure (default 1000)")
    parser.add_argument("--reloads", type=int, default=10, help="SIGHUPs in the reload mode (default 10)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated modes to run, of {', '.join(MODES)} (default all)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, configs)")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.duration <= 0 or args.tunnels < 1 or args.reloads < 1:
        parser.error("--reps, --duration, --tunnels and --reloads must be positive")
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
        "args": {"modes": args.modes, "reps": args.reps, "duration": args.duration, "tunnels": args.tunnels,
                 "reloads": args.reloads},
        "targets": TARGETS,
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
