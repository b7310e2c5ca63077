"""`diffusiond worker`: capacity on another machine, taking jobs from a daemon's queue over TCP.

The main thread owns the CurveZMQ connection: it says hello, asks for a job when the engine is
free, forwards the engine's progress and results, and beats its heart every second whatever the
engine is doing. The engine thread runs jobs through warm models, like the daemon's own worker.
A daemon silent for its timeout is given up: the job in hand is dropped (the daemon requeues it
when it comes back), and the worker connects afresh and says hello again.
"""

from __future__ import annotations

import logging
import queue as queues
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from diffusiond.clients.protocol import Code, pack, unpack

from ..config import Config
from ..engine.png import encode_result
from .jobs import outcome
from .remote_dispatch import HEARTBEAT, MAX_RESULT_BYTES, WORKER_PROTOCOL
from .warm import WarmModels
from .worker import job_request, progress_reporter, summary

log = logging.getLogger("diffusiond.remote_worker")
ENGINE_OUT = "inproc://remote-worker-engine"


def worker_endpoint(connect: str) -> str:
    """The daemon's worker port: the address clients use, port + 2."""
    host, _, port = connect.rpartition(":")
    if not host.startswith("tcp://") or not port.isdigit():
        raise ValueError(f"--connect must look like tcp://HOST:PORT (the daemon's tcp setting), got {connect!r}")
    return f"{host}:{int(port) + 2}"


class Engine(threading.Thread):
    """Runs one job at a time; everything it says goes out through the main thread."""

    def __init__(self, config: Config, context: zmq.Context) -> None:
        super().__init__(name="engine", daemon=True)
        self.context = context
        self.inbox: queues.SimpleQueue[dict[str, Any] | None] = queues.SimpleQueue()
        self.current: str | None = None
        self.cancels: set[str] = set()  # asked by the daemon: report `cancelled`
        self.dropped: set[str] = set()  # the daemon is gone or forgot it: report nothing
        self.models = WarmModels(config, self._emit)

    def _emit(self, topic: bytes, body: dict[str, Any]) -> None:
        body["ts"] = time.time()
        self.out.send(pack({"op": "event", "topic": topic, "body": body}))

    def run(self) -> None:
        self.out = self.context.socket(zmq.PUSH)
        self.out.connect(ENGINE_OUT)
        try:
            while (job := self.inbox.get()) is not None:
                self.current = job["job"]
                reply = self._run(job)
                self.current = None
                self.out.send(pack(reply))
        finally:
            self.out.close(linger=1000)

    def _run(self, job: dict[str, Any]) -> dict[str, Any]:
        job_id = job["job"]
        try:
            request = job_request(job["params"], job["init_image"])
            result = self.models.generate(
                job["model"], request, progress_reporter(job_id, self._emit, lambda _topic: bool(job["previews"])),
                lambda: job_id in self.cancels or job_id in self.dropped,
            )
            return {"op": "done", "job": job_id, "pngs": encode_result(result, job["model"]), "summary": summary(result)}
        except Exception as exc:
            # Dropped (the daemon is gone or forgot the job): it requeues the job itself.
            end = outcome(job_id, exc, cancel_asked=job_id not in self.dropped)
            if end.requeue:
                return {"op": "dropped", "job": job_id}
            if end.code == Code.CANCELLED:
                return {"op": "cancelled", "job": job_id}
            return {"op": "failed", "job": job_id, "code": end.code, "message": end.message}
        finally:
            self.cancels.discard(job_id)
            self.dropped.discard(job_id)

    def drop(self) -> None:
        if self.current is not None:
            self.dropped.add(self.current)


