"""The daemon as an operator meets it: twistd plugin, start-up failures,
check-config, the packaged wheel."""

from __future__ import annotations

import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import get_free_port, wait_for_port

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TWISTD = str(BIN / "twistd")
MYDATAPROXY = str(BIN / "mydataproxy")


def twistd(*arguments: str, cwd: Path, timeout: float = 20) -> subprocess.CompletedProcess:
    """Run twistd in the foreground and wait for it to exit by itself."""
    return subprocess.run(
        [TWISTD, "-n", "--pidfile=", "mydataproxy", *arguments],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_twistd_lists_the_plugin() -> None:
    out = subprocess.run([TWISTD, "--help"], capture_output=True, text=True, check=True).stdout
    assert "mydataproxy" in out


def test_bad_config_refuses_to_start_and_names_file_key_and_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[forward]\nlisten = "tcp:9000"\nconect_ports = [443]\n')
    result = twistd("--config", str(config), cwd=tmp_path)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"{config}:3: forward.conect_ports: unknown key" in output


def test_missing_config_file_refuses_to_start(tmp_path: Path) -> None:
    result = twistd("--config", str(tmp_path / "absent.toml"), cwd=tmp_path)
    assert result.returncode != 0
    assert "absent.toml" in result.stdout + result.stderr
    assert "cannot read" in result.stdout + result.stderr


def test_port_in_use_refuses_to_start(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = tmp_path / "busy.toml"
        config.write_text(f'[forward]\nlisten = "tcp:{port}:interface=127.0.0.1"\n')
        result = twistd("--config", str(config), cwd=tmp_path)
    assert result.returncode != 0, "a proxy without its port must not run on"
    assert f"cannot listen on tcp:{port}:interface=127.0.0.1" in result.stdout + result.stderr


def test_legacy_properties_start_the_daemon_and_report_unhonoured_keys(tmp_path: Path) -> None:
    port = get_free_port()
    config = tmp_path / "application.properties"
    config.write_text(
        f"server.port={port}\nserver.address=127.0.0.1\n"
        "proxy.httpclient.disableContentCompression=true\nspring.application.name=client\n"
    )
    process = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "mydataproxy", "--config", str(config)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_port(port, 15, process)
    finally:
        process.terminate()
        output = process.communicate(timeout=15)[0]
    assert "Server Shut Down." in output
    assert "proxy.httpclient.disableContentCompression is not supported yet" in output
    assert "spring.application.name" in output


def test_default_config_is_loopback_port_9000(tmp_path: Path, ss: str) -> None:
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 9000)) == 0:
            pytest.fail("port 9000 is taken on this machine; the default config needs it")
    process = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "mydataproxy"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_port(9000, 15, process)
        listening = subprocess.run(
            [ss, "-Htln", "sport = :9000"], capture_output=True, text=True
        ).stdout
    finally:
        process.terminate()
        output = process.communicate(timeout=15)[0]
    assert "127.0.0.1:9000" in listening and "0.0.0.0:9000" not in listening, listening
    assert "Server Shut Down." in output


def test_check_config_accepts_every_sample_and_rejects_bad_files(tmp_path: Path) -> None:
    for sample in sorted((REPO / "etc").glob("*.toml")) + sorted((REPO / "etc").glob("*.properties")):
        result = subprocess.run([MYDATAPROXY, "check-config", str(sample)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert f"{sample}: OK" in result.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[upstream]\nread_timeout = -1\n")
    result = subprocess.run([MYDATAPROXY, "check-config", str(bad)], capture_output=True, text=True)
    assert result.returncode == 2
    assert f"{bad}:2: upstream.read_timeout: must be at least" in result.stderr


def test_wheel_ships_the_plugin_and_the_command(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("mydataproxy-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert "twisted/plugins/mydataproxy_plugin.py" in names
        assert "twisted/plugins/__init__.py" not in names, "would shadow Twisted's own plugins package"
        assert "mydataproxy/forward.py" in names
        entryPoints = next(n for n in names if n.endswith("entry_points.txt"))
        assert "mydataproxy = mydataproxy.cli:main" in archive.read(entryPoints).decode()
        metadata = next(n for n in names if n.endswith("METADATA"))
        assert "Requires-Dist: Twisted[tls]>=26.10.0" in archive.read(metadata).decode()
