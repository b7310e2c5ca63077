"""`Client`: the Python API of a running daemon, on which `diffuse` and the hot folder are built.

    from diffusiond.clients import Client
    with Client() as client:
        job = client.submit("a lighthouse at dusk", steps=25, seed=42)
        done = client.wait(job["id"], on_event=print)
        print(done["outputs"])

Every call has a deadline; nothing here blocks forever.
"""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

from .protocol import (
    DAEMON_TOPIC,
    FINISHED,
    HARD_MESSAGE_BYTES,
    VERSION,
    Code,
    default_runtime_dir,
    endpoints,
    pack,
    unpack,
)


class ClientError(Exception):
    """Base of everything `Client` raises."""


class DaemonUnreachable(ClientError):
    pass


class RequestFailed(ClientError):
    """The daemon answered with an error; ``code`` is one of protocol.Code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class WaitTimeout(ClientError):
    pass


class JobFailed(ClientError):
    def __init__(self, job: dict[str, Any]) -> None:
        error = job.get("error") or {}
        super().__init__(f"job {job['id']} failed: {error.get('code')}: {error.get('message')}")
        self.job = job


class JobCancelled(ClientError):
    def __init__(self, job: dict[str, Any]) -> None:
        super().__init__(f"job {job['id']} was cancelled")
        self.job = job


_TERMINAL_EVENTS = {"job.done", "job.failed", "job.cancelled"}


def _unsendable(name: str, value: Any) -> str | None:
    """Why msgpack cannot carry this field's value (an integer beyond 64 bits, text that is not
    Unicode), in the user's terms; None when it can."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and not -(2**63) <= value < 2**64:
        return f"{name}: {value} does not fit in 64 bits"
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return (f"{name}: not valid text (a lone surrogate {value[exc.start]!r} at character {exc.start}; "
                    "was it read with the wrong encoding?)")
    if isinstance(value, (list, tuple)):
        return next((why for item in value if (why := _unsendable(name, item))), None)
    return None


def _public_key(path: Path) -> bytes:
    return zmq.auth.load_certificate(str(path))[0]


def _key_pair(path: Path) -> tuple[bytes, bytes]:
    public, secret = zmq.auth.load_certificate(str(path))
    if secret is None:
        raise ClientError(f"{path} holds no secret key: give the client its .key_secret file")
    return public, secret


