"""The C{mydataproxy} command: tools around the daemon."""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import os
import signal
import socket
import sys
import time
import tomllib
from pathlib import Path

from cryptography import x509
from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from mydataproxy import config, material
from mydataproxy.config.dump import settingsToToml
from mydataproxy.ops import reloadstatus
from mydataproxy.tls.contexts import OriginTLS, TLSCheckFailed, describeHandshakeFailure


def checkConfig(path: str) -> int:
    """
    Validate a config file and load the material it names (key stores, the
    htpasswd file) as start-up does, without starting anything; print a
    summary.
    """
    try:
        settings = config.load(path)
        material.loadMaterial(settings)
    except config.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for notice in settings.notices:
        print(f"warning: {notice}")
    forward = settings.forward
    print(f"{path}: OK")
    print(f"  forward.listen        {forward.listen}")
    print(f"  forward.client_allow  {', '.join(map(str, forward.client_allow)) or '(everyone)'}")
    print(f"  forward.connect_ports {', '.join(map(str, sorted(forward.connect_ports)))}")
    ranges = (str(low) if low == high else f"{low}-{high}" for low, high in forward.http_ports)
    print(f"  forward.http_ports    {', '.join(ranges)}")
    print(f"  forward.auth_file     {forward.auth_file or '(no authentication)'}")
    if forward.tls is not None:
        print(f"  forward.tls           {forward.tls.key_store.path}, client_auth={forward.tls.client_auth}")
    for profile in (settings.upstream.tls, *settings.upstream.tls_profiles):
        print(f"  {profile.name}: {_describeProfile(profile)}")
    egress = settings.egress
    print(f"  egress.guard          {'on' if egress.guard else 'OFF: private and metadata addresses reachable'}")
    for rule in egress.rules:
        conditions = [
            f"{name}={','.join(sorted(map(str, values)))}"
            for name, values in (
                ("hosts", rule.hosts),
                ("networks", rule.networks),
                ("ports", rule.ports),
                ("modes", rule.modes),
                ("users", rule.users),
            )
            if values
        ]
        print(f"  {rule.name}: {rule.action} {' '.join(conditions) or '(everything)'}")
    print(f"  egress.default        {egress.default}")
    print(f"  logging.access_log    {settings.logging.accessPath(socket.gethostname())}")
    return 0


def _aboutSettings(settings: config.Settings) -> config.Settings:
    """C{settings} without what describes their file (source, notices, locations)."""
    return dataclasses.replace(settings, source="", notices=(), locations=())


def _warn(settings: config.Settings) -> None:
    """The notices of loading C{settings}, on standard error."""
    for notice in settings.notices:
        print(f"warning: {notice}", file=sys.stderr)


def _storeRefs(value: object) -> list[config.StoreRef]:
    """Every key and trust store reference in a settings value."""
    if isinstance(value, config.StoreRef):
        return [value]
    if isinstance(value, tuple):
        return [ref for item in value for ref in _storeRefs(item)]
    if dataclasses.is_dataclass(value):
        return [ref for field in dataclasses.fields(value) for ref in _storeRefs(getattr(value, field.name))]
    return []


