"""Always on at login: LaunchAgents on macOS, systemd --user units on Linux.

The files are built by pure functions (tested on any OS); `launchctl` and `systemctl` are called
in one thin place each, the boundary this module cannot cross on the other OS.
"""

from __future__ import annotations

import importlib.util
import os
import plistlib
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from diffusiond.clients.http_guard import is_loopback

from ..errors import InvalidParameter

DAEMON, HOTFOLDER, HTTP, WORKER = "daemon", "hotfolder", "http", "worker"
LABELS = {DAEMON: "org.diffusiond.daemon", HOTFOLDER: "org.diffusiond.hotfolder", HTTP: "org.diffusiond.http",
          WORKER: "org.diffusiond.worker"}
UNITS = {DAEMON: "diffusiond.service", HOTFOLDER: "diffusiond-hotfolder.service", HTTP: "diffusiond-http.service",
         WORKER: "diffusiond-worker.service"}
TOKEN_VARIABLE = "DIFFUSIOND_HTTP_TOKEN"  # `diffuse http --token`'s default: the token stays off the command line


@dataclass(frozen=True)
class Service:
    name: str  # DAEMON, HOTFOLDER, HTTP or WORKER
    arguments: list[str]  # the command line, interpreter first, every path absolute
    # Variables of this service alone that others must not read (the HTTP token): its file is written 0600.
    secrets: dict[str, str] = field(default_factory=dict)


def services(config: Path | None, hotfolder: Path | None) -> list[Service]:
    """What to install: the daemon, and the hot folder when asked; both run by this interpreter."""
    python = sys.executable
    config_args = ["--config", str(config.resolve())] if config else []
    result = [Service(DAEMON, [python, "-m", "diffusiond.daemon.cli", "serve", *config_args])]
    if hotfolder is not None:
        result.append(Service(HOTFOLDER, [python, "-m", "diffusiond.clients.cli", "hotfolder", str(hotfolder.resolve())]))
    return result


def http_service(host: str, port: int, token: str | None, runtime_dir: Path | None) -> Service:
    """`diffuse http` beside the daemon, for the daemon whose sockets are in ``runtime_dir`` (None: the
    default one, worked out when the service starts). Refused here rather than written as a service
    that would only fail at every login: a bind that is not loopback without a token (`diffuse http`
    itself refuses that), a port out of range, an environment without the http extra."""
    if not 0 < port < 65536:
        raise InvalidParameter("--http-port", f"a TCP port from 1 to 65535, got {port}")
    if not is_loopback(host) and not token:
        raise InvalidParameter("--http-host", f"{host} is not a loopback address, so anyone who can reach it could use "
                               f"the daemon: give --http-token TOKEN (or set {TOKEN_VARIABLE}), or bind 127.0.0.1")
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise InvalidParameter("--http", f"`diffuse http` needs the http extra ({', '.join(missing)} missing from "
                               f"{sys.executable}): pip install 'diffusiond[http]'")
    arguments = [sys.executable, "-m", "diffusiond.clients.cli",
                 *(["--runtime-dir", str(runtime_dir)] if runtime_dir else []), "http", "--host", host, "--port", str(port)]
    return Service(HTTP, arguments, {TOKEN_VARIABLE: token} if token else {})


def worker_service(connect: str, server_key: Path, worker_key: Path, name: str | None, config: Path | None) -> Service:
    """A remote worker for a daemon on another machine, instead of a daemon on this one."""
    arguments = [sys.executable, "-m", "diffusiond.daemon.cli", "worker", "--connect", connect,
                 "--server-key", str(server_key.resolve()), "--worker-key", str(worker_key.resolve())]
    arguments += ["--name", name] if name else []
    arguments += ["--config", str(config.resolve())] if config else []
    return Service(WORKER, arguments)


def _environment() -> dict[str, str]:
    """What the service needs of the installing shell: launchd and systemd start with almost nothing."""
    keep = ("PATH", "HF_HOME", "HF_HUB_OFFLINE", "DIFFUSIOND_RUNTIME_DIR", "DIFFUSIOND_CONFIG")
    return {key: os.environ[key] for key in keep if os.environ.get(key)}


# -- macOS ---------------------------------------------------------------------------------------

def log_dir() -> Path:
    return Path.home() / "Library" / "Logs" / "diffusiond"


def plist_path(name: str) -> Path:
    return Path.home() / "Library" / "LaunchAgents" / f"{LABELS[name]}.plist"


def launch_agent(service: Service) -> dict:
    log = str(log_dir() / f"{service.name}.log")
    return {
        "Label": LABELS[service.name],
        "ProgramArguments": service.arguments,
        "RunAtLoad": True,
        # Restart after a crash (non-zero exit or a signal), not after a requested stop (exit 0).
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": 10,
        # Image generation is what the user is waiting for: no background throttling.
        "ProcessType": "Interactive",
        "StandardOutPath": log,
        "StandardErrorPath": log,
        "EnvironmentVariables": {**_environment(), **service.secrets},
        "WorkingDirectory": str(Path.home()),
    }


# -- Linux ---------------------------------------------------------------------------------------

def unit_dir() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "systemd" / "user"


def _quote(argument: str) -> str:
    """systemd's command-line quoting: a word with spaces, quotes, backslashes or % in double quotes."""
    if argument and not any(c in argument for c in ' \t"\'\\%$;'):
        return argument
    return '"' + argument.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$") + '"'


