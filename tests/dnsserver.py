"""
A DNS server for the tests, on loopback UDP: answers A/AAAA queries from a
JSON table, NXDOMAIN for everything else, so no test query leaves the host.

    python tests/dnsserver.py TABLE.json      (prints the bound port)

TABLE maps a name to {"answers": [[addr, ...], ...], "ttl": N}: successive
queries for the name (and type) get successive answer sets (cycling), which is how a
DNS-rebinding server behaves.  The table is re-read on every query, so a
test can change it while the server runs.  Every query is appended to
TABLE.log as "name type".
"""

from __future__ import annotations

import ipaddress
import json
import sys
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.names import dns, error, server


class TableResolver:
    def __init__(self, table: Path) -> None:
        self.table = table
        self.asked: dict[tuple[str, int], int] = {}

    def query(self, query: dns.Query, timeout=None):
        name = query.name.name.decode("ascii").lower().rstrip(".")
        with open(str(self.table) + ".log", "a") as log:
            log.write(f"{name} {dns.QUERY_TYPES.get(query.type, query.type)}\n")
        entry = json.loads(self.table.read_text()).get(name)
        if entry is None:
            return defer.fail(error.DomainError(name))
        sets = entry["answers"]
        turn = self.asked.get((name, query.type), 0)
        self.asked[name, query.type] = turn + 1
        answers = []
        for address in sets[turn % len(sets)]:
            ip = ipaddress.ip_address(address)
            if query.type == dns.A and ip.version == 4:
                payload = dns.Record_A(address, ttl=entry.get("ttl", 0))
            elif query.type == dns.AAAA and ip.version == 6:
                payload = dns.Record_AAAA(address, ttl=entry.get("ttl", 0))
            else:
                continue
            answers.append(
                dns.RRHeader(query.name.name, query.type, dns.IN, entry.get("ttl", 0), payload, auth=True)
            )
        return defer.succeed((answers, [], []))


def main() -> None:
    table = Path(sys.argv[1])
    factory = server.DNSServerFactory(authorities=[TableResolver(table)])
    port = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
    print(port.getHost().port, flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
