"""The real daemon as a subprocess, and a real ZeroMQ client of it, for the tests."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import zmq

from diffusiond.clients.protocol import Event, endpoints


def free_port() -> int:
    """A port with the two after it free too (requests, events, workers); loopback only."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            try:
                for offset in (1, 2):
                    with socket.socket() as other:
                        other.bind(("127.0.0.1", port + offset))
            except OSError:
                continue
            return port
    raise RuntimeError("no three free consecutive ports")


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f'"{value}"' if isinstance(value, str) else repr(value)


class Daemon:
    def __init__(self, home: Path, **settings: Any) -> None:
        # The random `tiny` model unless a test names another: the machinery's tests need its speed, not meaning.
        settings.setdefault("model", "tiny")
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        self.runtime_dir = home / "run"
        self.output_dir = home / "out"
        self.config = home / "config.toml"
        lines = [f'runtime_dir = "{self.runtime_dir}"', f'state_dir = "{home / "state"}"',
                 f'output_dir = "{self.output_dir}"']
        lines += [f"{key} = {_toml(value)}" for key, value in settings.items()]
        self.config.write_text("\n".join(lines) + "\n")
        self.request_endpoint, self.event_endpoint = endpoints(self.runtime_dir)
        self.process: subprocess.Popen | None = None
        self.context = zmq.Context()
        self.ids = itertools.count(1)
        self.log = home / "daemon.log"

    def start(self, wait: bool = True) -> Daemon:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "diffusiond.daemon.cli", "serve", "--config", str(self.config)],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"daemon exited {self.process.returncode}: {self.log.read_text()}"
            try:
                reply = self.call("ping", timeout=0.5)
            except TimeoutError:
                continue
            if reply["ready"]:
                return reply
            time.sleep(0.05)
        raise TimeoutError(f"daemon not ready in {timeout}s: {self.log.read_text()}")

    def client(self) -> zmq.Socket:
        socket = self.context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(self.request_endpoint)
        return socket

    def call(self, op: str, timeout: float = 10, socket: zmq.Socket | None = None, **fields: Any) -> dict:
        """One request and its reply; raises TimeoutError when none comes in time."""
        own = socket is None
        socket = socket or self.client()
        try:
            request_id = next(self.ids)
            socket.send(msgpack.packb({"v": 1, "op": op, "id": request_id, **fields}))
            reply = self.receive(socket, timeout)
            assert reply["id"] == request_id
            return reply
        finally:
            if own:
                socket.close()

    @staticmethod
    def receive(socket: zmq.Socket, timeout: float = 10) -> dict:
        if not socket.poll(int(timeout * 1000)):
            raise TimeoutError("no reply")
        return msgpack.unpackb(socket.recv(), raw=False)

    def subscribe(self, *topics: bytes, timeout: float = 10) -> zmq.Socket:
        """A SUB socket whose subscription is known to be live (ZeroMQ's slow joiner otherwise
        drops what is published before the subscription reaches the daemon)."""
        topics = topics or (b"",)
        socket = self.context.socket(zmq.SUB)
        socket.setsockopt(zmq.LINGER, 0)
        for topic in (*topics, b"daemon"):
            socket.setsockopt(zmq.SUBSCRIBE, topic)
        socket.connect(self.event_endpoint)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            token = self.call("ping", announce=True)["id"]
            try:
                self.wait_for(socket, lambda e: e.get("type") == Event.DAEMON_PING and e.get("token") == token, 0.5)
            except TimeoutError:
                continue
            socket.setsockopt(zmq.UNSUBSCRIBE, b"daemon")
            return socket
        raise TimeoutError("subscription not live")

    @staticmethod
    def next_event(socket: zmq.Socket, timeout: float = 30) -> tuple[bytes, dict]:
        if not socket.poll(int(timeout * 1000)):
            raise TimeoutError("no event")
        topic, body = socket.recv_multipart()
        return topic, msgpack.unpackb(body, raw=False)

    def wait_for(self, socket: zmq.Socket, predicate, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no matching event")
            _, event = self.next_event(socket, remaining)
            if predicate(event):
                return event

    def wait_job(self, job_id: str, timeout: float = 60) -> dict:
        """Poll `get` until the job is finished (the queue is the record, events are not)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.call("get", job=job_id)["job"]
            if job["state"] in ("done", "failed", "cancelled"):
                return job
            time.sleep(0.05)
        raise TimeoutError(f"job {job_id} not finished in {timeout}s")

    def kill(self, sig: int = signal.SIGKILL) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout=60)

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        try:
            self.call("shutdown", timeout=5)
        except TimeoutError:
            self.process.terminate()
        return self.process.wait(timeout=60)

    def close(self) -> None:
        self.stop()
        self.context.destroy(linger=0)

    def __enter__(self) -> Daemon:
        return self if self.process is not None else self.start()

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        """Stop and close; a test that passed also asserts a clean exit (a failing one keeps its own error)."""
        self.close()
        if kind is None:
            assert self.process.returncode == 0, f"daemon exited {self.process.returncode}: {self.log.read_text()}"

    def outputs(self) -> list[str]:
        return sorted(os.listdir(self.output_dir)) if self.output_dir.exists() else []