# What differs between the units: the [Unit] lines, the service type, and extra [Service] lines.
_UNIT_PARTS = {
    DAEMON: ("Description=diffusiond, the local text-to-image daemon\n",
             # READY=1 comes once the model is warm: `systemctl start` returns when jobs can run.
             "notify", "TimeoutStartSec=900\nTimeoutStopSec=120\n"),
    HOTFOLDER: (f"Description=diffusiond hot folder: prompt files in, images out\n"
                f"Wants={UNITS[DAEMON]}\nAfter={UNITS[DAEMON]}\n", "exec", ""),
    # After the daemon's unit, which is ready once warm. `diffuse http` needs no ordering (launchd has
    # none, and a daemon restarts): it answers 503 until the daemon's sockets answer.
    HTTP: (f"Description=diffusiond HTTP: AUTOMATIC1111's API and a web page\n"
           f"Wants={UNITS[DAEMON]}\nAfter={UNITS[DAEMON]}\n", "exec", ""),
    WORKER: ("Description=diffusiond remote worker: this machine's engine for a daemon on another\n", "exec", ""),
}


def systemd_unit(service: Service) -> str:
    command = " ".join(_quote(argument) for argument in service.arguments)
    environment = "".join(f"Environment={_quote(f'{k}={v}')}\n" for k, v in {**_environment(), **service.secrets}.items())
    unit, kind, extra = _UNIT_PARTS[service.name]
    return (
        f"[Unit]\n{unit}\n"
        "[Service]\n"
        f"Type={kind}\n"
        f"ExecStart={command}\n"
        f"{environment}"
        "WorkingDirectory=%h\n"
        "Restart=on-failure\n"
        "RestartSec=5\n"
        f"{extra}\n"
        "[Install]\n"
        "WantedBy=default.target\n"
    )


# -- install, uninstall, status ------------------------------------------------------------------

def _write(path: Path, data: bytes, private: bool) -> None:
    """A service file; a private one (it holds a secret) readable by this user alone from its first byte."""
    if not private:
        path.write_bytes(data)
        return
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)  # a file left by an earlier install keeps its mode otherwise
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)


def _run(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, check=check, timeout=120)


def install(wanted: list[Service], manager: str) -> list[Path]:
    """Write and load every service; a reinstall replaces the running one cleanly."""
    written = []
    if manager == "launchd":
        log_dir().mkdir(parents=True, exist_ok=True)
        domain = f"gui/{os.getuid()}"
        for service in wanted:
            path = plist_path(service.name)
            path.parent.mkdir(parents=True, exist_ok=True)
            _run("launchctl", "bootout", f"{domain}/{LABELS[service.name]}", check=False)
            _write(path, plistlib.dumps(launch_agent(service)), bool(service.secrets))
            _run("launchctl", "bootstrap", domain, str(path))
            written.append(path)
        return written
    unit_dir().mkdir(parents=True, exist_ok=True)
    for service in wanted:
        path = unit_dir() / UNITS[service.name]
        _write(path, systemd_unit(service).encode(), bool(service.secrets))
        written.append(path)
    _run("systemctl", "--user", "daemon-reload")
    for service in wanted:
        _run("systemctl", "--user", "enable", UNITS[service.name])
        _run("systemctl", "--user", "restart", UNITS[service.name])
    return written


def uninstall(manager: str) -> list[Path]:
    removed = []
    for name in (HTTP, HOTFOLDER, WORKER, DAEMON):
        if manager == "launchd":
            path = plist_path(name)
            _run("launchctl", "bootout", f"gui/{os.getuid()}/{LABELS[name]}", check=False)
        else:
            path = unit_dir() / UNITS[name]
            if path.exists():
                _run("systemctl", "--user", "disable", "--now", UNITS[name], check=False)
        if path.exists():
            path.unlink()
            removed.append(path)
    if manager == "systemd" and removed:
        _run("systemctl", "--user", "daemon-reload")
    return removed


def status(manager: str) -> list[dict[str, str]]:
    """Per service: installed, loaded, running, pid, and where its logs are."""
    rows = []
    for name in (DAEMON, HOTFOLDER, HTTP, WORKER):
        if manager == "launchd":
            path = plist_path(name)
            shown = _run("launchctl", "print", f"gui/{os.getuid()}/{LABELS[name]}", check=False)
            fields = dict(
                line.strip().split(" = ", 1) for line in shown.stdout.splitlines() if " = " in line and line.startswith("\t") and not line.startswith("\t\t")
            )
            rows.append({
                "service": LABELS[name], "installed": str(path.exists()), "loaded": str(shown.returncode == 0),
                "state": fields.get("state", "not loaded"), "pid": fields.get("pid", "-"),
                "logs": str(log_dir() / f"{name}.log"),
            })
        else:
            path = unit_dir() / UNITS[name]
            shown = _run("systemctl", "--user", "show", UNITS[name], "--property=LoadState,ActiveState,SubState,MainPID", check=False)
            fields = dict(line.split("=", 1) for line in shown.stdout.splitlines() if "=" in line)
            rows.append({
                "service": UNITS[name], "installed": str(path.exists()), "loaded": str(fields.get("LoadState") == "loaded"),
                "state": f"{fields.get('ActiveState', 'unknown')} ({fields.get('SubState', '?')})",
                "pid": fields.get("MainPID", "-"), "logs": f"journalctl --user -u {UNITS[name]}",
            })
    return rows


def manager() -> str:
    return "launchd" if sys.platform == "darwin" else "systemd"