class RemoteWorker:
    def __init__(self, config: Config, connect: str, server_key: Path, worker_key: Path, name: str | None = None) -> None:
        self.config = config
        self.endpoint = worker_endpoint(connect)
        self.server_public, _ = zmq.auth.load_certificate(str(server_key))
        self.public, self.secret = zmq.auth.load_certificate(str(worker_key))
        if self.secret is None:
            raise ValueError(f"{worker_key} holds no secret key: give the NAME.key_secret file")
        self.name = name or socket.gethostname()
        self.stopping = False
        self.refused = False
        self.busy = False

    def _connect(self) -> zmq.Socket:
        link = self.context.socket(zmq.DEALER)
        link.curve_serverkey, link.curve_publickey, link.curve_secretkey = self.server_public, self.public, self.secret
        link.setsockopt(zmq.LINGER, 0)
        link.setsockopt(zmq.IMMEDIATE, 1)  # nothing queued for a connection that is not up
        link.setsockopt(zmq.MAXMSGSIZE, MAX_RESULT_BYTES)
        link.connect(self.endpoint)
        self.welcomed = False
        self.heard = time.monotonic()
        return link

    def run(self) -> int:
        self.context = zmq.Context()
        engine_out = self.context.socket(zmq.PULL)
        engine_out.bind(ENGINE_OUT)
        engine = Engine(self.config, self.context)
        engine.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: setattr(self, "stopping", True))
        link = self._connect()
        poller = self._poller(link, engine_out)
        timeout, last_beat = self.config.worker_timeout, 0.0
        log.info("worker %s connecting to %s", self.name, self.endpoint)
        try:
            while not self.stopping:
                now = time.monotonic()
                if now - last_beat >= HEARTBEAT:
                    last_beat = now
                    self._send(link, {"op": "heartbeat"} if self.welcomed else {"op": "hello", "v": WORKER_PROTOCOL,
                                                                                "name": self.name})
                if now - self.heard > timeout:
                    if self.welcomed:
                        log.warning("the daemon is silent for %.0fs: dropping the job in hand and connecting again",
                                    timeout)
                    else:
                        log.warning("no answer from %s in %.0fs: is the daemon running with tcp set, and is this "
                                    "worker's public key in its keys/allowed_workers/? Trying again", self.endpoint,
                                    timeout)
                    engine.drop()
                    link.close()
                    link = self._connect()
                    poller = self._poller(link, engine_out)
                    continue
                events = dict(poller.poll(100))
                if link in events:
                    timeout = self._from_daemon(link, engine, timeout)
                if engine_out in events:
                    self._from_engine(link, engine_out)
        finally:
            if engine.current is not None:
                self._send(link, {"op": "requeue", "job": engine.current, "reason": f"worker {self.name} stopping"})
                engine.drop()
            engine.inbox.put(None)
            engine.join(timeout=30)
            link.close()
            engine_out.close(linger=0)
            self.context.term()
            log.info("worker %s stopped", self.name)
        return 2 if self.refused else 0

    @staticmethod
    def _poller(*sockets: zmq.Socket) -> zmq.Poller:
        poller = zmq.Poller()
        for s in sockets:
            poller.register(s, zmq.POLLIN)
        return poller

    def _send(self, link: zmq.Socket, message: dict[str, Any]) -> None:
        try:
            link.send(pack(message), zmq.NOBLOCK)
        except zmq.Again:
            pass  # not connected: the next heartbeat or hello tries again

    def _from_daemon(self, link: zmq.Socket, engine: Engine, timeout: float) -> float:
        while True:
            try:
                message = unpack(link.recv(zmq.NOBLOCK))
            except zmq.Again:
                return timeout
            except Exception:
                continue
            if not isinstance(message, dict):
                continue
            self.heard = time.monotonic()
            op = message.get("op")
            if op == "welcome":
                self.welcomed = True
                timeout = float(message.get("timeout", timeout))
                log.info("worker %s joined the daemon at %s", self.name, self.endpoint)
                if not self.busy:
                    self._send(link, {"op": "ready"})
            elif op == "job" and not self.busy:
                self.busy = True
                engine.inbox.put(message)
            elif op == "cancel" and message.get("job") == engine.current:
                engine.cancels.add(message["job"])
            elif op == "reset":  # the daemon forgot us (it restarted): whatever we run is no longer ours
                engine.drop()
                self.welcomed = False
                self._send(link, {"op": "hello", "v": WORKER_PROTOCOL, "name": self.name})
            elif op == "refused":
                log.error("the daemon refused this worker: %s", message.get("reason"))
                self.stopping = self.refused = True

    def _from_engine(self, link: zmq.Socket, engine_out: zmq.Socket) -> None:
        while True:
            try:
                message = unpack(engine_out.recv(zmq.NOBLOCK))
            except zmq.Again:
                return
            if message["op"] != "event":
                self.busy = False
                if message["op"] != "dropped":
                    self._send(link, message)
                if self.welcomed:
                    self._send(link, {"op": "ready"})
                continue
            self._send(link, message)
