"""Login services: the files as launchd and systemd read them, the commands they are given, READY=1."""

from __future__ import annotations

import os
import plistlib
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from diffusiond.daemon.service import login_service


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / ".config"))
    return tmp_path


@pytest.fixture
def recorder(tmp_path, monkeypatch) -> Path:
    """`launchctl` and `systemctl` stand-ins that write down their arguments. This machine has no
    launchd and no user systemd: the commands are the OS boundary, everything before it is real."""
    bin_dir, record = tmp_path / "bin", tmp_path / "record.txt"
    bin_dir.mkdir()
    for tool in ("launchctl", "systemctl"):
        script = bin_dir / tool
        script.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{record}"\n')
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return record


def test_launch_agents_hold_every_key_with_absolute_existing_paths(home, monkeypatch) -> None:
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    prompts = home / "Prompts"
    prompts.mkdir()
    for agent in map(login_service.launch_agent, login_service.services(home / "config.toml", prompts)):
        loaded = plistlib.loads(plistlib.dumps(agent))
        assert loaded["Label"] in login_service.LABELS.values()
        program = Path(loaded["ProgramArguments"][0])
        assert program.is_absolute() and program.exists() and program == Path(sys.executable)
        assert loaded["RunAtLoad"] is True
        assert loaded["KeepAlive"] == {"SuccessfulExit": False}
        assert loaded["ThrottleInterval"] >= 10 and loaded["ProcessType"] == "Interactive"
        for key in ("StandardOutPath", "StandardErrorPath"):
            assert Path(loaded[key]).is_absolute() and Path(loaded[key]).parent == home / "Library/Logs/diffusiond"
        assert Path(loaded["WorkingDirectory"]).is_dir()
        assert loaded["EnvironmentVariables"]["PATH"] == os.environ["PATH"]
        assert loaded["EnvironmentVariables"]["HF_HOME"] == str(home / "hf")
    daemon, hot = login_service.services(home / "config.toml", prompts)
    assert daemon.arguments[1:] == ["-m", "diffusiond.daemon.cli", "serve", "--config", str(home / "config.toml")]
    assert hot.arguments[-1] == str(prompts)


def test_install_reinstall_and_uninstall_with_launchctl(home, recorder) -> None:
    wanted = login_service.services(None, home)
    uid = os.getuid()
    login_service.install(wanted, "launchd")
    login_service.install(wanted, "launchd")  # a reinstall boots out first
    plist = home / "Library/LaunchAgents/org.diffusiond.daemon.plist"
    assert plistlib.loads(plist.read_bytes())["Label"] == "org.diffusiond.daemon"
    assert (home / "Library/Logs/diffusiond").is_dir()
    once = [
        f"launchctl bootout gui/{uid}/org.diffusiond.daemon",
        f"launchctl bootstrap gui/{uid} {plist}",
        f"launchctl bootout gui/{uid}/org.diffusiond.hotfolder",
        f"launchctl bootstrap gui/{uid} {home}/Library/LaunchAgents/org.diffusiond.hotfolder.plist",
    ]
    assert recorder.read_text().splitlines() == once * 2
    recorder.unlink()
    removed = login_service.uninstall("launchd")
    assert not plist.exists() and len(removed) == 2
    assert recorder.read_text().splitlines() == [
        f"launchctl bootout gui/{uid}/org.diffusiond.hotfolder", f"launchctl bootout gui/{uid}/org.diffusiond.worker",
        f"launchctl bootout gui/{uid}/org.diffusiond.daemon"]


def test_install_and_uninstall_with_systemctl(home, recorder) -> None:
    login_service.install(login_service.services(None, home), "systemd")
    units = home / ".config/systemd/user"
    assert sorted(p.name for p in units.iterdir()) == ["diffusiond-hotfolder.service", "diffusiond.service"]
    assert recorder.read_text().splitlines() == [
        "systemctl --user daemon-reload",
        "systemctl --user enable diffusiond.service", "systemctl --user restart diffusiond.service",
        "systemctl --user enable diffusiond-hotfolder.service", "systemctl --user restart diffusiond-hotfolder.service",
    ]
    recorder.unlink()
    login_service.uninstall("systemd")
    assert list(units.iterdir()) == []
    assert recorder.read_text().splitlines() == [
        "systemctl --user disable --now diffusiond-hotfolder.service",
        "systemctl --user disable --now diffusiond.service", "systemctl --user daemon-reload",
    ]


