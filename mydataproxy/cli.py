"""The C{mydataproxy} command: tools around the daemon."""

from __future__ import annotations

import argparse
import sys

from mydataproxy import config


def checkConfig(path: str) -> int:
    """Validate a config file without starting anything; print a summary."""
    try:
        settings = config.load(path)
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
    print(f"  forward.auth_file     {forward.auth_file or '(no authentication)'}")
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
    print(f"  logging.access_log    {settings.logging.access_log}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mydataproxy", description="MyData Proxy tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file", help="TOML config, or the Java product's application.properties")
    arguments = parser.parse_args(argv)
    if arguments.command == "check-config":
        return checkConfig(arguments.file)
    return 2


if __name__ == "__main__":
    sys.exit(main())