def migrate(path: str, out: str | None, force: bool) -> int:
    """
    C{mydataproxy migrate}: write the native TOML equivalent of a config
    file (the Java product's C{application.properties}, usually) to C{out},
    or to standard output.  What is written is loaded back and compared
    with what the source loads to before anything is written.
    """
    try:
        settings = config.load(path)
    except config.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = settingsToToml(settings)
    target = Path(out) if out is not None else None
    source = str(target) if target is not None else "<migrate output>"
    try:
        written = config.settingsFromMapping(
            tomllib.loads(text), source, text, (target or Path(path)).resolve().parent
        )
    except (config.ConfigError, tomllib.TOMLDecodeError) as e:
        print(f"error: the TOML written for {path} does not load ({e}); nothing written", file=sys.stderr)
        return 2
    loaded, wanted = _aboutSettings(written), _aboutSettings(settings)
    differing = [f.name for f in dataclasses.fields(wanted) if getattr(loaded, f.name) != getattr(wanted, f.name)]
    if differing:
        print(
            f"error: the TOML written for {path} loads to other settings ({', '.join(differing)}); nothing written",
            file=sys.stderr,
        )
        return 2
    if target is None:
        _warn(settings)
        sys.stdout.write(text)
        return 0
    passwords = any(ref.password or ref.key_password for ref in _storeRefs(settings))
    try:
        # Passwords copied from the source stay readable by owner and group only.
        descriptor = os.open(
            target, os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL), 0o640 if passwords else 0o644
        )
    except FileExistsError:
        print(f"error: {target} exists (--force replaces it)", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write {target}: {e.strerror}", file=sys.stderr)
        return 2
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(text)
    _warn(settings)
    print(f"wrote {target}")
    if passwords:
        print(
            f"note: {target} holds the store passwords of {path} as pass: literals;"
            " env:NAME or file:PATH keep them out of the file"
        )
    return 0


#: twistd's pidfile when C{--pidfile} is not given: in its working directory.
DEFAULT_PIDFILE = "twistd.pid"
#: How long C{reload} waits for the proxy's word on the new configuration.
RELOAD_WAIT_SECONDS = 60.0


def reload(pidfile: str, timeout: float = RELOAD_WAIT_SECONDS) -> int:
    """
    C{mydataproxy reload}: send SIGHUP to the proxy whose process id is in
    C{pidfile}, and wait up to C{timeout} seconds for what the proxy says of
    the reload in its status file (L{reloadstatus}): the new generation in
    force, or the error that kept the old one.  Refuses a process that is
    not a MyData Proxy (a stale pidfile whose number was reused): SIGHUP
    ends most programs.

    @return: 0 when the new configuration took, 1 otherwise; one line
        either way.
    """
    try:
        text = Path(pidfile).read_text(encoding="ascii", errors="replace").strip()
    except FileNotFoundError:
        print(f"error: no pidfile {pidfile}: the proxy is not running, or was started with another --pidfile",
              file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: cannot read the pidfile {pidfile}: {e.strerror}", file=sys.stderr)
        return 1
    if not text.isdigit() or int(text) < 2:
        print(f"error: {pidfile} does not hold a process id ({text[:20]!r})", file=sys.stderr)
        return 1
    pid = int(text)
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        print(f"error: no process {pid}: stale pidfile {pidfile}, the proxy is not running", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: cannot tell what process {pid} is: {e.strerror}", file=sys.stderr)
        return 1
    if b"mydataproxy" not in command:
        shown = " ".join(part.decode(errors="replace") for part in command if part)[:60]
        print(f"error: process {pid} ({shown}) is not MyData Proxy: stale pidfile {pidfile}, not signalled",
              file=sys.stderr)
        return 1
    where = reloadstatus.statusPath(pidfile)
    before = reloadstatus.readStatus(where)
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        print(f"error: process {pid} ended: stale pidfile {pidfile}", file=sys.stderr)
        return 1
    except PermissionError:
        print(f"error: not allowed to signal process {pid} (run this as its user, or root)", file=sys.stderr)
        return 1
    deadline = time.monotonic() + timeout
    while True:
        status = reloadstatus.readStatus(where)
        if status is not None and status.pid == pid and (before is None or status.attempt > before.attempt):
            print(status.message, file=sys.stdout if status.ok else sys.stderr)
            return 0 if status.ok else 1
        if time.monotonic() > deadline:
            print(f"error: SIGHUP sent to MyData Proxy (pid {pid}), but it wrote no outcome to {where} "
                  f"within {timeout:g} s: see its error log", file=sys.stderr)
            return 1
        time.sleep(0.1)


#: How long C{status} waits for each admin endpoint.
STATUS_TIMEOUT = 5.0


def adminURL(settings: config.Settings | None) -> str:
    """
    The base URL of the admin listener of C{settings} (L{None}: the
    default C{[admin] listen}); one bound to every interface is asked on
    loopback.

    @raise ValueError: The settings have no admin listener, or not on TCP.
    """
    if settings is not None and settings.admin is None:
        raise ValueError(f"{settings.source} has no [admin] section: the admin listener is not running")
    listen = (settings.admin if settings is not None else config.AdminSettings()).listen
    address = config.parseListen(listen)
    if address is None:
        raise ValueError(f"admin.listen {listen!r} is not a TCP port: give --admin URL")
    interface = address.interface
    if interface in ("", "0.0.0.0"):
        interface = "127.0.0.1"
    elif interface == "::":
        interface = "::1"
    host = f"[{interface}]" if ":" in interface else interface
    return f"http://{host}:{address.port}"


def _fetch(url: str) -> tuple[int, str]:
    """GET C{url} straight (never through a proxy the environment names): (status, body)."""
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=STATUS_TIMEOUT) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read().decode("utf-8", "replace")


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text as C{sample name -> [(labels, value)]}."""
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    parts = [f"{days}d"] * bool(days) + [f"{hours}h"] * bool(days or hours) + [f"{minutes}m", f"{seconds}s"]
    return " ".join(parts)


def _counters(metrics: dict[str, list[tuple[dict[str, str], float]]]) -> list[tuple[str, str]]:
    """The lines of C{status} drawn from the metrics: (label, text); what is not exported is left out."""
    import time

    def total(name: str, **where: str) -> float:
        return sum(v for labels, v in metrics.get(name, ()) if all(labels.get(k) == w for k, w in where.items()))

    def by(name: str, label: str) -> dict[str, float]:
        values: dict[str, float] = {}
        for labels, value in metrics.get(name, ()):
            values[labels.get(label, "")] = values.get(labels.get(label, ""), 0) + value
        return values

    lines = []
    if "process_start_time_seconds" in metrics:
        lines.append(("uptime", _duration(time.time() - metrics["process_start_time_seconds"][0][1])))
    if "mydataproxy_client_connections" in metrics:
        tunnels = by("mydataproxy_tunnels", "listener")
        lines.append(("listeners", "; ".join(
            f"{name}: {int(open_)} connections, {int(tunnels.get(name, 0))} tunnels"
            for name, open_ in sorted(by("mydataproxy_client_connections", "listener").items())
        ) or "(none)"))
    if "mydataproxy_requests_total" in metrics:
        classes: dict[str, float] = {}
        for status, count in by("mydataproxy_requests_total", "status").items():
            key = status if status == "none" else f"{status[0]}xx"
            classes[key] = classes.get(key, 0) + count
        detail = ", ".join(f"{key} {int(count)}" for key, count in sorted(classes.items()) if count)
        lines.append(("requests", f"{int(total('mydataproxy_requests_total'))}" + (f" ({detail})" if detail else "")))
    if "mydataproxy_refusals_total" in metrics:
        rules = sorted(by("mydataproxy_refusals_total", "rule").items(), key=lambda item: -item[1])
        top = ", ".join(f"{rule} {int(count)}" for rule, count in rules[:3] if count)
        lines.append(("refusals", f"{int(total('mydataproxy_refusals_total'))}" + (f" (most: {top})" if top else "")))
    if "mydataproxy_upstream_pool_connections" in metrics:
        pool = by("mydataproxy_upstream_pool_connections", "state")
        waiting = total("mydataproxy_queue_depth", queue="upstream pool")
        rejected = total("mydataproxy_upstream_pool_rejected_total")
        lines.append(("upstream pool", f"{int(pool.get('in_use', 0))} in use, {int(pool.get('idle', 0))} idle, "
                                       f"{int(waiting)} waiting, {int(rejected)} refused (503)"))
    for name, label in (("mydataproxy_upstream_tls_failures_total", "TLS failures"),
                        ("mydataproxy_dns_failures_total", "DNS failures")):
        if name in metrics:
            lines.append((label, str(int(total(name)))))
    if "mydataproxy_log_lines_dropped_total" in metrics:
        lines.append(("log lines", f"{int(total('mydataproxy_log_lines_dropped_total', why='dropped'))} dropped, "
                                   f"{int(total('mydataproxy_log_lines_dropped_total', why='lost'))} lost"))
    expiries = metrics.get("mydataproxy_certificate_expiry_seconds", ())
    if expiries:
        labels, seconds = min(expiries, key=lambda item: item[1])
        when = f"in {int(seconds // 86400)} days" if seconds >= 0 else f"EXPIRED {int(-seconds // 86400)} days ago"
        lines.append(("next expiry", f"{labels.get('subject', '?')} ({labels.get('store', '?')}) {when}"))
    return lines


def status(base: str) -> int:
    """
    C{mydataproxy status}: ask the admin listener at C{base} whether the
    proxy is up (C{/healthz}) and ready (C{/readyz}, with the reasons when
    not), and print a few counters of C{/metrics}.

    @return: 0 ready, 1 up but not ready, 2 not reachable (or not answering).
    """
    base = base.rstrip("/")
    try:
        health, _ = _fetch(base + "/healthz")
        ready, reasons = _fetch(base + "/readyz")
        metricsStatus, metricsText = _fetch(base + "/metrics")
    except (OSError, ValueError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        print(f"down: the admin listener at {base} does not answer ({reason})")
        return 2
    if health != 200:
        print(f"down: {base}/healthz answered {health}")
        return 2
    try:
        metrics = _samples(metricsText) if metricsStatus == 200 else {}
    except ValueError as e:
        print(f"warning: {base}/metrics is not Prometheus text ({e})", file=sys.stderr)
        metrics = {}
    version = next((labels.get("version") for labels, _ in metrics.get("mydataproxy_build_info", ())), None)
    name = f"MyData Proxy {version}" if version else "MyData Proxy"
    print(f"{name} at {base}: up, {'ready' if ready == 200 else f'NOT READY ({ready})'}")
    if ready != 200:
        for reason in reasons.splitlines():
            if reason.strip():
                print(f"  not ready:      {reason.strip()}")
    for label, text in _counters(metrics):
        print(f"  {label + ':':<16}{text}")
    return 0 if ready == 200 else 1


class _WatchedResolver:
    """
    The pipeline's resolver, noting the names it had to look up (hosts
    file, then DNS) and their answers: C{explain} says whether a request
    would ask.
    """

    def __init__(self, resolver) -> None:
        self._resolver = resolver
        self.answers: dict[str, list[str]] = {}

    def known(self, host: str) -> list[str] | None:
        """As L{mydataproxy.egress.resolver.Resolver.known}."""
        return self._resolver.known(host)

    def resolve(self, host: str):
        """As L{mydataproxy.egress.resolver.Resolver.resolve}, noting a lookup and its answer."""
        lookup = self._resolver.known(host) is None
        d = self._resolver.resolve(host)
        if lookup:
            d.addCallback(self._answered, host)
        return d

    def _answered(self, addresses: list[str], host: str) -> list[str]:
        self.answers[host] = addresses
        return addresses


class _AssumedUser:
    """An authenticator that takes the C{--user} of C{explain} for proven (no password is checked)."""

    def __init__(self, user: str) -> None:
        self.user = user

    def authenticate(self, credentials: list[bytes] | None, client: str):
        """The user, as L{mydataproxy.egress.auth.ProxyAuthenticator.authenticate} would give it."""
        from twisted.internet.defer import succeed

        return succeed(self.user)


def _headerArguments(values: list[str]) -> dict[bytes, list[bytes]]:
    """C{--header NAME=VALUE} (or C{NAME: VALUE}) arguments by lower-cased name."""
    headers: dict[bytes, list[bytes]] = {}
    for value in values:
        cut = min((i for i in (value.find("="), value.find(":")) if i > 0), default=-1)
        if cut < 0:
            raise ValueError(f"--header {value!r}: give NAME=VALUE")
        name, text = value[:cut].strip(), value[cut + 1 :].strip()
        headers.setdefault(name.lower().encode("ascii"), []).append(text.encode("utf-8"))
    return headers


def _step(name: str, text: str) -> None:
    """One step of C{explain}."""
    print(f"  {name + ':':<14}{text}")


def _refused(status: int, reason: str, rule: str = "") -> int:
    """C{explain}'s verdict for a refusal, as the proxy's log line words it; the exit status."""
    print(f"verdict: {status} {reason}" + (f" (refused by {rule})" if rule else ""))
    return 1


def _allowed(text: str) -> int:
    """C{explain}'s verdict for an admitted request; the exit status."""
    print(f"verdict: allowed, {text}")
    return 0


async def _explainForward(reactor, settings: config.Settings, loaded: material.Material, arguments) -> None:
    """
    C{explain} on the forward listener: the steps the listener and the
    pipeline take, in their order, on a reactor; nothing is sent to the
    target.  Ends with C{SystemExit} (L{task.react}'s way to an exit status).
    """
    from twisted.internet.error import DNSLookupError

    from mydataproxy.egress.auth import ProxyAuthenticator
    from mydataproxy.egress.policy import Request, connectAllowed, httpPortAllowed
    from mydataproxy.egress.resolver import Resolver
    from mydataproxy.http.target import Mode, Refusal, parseTarget
    from mydataproxy.pipeline import RequestPipeline
    from mydataproxy.upstream.client import UpstreamPool

    headers = arguments.headers
    forward = settings.forward
    user = arguments.user
    authenticator: ProxyAuthenticator | _AssumedUser | None = None
    if loaded.htpasswd is None and user is not None:
        print("warning: forward.auth_file is not set: --user is ignored", file=sys.stderr)
        user = None
    elif loaded.htpasswd is not None:
        authenticator = (
            _AssumedUser(user) if user is not None
            else ProxyAuthenticator(loaded.htpasswd, forward.auth_realm, reactor)
        )
    resolver = _WatchedResolver(Resolver(reactor, settings.resolver))
    pipeline = RequestPipeline(settings, resolver, authenticator, reactor)
    print(f"explain {arguments.method} {arguments.url} from {arguments.client} ({settings.source})")
    client = pipeline.clientOf(arguments.client, headers.get(b"x-forwarded-for"))
    try:
        pipeline.admitClient(client)
        _step("client", f"{client}: allowed ({pipeline.access.allowed(client).rule})")
        if settings.limits.requests_per_second:
            _step("rate", f"limits.requests_per_second {settings.limits.requests_per_second:g}: "
                          "not judged here (it counts the client's recent requests)")
        target = parseTarget(arguments.method.encode("ascii"), arguments.url.encode("utf-8"),
                             headers.get(b"x-target-host"))
        _step("target", f"{target.mode.value}: {target.display}")
        pipeline.checkTarget(target)
    except Refusal as refusal:
        raise SystemExit(_refused(refusal.status, refusal.reason, refusal.rule)) from None
    destination = target.destination
    connect = target.mode is Mode.CONNECT
    port = connectAllowed(forward, destination.port) if connect else httpPortAllowed(forward, destination.port)
    if not connect:
        _step("port", f"allowed ({port.rule})")
    if authenticator is None:
        _step("auth", "off (forward.auth_file is not set)")
    elif user is not None:
        _step("auth", f"{user!r}, assumed (no password is checked here)")
    request = Request(target.mode.value, destination.host, destination.port, user, arguments.certificate)
    try:
        admitted = await pipeline.admit(None, target, arguments.certificate, client)
    except Refusal as refusal:
        if refusal.rule.startswith("forward.auth_file"):
            _step("auth", "refused: no credentials (--user takes the request as authenticated)")
        elif connect and refusal.rule == port.rule:
            _step("port", f"refused ({port.rule})")
        elif resolver.known(destination.host) is None and destination.host not in resolver.answers:
            _step("DNS", "not asked: the rules refuse this name whatever it resolves to")
        else:
            _explainAddresses(pipeline, request, resolver, ())
        raise SystemExit(_refused(refusal.status, refusal.reason, refusal.rule)) from None
    except DNSLookupError as e:
        failure = UpstreamPool(reactor, settings.upstream, loaded.originTLS).describeConnectFailure(
            destination, Failure(e)
        )
        _step("DNS", f"asked for {destination.host} (resolver.hosts_file, then DNS): no answer")
        raise SystemExit(_refused(failure.status, failure.reason)) from None
    if connect:
        _step("port", f"allowed ({port.rule})")
    _explainAddresses(pipeline, request, resolver, admitted.addresses)
    addresses = ", ".join(admitted.addresses)
    if connect:
        raise SystemExit(_allowed(f"a tunnel to {addresses} port {admitted.port}"))
    if admitted.scheme == "https":
        profile = loaded.originTLS.profileFor(admitted.host)
        _step("TLS profile", f"{profile.name}: {_describeProfile(profile)}")
    _step("pool key", f"scheme={admitted.scheme} host={admitted.host} port={admitted.port} addresses={addresses}")
    raise SystemExit(_allowed(f"to {target.display} via {addresses}"))


def _explainAddresses(pipeline, request, resolver: _WatchedResolver, allowed: tuple[str, ...]) -> None:
    """The DNS step of C{explain}, and the egress policy's verdict on each address."""
    host = request.host
    if host in resolver.answers:
        addresses = resolver.answers[host]
        _step("DNS", f"asked for {host} (resolver.hosts_file, then DNS): {', '.join(addresses)}")
    else:
        addresses = resolver.known(host) or []
        _step("DNS", f"not needed ({host} is an IP address)")
    for address in addresses:
        decision = pipeline.egress.decideAddress(request, address)
        _step("egress", f"{address}: {'allowed' if address in allowed else 'refused'} ({decision.rule})")


def _explainReverse(
    settings: config.Settings, reverse: config.ReverseSettings, loaded: material.Material, arguments
) -> int:
    """C{explain --reverse}: the route and backend targets a path on the reverse listener gets."""
    from mydataproxy.egress.policy import ClientAccess
    from mydataproxy.http.target import Destination, Refusal
    from mydataproxy.reverse.routes import RouteTable, backendTarget, checkTarget, requestHost

    print(f"explain {arguments.method} {arguments.url} on the reverse listener from {arguments.client}"
          f" ({settings.source})")
    access = ClientAccess(reverse, "reverse")
    headers = arguments.headers
    client = access.clientAddress(arguments.client, headers.get(b"x-forwarded-for"))
    target = arguments.url.encode("utf-8")
    hosts = headers.get(b"host")
    try:
        decision = access.allowed(client)
        if not decision.allowed:
            raise Refusal(403, "client address not allowed", decision.rule)
        _step("client", f"{client}: allowed ({decision.rule})")
        if arguments.method == "CONNECT":
            raise Refusal(405, "CONNECT is not served by the reverse proxy")
        checkTarget(target)
        route, rest = RouteTable(reverse.routes).match(requestHost(hosts[-1]) if hosts else None, target)
    except Refusal as refusal:
        return _refused(refusal.status, refusal.reason, refusal.rule)
    where = f" on {', '.join(route.hosts)}" if route.hosts else ""
    _step("route", f"{route.name} (prefix {route.prefix.decode('ascii')}{where})")
    _step("balance", f"{route.balance} over {len(route.backends)} backend(s)"
                     + (f", at most {route.max_concurrent} in flight" if route.max_concurrent else ""))
    _step("egress", "not applied: backends are the operator's configuration")
    urls = []
    for backend in route.backends:
        url = str(Destination(backend.scheme, backend.host, backend.port)) + backendTarget(
            backend, route.prefix, rest
        ).decode("ascii", "replace")
        urls.append(url)
        _step("backend", url)
        if backend.scheme == "https":
            profile = loaded.originTLS.profileFor(backend.host)
            _step("TLS profile", f"{profile.name}: {_describeProfile(profile)}")
    others = f" (or {len(urls) - 1} other backend(s), by {route.balance})" if len(urls) > 1 else ""
    return _allowed(f"route {route.name} to {urls[0]}{others}")


def explain(arguments: argparse.Namespace) -> int:
    """
    C{mydataproxy explain}: run a request's admission as the proxy would,
    sending nothing to the target, and print each step's verdict and the
    rule that decided it.

    @return: 0 allowed, 1 refused, 2 a bad config or argument.
    """
    try:
        settings = config.load(arguments.config) if arguments.config else config.Settings()
        loaded = material.loadMaterial(settings)
        arguments.headers = _headerArguments(arguments.header)
    except (config.ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    arguments.method = arguments.method.upper()
    if arguments.host is not None:
        arguments.headers[b"host"] = [arguments.host.encode("utf-8")]
    if arguments.reverse:
        if settings.reverse is None:
            print(f"error: {settings.source} has no [reverse] section: there is no reverse listener", file=sys.stderr)
            return 2
        return _explainReverse(settings, settings.reverse, loaded, arguments)
    if not settings.forward.enabled:
        print(f"error: forward.enabled is false in {settings.source}: there is no forward listener", file=sys.stderr)
        return 2
    from twisted.internet import task

    # Runs the reactor, then exits with the status _explainForward raises.
    task.react(_explainForward, (settings, loaded, arguments))


@implementer(IHandshakeListener)
class _Handshake(Protocol):
    """
    C{tls-probe}'s connection: one handshake, then the proxy's checks of
    the origin (unless C{checkHost} is L{None}), then close.

    @ivar seen: The version, cipher and certificate chain the origin
        presented, once the handshake is done.
    @ivar done: Fires when the connection is over, with the problem found
        in the words of the proxy's 502, or L{None}.
    """

    def __init__(self, originTLS: OriginTLS, checkHost: str | None) -> None:
        self.originTLS = originTLS
        self.checkHost = checkHost
        self.ready: Deferred = Deferred()
        self.done: Deferred = Deferred()
        self.seen: tuple[str, str, list[x509.Certificate]] | None = None

    def connectionMade(self) -> None:
        self.ready.callback(self)

    def handshakeCompleted(self) -> None:
        handle = self.transport.getHandle()
        chain = handle.get_peer_cert_chain(as_cryptography=True) or []
        self.seen = (handle.get_protocol_version_name(), handle.get_cipher_name(), chain)
        problem = self.originTLS.checkPeer(self.checkHost, handle) if self.checkHost is not None else None
        if problem is not None:
            self.transport.failVerification(Failure(TLSCheckFailed(problem)))
        else:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure) -> None:
        problem = None
        if self.seen is None or reason.check(SSL.Error, TLSCheckFailed):
            problem = describeHandshakeFailure(self.transport, reason)
        self.done.callback(problem)


async def _tlsProbe(reactor, settings: config.Settings, loaded: material.Material, url: str) -> None:
    """
    C{tls-probe}: the TLS handshake the proxy would make with the origin at
    C{url}, with the profile that applies, then the proxy's own checks
    (host name, pins, serialNumber); no request is sent.  Ends with
    C{SystemExit} (L{task.react}'s way to an exit status).
    """
    from dataclasses import replace

    from twisted.internet import error

    from mydataproxy.egress.connect import connect
    from mydataproxy.egress.resolver import Resolver
    from mydataproxy.http.target import Refusal, parseURL
    from mydataproxy.tls.keystore import fingerprint
    from mydataproxy.upstream.client import UpstreamPool

    async def handshake(originTLS: OriginTLS, checks: bool) -> tuple[tuple[str, str, list] | None, str | None]:
        """What the origin presented (if the handshake got that far), and the problem found (or L{None})."""
        probe = _Handshake(originTLS, host if checks else None)
        await connect(reactor, addresses, port, settings.upstream.connect_timeout, probe, originTLS.creatorFor(host))
        problem = await probe.done
        return probe.seen, problem

    try:
        destination, _ = parseURL((url if "://" in url else "https://" + url).encode("utf-8"))
    except (Refusal, UnicodeEncodeError) as e:
        raise SystemExit(_failed(2, f"{url}: {e}")) from None
    if destination.scheme != "https":
        raise SystemExit(_failed(2, f"{url}: tls-probe speaks to https:// origins"))
    host, port = destination.host, destination.port
    where = f"{host}:{port}"
    originTLS = loaded.originTLS
    profile = originTLS.profileFor(host)
    print(f"tls-probe {where} ({settings.source})")
    _step("profile", f"{profile.name}: {_describeProfile(profile)}")
    unreachable = (error.DNSLookupError, error.ConnectError, error.TimeoutError)
    try:
        addresses = await Resolver(reactor, settings.resolver).resolve(host)
        _step("address", ", ".join(addresses))
        seen, problem = await handshake(originTLS, True)
    except unreachable as e:
        # What the proxy answers when it cannot reach the origin, in its words.
        failure = UpstreamPool(reactor, settings.upstream, originTLS).describeConnectFailure(destination, Failure(e))
        raise SystemExit(_refused(failure.status, failure.reason)) from None
    unverified = seen is None
    if unverified:
        # Refused during the handshake: look again without verifying, to show what the origin presents.
        try:
            seen, _ = await handshake(OriginTLS(replace(profile, verify=False, pins=(), serial_number=""), ()), False)
        except unreachable:
            seen = None
    if seen is not None:
        version, cipher, chain = seen
        _step("version", f"{version}, {cipher}" + (" (seen without verifying)" if unverified else ""))
        for index, certificate in enumerate(chain):
            _printCertificate(f"[{index}] ", certificate, "  ")
        if profile.pins and chain:
            _step("pins", f"{'matched' if fingerprint(chain[0]) in profile.pins else 'NOT matched'}"
                          f" ({len(profile.pins)} configured)")
    if problem is not None:
        raise SystemExit(_refused(502, f"TLS with {where} failed: {problem}"))
    print(f"verdict: OK, the handshake and every check of {profile.name} passed")
    raise SystemExit(0)


def _failed(status: int, message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return status


def tlsProbe(configPath: str | None, url: str) -> int:
    """
    C{mydataproxy tls-probe}: the handshake the proxy would make with the
    origin at C{url}, its checks, and what the origin presented.

    @return: 0 when every check passed, 1 when one failed (or the origin
        could not be reached), 2 for a bad config or URL.
    """
    try:
        settings = config.load(configPath) if configPath else config.Settings()
        loaded = material.loadMaterial(settings)
    except config.ConfigError as e:
        return _failed(2, str(e))
    from twisted.internet import task

    # Runs the reactor, then exits with the status _tlsProbe raises.
    task.react(_tlsProbe, (settings, loaded, url))


def _oldestFirst(paths: list[Path]) -> list[Path]:
    """
    Log files in the order they were written: each log's rotated files by
    name (their time stamps), then its current file, which a shell glob
    (C{access.h.log*}) puts first.
    """

    def current(path: Path) -> str:
        owners = [o.name for o in paths if o.parent == path.parent and path.name.startswith(o.name + ".")]
        return max(owners, key=len, default=path.name)

    return sorted(paths, key=lambda p: (str(p.parent), current(p), current(p) == p.name, p.name))


def verifyLog(files: list[str]) -> int:
    """
    C{mydataproxy verify-log}: check the hash chain of a tamper-evident
    access log (C{logging.tamper_evident}) through its files, rotated and
    gzipped ones included.

    @return: 0 when the chain is intact, 1 when a line was removed,
        altered or reordered, or a file cannot be read.
    """
    from mydataproxy.ops import audit

    paths = _oldestFirst([Path(name) for name in files])
    checked, problems = audit.verify(paths)
    for problem in problems:
        print(problem)
    summary = f"{checked} lines in {len(paths)} file{'s' if len(paths) != 1 else ''}"
    if problems:
        print(f"verify-log: {summary}: {len(problems)} problem{'s' if len(problems) != 1 else ''}")
        return 1
    print(f"verify-log: {summary}: the chain is intact")
    return 0


#: Where C{keystore} commands find the store password when no C{--password}
#: is given (the variable's value is the password itself).
PASSWORD_VARIABLE = "MYDATAPROXY_KEYSTORE_PASSWORD"

#: Certificates expiring in fewer days than this are flagged by C{keystore show}.
EXPIRY_WARNING_DAYS = 30


def _openKeyStore(arguments: argparse.Namespace):
    """
    Load the store named on the command line, with the passwords it names.

    @return: the L{keystore.KeyStore}.
    @raise keystore.KeyStoreError: a password or the store cannot be read.
    """
    from mydataproxy.tls import keystore

    if arguments.password is not None:
        password = keystore.resolvePassword(arguments.password)
    else:
        password = os.environ.get(PASSWORD_VARIABLE)
    keyPassword = None
    if arguments.key_password is not None:
        keyPassword = keystore.resolvePassword(arguments.key_password)
    return keystore.loadKeyStore(arguments.store, password, keyPassword)


def _printCertificate(label: str, cert, indent: str) -> None:
    from mydataproxy.tls import keystore

    facts = keystore.describe(cert)
    days = facts["daysToExpiry"]
    if days < 0:
        expiry = f"EXPIRED {-days} days ago  WARNING"
    elif days < EXPIRY_WARNING_DAYS:
        expiry = f"{days} days  WARNING: expires in under {EXPIRY_WARNING_DAYS} days"
    else:
        expiry = f"{days} days"
    print(f"{indent}{label}subject:      {facts['subject']}")
    pad = indent + " " * len(label)
    print(f"{pad}issuer:       {facts['issuer']}")
    print(f"{pad}SANs:         {', '.join(facts['sans']) or '(none)'}")
    print(f"{pad}serialNumber: {facts['serialNumber'] or '(none)'}")
    print(f"{pad}serial:       {facts['serial']}")
    print(f"{pad}SHA-256:      {facts['fingerprint']}")
    print(f"{pad}not after:    {facts['notAfter']:%Y-%m-%d %H:%M:%S} UTC")
    print(f"{pad}expires in:   {expiry}")


def keystoreShow(arguments: argparse.Namespace) -> int:
    """C{mydataproxy keystore show}: list a store's entries."""
    from mydataproxy.tls import keystore

    try:
        store = _openKeyStore(arguments)
    except keystore.KeyStoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{store.source}: {store.format}, {len(store.keys)} private-key "
        f"{'entry' if len(store.keys) == 1 else 'entries'}, {len(store.trusted)} trusted "
        f"{'certificate' if len(store.trusted) == 1 else 'certificates'}"
    )
    for entry in store.keys:
        print(f"alias {entry.alias}: private key ({keystore.keyDescription(entry.key)}), "
              f"chain of {len(entry.chain)}")
        for index, cert in enumerate(entry.chain):
            _printCertificate(f"[{index}] ", cert, "  ")
    for alias, cert in store.trusted:
        print(f"alias {alias}: trusted certificate")
        _printCertificate("", cert, "  ")
    return 0


def keystoreConvert(arguments: argparse.Namespace) -> int:
    """C{mydataproxy keystore convert}: write a store's key and certificates as PEM."""
    from mydataproxy.tls import keystore

    try:
        store = _openKeyStore(arguments)
        written = keystore.writePem(store, Path(arguments.out), arguments.alias, force=arguments.force)
    except keystore.KeyStoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


def _addKeystoreCommands(commands) -> None:
    keystoreParser = commands.add_parser(
        "keystore",
        help="read Java key stores (JKS, JCEKS), PKCS#12 and PEM",
        description="Read a key store (JKS, JCEKS, PKCS#12, PEM; recognised by content).",
    )
    actions = keystoreParser.add_subparsers(dest="action", required=True)
    passwordHelp = (
        "store password: env:NAME (environment variable), file:PATH (first line of a file), "
        f"pass:TEXT or TEXT (literal: visible to other users in the process list); "
        f"default: ${PASSWORD_VARIABLE}, else none"
    )
    keyPasswordHelp = "private key password, as --password (default: the store password)"
    show = actions.add_parser("show", help="list the entries of a key store")
    convert = actions.add_parser(
        "convert", help="write the key, chain and trusted certificates as PEM (key.pem 0600, chain.pem, root.pem, ca.pem)"
    )
    for sub in (show, convert):
        sub.add_argument("store", help="the key store file")
        sub.add_argument("--password", metavar="SPEC", help=passwordHelp)
        sub.add_argument("--key-password", metavar="SPEC", help=keyPasswordHelp)
    convert.add_argument("--out", required=True, metavar="DIR", help="directory to write to")
    convert.add_argument("--alias", help="the private-key entry to write (needed when there are several)")
    convert.add_argument("--force", action="store_true", help="replace existing files")


def _describeProfile(profile) -> str:
    parts = [f"{profile.min_version}-{profile.max_version}"]
    if profile.hosts:
        parts.insert(0, "hosts=" + ",".join(profile.hosts))
    parts.append(f"trust={profile.trust_store.path if profile.trust_store else 'system'}")
    if profile.key_store:
        parts.append(f"client certificate from {profile.key_store.path}")
    if profile.pins:
        parts.append(f"{len(profile.pins)} pin(s)")
    if profile.serial_number:
        parts.append(f"serialNumber={profile.serial_number}")
    if not profile.verify:
        parts.append("WARNING: verify=false, origin certificates are not checked")
    return ", ".join(parts)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mydataproxy")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    """
    The C{mydataproxy} command.  Output piped to a reader that stops early
    (C{| head -1}) ends the command quietly instead of with a traceback.

    @return: The exit status: 0 on success, 2 on a bad file, store or
        argument, and what each command documents (1: refused, not ready,
        not running...); 1 also when the reader left before the command had
        written everything it had to say.
    """
    status = 1
    try:
        try:
            status = _run(argv)
        finally:
            # Also after argparse's own exits (--version, --help, usage).
            sys.stdout.flush()
    except BrokenPipeError:
        # Python flushes again at exit and would complain: point stdout at
        # /dev/null so that flush has nothing left to fail on.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return status


def _run(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="mydataproxy", description="MyData Proxy tools.")
    parser.add_argument("--version", action="version", version=f"mydataproxy {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file", help="TOML config, or the Java product's application.properties")
    _addKeystoreCommands(commands)
    migrateParser = commands.add_parser(
        "migrate",
        help="write the TOML equivalent of a config file (application.properties)",
        description="Write the native TOML equivalent of a config file, usually the Java product's "
        "application.properties: only the settings that differ from the defaults.",
    )
    migrateParser.add_argument("file", help="application.properties (or a TOML config)")
    migrateParser.add_argument("-o", "--out", metavar="FILE", help="where to write (default: standard output)")
    migrateParser.add_argument("--force", action="store_true", help="replace FILE if it exists")
    reloadParser = commands.add_parser(
        "reload",
        help="make the running proxy load its configuration again (SIGHUP) and say whether it took",
        description="Send SIGHUP to the proxy whose process id is in the pidfile, and wait for its outcome: "
        "exit 0 when the new configuration is in force, 1 with the error (file:line: key: problem) when "
        "the proxy kept the old one.",
    )
    reloadParser.add_argument(
        "--pidfile", default=DEFAULT_PIDFILE, help=f"twistd's --pidfile (default: {DEFAULT_PIDFILE})"
    )
    reloadParser.add_argument(
        "--timeout", type=float, default=RELOAD_WAIT_SECONDS, metavar="SECONDS",
        help=f"how long to wait for the outcome (default: {RELOAD_WAIT_SECONDS:g})",
    )
    statusParser = commands.add_parser(
        "status",
        help="ask the running proxy's admin listener: up, ready (or why not), counters",
        description="Read /healthz, /readyz and /metrics of the admin listener. "
        "Exit status: 0 ready, 1 not ready, 2 not reachable.",
    )
    where = statusParser.add_mutually_exclusive_group()
    where.add_argument("--config", metavar="FILE", help="the proxy's config: its [admin] listen")
    where.add_argument("--admin", metavar="URL", help="the admin listener's URL (default: http://127.0.0.1:9100)")
    explainParser = commands.add_parser(
        "explain",
        help="run a request's admission without sending anything: each step's verdict and rule",
        description="Run the admission of one request as the proxy would (client, ports, rules, DNS when "
        "the rules need it, egress policy), sending nothing to the target; print each step's verdict, "
        "the rule that decided it, the TLS profile and the pool key. Exit status: 0 allowed, 1 refused.",
    )
    explainParser.add_argument("method", help="GET, POST, ... or CONNECT")
    explainParser.add_argument(
        "url", help="http(s)://host[:port]/path, host:port for CONNECT, /path with --header x-target-host=URL or --reverse"
    )
    explainParser.add_argument("--config", metavar="FILE", help="the proxy's config (default: the embedded defaults)")
    explainParser.add_argument("--client", default="127.0.0.1", metavar="IP", help="the client's address (default: 127.0.0.1)")
    explainParser.add_argument("--user", metavar="USER", help="take the request as authenticated by USER")
    explainParser.add_argument(
        "--certificate", default="", metavar="SUBJECT", help="the client certificate's subject (RFC 4514)"
    )
    explainParser.add_argument(
        "--header", action="append", default=[], metavar="NAME=VALUE",
        help="a request field: x-target-host, x-forwarded-for, host (repeatable)",
    )
    explainParser.add_argument("--reverse", action="store_true", help="a path on the reverse listener")
    explainParser.add_argument("--host", help="the Host field (--reverse)")
    verifyParser = commands.add_parser(
        "verify-log",
        help="check the hash chain of a tamper-evident access log",
        description="Check the chain of a tamper-evident access log (logging.tamper_evident) through its "
        "files, e.g. /mnt/proxy/log/access.$(hostname).log*: rotated files (gzipped or not) are taken "
        "oldest first, then the current one. Exit status: 0 intact, 1 a line removed, altered or "
        "reordered, or a file missing or unreadable.",
    )
    verifyParser.add_argument("files", nargs="+", metavar="FILE", help="the log's files")
    probeParser = commands.add_parser(
        "tls-probe",
        help="make the TLS handshake the proxy would make with an origin, and say what it found",
        description="Connect to an https origin with the TLS profile that applies to it (trust store, client "
        "certificate, versions), run the proxy's checks (host name, pins, serialNumber) and print the chain, "
        "version and cipher, and the verdict in the words of the 502 the proxy would answer. No request is "
        "sent, and the egress policy is not asked (explain gives its verdict). Exit status: 0 passed, "
        "1 a check failed or the origin cannot be reached.",
    )
    probeParser.add_argument("url", help="https://host[:port] or host:port")
    probeParser.add_argument("--config", metavar="FILE", help="the proxy's config (default: the embedded defaults)")
    arguments = parser.parse_args(argv)
    if arguments.command == "check-config":
        return checkConfig(arguments.file)
    if arguments.command == "migrate":
        return migrate(arguments.file, arguments.out, arguments.force)
    if arguments.command == "reload":
        return reload(arguments.pidfile, arguments.timeout)
    if arguments.command == "explain":
        return explain(arguments)
    if arguments.command == "tls-probe":
        return tlsProbe(arguments.config, arguments.url)
    if arguments.command == "verify-log":
        return verifyLog(arguments.files)
    if arguments.command == "status":
        base = arguments.admin
        if base is None:
            try:
                base = adminURL(config.load(arguments.config) if arguments.config else None)
            except (config.ConfigError, ValueError) as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
        return status(base)
    if arguments.command == "keystore":
        if arguments.action == "show":
            return keystoreShow(arguments)
        if arguments.action == "convert":
            return keystoreConvert(arguments)
    return 2


if __name__ == "__main__":
    sys.exit(main())