def test_the_install_command_says_how_to_outlive_logout(home, recorder) -> None:
    if sys.platform == "darwin":
        pytest.skip("the systemd path: this is a Linux test")
    done = subprocess.run([sys.executable, "-m", "diffusiond.daemon.cli", "install"], capture_output=True,
                          text=True, timeout=60, env={**os.environ})
    assert done.returncode == 0, done.stderr
    assert "loginctl enable-linger" in done.stderr
    assert "installed" in done.stdout and (home / ".config/systemd/user/diffusiond.service").exists()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_units_pass_systemd_analyze_verify(tmp_path) -> None:
    folder = tmp_path / "units"
    folder.mkdir()
    paths = []
    worker = login_service.worker_service("tcp://studio.local:5570", tmp_path / "server.key", tmp_path / "gpu.key_secret",
                                    "gpu box", None)
    for unit in [*login_service.services(tmp_path / "config.toml", tmp_path), worker]:
        path = folder / login_service.UNITS[unit.name]
        path.write_text(login_service.systemd_unit(unit))
        paths.append(str(path))
    # The system manager's verify: the --user one needs a running user manager, which this
    # machine lacks. It checks the syntax and that ExecStart is executable; warnings count as failures.
    done = subprocess.run(["systemd-analyze", "verify", *paths], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr
    text = Path(paths[0]).read_text()
    assert "Type=notify" in text and "Restart=on-failure" in text


def test_quoting_keeps_odd_paths_whole() -> None:
    unit = login_service.systemd_unit(login_service.Service(login_service.HOTFOLDER, ["/usr/bin/python3", "/Users/a b/50% done"]))
    assert 'ExecStart=/usr/bin/python3 "/Users/a b/50%% done"' in unit


def test_daemon_sends_ready_only_when_warm_and_stopping_at_the_end(fresh, tmp_path, monkeypatch) -> None:
    address = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(address)
    listener.settimeout(120)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    try:
        fresh.start(wait=False)
        first = listener.recv(4096).decode()
        status = fresh.call("ping")  # asked the moment READY=1 arrived
        assert first.splitlines()[0] == "READY=1"
        assert status["ready"] and status["models"]["loaded"] == ["tiny"]
        assert fresh.stop() == 0
        assert listener.recv(4096).decode() == "STOPPING=1"
    finally:
        listener.close()


@pytest.mark.skipif(sys.platform != "darwin", reason="launchd and plutil exist only on macOS (the macOS workflow runs this)")
def test_real_launchd_bootstrap_and_bootout(tmp_path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'runtime_dir = "{tmp_path}/run"\nstate_dir = "{tmp_path}/state"\noutput_dir = "{tmp_path}/out"\n')
    try:
        paths = login_service.install(login_service.services(config, None), "launchd")
        subprocess.run(["plutil", "-lint", *map(str, paths)], check=True)
        rows = {row["service"]: row for row in login_service.status("launchd")}
        assert rows["org.diffusiond.daemon"]["loaded"] == "True"
    finally:
        login_service.uninstall("launchd")
    rows = {row["service"]: row for row in login_service.status("launchd")}
    assert rows["org.diffusiond.daemon"]["loaded"] == "False"


def test_a_worker_machine_installs_a_worker_instead_of_a_daemon(home, recorder) -> None:
    if sys.platform == "darwin":
        pytest.skip("the systemd path: this is a Linux test")
    keys = {name: home / name for name in ("server.key", "gpu.key_secret")}
    command = [sys.executable, "-m", "diffusiond.daemon.cli", "install", "--connect", "tcp://studio.local:5570",
               "--server-key", "server.key", "--worker-key", "gpu.key_secret", "--name", "gpu"]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=home)
    assert refused.returncode == 2 and "--server-key and --worker-key" in refused.stderr
    for path in keys.values():
        path.write_text("a key file\n")
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=home)
    assert done.returncode == 0, done.stderr
    units = home / ".config/systemd/user"
    assert [p.name for p in units.iterdir()] == ["diffusiond-worker.service"]  # no daemon on a worker machine
    exec_start = next(line for line in (units / "diffusiond-worker.service").read_text().splitlines()
                      if line.startswith("ExecStart="))
    assert exec_start.split()[1:] == ["-m", "diffusiond.daemon.cli", "worker", "--connect", "tcp://studio.local:5570",
                                      "--server-key", str(keys["server.key"]), "--worker-key",
                                      str(keys["gpu.key_secret"]), "--name", "gpu"]
    assert "systemctl --user restart diffusiond-worker.service" in recorder.read_text()
    assert [row["service"] for row in login_service.status("systemd")][-1] == "diffusiond-worker.service"
