"""
Integration harness for the MyData Proxy: real processes, real sockets.

  - L{OriginProcess}: C{tests/origin.py} run as a subprocess (HTTP, HTTPS or
    raw TCP), bound to loopback.
  - L{ProxyProcess}: C{twistd -n --pidfile= mydataproxy --config FILE.toml}
    with a config written to a temporary directory, C{SSL_CERT_FILE} pointing
    at the test CA so that the proxy trusts the test origins.
  - L{RawConnection}: a deliberately small HTTP/1.1 client over a plain
    socket, for what real clients hide (pipelining, raw targets, exact
    headers, interim responses, half-close).

The Twisted reactor is never imported here: the tests talk to the proxy
from outside, over sockets.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ORIGIN_SCRIPT = HERE / "origin.py"
BIN = Path(sys.executable).parent
TWISTD = BIN / "twistd"

CI = os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")

LOOPBACK = "127.0.0.1"


# ---------------------------------------------------------------------------
# External tools
# ---------------------------------------------------------------------------


def require_tool(name: str) -> str:
    """
    Return the path of an external tool; when it is missing, fail under
    C{CI=true} and skip otherwise.
    """
    path = shutil.which(name)
    if path is None:
        message = f"required tool {name!r} is not installed"
        if CI:
            pytest.fail(message + " (CI=true: missing tools are failures)")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def curl() -> str:
    return require_tool("curl")


@pytest.fixture(scope="session")
def ss() -> str:
    return require_tool("ss")


# ---------------------------------------------------------------------------
# Ports
# ---------------------------------------------------------------------------


def get_free_port(host: str = LOOPBACK) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port() -> int:
    return get_free_port()


@pytest.fixture(scope="session")
def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused)."""
    port = get_free_port()
    with pytest.raises(OSError):
        socket.create_connection((LOOPBACK, port), timeout=2).close()
    return port


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None,
                  host: str = LOOPBACK) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


# ---------------------------------------------------------------------------
# Certificates
# ---------------------------------------------------------------------------


@dataclass
class TLSFiles:
    ca_pem: Path
    cert_pem: Path
    key_pem: Path
    extra: dict = field(default_factory=dict)


