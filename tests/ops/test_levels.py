"""
Log levels per component (C{logging.levels}) in syslog's severities, and the
Java product's C{logging.level.<logger>} keys mapped onto them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from twisted.logger import LogLevel, capturedLogs

from mydataproxy import config
from mydataproxy.config import LoggingSettings
from mydataproxy.http.wire import redacted
from mydataproxy.ops.levels import applyLevels


@pytest.fixture
def restoreLevels():
    tuned: list[str] = []
    yield tuned
    for name in tuned:
        sys.modules[name].log.set_log_level("info", keep=False)
    applyLevels(LoggingSettings())


def test_aComponentGetsALevelOfItsOwn(restoreLevels) -> None:
    import mydataproxy.server.request as request
    import mydataproxy.upstream.client as client

    restoreLevels += applyLevels(LoggingSettings(level="warning", levels=(("mydataproxy.upstream", "debug"),)))
    assert "mydataproxy.upstream.client" in restoreLevels and "mydataproxy.server.request" not in restoreLevels
    with capturedLogs() as events:
        client.log.debug("upstream detail")
        request.log.info("request chatter")
        request.log.warn("request warning")
    texts = [(e["log_format"], e["log_level"]) for e in events]
    assert ("upstream detail", LogLevel.debug) in texts
    assert ("request warning", LogLevel.warn) in texts
    assert ("request chatter", LogLevel.info) not in texts, "notice/warning for the rest keeps info out"


def test_theMostSpecificComponentWins(restoreLevels) -> None:
    import mydataproxy.upstream.client as client

    restoreLevels += applyLevels(LoggingSettings(
        levels=(("mydataproxy.upstream.client", "err"), ("mydataproxy", "debug"))
    ))
    with capturedLogs() as events:
        client.log.info("client info")
        client.log.error("client error")
    assert [e["log_format"] for e in events] == ["client error"]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_levelsInTomlTakeSyslogSeverities(tmp_path: Path) -> None:
    path = write(tmp_path, "m.toml", '[logging]\nlevel = "notice"\nlevels = { "mydataproxy.reverse" = "crit" }\n')
    settings = config.load(path).logging
    assert (settings.level, settings.levels) == ("notice", (("mydataproxy.reverse", "crit"),))


@pytest.mark.parametrize("text, key, problem", [
    ('[logging]\nlevels = { "org.apache" = "debug" }\n', "logging.levels.org.apache", "must name a component"),
    ('[logging]\nlevels = { "mydataproxy.upstream" = "loud" }\n', "logging.levels.mydataproxy.upstream", "must be one of"),
    ('[logging]\nlevels = "debug"\n', "logging.levels", "must be a table"),
])
def test_badLevelsAreLocatedErrors(tmp_path: Path, text: str, key: str, problem: str) -> None:
    path = write(tmp_path, "m.toml", text)
    with pytest.raises(config.ConfigError) as caught:
        config.load(path)
    assert caught.value.key == key and problem in caught.value.problem, str(caught.value)


def test_javaLoggerLevelsMapOntoComponents(tmp_path: Path) -> None:
    path = write(tmp_path, "application.properties", "\n".join([
        "logging.level.root=WARN",
        "logging.level.org.apache.http=DEBUG",
        "logging.level.org.springframework.web.client.RestTemplate=TRACE",
        "",
    ]))
    settings = config.load(path)
    assert settings.logging.level == "warn"
    assert settings.logging.levels == (("mydataproxy.upstream", "debug"), ("mydataproxy.upstream", "trace"))
    assert not [n for n in settings.notices if "logging.level" in n]


def test_javaWireLoggingMapsOntoTheWireComponent(tmp_path: Path) -> None:
    path = write(tmp_path, "application.properties", "logging.level.org.apache.http.wire=DEBUG\n")
    settings = config.load(path)
    assert settings.logging.levels == (("mydataproxy.http.wire", "debug"),)


def test_wireHeadsAreRedacted() -> None:
    head = (
        b"GET /v1/accounts?id=7&password=hunter2&token=abc HTTP/1.1\r\n"
        b"Host: api.bank.example\r\nAuthorization: Bearer s3cr3t\r\nproxy-authorization:Basic eDp5\r\n"
        b"Cookie: session=42\r\nX-Api-Tran-Id: T1\r\n\r\n"
    )
    shown = redacted(head)
    for secret in ("hunter2", "abc", "s3cr3t", "eDp5", "session=42"):
        assert secret not in shown, shown
    assert "id=7" in shown and "X-Api-Tran-Id: T1" in shown and shown.count("[redacted]") == 5, shown


def test_aRunningProxyLogsTheWireWhenAsked(proxy_factory, origin) -> None:
    import requests

    proxy = proxy_factory(logging={"levels": {"mydataproxy.http.wire": "debug"}})
    r = requests.get(f"{proxy.url}/echo/wire", headers={"x-target-host": origin.url, "Authorization": "Bearer s3cr3t"},
                     timeout=10)
    assert r.status_code == 200
    deadline = time.monotonic() + 5
    while ">> 127.0.0.1" not in proxy.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    output = proxy.output()
    assert ">> 127.0.0.1" in output and "GET /echo/wire HTTP/1.1" in output, output[-2000:]
    assert "<< 127.0.0.1" in output and "HTTP/1.1 200" in output, output[-2000:]
    assert "Authorization: [redacted]" in output and "s3cr3t" not in output
