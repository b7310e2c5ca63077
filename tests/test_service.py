"""Login services: the files as launchd and systemd read them, the commands they are given, READY=1,
and `install --http`'s command run as written against a real daemon that comes up after it."""

from __future__ import annotations

import configparser
import os
import plistlib
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from diffusiond.daemon.service import login_service

from .daemon_process import free_port


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
        f"launchctl bootout gui/{uid}/org.diffusiond.http", f"launchctl bootout gui/{uid}/org.diffusiond.hotfolder",
        f"launchctl bootout gui/{uid}/org.diffusiond.worker", f"launchctl bootout gui/{uid}/org.diffusiond.daemon"]


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
    http = login_service.http_service("0.0.0.0", 7860, "a token", tmp_path / "run")
    for unit in [*login_service.services(tmp_path / "config.toml", tmp_path), http, worker]:
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


# `install --http`: `diffuse http` at login, after the daemon


def _unit(text: str) -> configparser.ConfigParser:
    """A systemd unit read as INI (keys case-sensitive, no interpolation: `%` is systemd's)."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read_string(text)
    return parser


def _words(line: str) -> list[str]:
    """A systemd command line's words: its double quotes and backslashes as a shell's, %% and $$ undone."""
    return [word.replace("%%", "%").replace("$$", "$") for word in shlex.split(line)]


def _environment(text: str) -> dict[str, str]:
    """A unit's Environment= assignments (INI keeps one of a repeated key: they are read line by line)."""
    pairs = [_words(line.removeprefix("Environment="))[0] for line in text.splitlines() if line.startswith("Environment=")]
    return dict(pair.split("=", 1) for pair in pairs)