def _make_ca(common_name: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _make_leaf(ca_key, ca_cert, names=("localhost", "127.0.0.1", "::1")):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([_san(n) for n in names]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _san(name: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _write_tls(directory: Path, ca_name: str, extra_leaves=None) -> TLSFiles:
    """
    A CA and a leaf for localhost/127.0.0.1/::1 in C{directory}; plus, for
    each C{label: names} in C{extra_leaves}, a leaf from the same CA for just
    those names (C{label.cert.pem}, C{label.key.pem}).
    """
    from cryptography.hazmat.primitives import serialization

    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _make_ca(ca_name)

    def write(certPath: Path, keyPath: Path, key, cert) -> None:
        certPath.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        keyPath.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    files = TLSFiles(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    files.ca_pem.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    write(files.cert_pem, files.key_pem, *_make_leaf(ca_key, ca_cert))
    for label, names in (extra_leaves or {}).items():
        leaf = TLSFiles(files.ca_pem, directory / f"{label}.cert.pem", directory / f"{label}.key.pem")
        write(leaf.cert_pem, leaf.key_pem, *_make_leaf(ca_key, ca_cert, names))
        files.extra[label] = leaf
    return files


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory) -> TLSFiles:
    """
    The test CA (trusted by the proxy) and a leaf for 127.0.0.1/::1/localhost;
    C{.extra["wrong-name"]} is a leaf from the same CA for C{wrong.example} only.
    """
    return _write_tls(tmp_path_factory.mktemp("tls"), "MyData Proxy Test CA",
                      {"wrong-name": ["wrong.example"]})


@pytest.fixture(scope="session")
def ca_pem(tls_files) -> Path:
    return tls_files.ca_pem


@pytest.fixture(scope="session")
def untrusted_tls_files(tmp_path_factory) -> TLSFiles:
    """A second CA and leaf that the proxy is not told to trust."""
    return _write_tls(tmp_path_factory.mktemp("untrusted-tls"), "Untrusted Test CA")


# ---------------------------------------------------------------------------
# Origin processes
# ---------------------------------------------------------------------------


class OriginProcess:
    """C{tests/origin.py} as a subprocess."""

    def __init__(self, workdir: Path, mode: str = "http", tls: TLSFiles | None = None,
                 host: str = LOOPBACK):
        self.mode = mode
        self.tls = tls
        self.host = host
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.stderr_path = workdir / "origin.stderr"
        argv = [sys.executable, str(ORIGIN_SCRIPT), "--port", "0", "--mode", mode, "--host", host]
        if tls is not None:
            argv += ["--tls-cert", str(tls.cert_pem), "--tls-key", str(tls.key_pem)]
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._stderr,
                                     stdin=subprocess.DEVNULL)
        line = self._read_port_line(10.0)
        if not line:
            self.stop()
            raise RuntimeError(f"origin did not start: {self.stderr_path.read_text()}")
        self.port = int(line)

    def _read_port_line(self, timeout: float) -> bytes:
        result: list[bytes] = []
        reader = threading.Thread(target=lambda: result.append(self.proc.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(timeout)
        return result[0].strip() if result else b""

    @property
    def authority(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.authority}"

    def stats(self) -> dict:
        """Counters, fetched directly (not through the proxy)."""
        assert self.mode == "http" and self.tls is None
        with RawConnection(self.port, host=self.host) as c:
            c.send(b"GET /stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return json.loads(c.read_response().body)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout:
            self.proc.stdout.close()
        self._stderr.close()


@pytest.fixture(scope="session")
def origin(tmp_path_factory):
    """Plain HTTP origin shared by the whole session."""
    o = OriginProcess(tmp_path_factory.mktemp("origin-http"))
    yield o
    o.stop()


@pytest.fixture(scope="session")
def tls_origin(tmp_path_factory, tls_files):
    """HTTPS origin (certificate from the trusted test CA)."""
    o = OriginProcess(tmp_path_factory.mktemp("origin-https"), tls=tls_files)
    yield o
    o.stop()


@pytest.fixture(scope="session")
def untrusted_tls_origin(tmp_path_factory, untrusted_tls_files):
    """HTTPS origin whose certificate the proxy must not accept."""
    o = OriginProcess(tmp_path_factory.mktemp("origin-untrusted"), tls=untrusted_tls_files)
    yield o
    o.stop()


@pytest.fixture(scope="session")
def wrong_name_tls_origin(tmp_path_factory, tls_files):
    """HTTPS origin with a certificate from the trusted CA, but for another name."""
    o = OriginProcess(tmp_path_factory.mktemp("origin-wrong-name"),
                      tls=tls_files.extra["wrong-name"])
    yield o
    o.stop()


@pytest.fixture(scope="session")
def tcp_origin(tmp_path_factory):
    """Raw TCP origin with half-close support (see origin.py C{--mode tcp})."""
    o = OriginProcess(tmp_path_factory.mktemp("origin-tcp"), mode="tcp")
    yield o
    o.stop()


@pytest.fixture
def fresh_origin(tmp_path):
    """A new plain HTTP origin for one test, so its counters start at zero."""
    o = OriginProcess(tmp_path / "origin")
    yield o
    o.stop()


# ---------------------------------------------------------------------------
# The proxy process
# ---------------------------------------------------------------------------


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def to_toml(config: dict) -> str:
    out = []
    for section, table in config.items():
        out.append(f"[{section}]")
        for key, value in table.items():
            out.append(f"{key} = {_toml_value(value)}")
        out.append("")
    return "\n".join(out)


TCP_STATES = {
    "01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1",
    "05": "FIN_WAIT2", "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT",
    "09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING",
}


def _decode_proc_address(text: str) -> tuple[str, int]:
    address, port = text.split(":")
    raw = bytes.fromhex(address)
    if len(raw) == 4:
        ip = str(ipaddress.IPv4Address(raw[::-1]))
    else:
        words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
        ip6 = ipaddress.IPv6Address(words)
        ip = str(ip6.ipv4_mapped) if ip6.ipv4_mapped else str(ip6)
    return ip, int(port, 16)


@dataclass
class SocketInfo:
    state: str
    local: tuple[str, int]
    remote: tuple[str, int]
    inode: str = ""


def socket_inodes(pid: int) -> set[str]:
    """The inodes of every socket process C{pid} holds (from /proc)."""
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            link = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue
        m = re.fullmatch(r"socket:\[(\d+)\]", link)
        if m:
            inodes.add(m.group(1))
    return inodes


def process_tcp_sockets(pid: int) -> list[SocketInfo]:
    """TCP sockets held by process C{pid} (from /proc, no external tool)."""
    inodes = socket_inodes(pid)
    found = []
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                lines = f.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[9] not in inodes:
                continue
            found.append(
                SocketInfo(
                    TCP_STATES.get(fields[3], fields[3]),
                    _decode_proc_address(fields[1]),
                    _decode_proc_address(fields[2]),
                    fields[9],
                )
            )
    return found


def read_status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


LOGFMT = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def parse_access_line(line: str) -> dict:
    """
    Parse one access log line into its C{key=value} fields (quoted values
    unquoted); the leading timestamp is under C{"_timestamp"}.
    """
    fields = {}
    for key, value in LOGFMT.findall(line):
        if value.startswith('"'):
            value = json.loads(value) if "\\" in value else value[1:-1]
        fields[key] = value
    first = line.split(" ", 1)[0]
    fields["_timestamp"] = first if "=" not in first else ""
    fields["_line"] = line
    return fields


#: The daemon's reload outcome lines (SIGHUP), with the generation number.
RELOAD_OK = re.compile(r"reload: generation (\d+) in force from (.+)$")
RELOAD_FAILED = re.compile(r"reload failed, still on generation (\d+): (.+)$")


def stop_process(proc: subprocess.Popen, timeout: float) -> int | None:
    """SIGTERM C{proc} and wait C{timeout} s; its exit code, or None if it had to be killed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            return None
    return proc.returncode


def listenPort(description: str) -> int:
    """The port of a listener's endpoint description (C{tcp:PORT...}, C{haproxy:tcp:PORT...})."""
    return int(description.removeprefix("haproxy:").split(":")[1])


class ProxyProcess:
    """One running C{twistd -n mydataproxy}."""

    def __init__(self, workdir: Path, config: dict, env_extra: dict | None = None, pidfile: bool = False):
        """
        @param pidfile: Start twistd with C{--pidfile=<workdir>/twistd.pid}
            (C{.pidfile}) instead of none, as C{mydataproxy reload} needs.
        """
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "mydataproxy.toml"
        self.config_path.write_text(to_toml(config))
        self._adopt(config)
        self.pidfile = workdir / "twistd.pid" if pidfile else None
        self.output_path = workdir / "twistd.out"
        env = dict(os.environ)
        for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy",
                     "ALL_PROXY"):
            env.pop(name, None)
        env.update(env_extra or {})
        self._output = open(self.output_path, "wb")
        argv = [str(TWISTD), "-n", f"--pidfile={self.pidfile or ''}", "mydataproxy", "--config", str(self.config_path)]
        self.proc = subprocess.Popen(argv, cwd=workdir, env=env, stdout=self._output,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid
        for port in (self.port, self.reverse_port):
            if port is not None and not wait_for_port(port, 10.0, self.proc):
                self.stop()
                raise RuntimeError(
                    f"proxy did not accept connections on {port} within 10 s "
                    f"(exit code {self.proc.returncode}); output:\n{self.output()}"
                )

    def _adopt(self, config: dict) -> None:
        """Take C{config}'s ports and access log as this proxy's (at start, after a good reload)."""
        self.config = config
        self.access_log = Path(config["logging"]["access_log"])
        forward = config.get("forward", {})
        self.port = listenPort(forward["listen"]) if forward.get("enabled", True) else None
        reverse = config.get("reverse")
        self.reverse_port = listenPort(reverse.get("listen", "tcp:8080")) if reverse else None

    def write_config(self, config: dict | str) -> None:
        """
        Replace the config file with C{config} (a dict written as TOML, or
        raw text), in one rename so the daemon never reads half a file.
        """
        text = config if isinstance(config, str) else to_toml(config)
        fresh = self.config_path.with_name(self.config_path.name + ".new")
        fresh.write_text(text)
        fresh.replace(self.config_path)

    def reload(self, config: dict | str | None = None, timeout: float = 10.0) -> str:
        """
        Write C{config} (if given, as L{write_config}), send SIGHUP and wait
        for the daemon's outcome line in twistd's output (so no
        C{logging.error_log}): C{reload: generation N in force ...} or
        C{reload failed, still on generation N: ...}; return that line.
        On success a dict C{config} becomes C{.config} (and C{.port},
        C{.reverse_port}, C{.access_log} follow it).  Fails the test when no
        outcome is logged within C{timeout} seconds.
        """
        if config is not None:
            self.write_config(config)
        mark = len(self.output())
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.output()[mark:].splitlines():
                if RELOAD_OK.search(line):
                    if isinstance(config, dict):
                        self._adopt(config)
                    return line
                if RELOAD_FAILED.search(line):
                    return line
            if not self.alive() or time.monotonic() > deadline:
                pytest.fail(
                    f"no reload outcome logged within {timeout} s (alive: {self.alive()}); "
                    f"output since SIGHUP:\n{self.output()[mark:][-4000:]}"
                )
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def reverse_url(self) -> str:
        return f"http://{LOOPBACK}:{self.reverse_port}"

    def output(self) -> str:
        try:
            return self.output_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM and wait; returns the exit code, None if it had to be killed."""
        code = stop_process(self.proc, timeout)
        self._output.close()
        return code

    # -- observation ------------------------------------------------------

    def tcp_sockets(self) -> list[SocketInfo]:
        return process_tcp_sockets(self.pid)

    def rss_kib(self) -> int:
        return read_status_kib(self.pid, "VmRSS")

    def hwm_kib(self) -> int:
        return read_status_kib(self.pid, "VmHWM")

    def access_lines(self) -> list[str]:
        try:
            return self.access_log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def wait_access_lines(self, predicate, count: int = 1, timeout: float = 5.0) -> list[dict]:
        """
        Wait until at least C{count} access log lines satisfy C{predicate}
        (a function of the raw line); return them parsed.
        """
        deadline = time.monotonic() + timeout
        while True:
            matching = [parse_access_line(l) for l in self.access_lines() if predicate(l)]
            if len(matching) >= count or time.monotonic() > deadline:
                return matching
            time.sleep(0.05)


class DnsServer:
    """tests/dnsserver.py in a subprocess: the proxy's only DNS server in tests."""

    def __init__(self, workdir: Path) -> None:
        self.table = workdir / "dns.json"
        self.table.write_text("{}")
        self.hosts = workdir / "hosts"
        self.hosts.write_text("127.0.0.1 localhost\n::1 localhost\n")
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "dnsserver.py"), str(self.table)],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.port = int(self.proc.stdout.readline())

    def set(self, name: str, *answers: list[str], ttl: int = 0) -> None:
        """Answer C{name} with the given address sets, one per query, cycling."""
        table = json.loads(self.table.read_text())
        table[name] = {"answers": [list(a) for a in answers], "ttl": ttl}
        self.table.write_text(json.dumps(table))

    def queries(self, name: str) -> list[str]:
        """The query types asked for C{name} so far."""
        log = Path(str(self.table) + ".log")
        lines = log.read_text().splitlines() if log.exists() else []
        return [line.split()[1] for line in lines if line.split()[0] == name]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def dns_server(tmp_path_factory):
    server = DnsServer(tmp_path_factory.mktemp("dns"))
    yield server
    server.stop()


def default_config(port: int, access_log: Path, connect_ports, dns: DnsServer, **overrides) -> dict:
    config = {
        "forward": {
            "listen": f"tcp:{port}:interface={LOOPBACK}",
            "client_allow": [],
            "connect_ports": sorted(set(connect_ports)),
            "header_filter": ["x-target-host", "x-secret-internal"],
            # The test origins listen on ephemeral ports; 25 and 6379 stay out.
            "http_ports": [80, 443, 8080, 8443, "10000-65535"],
            "client_idle_timeout": 60.0,
        },
        "upstream": {
            "connect_timeout": 5.0,
            "read_timeout": 30.0,
            "pool_wait_timeout": 30.0,
            "idle_timeout": 30.0,
            "max_connections_per_destination": 200,
            "max_connections_total": 500,
        },
        "logging": {"access_log": str(access_log), "level": "info"},
        # A test that stops a proxy with work in flight waits this long at most.
        "daemon": {"shutdown_timeout": 2.0},
        # The SSRF guard refuses loopback unless a rule names it: the test
        # origins all live there.
        "egress": {
            "rules": [{"name": "test origins", "action": "allow", "networks": ["127.0.0.0/8", "::1/128"]}]
        },
        "resolver": {
            "servers": [f"127.0.0.1:{dns.port}"],
            "hosts_file": str(dns.hosts),
            "timeout": 2.0,
        },
    }
    for section, values in overrides.items():
        config.setdefault(section, {}).update(values)
    return config


class ProxyLauncher:
    def __init__(self, base: Path, ca_pem: Path, connect_ports, dns: DnsServer):
        self.base = base
        self.dns = dns
        self.ca_pem = ca_pem
        self.connect_ports = list(connect_ports)
        self.started: list[ProxyProcess] = []

    def __call__(self, *, pidfile: bool = False, **overrides) -> ProxyProcess:
        """
        Start a proxy; keyword arguments are config sections whose keys
        override the defaults, e.g. C{upstream={"read_timeout": 1.0}};
        C{pidfile=True} gives it a pidfile (see L{ProxyProcess}).
        """
        n = len(self.started)
        workdir = self.base / f"proxy{n}"
        workdir.mkdir(parents=True, exist_ok=True)
        last_error = None
        for _attempt in range(3):  # the free port may be taken in between
            port = get_free_port()
            config = default_config(port, workdir / "access.log", self.connect_ports, self.dns, **overrides)
            try:
                p = ProxyProcess(workdir, config, {"SSL_CERT_FILE": str(self.ca_pem)}, pidfile=pidfile)
            except RuntimeError as e:
                last_error = e
                if "Address already in use" in str(e) or "CannotListen" in str(e):
                    continue
                raise
            self.started.append(p)
            return p
        raise last_error

    def stop_all(self) -> list[str]:
        problems = []
        for p in self.started:
            code = p.stop()
            if code is None:
                problems.append(f"proxy pid {p.pid} ignored SIGTERM for 10 s and was killed")
        return problems


@pytest.fixture(scope="session")
def session_connect_ports(origin, tls_origin, tcp_origin, closed_port):
    return [origin.port, tls_origin.port, tcp_origin.port, closed_port, 443]


@pytest.fixture(scope="session")
def _session_launcher(tmp_path_factory, ca_pem, session_connect_ports, dns_server):
    launcher = ProxyLauncher(tmp_path_factory.mktemp("proxy"), ca_pem, session_connect_ports, dns_server)
    yield launcher
    problems = launcher.stop_all()
    assert not problems, problems


@pytest.fixture(scope="session")
def proxy(_session_launcher) -> ProxyProcess:
    """
    The proxy shared by most tests: connect_ports = the session origins'
    ports, a refused port and 443; header_filter adds C{x-secret-internal}.
    """
    return _session_launcher()


@pytest.fixture
def proxy_factory(tmp_path, ca_pem, session_connect_ports, dns_server):
    """A function that starts a dedicated proxy (stopped after the test)."""
    launcher = ProxyLauncher(tmp_path, ca_pem, session_connect_ports, dns_server)
    yield launcher
    problems = launcher.stop_all()
    assert not problems, problems


@pytest.fixture
def reverse_factory(proxy_factory):
    """
    A function C{(routes, **sections) -> ProxyProcess} starting a proxy whose
    reverse listener (on a free loopback port, C{.reverse_port}) serves
    C{routes}; C{reverse={...}} adds keys to C{[reverse]}, other keyword
    arguments override config sections as for C{proxy_factory}.
    """

    def start(routes: list[dict], **sections) -> ProxyProcess:
        reverse = {"listen": f"tcp:{get_free_port()}:interface={LOOPBACK}", "routes": routes}
        reverse.update(sections.pop("reverse", {}))
        return proxy_factory(reverse=reverse, **sections)

    return start


@pytest.fixture(autouse=True)
def _proxy_still_running(request):
    """After each test, the shared proxy (if used) must still be running."""
    yield
    if "proxy" in request.fixturenames:
        p = request.getfixturevalue("proxy")
        assert p.alive(), f"the proxy died during this test; output:\n{p.output()[-4000:]}"


# ---------------------------------------------------------------------------
# A raw HTTP/1.1 client
# ---------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    reason: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    informational: list["Response"] = field(default_factory=list)
    trailers: list[tuple[str, str]] = field(default_factory=list)
    raw_head: bytes = b""
    chunked: bool = False

    def values(self, name: str) -> list[str]:
        name = name.lower()
        return [v for n, v in self.headers if n.lower() == name]

    def get(self, name: str) -> str | None:
        values = self.values(name)
        return ", ".join(values) if values else None

    def tokens(self, name: str) -> set[str]:
        out = set()
        for v in self.values(name):
            out.update(t.strip().lower() for t in v.split(",") if t.strip())
        return out

    def json(self):
        return json.loads(self.body)


class ConnectionClosed(Exception):
    pass


class RawConnection:
    """A blocking socket with an input buffer and HTTP/1.1 response parsing."""

    def __init__(self, port: int, host: str = LOOPBACK, timeout: float = 10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.eof = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def local_port(self) -> int:
        return self.sock.getsockname()[1]

    def settimeout(self, t: float) -> None:
        self.sock.settimeout(t)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def shutdown_write(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def _fill(self) -> bool:
        if self.eof:
            return False
        data = self.sock.recv(1 << 20)
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def read_until(self, marker: bytes, limit: int = 1 << 20) -> bytes:
        start = 0
        while True:
            idx = self.buf.find(marker, start)
            if idx >= 0:
                out = bytes(self.buf[: idx + len(marker)])
                del self.buf[: idx + len(marker)]
                return out
            start = max(0, len(self.buf) - len(marker) + 1)
            if len(self.buf) > limit:
                raise AssertionError(f"no {marker!r} within {limit} bytes")
            if not self._fill():
                raise ConnectionClosed(
                    f"connection closed before {marker!r}; got {bytes(self.buf[:500])!r}"
                )

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise ConnectionClosed(f"connection closed after {len(self.buf)} of {n} bytes")
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_to_eof(self) -> bytes:
        while self._fill():
            pass
        out = bytes(self.buf)
        self.buf.clear()
        return out

    def discard_exact(self, n: int) -> None:
        """Read and drop C{n} bytes without keeping them (for huge bodies)."""
        take = min(n, len(self.buf))
        del self.buf[:take]
        n -= take
        chunk = bytearray(1 << 20)
        view = memoryview(chunk)
        while n:
            got = self.sock.recv_into(view, min(n, len(chunk)))
            if not got:
                raise ConnectionClosed(f"connection closed with {n} bytes still expected")
            n -= got

    def read_head(self) -> Response:
        raw = self.read_until(b"\r\n\r\n")
        lines = raw[:-4].split(b"\r\n")
        status_line = lines[0].decode("latin-1")
        parts = status_line.split(" ", 2)
        assert len(parts) >= 2 and parts[0].startswith("HTTP/"), f"bad status line {status_line!r}"
        headers = []
        for line in lines[1:]:
            name, sep, value = line.decode("latin-1").partition(":")
            assert sep, f"bad header line {line!r} in {raw!r}"
            headers.append((name, value.strip(" \t")))
        return Response(int(parts[1]), parts[2] if len(parts) > 2 else "", parts[0], headers,
                        raw_head=raw)

    def read_response(self, method: str = "GET", keep_body: bool = True) -> Response:
        """
        Read one final response (interim 1xx responses are collected in
        C{.informational}).  Framing follows RFC 9112 section 6.3.
        """
        informational = []
        while True:
            resp = self.read_head()
            if 100 <= resp.status < 200 and resp.status != 101:
                informational.append(resp)
                continue
            break
        resp.informational = informational
        if method == "HEAD" or resp.status in (204, 304) or (
            method == "CONNECT" and 200 <= resp.status < 300
        ):
            return resp
        te = resp.tokens("transfer-encoding")
        if te:
            assert "chunked" in te, f"unexpected transfer-encoding {te}"
            resp.chunked = True
            body = bytearray()
            while True:
                size_line = self.read_until(b"\r\n")
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    break
                data = self.read_exact(size)
                if keep_body:
                    body += data
                assert self.read_exact(2) == b"\r\n", "chunk not followed by CRLF"
            while True:
                line = self.read_until(b"\r\n")
                if line == b"\r\n":
                    break
                name, _, value = line.decode("latin-1").partition(":")
                resp.trailers.append((name, value.strip()))
            resp.body = bytes(body)
        elif resp.get("content-length") is not None:
            values = set(resp.values("content-length"))
            assert len(values) == 1, f"conflicting Content-Length {values}"
            n = int(values.pop())
            if keep_body:
                resp.body = self.read_exact(n)
            else:
                self.discard_exact(n)
        else:
            resp.body = self.read_to_eof()
        return resp


def build_request(method: str, target: str, headers=(), body: bytes | None = None,
                  chunks=None, version: str = "HTTP/1.1") -> bytes:
    """
    Bytes of one request.  C{headers} is a list of (name, value); a
    Content-Length is added for C{body}, chunked framing for C{chunks}.
    """
    lines = [f"{method} {target} {version}"]
    lines += [f"{n}: {v}" for n, v in headers]
    payload = b""
    if chunks is not None:
        lines.append("Transfer-Encoding: chunked")
        payload = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks if c) + b"0\r\n\r\n"
    elif body is not None:
        lines.append(f"Content-Length: {len(body)}")
        payload = body
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + payload


class Route:
    """
    How a test reaches an origin through the proxy: C{absolute} (absolute-form
    request-target) or C{header} (origin-form + C{x-target-host}).
    """

    def __init__(self, form: str, proxy: ProxyProcess, origin: OriginProcess,
                 base_path: str = ""):
        self.form = form
        self.proxy = proxy
        self.origin = origin
        self.base_path = base_path

    def request(self, method: str, path: str, headers=(), body=None, chunks=None) -> bytes:
        headers = list(headers)
        if self.form == "absolute":
            if not any(n.lower() == "host" for n, _ in headers):
                headers.insert(0, ("Host", self.origin.authority))
            return build_request(method, self.origin.url + path, headers, body, chunks)
        if not any(n.lower() == "host" for n, _ in headers):
            headers.insert(0, ("Host", f"{LOOPBACK}:{self.proxy.port}"))
        headers.insert(1, ("x-target-host", self.origin.url + self.base_path))
        return build_request(method, path, headers, body, chunks)

    def connect(self, timeout: float = 10.0) -> RawConnection:
        return RawConnection(self.proxy.port, timeout=timeout)

    def exchange(self, method: str, path: str, headers=(), body=None, chunks=None) -> Response:
        with self.connect() as c:
            c.send(self.request(method, path, headers, body, chunks))
            return c.read_response(method)

    # requests-library view
    def requests_session(self):
        import requests

        s = requests.Session()
        s.trust_env = False
        if self.form == "absolute":
            s.proxies = {"http": self.proxy.url, "https": self.proxy.url}
        else:
            s.headers["x-target-host"] = self.origin.url + self.base_path
        return s

    def requests_url(self, path: str) -> str:
        if self.form == "absolute":
            return self.origin.url + path
        return self.proxy.url + path


def open_tunnel(proxy: ProxyProcess, authority: str, timeout: float = 10.0,
                extra: bytes = b"") -> tuple[RawConnection, Response]:
    """Send C{CONNECT authority} (plus C{extra} bytes right behind it); return the connection and the response head."""
    c = RawConnection(proxy.port, timeout=timeout)
    c.send(build_request("CONNECT", authority, [("Host", authority)]) + extra)
    resp = c.read_response("CONNECT")
    return c, resp


def assert_short_text_error(resp: Response, status: int) -> None:
    """An error generated by the proxy: given status and a short plain-text body."""
    assert resp.status == status, f"expected {status}, got {resp.status} {resp.reason}: {resp.body[:300]!r}"
    ctype = (resp.get("content-type") or "").lower()
    assert ctype.startswith("text/plain"), f"error response Content-Type is {ctype!r}, not text/plain"
    assert 0 < len(resp.body) <= 1024, f"error body should be short and non-empty: {resp.body[:300]!r}"


def assert_proxy_works(proxy: ProxyProcess, origin: OriginProcess) -> None:
    """A fresh request through C{proxy} to C{origin} succeeds."""
    with RawConnection(proxy.port) as c:
        c.send(build_request("GET", origin.url + "/echo?alive", [("Host", origin.authority)]))
        resp = c.read_response()
    assert resp.status == 200, f"follow-up request failed: {resp.status} {resp.body[:200]!r}"
    assert resp.json()["uri"] == "/echo?alive"


class RSSSampler:
    """Samples a process's VmRSS in a thread; C{max_kib} is the highest seen."""

    def __init__(self, pid: int, interval: float = 0.02):
        self.pid = pid
        self.interval = interval
        self.max_kib = read_status_kib(pid, "VmRSS")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.max_kib = max(self.max_kib, read_status_kib(self.pid, "VmRSS"))
            except (OSError, KeyError):
                return
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(2)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: moves a gigabyte or so (deselect with -m 'not slow')")


def peak_growth_kib(proxy: "ProxyProcess", baseline_kib: int, hwm_before: int, sampler: "RSSSampler") -> int:
    """How far the proxy's RSS rose above C{baseline_kib} while C{sampler} ran
    (the kernel's high-water mark counts too, if it moved)."""
    peak = sampler.max_kib
    hwm_after = proxy.hwm_kib()
    if hwm_after > hwm_before:
        peak = max(peak, hwm_after)
    return peak - baseline_kib


def send_in_background(sock, block: bytes, count: int) -> tuple[threading.Thread, dict]:
    """Send C{block} C{count} times from a thread; the dict gets C{sent} or C{error}."""
    result: dict = {}

    def sender() -> None:
        try:
            for _ in range(count):
                sock.sendall(block)
            result["sent"] = True
        except OSError as e:
            result["error"] = e

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    return thread, result


class LogWatch:
    """New lines of a proxy's own log (twistd output) from now on."""

    def __init__(self, proxy) -> None:
        self.proxy = proxy
        self.mark = len(proxy.output())

    def new(self) -> str:
        return self.proxy.output()[self.mark:]

    def wait(self, pattern: str, timeout: float = 5.0) -> str:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            new = self.new()
            for line in new.splitlines():
                if rx.search(line):
                    return line
            if time.monotonic() > deadline:
                pytest.fail(f"no proxy log line matches {pattern!r}; new log lines:\n{new[-4000:]}")
            time.sleep(0.05)


@pytest.fixture
def seoul(monkeypatch: pytest.MonkeyPatch):
    """Local time is Asia/Seoul (UTC+9, no DST) for the test, and what it was after."""
    with monkeypatch.context() as m:
        m.setenv("TZ", "Asia/Seoul")
        time.tzset()
        yield
    time.tzset()
