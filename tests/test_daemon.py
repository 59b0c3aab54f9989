"""The daemon as an operator meets it: twistd plugin, start-up failures,
check-config, the packaged wheel."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import zipfile
from importlib.metadata import version
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
    # One line, not twistd's option summary above it.
    assert (result.stdout + result.stderr).splitlines() == [
        f"mydataproxy: {config}:3: forward.conect_ports: unknown key"
    ]


def bad_config_files(directory: Path) -> dict[str, tuple[Path, str]]:
    """Config files start-up must refuse, with what the one line must say."""
    latin1 = directory / "latin1.toml"
    latin1.write_bytes(b"# caf\xe9\n")
    port = directory / "port.toml"
    port.write_text('[forward]\nlisten = "tcp:70000:interface=127.0.0.1"\n')
    interface = directory / "interface.properties"
    interface.write_text("server.port=9000\nserver.address=localhost\n")
    logs = directory / "logs.toml"
    logs.write_text('[logging]\naccess_log = "no/such/dir/access.log"\n')
    folder = directory / "folder.toml"
    folder.mkdir()
    # Material: the settings load, the files they name do not.
    htpasswd = directory / "htpasswd.toml"
    htpasswd.write_text('[forward]\nlisten = "tcp:9000:interface=127.0.0.1"\nauth_file = "absent.htpasswd"\n')
    trust = directory / "trust.properties"
    trust.write_text("server.port=9000\nserver.address=127.0.0.1\nserver.ssl.trust-store=absent.jks\n")
    return {
        "missing": (directory / "absent.toml", "cannot read: [Errno 2] No such file or directory"),
        "directory": (folder, "cannot read: [Errno 21] Is a directory"),
        "not UTF-8": (latin1, "cannot read: 'utf-8' codec can't decode byte 0xe9"),
        "port out of range": (port, "2: forward.listen: port 70000 is out of range (0-65535)"),
        "interface not an IP": (interface, "2: server.address: must be an IP address"),
        "no log directory": (logs, f"2: logging.access_log: the directory {directory / 'no/such/dir'} does not exist"),
        "no htpasswd file": (htpasswd, f"3: forward.auth_file: {directory / 'absent.htpasswd'}: No such file"),
        "no trust store": (trust, f"3: server.ssl.trust-store: {directory / 'absent.jks'}: cannot read"),
    }


def test_start_failures_are_one_line_never_a_traceback(tmp_path: Path) -> None:
    for case, (config, problem) in bad_config_files(tmp_path).items():
        result = twistd("--config", str(config), cwd=tmp_path)
        lines = (result.stdout + result.stderr).splitlines()
        assert result.returncode == 1, case
        assert len(lines) == 1, (case, lines)
        assert lines[0].startswith(f"mydataproxy: {config}") and problem in lines[0], (case, lines)


def test_check_config_bad_files_are_one_line_never_a_traceback(tmp_path: Path) -> None:
    for case, (config, problem) in bad_config_files(tmp_path).items():
        result = subprocess.run([MYDATAPROXY, "check-config", str(config)], capture_output=True, text=True)
        assert result.returncode == 2, case
        assert result.stdout == "", case
        assert result.stderr.splitlines() == [result.stderr.strip()], case
        assert result.stderr.startswith(f"error: {config}") and problem in result.stderr, (case, result.stderr)


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
    assert "Traceback" not in result.stdout + result.stderr, "a busy port is one line, not a traceback"


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


def test_check_config_warns_loudly_about_an_open_proxy(tmp_path: Path) -> None:
    # The Java product's drop-in case: no server.address, every interface.
    config = tmp_path / "application.properties"
    config.write_text("server.port=9000\n")
    result = subprocess.run([MYDATAPROXY, "check-config", str(config)], capture_output=True, text=True)
    assert result.returncode == 0
    assert result.stdout.startswith(f"warning: {config}:1: OPEN PROXY: server.address is not set"), result.stdout
    assert "  forward.http_ports    80, 443, 8080, 8443" in result.stdout


def test_version_comes_from_the_package_metadata() -> None:
    result = subprocess.run([MYDATAPROXY, "--version"], capture_output=True, text=True)
    assert result.returncode == 0
    assert result.stdout == f"mydataproxy {version('mydataproxy')}\n"


def run_into_closed_pipe(*arguments: str) -> subprocess.CompletedProcess:
    """Run the command with its output going to a pipe nobody reads (| head -0)."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        return subprocess.run([MYDATAPROXY, *arguments], stdout=writer, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(writer)


def test_output_into_a_closed_pipe_is_not_a_traceback(ca_pem: Path) -> None:
    for arguments in (
        ["check-config", str(REPO / "etc" / "mydataproxy.toml")],
        ["keystore", "show", str(ca_pem)],
        ["--version"],
        ["--help"],
    ):
        result = run_into_closed_pipe(*arguments)
        assert result.stderr == "", (arguments, result.stderr)
        assert result.returncode in (0, 1), arguments


def test_output_piped_to_head(ca_pem: Path) -> None:
    for command in (
        f"{MYDATAPROXY} check-config {REPO / 'etc' / 'mydataproxy.toml'} | head -1",
        f"{MYDATAPROXY} keystore show {ca_pem} | head -1",
    ):
        result = subprocess.run(["sh", "-c", command], capture_output=True, text=True)
        assert result.stderr == "", (command, result.stderr)
        assert len(result.stdout.splitlines()) == 1, command


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
        packages = sorted(str(init.relative_to(REPO)) for init in (REPO / "mydataproxy").rglob("__init__.py"))
        assert [init for init in packages if init not in names] == [], "packages missing from setup.cfg"
        entryPoints = next(n for n in names if n.endswith("entry_points.txt"))
        assert "mydataproxy = mydataproxy.cli:main" in archive.read(entryPoints).decode()
        metadata = next(n for n in names if n.endswith("METADATA"))
        assert "Requires-Dist: Twisted[tls]>=26.10.0" in archive.read(metadata).decode()
