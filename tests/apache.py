"""
A real Apache httpd for the tests: Debian's C{apache2} binary started in the
foreground from a temporary ServerRoot (never the system service), serving
C{etc/apache/mydataproxy.conf} (L{start_apache}) or
C{etc/apache/mydataproxy-balancer.conf} (L{start_balancer}) as it is shipped,
except for a textual substitution of its ports, listen addresses, backend or
member addresses and certificate paths.

The generated main config is what Debian's C{apache2.conf}, C{ports.conf} and
C{ssl.conf} give that file, cut down: the event MPM, C{authz_core}, the SSL
session cache, the modules named by the file's own C{a2enmod} line, C{Listen}
on loopback only, pid file, mutexes, runtime directory and logs in the
temporary directory. Only the binary and its modules are needed (Debian
package C{apache2-bin}), not C{/etc/apache2}. As root, the children run as
C{www-data} (Apache refuses to serve as root); otherwise as the current user.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from conftest import LOOPBACK, TLSFiles, get_free_port, require_tool, stop_process, wait_for_port

REPO = Path(__file__).resolve().parent.parent
SITE_CONF = REPO / "etc" / "apache" / "mydataproxy.conf"
BALANCER_CONF = REPO / "etc" / "apache" / "mydataproxy-balancer.conf"
MODULES_DIR = Path("/usr/lib/apache2/modules")
# Enabled by a Debian apache2 install before any a2enmod (mpm_event,
# authz_core), and the session cache a2enmod ssl brings along (socache_shmcb,
# for the SSLSessionCache that Debian's ssl.conf sets).
BASE_MODULES = ("mpm_event", "authz_core", "socache_shmcb")

# The deployable values in SITE_CONF that a test run replaces.
PUBLIC_HTTP = "<VirtualHost *:80>"
PUBLIC_HTTPS = "<VirtualHost *:443>"
BACKEND = "http://127.0.0.1:8080/"
CERT_FILE = "/etc/mydataproxy/tls/apache.crt"
KEY_FILE = "/etc/mydataproxy/tls/apache.key"
MEMBERS = ('BalancerMember "http://10.0.1.21:8080"', 'BalancerMember "http://10.0.1.22:8080"')

#: A site file's text and the public HTTP and HTTPS ports -> what Apache loads.
Render = Callable[[str, int, int], str]


def apache_binary() -> str:
    """
    The C{apache2} binary (on PATH, else Debian's C{/usr/sbin}, which is not
    on a normal user's PATH); missing: a failure under C{CI=true}, else a skip.
    """
    return require_tool(shutil.which("apache2") or "/usr/sbin/apache2")


def site_modules(conf_text: str, site: Path = SITE_CONF) -> list[str]:
    """
    The modules to load: the base (L{BASE_MODULES}), then the names on the
    site file's own C{a2enmod} comment line, so that a module the file needs
    but does not name makes the tests fail as it would fail a deployment.
    """
    match = re.search(r"^#\s*a2enmod\s+([\w ]+)$", conf_text, re.MULTILINE)
    if match is None:
        raise AssertionError(f"{site} names no modules on an 'a2enmod' comment line")
    return list(dict.fromkeys(BASE_MODULES + tuple(match.group(1).split())))


def render_site(conf_text: str, http_port: int, https_port: int, backend_port: int,
                tls: TLSFiles) -> str:
    """
    C{conf_text} with its public ports, backend port and certificate paths
    replaced; every value to replace must be there (a change to the shipped
    file must not leave the tests exercising something else).
    """
    substitutions = [(BACKEND, f"http://{LOOPBACK}:{backend_port}/")]
    return _substitute(SITE_CONF, conf_text, http_port, https_port, tls, substitutions)


def render_balancer(conf_text: str, http_port: int, https_port: int, member_ports: Sequence[int],
                    tls: TLSFiles) -> str:
    """
    The balancer site C{conf_text} with its public ports, certificate paths
    and members (L{MEMBERS}, in order, to C{127.0.0.1:member_ports}) replaced;
    every value to replace must be there.
    """
    if len(member_ports) != len(MEMBERS):
        raise AssertionError(f"{BALANCER_CONF} has {len(MEMBERS)} members, not {len(member_ports)}")
    substitutions = [(member, f'BalancerMember "http://{LOOPBACK}:{port}"')
                     for member, port in zip(MEMBERS, member_ports)]
    return _substitute(BALANCER_CONF, conf_text, http_port, https_port, tls, substitutions)


def _substitute(site: Path, conf_text: str, http_port: int, https_port: int, tls: TLSFiles,
                backends: list[tuple[str, str]]) -> str:
    substitutions = [
        (PUBLIC_HTTP, f"<VirtualHost {LOOPBACK}:{http_port}>"),
        (PUBLIC_HTTPS, f"<VirtualHost {LOOPBACK}:{https_port}>"),
        (CERT_FILE, str(tls.cert_pem)),
        (KEY_FILE, str(tls.key_pem)),
        *backends,
    ]
    for old, new in substitutions:
        if old not in conf_text:
            raise AssertionError(f"{site} no longer contains {old!r}; update tests/apache.py")
        conf_text = conf_text.replace(old, new)
    directives = "\n".join(l for l in conf_text.splitlines() if not l.lstrip().startswith("#"))
    for leftover in (":8080", "*:80", "*:443", "/etc/mydataproxy/", "10.0.1."):
        if leftover in directives:
            raise AssertionError(f"{site}: {leftover!r} is used where the tests cannot substitute it")
    return conf_text


def _main_conf(root: Path, http_port: int, https_port: int, modules: list[str]) -> str:
    lines = [f'ServerRoot "{root}"', f'DefaultRuntimeDir "{root}/run"',
             f'PidFile "{root}/run/apache2.pid"', f"Mutex file:{root}/lock default",
             f"ServerName {LOOPBACK}", f'ErrorLog "{root}/logs/error.log"', "LogLevel warn"]
    for name in modules:
        so = MODULES_DIR / f"mod_{name}.so"
        if not so.exists():
            raise AssertionError(f"Apache module {so} is missing (Debian package apache2-bin)")
        lines.append(f"LoadModule {name}_module {so}")
    if os.geteuid() == 0:
        lines += ["User www-data", "Group www-data"]
    lines += [
        "StartServers 1", "ServerLimit 2", "ThreadsPerChild 25", "MaxRequestWorkers 50",
        "MinSpareThreads 5", "MaxSpareThreads 50",
        f"Listen {LOOPBACK}:{http_port}", f"Listen {LOOPBACK}:{https_port}",
        'LogFormat "%h %l %u %t \\"%r\\" %>s %O \\"%{Referer}i\\" \\"%{User-Agent}i\\"" combined',
        "<Directory />", "    AllowOverride None", "    Require all denied", "</Directory>",
        f"SSLSessionCache shmcb:{root}/run/ssl_scache(512000)",
        f'Include "{root}/sites/mydataproxy.conf"',
    ]
    return "\n".join(lines) + "\n"


class ApacheProcess:
    """
    One C{apache2 -DFOREGROUND} serving the shipped C{site} file on loopback,
    as C{render} makes it: C{http_port} (the C{*:80} vhost) and C{https_port}
    (C{*:443}).
    """

    def __init__(self, workdir: Path, site: Path, render: Render, timeout: float = 10.0):
        binary = apache_binary()
        self.root = workdir
        for sub in ("run", "lock", "logs", "sites"):
            (workdir / sub).mkdir(parents=True, exist_ok=True)
        self.http_port = get_free_port()
        self.https_port = get_free_port()
        text = site.read_text()
        (workdir / "sites" / "mydataproxy.conf").write_text(render(text, self.http_port, self.https_port))
        self.conf_path = workdir / "apache2.conf"
        self.conf_path.write_text(
            _main_conf(workdir, self.http_port, self.https_port, site_modules(text, site)))
        self.output_path = workdir / "apache2.out"
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C",
               "APACHE_LOG_DIR": str(workdir / "logs")}
        with open(self.output_path, "wb") as output:
            self.proc = subprocess.Popen(
                [binary, "-DFOREGROUND", "-d", str(workdir), "-f", str(self.conf_path)],
                cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=output,
                stderr=subprocess.STDOUT)
        for port in (self.http_port, self.https_port):
            if not wait_for_port(port, timeout, self.proc):
                self.stop()
                raise RuntimeError(
                    f"apache2 did not accept connections on {port} within {timeout} s "
                    f"(exit code {self.proc.returncode}):\n{self.logs()}")

    def logs(self) -> str:
        """Apache's console output and every error log, for failure messages."""
        parts = []
        for path in [self.output_path, *sorted((self.root / "logs").glob("*error*.log"))]:
            if path.exists() and path.stat().st_size:
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')}")
        return "\n".join(parts)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (Apache's stop) and wait; the exit code, or None if it had to be killed."""
        return stop_process(self.proc, timeout)


def start_apache(workdir: Path, backend_port: int, tls: TLSFiles) -> ApacheProcess:
    """
    An L{ApacheProcess} in C{workdir} serving C{mydataproxy.conf} (with the
    leaf of C{tls} on C{https_port}), proxying to C{127.0.0.1:backend_port}.
    """
    return _start(workdir, SITE_CONF,
                  lambda text, http, https: render_site(text, http, https, backend_port, tls))


def start_balancer(workdir: Path, member_ports: Sequence[int], tls: TLSFiles) -> ApacheProcess:
    """
    An L{ApacheProcess} in C{workdir} serving C{mydataproxy-balancer.conf}
    (with the leaf of C{tls} on C{https_port}), balancing over the members
    C{127.0.0.1:member_ports}.
    """
    return _start(workdir, BALANCER_CONF,
                  lambda text, http, https: render_balancer(text, http, https, member_ports, tls))


def _start(workdir: Path, site: Path, render: Render) -> ApacheProcess:
    """An L{ApacheProcess} in C{workdir}, retried on fresh ports if one was taken meanwhile."""
    attempt = 0
    while True:
        try:
            return ApacheProcess(workdir / f"attempt{attempt}", site, render)
        except RuntimeError as e:
            attempt += 1
            if "Address already in use" not in str(e) or attempt == 3:
                raise
