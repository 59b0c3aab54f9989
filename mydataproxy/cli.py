"""The C{mydataproxy} command: tools around the daemon."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import socket
import sys
import tomllib
from pathlib import Path

from mydataproxy import config, material
from mydataproxy.config.dump import settingsToToml


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


def reload(pidfile: str) -> int:
    """
    C{mydataproxy reload}: send SIGHUP to the proxy whose process id is in
    C{pidfile} (it then re-reads its key and trust stores).  Refuses a
    process that is not a MyData Proxy (a stale pidfile whose number was
    reused): SIGHUP ends most programs.

    @return: 0 when the signal was sent, 1 otherwise; one line either way.
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
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        print(f"error: process {pid} ended: stale pidfile {pidfile}", file=sys.stderr)
        return 1
    except PermissionError:
        print(f"error: not allowed to signal process {pid} (run this as its user, or root)", file=sys.stderr)
        return 1
    print(f"reload: SIGHUP sent to MyData Proxy (pid {pid}); it re-reads its key and trust stores"
          " and logs 'reload of key and trust stores done'")
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

    @return: The exit status: 0, or 2 on a bad file or store; 1 when the
        reader left before the command had written everything it had to say.
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
        help="make the running proxy re-read its key and trust stores (SIGHUP)",
        description="Send SIGHUP to the proxy whose process id is in the pidfile.",
    )
    reloadParser.add_argument(
        "--pidfile", default=DEFAULT_PIDFILE, help=f"twistd's --pidfile (default: {DEFAULT_PIDFILE})"
    )
    arguments = parser.parse_args(argv)
    if arguments.command == "check-config":
        return checkConfig(arguments.file)
    if arguments.command == "migrate":
        return migrate(arguments.file, arguments.out, arguments.force)
    if arguments.command == "reload":
        return reload(arguments.pidfile)
    if arguments.command == "keystore":
        if arguments.action == "show":
            return keystoreShow(arguments)
        if arguments.action == "convert":
            return keystoreConvert(arguments)
    return 2


if __name__ == "__main__":
    sys.exit(main())
