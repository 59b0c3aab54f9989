"""
A real HAProxy for the tests: Debian's C{haproxy} binary in the foreground
(C{-db}, never the service), loading C{etc/haproxy/mydataproxy.cfg} as it is
shipped, except for a textual substitution of its listen addresses, server
addresses, admin (check) ports, certificate path and check interval.

The sample is a fragment meant to follow Debian's C{haproxy.cfg}, which
holds the global section; here a generated global section (no chroot, no
user switch, no stats socket, logs on standard output) is loaded first, as
the first C{-f}. Its log lines (health-check transitions among them) are in
L{HAProxyProcess.output}.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from conftest import LOOPBACK, TLSFiles, get_free_port, require_tool, stop_process, wait_for_port

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "etc" / "haproxy" / "mydataproxy.cfg"

# The deployable values in SAMPLE that a test run replaces.
FORWARD_BIND = "bind :9000"
REVERSE_BIND = "bind :80"
TLS_BIND = "bind :443 ssl crt /etc/haproxy/certs/mydata.example.com.pem"
FORWARD_SERVERS = ("server mdp1 10.0.1.21:9000", "server mdp2 10.0.1.22:9000")
REVERSE_SERVERS = ("server mdp1 10.0.1.21:8080", "server mdp2 10.0.1.22:8080")
# Test override: the sample's check interval (2 s, what operators copy) is
# cut to 200 ms so that a check's verdict (an instance marked down by its
# /readyz 503) is seen within a test's second, not after fall x 2 s.
CHECK_INTERVAL = ("inter 2s", "inter 200ms")


def haproxy_binary() -> str:
    """
    The C{haproxy} binary (on PATH, else Debian's C{/usr/sbin}); missing: a
    failure under C{CI=true}, else a skip.
    """
    return require_tool(shutil.which("haproxy") or "/usr/sbin/haproxy")


@dataclass(frozen=True)
class Instance:
    """The ports of one MyData Proxy instance behind the balancer."""

    forward_port: int
    reverse_port: int
    admin_port: int


def render_sample(conf_text: str, ports: dict[str, int], instances: tuple[Instance, Instance],
                  pem: Path) -> str:
    """
    C{conf_text} with its binds on loopback (C{ports}: C{forward},
    C{reverse}, C{tls}), its servers at C{instances} (each server checked on
    its own instance's admin port), the certificate at C{pem} and the check
    interval of L{CHECK_INTERVAL}; every value to replace must be there (a
    change to the shipped file must not leave the tests exercising something
    else).
    """
    substitutions = [
        (FORWARD_BIND, f"bind {LOOPBACK}:{ports['forward']}"),
        (REVERSE_BIND, f"bind {LOOPBACK}:{ports['reverse']}"),
        (TLS_BIND, f"bind {LOOPBACK}:{ports['tls']} ssl crt {pem}"),
        CHECK_INTERVAL,
    ]
    for line, each in zip(FORWARD_SERVERS, instances):
        substitutions.append((line, f"{line.rsplit(' ', 1)[0]} {LOOPBACK}:{each.forward_port} port {each.admin_port}"))
    for line, each in zip(REVERSE_SERVERS, instances):
        substitutions.append((line, f"{line.rsplit(' ', 1)[0]} {LOOPBACK}:{each.reverse_port} port {each.admin_port}"))
    for old, new in substitutions:
        if old not in conf_text:
            raise AssertionError(f"{SAMPLE} no longer contains {old!r}; update tests/haproxy.py")
        conf_text = conf_text.replace(old, new)
    directives = "\n".join(l for l in conf_text.splitlines() if not l.lstrip().startswith("#"))
    for leftover in ("10.0.1.", "bind :", "/etc/"):
        if leftover in directives:
            raise AssertionError(f"{SAMPLE}: {leftover!r} is used where the tests cannot substitute it")
    return conf_text


GLOBAL = """\
global
    log stdout format raw local0 info
    maxconn 1024
"""


class HAProxyProcess:
    """
    One C{haproxy -db} running the shipped sample on loopback: C{forward_port}
    (the C{mydata_out} front, mode tcp), C{reverse_port} and C{tls_port}
    (C{mydata_in}, mode http, TLS with the leaf of C{tls}) in front of the two
    C{instances}.
    """

    def __init__(self, workdir: Path, instances: tuple[Instance, Instance], tls: TLSFiles,
                 timeout: float = 10.0) -> None:
        binary = haproxy_binary()
        workdir.mkdir(parents=True, exist_ok=True)
        self.forward_port, self.reverse_port, self.tls_port = get_free_port(), get_free_port(), get_free_port()
        pem = workdir / "front.pem"
        pem.write_bytes(tls.cert_pem.read_bytes() + tls.key_pem.read_bytes())
        global_path, sample_path = workdir / "global.cfg", workdir / "mydataproxy.cfg"
        global_path.write_text(GLOBAL)
        ports = {"forward": self.forward_port, "reverse": self.reverse_port, "tls": self.tls_port}
        sample_path.write_text(render_sample(SAMPLE.read_text(), ports, instances, pem))
        self.output_path = workdir / "haproxy.out"
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C"}
        with open(self.output_path, "wb") as output:
            self.proc = subprocess.Popen(
                [binary, "-db", "-f", str(global_path), "-f", str(sample_path)],
                cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=output,
                stderr=subprocess.STDOUT)
        for port in (self.forward_port, self.reverse_port, self.tls_port):
            if not wait_for_port(port, timeout, self.proc):
                self.stop()
                raise RuntimeError(
                    f"haproxy did not accept connections on {port} within {timeout} s "
                    f"(exit code {self.proc.returncode}):\n{self.output()}")

    def output(self) -> str:
        """HAProxy's console output: warnings, and its log lines."""
        try:
            return self.output_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def server_events(self, backend: str) -> list[str]:
        """The health-check transitions of C{backend}'s servers, in order (C{Server b/s is DOWN, reason: ...})."""
        return re.findall(rf"^.*Server {re.escape(backend)}/\S+ is (?:UP|DOWN).*$", self.output(), re.MULTILINE)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (a hard stop) and wait; the exit code, or None if it had to be killed."""
        return stop_process(self.proc, timeout)


def start_haproxy(workdir: Path, instances: tuple[Instance, Instance], tls: TLSFiles) -> HAProxyProcess:
    """An L{HAProxyProcess} in C{workdir}, retried on fresh ports if one was taken meanwhile."""
    attempt = 0
    while True:
        try:
            return HAProxyProcess(workdir / f"attempt{attempt}", instances, tls)
        except RuntimeError as e:
            attempt += 1
            taken = "Address already in use" in str(e) or "cannot bind" in str(e)
            if not taken or attempt == 3:
                raise
