"""TCP for other machines: only with CurveZMQ keys from the allow folder; none without keys."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys

import pytest
import zmq.auth

from diffusiond.clients import Client, DaemonUnreachable, RequestFailed
from diffusiond.clients.protocol import Event

from .daemon_process import Daemon, free_port


def keys(daemon: Daemon, client: str, role: str = "client") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffusiond.daemon.cli", "keys", f"--{role}", client, "--config",
                           str(daemon.config)], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def tcp_daemon(tmp_path_factory):
    """One TCP daemon for the module: each test only adds keys-checked calls and jobs of its own."""
    port = free_port()
    daemon = Daemon(tmp_path_factory.mktemp("tcp") / "d", tcp=f"127.0.0.1:{port}")
    made = keys(daemon, "laptop")
    assert made.returncode == 0, made.stderr
    daemon.start()
    daemon.port = port
    yield daemon
    daemon.close()


def test_keys_are_private_files_and_the_client_is_allowed(tcp_daemon) -> None:
    folder = tcp_daemon.home / "state" / "keys"
    for name in ("server.key", "server.key_secret", "laptop.key", "laptop.key_secret", "allowed/laptop.key"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600, name
    assert zmq.auth.load_certificate(str(folder / "allowed" / "laptop.key"))[1] is None  # public half only


def test_an_allowed_client_works_over_tcp_with_events(tcp_daemon) -> None:
    folder = tcp_daemon.home / "state" / "keys"
    with Client(connect=f"tcp://127.0.0.1:{tcp_daemon.port}", server_key=folder / "server.key",
                client_key=folder / "laptop.key_secret", timeout=10) as client:
        assert client.ping()["ready"]
        with client.subscribe([b"job."]) as events:  # live: it saw its own announcement over TCP
            job = client.submit("over the network", steps=2, width=64, height=64)
            seen = []
            while not seen or seen[-1] != Event.JOB_DONE:
                event = events.next(60)
                assert event is not None, "no event over TCP"
                seen.append(event["type"])
        assert seen == [Event.JOB_QUEUED, Event.JOB_STARTED, Event.JOB_PROGRESS, Event.JOB_PROGRESS, Event.JOB_DONE]
        assert client.get(job["id"])["state"] == "done"


def test_an_unknown_key_is_refused_and_logged(tcp_daemon, tmp_path) -> None:
    public, secret = zmq.auth.create_certificates(str(tmp_path), "stranger")
    folder = tcp_daemon.home / "state" / "keys"
    with Client(connect=f"tcp://127.0.0.1:{tcp_daemon.port}", server_key=folder / "server.key",
                client_key=secret, timeout=2) as client:
        with pytest.raises(DaemonUnreachable, match="keys/allowed"):
            client.ping()
    stranger = zmq.auth.load_certificate(public)[0].decode()
    assert f"refused a TCP client whose key is not allowed: {stranger}" in tcp_daemon.log.read_text()
    assert tcp_daemon.call("ping")["ready"]  # and the local way in is untouched


def test_no_keys_no_tcp(tmp_path) -> None:
    port = free_port()
    daemon = Daemon(tmp_path / "d", tcp=f"127.0.0.1:{port}")
    daemon.start(wait=False)
    assert daemon.process.wait(timeout=120) == 2
    assert "run `diffusiond keys" in daemon.log.read_text()
    plain = Daemon(tmp_path / "plain").start()  # no tcp in its config
    try:
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0  # nothing listens
    finally:
        plain.close()


def test_the_cli_connects_with_flags(tcp_daemon) -> None:
    folder = tcp_daemon.home / "state" / "keys"
    done = subprocess.run(
        [sys.executable, "-m", "diffusiond.clients.cli", "--connect", f"tcp://127.0.0.1:{tcp_daemon.port}",
         "--server-key", str(folder / "server.key"), "--client-key", str(folder / "laptop.key_secret"), "status"],
        capture_output=True, text=True, timeout=60, env={**os.environ},
    )
    assert done.returncode == 0, done.stderr
    assert "ready" in done.stdout


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"output_dir": "/tmp/anywhere"}, "inside the daemon's output folder"),
        ({"output_dir": "../outside"}, "inside the daemon's output folder"),
        ({"model": "/etc"}, "a catalog name or a Hub id"),
    ],
)
def test_a_remote_client_cannot_name_paths_on_the_daemon_machine(tcp_daemon, fields, message) -> None:
    folder = tcp_daemon.home / "state" / "keys"
    with Client(connect=f"tcp://127.0.0.1:{tcp_daemon.port}", server_key=folder / "server.key",
                client_key=folder / "laptop.key_secret", timeout=10) as client:
        with pytest.raises(RequestFailed, match=message) as refused:
            client.submit("p", steps=1, width=64, height=64, **fields)
        assert refused.value.code == "invalid_parameter"
        job = client.submit("p", steps=1, width=64, height=64, output_dir="from-laptop")
        done = client.wait(job["id"], timeout=60)
    assert done["outputs"] == [str(tcp_daemon.output_dir.resolve() / "from-laptop" / f"{job['id']}.png")]
    local = tcp_daemon.call("submit", prompt="p", steps=1, width=64, height=64, output_dir=str(tcp_daemon.home / "mine"))
    assert local["ok"]  # the machine's own user may still write where it likes
