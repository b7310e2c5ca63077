"""The daemon's side of remote workers: who is connected, which job each runs, heartbeats both ways.

A remote worker (`diffusiond worker --connect`, daemon/service/remote_worker.py) is a DEALER on the
daemon's worker port (TCP port + 2, CurveZMQ, keys in allowed_workers/). They talk in msgpack
maps with an `op` (docs/protocol.md, "Remote workers"):

    worker → daemon: hello {v, name}, ready, heartbeat, event {topic, body},
                     done {job, pngs, summary}, failed {job, code, message}, cancelled {job},
                     requeue {job, reason}
    daemon → worker: welcome {heartbeat, timeout}, job {job, attempt, model, params, init_image,
                     previews}, cancel {job}, heartbeat, reset

The queue stays the record: a job handed out is `running` in SQLite like a local one. A worker
silent for `worker_timeout` seconds is lost and its job goes back to the queue at its old place;
a result that arrives for a job the worker no longer holds is dropped, so a job ends once. The
daemon writes the images itself (the same atomic write, the same names by job id as local jobs).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq
from diffusiond.clients.protocol import (
    DAEMON_TOPIC,
    Code,
    Event,
    ProtocolError,
    job_topic,
    pack,
    preview_topic,
    unpack,
)

from .jobs import Jobs, Publish

log = logging.getLogger("diffusiond.dispatch")
WORKER_PROTOCOL = 1
HEARTBEAT = 1.0  # seconds between heartbeats, each way
MAX_RESULT_BYTES = 512 * 1024 * 1024  # one worker message: up to 16 images of 2048² as PNG
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SUMMARY_FIELDS = ("seed", "width", "height", "flagged", "prompt_dropped", "timings")
_WORKER_EVENTS = {Event.JOB_PROGRESS, Event.JOB_PREVIEW, Event.MODEL_DOWNLOADING, Event.MODEL_DOWNLOAD,
                  Event.MODEL_DOWNLOADED, Event.MODEL_LOADING, Event.MODEL_COMPILING, Event.MODEL_COMPILED,
                  Event.MODEL_LOADED, Event.MODEL_UNLOADED}


def _json_safe(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


@dataclass
class Peer:
    identity: bytes
    name: str
    seen: float
    idle: bool = False
    job: str | None = None


class RemoteWorkers:
    """Owned by the server's thread: it shares the server's queue connection and publisher."""

    def __init__(self, socket: zmq.Socket, jobs: Jobs, publish: Publish, timeout: float,
                 previews: Callable[[], bool]) -> None:
        self.socket = socket
        self.jobs = jobs
        self.publish = publish
        self.timeout = timeout
        self.previews = previews
        self.peers: dict[bytes, Peer] = {}
        self.last_beat = 0.0

    def connected(self) -> list[dict[str, Any]]:
        return [{"name": p.name, "job": p.job} for p in self.peers.values()]

    def _send(self, identity: bytes, message: dict[str, Any]) -> None:
        try:
            self.socket.send_multipart([identity, pack(message)], zmq.NOBLOCK)
        except zmq.Again:
            log.warning("worker %r is not reading; a message to it was dropped", identity)

    # -- from the workers --------------------------------------------------------------------

    def receive(self) -> None:
        while True:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                continue
            identity, body = frames
            try:
                message = unpack(body)
                if not isinstance(message, dict) or not isinstance(message.get("op"), str):
                    raise ProtocolError(Code.BAD_MESSAGE, "a worker message is a map with an op")
                self._handle(identity, message)
            except ProtocolError as exc:
                log.warning("dropped a message from worker %r: %s", identity, exc.message)
            except Exception:
                # A worker's bad message must not stop the daemon: its job, if any, is requeued
                # when the worker goes silent or says ready again.
                log.exception("dropped a message from worker %r that could not be handled", identity)

    def _handle(self, identity: bytes, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "hello":
            self._hello(identity, message)
            return
        peer = self.peers.get(identity)
        if peer is None:  # this daemon restarted, or had given the worker up: it must say hello again
            self._send(identity, {"op": "reset"})
            return
        peer.seen = time.monotonic()
        if op == "heartbeat":
            return
        if op == "ready":
            if peer.job is not None:
                self._requeue(peer, f"worker {peer.name} dropped it")
            peer.idle = True
            self.dispatch()
            return
        if op == "event":
            self._event(peer, message)
            return
        job_id = message.get("job")
        if not isinstance(job_id, str) or job_id != peer.job:
            log.info("worker %s reported on job %r, which it does not hold; ignored", peer.name, job_id)
            return
        if op == "done":
            self._done(peer, job_id, message)
        elif op == "failed":
            code, text = str(message.get("code", Code.INTERNAL)), str(message.get("message", ""))
            self.jobs.failed(job_id, code, text, worker=peer.name)
        elif op == "cancelled":
            self.jobs.cancelled(job_id, worker=peer.name)
        elif op == "requeue":
            self._requeue(peer, str(message.get("reason", f"worker {peer.name} gave it back")))
            self.dispatch()
            return
        else:
            log.warning("worker %s sent an unknown op %r", peer.name, op)
            return
        peer.job = None  # only once the queue has the outcome: else its next `ready` requeues the job

    def _hello(self, identity: bytes, message: dict[str, Any]) -> None:
        name = str(message.get("name", "worker"))[:64]
        if type(message.get("v")) is not int or message["v"] != WORKER_PROTOCOL:  # true == 1 in Python
            self._send(identity, {"op": "refused", "reason": f"this daemon speaks worker protocol {WORKER_PROTOCOL}"})
            return
        old = self.peers.get(identity)
        if old is not None and old.job is not None:
            self._requeue(old, f"worker {old.name} started again")
        self.peers[identity] = Peer(identity, name, time.monotonic())
        self._send(identity, {"op": "welcome", "heartbeat": HEARTBEAT, "timeout": self.timeout})
        log.info("worker %s joined", name)
        self.publish(DAEMON_TOPIC, {"type": Event.WORKER_JOINED, "worker": name})

    def _event(self, peer: Peer, message: dict[str, Any]) -> None:
        """Progress and model events, republished as the daemon's own, marked with the worker."""
        topic, body = message.get("topic"), message.get("body")
        if not isinstance(topic, bytes) or not isinstance(body, dict) or body.get("type") not in _WORKER_EVENTS:
            return
        own_job = peer.job is not None and topic in (job_topic(peer.job), preview_topic(peer.job))
        if own_job or topic.startswith(b"model."):
            self.publish(topic, {**body, "worker": peer.name})

    def _done(self, peer: Peer, job_id: str, message: dict[str, Any]) -> None:
        job = self.jobs.queue.get(job_id)
        pngs = message.get("pngs")
        if (not isinstance(pngs, list) or not 0 < len(pngs) <= job.params.get("count", 1)
                or not all(isinstance(p, bytes) and p.startswith(_PNG_SIGNATURE) for p in pngs)):
            self.jobs.failed(job_id, Code.INTERNAL, f"worker {peer.name} sent a result that is not the job's PNGs")
            return
        raw = message.get("summary")
        raw = raw if isinstance(raw, dict) else {}
        summary = {key: raw[key] for key in _SUMMARY_FIELDS if key in raw and _json_safe(raw[key])}
        self.jobs.done(job_id, pngs, summary, worker=peer.name)

    def _requeue(self, peer: Peer, reason: str) -> None:
        job_id, peer.job = peer.job, None
        if job_id is not None:
            self.jobs.let_go(job_id, reason)

    # -- to the workers ----------------------------------------------------------------------

    def tick(self) -> None:
        """Heartbeats out and silent workers given up; called every loop. Work goes out when a
        worker says ready and after submits (server), a lost worker's job at once, and anything
        else within a heartbeat: no queue query on every turn of the loop."""
        now = time.monotonic()
        lost = [p for p in self.peers.values() if now - p.seen > self.timeout]
        for peer in lost:
            del self.peers[peer.identity]
            log.warning("worker %s lost: silent for %.0fs", peer.name, now - peer.seen)
            self.publish(DAEMON_TOPIC, {"type": Event.WORKER_LOST, "worker": peer.name})
            if peer.job is not None:
                self._requeue(peer, f"worker {peer.name} lost")
        beat = now - self.last_beat >= HEARTBEAT
        if beat:
            self.last_beat = now
            for identity in self.peers:
                self._send(identity, {"op": "heartbeat"})
        if beat or lost:
            self.dispatch()

    def dispatch(self) -> None:
        idle = [p for p in self.peers.values() if p.idle]
        if not idle or self.jobs.queue.paused():
            return
        for peer in idle:
            job = self.jobs.claim_next(worker=peer.name)
            if job is None:
                return
            peer.idle, peer.job = False, job.id
            self._send(peer.identity, {
                "op": "job", "job": job.id, "attempt": job.attempts, "model": job.model, "params": job.params,
                "init_image": self.jobs.queue.init_image(job.id), "previews": self.previews(),
            })

    def cancel(self, job_id: str) -> bool:
        """Ask the worker running the job to stop it; False when no remote worker runs it."""
        for peer in self.peers.values():
            if peer.job == job_id:
                self._send(peer.identity, {"op": "cancel", "job": job_id})
                return True
        return False

    def stop(self) -> None:
        """The daemon is stopping: remote jobs back to the queue, their workers told to drop them."""
        for peer in self.peers.values():
            if peer.job is not None:
                self._send(peer.identity, {"op": "cancel", "job": peer.job})
                self._requeue(peer, "daemon stopping")
