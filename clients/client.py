"""`Client`: the Python API of a running daemon, on which `diffuse` and the hot folder are built.

    from diffusiond.clients import Client
    with Client() as client:
        job = client.submit("a lighthouse at dusk", steps=25, seed=42)
        done = client.wait(job["id"], on_event=print)
        print(done["outputs"])
        with client.subscribe([b"model."]) as events:  # live once it returns
            for event in events.until(time.monotonic() + 60):  # what comes within a minute
                print(event["type"])

Every request has a deadline; a wait for events has one unless you ask for none (None).
"""

from __future__ import annotations

import itertools
import math
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
    Event,
    default_runtime_dir,
    endpoints,
    job_topic,
    model_topic,
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


_TERMINAL_EVENTS = {Event.JOB_DONE, Event.JOB_FAILED, Event.JOB_CANCELLED}
# After these the daemon counts the job's topic from 1 again (a retried or requeued job runs again).
_LAST_OF_A_RUN = {*_TERMINAL_EVENTS, Event.JOB_REQUEUED}


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


class Subscription:
    """Events of some topics, live from the moment `Client.subscribe` returns it: each a dict, each
    wait with a deadline. Where the daemon dropped some of a job's events (a jump in its topic's
    ``topic_seq``: PUB drops for a subscriber that falls behind), a ``job.resync`` carrying the job
    from `get` comes before the event that showed the gap. Close it, or use it in a ``with``."""

    def __init__(self, socket: zmq.Socket, get: Callable[[str], dict[str, Any]] | None) -> None:
        self._socket = socket
        self._get = get  # None: no resync
        self._last: dict[bytes, int] = {}  # a job topic → the topic_seq seen last
        self._held: dict[str, Any] | None = None  # the event that showed a gap, due after its resync

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._socket.close()

    def next(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next event; None when none comes within ``timeout`` seconds (None: no limit)."""
        if self._held is not None:
            held, self._held = self._held, None
            return held
        if not self._socket.poll(None if timeout is None else max(0, math.ceil(timeout * 1000))):
            return None
        topic, body = self._socket.recv_multipart()
        event: dict[str, Any] = unpack(body)
        if self._get is None or not topic.startswith(b"job."):
            return event
        seen = self._last.get(topic)
        self._last[topic] = event.get("topic_seq", 0)
        if event.get("type") in _LAST_OF_A_RUN:
            del self._last[topic]
        if seen is None or event.get("topic_seq") == seen + 1:
            return event
        self._held = event
        job_id = topic.decode().removeprefix("job.")
        return {"type": Event.JOB_RESYNC, "job": job_id, "state": self._get(job_id), "missed": True}

    def until(self, deadline: float | None) -> Iterator[dict[str, Any]]:
        """Events as they come, until none has come by ``deadline`` (a `time.monotonic()` time;
        None: for ever). A deadline already past yields only what has arrived."""
        while (event := self.next(None if deadline is None else deadline - time.monotonic())) is not None:
            yield event

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.until(None)


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

    def jobs(self, states: list[str] | None = None, limit: int = 50, offset: int = 0) -> dict[str, Any]:
        """A page of jobs, newest first (``jobs``), and how many there are in each state (``counts``)."""
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

    def subscribe(self, topics: list[bytes], timeout: float | None = None, resync: bool = True) -> Subscription:
        """A subscription that is live (it has seen its own `ping` announcement) within ``timeout``
        seconds, else DaemonUnreachable. ``resync``: a ``job.resync`` where a job's events were lost."""
        socket = self._socket_of(zmq.SUB)
        for topic in (*topics, DAEMON_TOPIC):
            socket.setsockopt(zmq.SUBSCRIBE, topic)
        socket.connect(self.event_endpoint)
        subscription = Subscription(socket, self.get if resync else None)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while time.monotonic() < deadline:
            token = self.call("ping", announce=True)["id"]
            for event in subscription.until(min(deadline, time.monotonic() + 0.25)):
                if event.get("type") == Event.DAEMON_PING and event.get("token") == token:
                    socket.setsockopt(zmq.UNSUBSCRIBE, DAEMON_TOPIC)
                    return subscription
        subscription.close()
        raise self._unreachable("its event socket did not confirm the subscription")

    def events(
        self, job_id: str | None = None, topics: list[bytes] | None = None, timeout: float | None = None
    ) -> Iterator[dict[str, Any]]:
        """Events as they come, with ``job.resync`` events (the job from `get`) where some were lost.

        ``timeout`` bounds the wait for each event (None: wait as long as it takes). Filtered to one
        job, it yields that job's current state first, and stops after the job finishes.
        """
        if topics is None:
            topics = [job_topic(job_id)] if job_id else [b"job.", b"model.", DAEMON_TOPIC]
        with self.subscribe(topics) as subscription:
            if job_id:
                job = self.get(job_id)
                yield {"type": Event.JOB_RESYNC, "job": job_id, "state": job, "missed": False}
                if job["state"] in FINISHED:
                    return
            while True:
                event = subscription.next(timeout)
                if event is None:
                    raise WaitTimeout(f"no event within {timeout:g}s")
                yield event
                if job_id and event.get("job") == job_id and event.get("type") in _TERMINAL_EVENTS:
                    return

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
        with self.subscribe([job_topic(job_id), model_topic(job["model"])]) as subscription:
            job = self.get(job_id)  # anything that happened before the subscription went live
            while job["state"] not in FINISHED:
                wait = poll_every if deadline is None else min(poll_every, deadline - time.monotonic())
                if wait <= 0:
                    raise WaitTimeout(f"job {job_id} is still {job['state']} after {timeout:g}s")
                event = subscription.next(wait)
                if event is not None and event.get("type") == Event.JOB_RESYNC:
                    job = event["state"]
                    continue
                if event is not None:
                    if on_event is not None:
                        on_event(event)
                    if event.get("type") not in _TERMINAL_EVENTS:
                        continue
                job = self.get(job_id)
        if job["state"] == "failed":
            raise JobFailed(job)
        if job["state"] == "cancelled":
            raise JobCancelled(job)
        return job
