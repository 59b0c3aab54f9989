"""
Log levels per component (C{logging.levels}) in syslog's severities, and the
Java product's C{logging.level.<logger>} keys mapped onto them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from twisted.logger import LogLevel, capturedLogs

from mydataproxy import config
from mydataproxy.config import LoggingSettings
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


def test_javaWireLoggingIsReportedNotHonoured(tmp_path: Path) -> None:
    path = write(tmp_path, "application.properties", "logging.level.org.apache.http.wire=DEBUG\n")
    settings = config.load(path)
    assert settings.logging.levels == ()
    assert any("logging.level.org.apache.http.wire is not supported yet" in n for n in settings.notices)