def test_install_http_runs_diffuse_http_after_the_daemon_and_uninstall_removes_it(home, recorder, fresh) -> None:
    """The unit wants and follows the daemon's, keeps the token in its environment (the file is 0600),
    and its ExecStart, run as written with the unit's environment before the daemon is up (launchd
    has no ordering; a daemon may also restart), serves: progress answers at once, what needs the
    daemon is 503, and the daemon is served the moment it is ready."""
    if sys.platform == "darwin":
        pytest.skip("the systemd path: this is a Linux test")
    port = free_port()
    done = subprocess.run([sys.executable, "-m", "diffusiond.daemon.cli", "install", "--config", str(fresh.config),
                           "--http", "--http-port", str(port), "--http-token", "s3cret"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    path = home / ".config/systemd/user/diffusiond-http.service"
    text = path.read_text()
    unit = _unit(text)
    assert unit["Unit"]["Wants"] == "diffusiond.service" and unit["Unit"]["After"] == "diffusiond.service"
    assert unit["Service"]["Restart"] == "on-failure" and unit["Install"]["WantedBy"] == "default.target"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    environment = _environment(text)
    assert environment["DIFFUSIOND_HTTP_TOKEN"] == "s3cret" and "s3cret" not in unit["Service"]["ExecStart"]
    command = _words(unit["Service"]["ExecStart"])
    assert command == [sys.executable, "-m", "diffusiond.clients.cli", "--runtime-dir", str(fresh.runtime_dir), "http",
                       "--host", "127.0.0.1", "--port", str(port)]
    calls = recorder.read_text().splitlines()
    assert calls.index("systemctl --user restart diffusiond.service") < calls.index(
        "systemctl --user restart diffusiond-http.service")

    base, token = f"http://127.0.0.1:{port}", {"Authorization": "Bearer s3cret"}
    server = subprocess.Popen(command, env={"HOME": str(home), **environment}, cwd=home, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        assert "listening on" in server.stdout.readline()  # printed just before uvicorn binds
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None and time.monotonic() < deadline, "diffuse http did not answer"
            try:
                idle = requests.get(base + "/sdapi/v1/progress", headers=token, timeout=5)
                break
            except requests.ConnectionError:
                time.sleep(0.05)
        assert idle.status_code == 200 and idle.json()["progress"] == 0
        assert requests.get(base + "/sdapi/v1/progress").status_code == 401
        assert requests.get(base + "/sdapi/v1/options", headers=token).status_code == 503
        fresh.start()  # ready when it returns
        assert requests.get(base + "/sdapi/v1/options", headers=token).json() == {"sd_model_checkpoint": "tiny"}
        made = requests.post(base + "/sdapi/v1/txt2img", headers=token, timeout=120,
                             json={"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64, "seed": 1})
        assert made.status_code == 200 and len(made.json()["images"]) == 1
    finally:
        server.terminate()
        server.wait(timeout=30)  # SIGTERM stops it, as the service manager stops it

    assert "diffusiond-http.service" in [row["service"] for row in login_service.status("systemd")]
    recorder.unlink()
    removed = subprocess.run([sys.executable, "-m", "diffusiond.daemon.cli", "uninstall"], capture_output=True,
                             text=True, timeout=60)
    assert removed.returncode == 0 and not path.exists()
    assert recorder.read_text().splitlines()[0] == "systemctl --user disable --now diffusiond-http.service"


def test_install_http_as_a_launch_agent_keeps_its_token_private(home, recorder) -> None:
    wanted = [*login_service.services(None, None), login_service.http_service("127.0.0.1", 7860, "s3cret", None)]
    login_service.install(wanted, "launchd")
    plist = home / "Library/LaunchAgents/org.diffusiond.http.plist"
    agent = plistlib.loads(plist.read_bytes())
    assert agent["Label"] == "org.diffusiond.http"
    assert agent["ProgramArguments"] == [sys.executable, "-m", "diffusiond.clients.cli", "http", "--host", "127.0.0.1",
                                         "--port", "7860"]  # no --runtime-dir: the default one, found at its start
    assert agent["EnvironmentVariables"]["DIFFUSIOND_HTTP_TOKEN"] == "s3cret"
    assert agent["RunAtLoad"] is True and agent["KeepAlive"] == {"SuccessfulExit": False}
    assert agent["StandardOutPath"] == str(home / "Library/Logs/diffusiond/http.log")
    assert stat.S_IMODE(plist.stat().st_mode) == 0o600
    daemon = plistlib.loads((home / "Library/LaunchAgents/org.diffusiond.daemon.plist").read_bytes())
    assert "DIFFUSIOND_HTTP_TOKEN" not in daemon["EnvironmentVariables"]
    plist.chmod(0o644)
    login_service.install(wanted, "launchd")  # a reinstall over a readable file
    assert stat.S_IMODE(plist.stat().st_mode) == 0o600
    assert f"launchctl bootstrap gui/{os.getuid()} {plist}" in recorder.read_text().splitlines()
    login_service.uninstall("launchd")
    assert not plist.exists()


def test_install_http_refuses_a_service_that_would_fail(home, recorder) -> None:
    """Refused before anything is written: a bind that is not loopback without a token (`diffuse
    http` would refuse to start at every login), a port out of range, --http on a worker machine."""
    environment = {key: value for key, value in os.environ.items() if key != "DIFFUSIOND_HTTP_TOKEN"}

    def install(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "diffusiond.daemon.cli", "install", *args], capture_output=True,
                              text=True, timeout=60, env=environment, cwd=home)

    exposed = install("--http", "--http-host", "0.0.0.0")
    assert exposed.returncode == 2 and "0.0.0.0 is not a loopback address" in exposed.stderr
    assert "--http-token" in exposed.stderr
    port = install("--http", "--http-port", "70000")
    assert port.returncode == 2 and "--http-port: a TCP port from 1 to 65535, got 70000" in port.stderr
    (home / "server.key").write_text("a key file\n")
    (home / "gpu.key_secret").write_text("a key file\n")
    worker = install("--connect", "tcp://studio.local:5570", "--server-key", "server.key", "--worker-key",
                     "gpu.key_secret", "--http")
    assert worker.returncode == 2 and "--http goes with the daemon's install" in worker.stderr
    for folder in (home / ".config/systemd/user", home / "Library/LaunchAgents"):
        assert not folder.exists() or list(folder.iterdir()) == []
    assert not recorder.exists()

    environment["DIFFUSIOND_HTTP_TOKEN"] = "from the environment"
    if sys.platform != "darwin":
        taken = install("--http", "--http-host", "0.0.0.0")
        assert taken.returncode == 0, taken.stderr
        unit = (home / ".config/systemd/user/diffusiond-http.service").read_text()
        assert _environment(unit)["DIFFUSIOND_HTTP_TOKEN"] == "from the environment"
        assert _words(_unit(unit)["Service"]["ExecStart"])[-4:] == ["--host", "0.0.0.0", "--port", "7860"]