class Client:
    def __init__(
        self,
        runtime_dir: Path | None = None,
        timeout: float = 10.0,
        connect: str | None = None,
        server_key: Path | None = None,
        client_key: Path | None = None,
    ) -> None:
        """The local daemon through its runtime folder; or, with ``connect`` ("tcp://HOST:PORT"), a
        daemon on another machine, with its public key and this client's secret key (CurveZMQ)."""
        self.timeout = timeout
        self.context = zmq.Context()
        self._socket: zmq.Socket | None = None
        self._ids = itertools.count(1)
        self._curve: tuple[bytes, bytes, bytes] | None = None
        if connect:
            if not (server_key and client_key):
                raise ClientError("a TCP connection needs the server's public key and this client's secret key")
            host, _, port = connect.removeprefix("tcp://").rpartition(":")
            self.request_endpoint, self.event_endpoint = f"tcp://{host}:{port}", f"tcp://{host}:{int(port) + 1}"
            self._curve = (_public_key(server_key), *_key_pair(client_key))
        else:
            self.runtime_dir = Path(runtime_dir) if runtime_dir else default_runtime_dir()
            self.request_endpoint, self.event_endpoint = endpoints(self.runtime_dir)

    def _socket_of(self, kind: int) -> zmq.Socket:
        socket = self.context.socket(kind)
        socket.setsockopt(zmq.LINGER, 0)
        if self._curve:
            socket.curve_serverkey, socket.curve_publickey, socket.curve_secretkey = self._curve
        return socket

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.context.destroy(linger=0)

    def _unreachable(self, why: str) -> DaemonUnreachable:
        if self._curve:
            return DaemonUnreachable(
                f"no diffusiond answers at {self.request_endpoint} ({why}). Is it listening there, and is this "
                "client's public key in its keys/allowed folder?"
            )
        return DaemonUnreachable(
            f"no diffusiond answers at {self.request_endpoint} ({why}). Start one with `diffusiond start`, "
            "or run `diffusiond serve` in a terminal"
        )

    def _check_listening(self, path: Path) -> None:
        """Fail at once where nobody serves the socket, instead of waiting out the timeout: a unix
        socket file that a killed daemon left behind refuses a connection straight away."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(path))
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                why = "its socket does not exist" if isinstance(exc, FileNotFoundError) else "nothing listens on its socket"
                raise self._unreachable(why) from None
            except OSError:
                pass  # any other answer (a path too long to probe, say): let the request find out

    def call(self, op: str, timeout: float | None = None, **fields: Any) -> dict[str, Any]:
        """One request, its reply; RequestFailed for an error reply, DaemonUnreachable for none."""
        if self._socket is None:
            if self._curve is None:
                self._check_listening(Path(self.request_endpoint.removeprefix("ipc://")))
            self._socket = self._socket_of(zmq.DEALER)
            self._socket.connect(self.request_endpoint)
        for name, value in fields.items():
            if why := _unsendable(name, value):
                raise RequestFailed(Code.INVALID_PARAMETER, why)
        request_id = next(self._ids)
        frame = pack({"v": VERSION, "op": op, "id": request_id, **fields})
        if len(frame) > HARD_MESSAGE_BYTES:  # ZeroMQ would drop it unanswered
            raise RequestFailed(Code.MESSAGE_TOO_LARGE, f"the request is {len(frame)} bytes; at most {HARD_MESSAGE_BYTES}")
        self._socket.send(frame)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while (remaining := deadline - time.monotonic()) > 0:
            if not self._socket.poll(int(remaining * 1000) + 1):
                break
            reply = unpack(self._socket.recv())
            # An error without an id answers a request the daemon could not read an id from: with
            # one request in flight on this socket, ours.
            if reply.get("id") != request_id and not (reply.get("id") is None and not reply.get("ok")):
                continue  # a late reply to a request that timed out earlier
            if not reply.get("ok"):
                error = reply.get("error") or {}
                raise RequestFailed(error.get("code", "unknown"), error.get("message", ""))
            return reply
        # The socket may still get that reply later; a fresh one keeps the next call clean.
        self._socket.close()
        self._socket = None
        raise self._unreachable(f"no reply to {op} within {self.timeout if timeout is None else timeout:g}s")

    def ping(self) -> dict[str, Any]:
        return self.call("ping")

    def submit(self, prompt: str, **params: Any) -> dict[str, Any]:
        return self.call("submit", prompt=prompt, **params)["job"]

    def get(self, job_id: str) -> dict[str, Any]:
        return self.call("get", job=job_id)["job"]

    def list(self, states: list[str] | None = None, limit: int = 50, offset: int = 0) -> dict[str, Any]:
        fields: dict[str, Any] = {"limit": limit, "offset": offset}
        if states:
            fields["states"] = states
        return self.call("list", **fields)

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.call("cancel", job=job_id)["job"]

    def cancel_all_queued(self) -> list[str]:
        return self.call("cancel", all_queued=True)["cancelled"]

    def pause(self) -> None:
        self.call("pause")

    def resume(self) -> None:
        self.call("resume")

    def retry(self, job_id: str) -> dict[str, Any]:
        return self.call("retry", job=job_id)["job"]

    def subscribe(self, topics: list[bytes], timeout: float | None = None) -> zmq.Socket:
        """A SUB socket whose subscription is live: it has seen its own `ping` announcement."""
        socket = self._socket_of(zmq.SUB)
        for topic in (*topics, DAEMON_TOPIC):
            socket.setsockopt(zmq.SUBSCRIBE, topic)
        socket.connect(self.event_endpoint)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while time.monotonic() < deadline:
            token = self.call("ping", announce=True)["id"]
            until = min(deadline, time.monotonic() + 0.25)
            while (remaining := until - time.monotonic()) > 0 and socket.poll(int(remaining * 1000) + 1):
                _, body = socket.recv_multipart()
                event = unpack(body)
                if event.get("type") == "daemon.ping" and event.get("token") == token:
                    socket.setsockopt(zmq.UNSUBSCRIBE, DAEMON_TOPIC)
                    return socket
        socket.close()
        raise self._unreachable("its event socket did not confirm the subscription")

    def events(
        self, job_id: str | None = None, topics: list[bytes] | None = None, timeout: float | None = None
    ) -> Iterator[dict[str, Any]]:
        """Events as they come, with ``job.resync`` events (the job from `get`) where some were lost.

        ``timeout`` bounds the wait for each event (None: wait as long as it takes). Filtered to one
        job, it yields that job's current state first, and stops after the job finishes.
        """
        if topics is None:
            topics = [f"job.{job_id}".encode()] if job_id else [b"job.", b"model.", DAEMON_TOPIC]
        socket = self.subscribe(topics)
        last: dict[bytes, int] = {}
        try:
            if job_id:
                job = self.get(job_id)
                yield {"type": "job.resync", "job": job_id, "state": job, "missed": False}
                if job["state"] in FINISHED:
                    return
            while True:
                if not socket.poll(None if timeout is None else int(timeout * 1000)):
                    raise WaitTimeout(f"no event within {timeout:g}s")
                topic, body = socket.recv_multipart()
                event = unpack(body)
                seen = last.get(topic)
                if seen is not None and event.get("topic_seq") != seen + 1 and topic.startswith(b"job."):
                    missed = topic.decode().removeprefix("job.")
                    yield {"type": "job.resync", "job": missed, "state": self.get(missed), "missed": True}
                last[topic] = event.get("topic_seq", 0)
                if event.get("type") in _TERMINAL_EVENTS or event.get("type") == "job.requeued":
                    del last[topic]  # the daemon starts this topic's count again
                yield event
                if job_id and event.get("job") == job_id and event.get("type") in _TERMINAL_EVENTS:
                    return
        finally:
            socket.close()

    def wait(
        self,
        job_id: str,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        timeout: float | None = None,
        poll_every: float = 2.0,
    ) -> dict[str, Any]:
        """The finished job; JobFailed / JobCancelled / WaitTimeout otherwise.

        Events drive progress; `get` every ``poll_every`` seconds without one covers a lost final event.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        job = self.get(job_id)
        topics = [f"job.{job_id}".encode(), f"model.{job['model']}".encode()]
        socket = self.subscribe(topics)
        try:
            job = self.get(job_id)  # anything that happened before the subscription went live
            while job["state"] not in FINISHED:
                wait = poll_every if deadline is None else min(poll_every, deadline - time.monotonic())
                if wait <= 0:
                    raise WaitTimeout(f"job {job_id} is still {job['state']} after {timeout:g}s")
                if socket.poll(int(wait * 1000) + 1):
                    _, body = socket.recv_multipart()
                    event = unpack(body)
                    if on_event is not None:
                        on_event(event)
                    if event.get("type") not in _TERMINAL_EVENTS:
                        continue
                job = self.get(job_id)
        finally:
            socket.close()
        if job["state"] == "failed":
            raise JobFailed(job)
        if job["state"] == "cancelled":
            raise JobCancelled(job)
        return job
