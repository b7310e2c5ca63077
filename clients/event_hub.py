"""One subscription to every daemon event, shared by the whole HTTP server.

A thread reads the daemon's events through `Client.subscribe` (resync included) and keeps what the
HTTP side asks for without a round trip to the daemon: the running job's step and preview (A1111's
/progress), the recent events for Server-Sent Events with their sequence numbers (a reconnecting
browser resumes from Last-Event-ID), and who waits for which job to finish (txt2img). Readers on
the asyncio side are handed events with `loop.call_soon_threadsafe`; nothing here blocks the loop.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .client import Client, ClientError
from .protocol import DAEMON_TOPIC, FINISHED, Event

HISTORY = 1000  # events kept for Last-Event-ID resumes (previews are live only)
ENDED = 1000  # the final events of the jobs that ended last, for a waiter that comes after the end
SUBSCRIBER_BACKLOG = 2000  # events queued for one SSE reader before it is dropped (it reconnects and resumes)
_TERMINAL = {Event.JOB_DONE, Event.JOB_FAILED, Event.JOB_CANCELLED}


def wire_event(event: dict[str, Any]) -> dict[str, Any]:
    """An event as JSON can carry it: binary fields (a preview's JPEG) as base64 text."""
    return {key: base64.b64encode(value).decode() if isinstance(value, bytes) else value for key, value in event.items()}


def _settle(future: asyncio.Future[dict[str, Any]], event: dict[str, Any]) -> None:
    if not future.done():
        future.set_result(event)


@dataclass(eq=False)  # a reader is itself, kept in a set
class _Reader:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[dict[str, Any] | None]


@dataclass
class Running:
    """The job a runner works on now, as /progress reports it."""

    job: str
    started: float
    step: int = 0
    total: int = 0
    eta: float = 0.0
    preview: bytes | None = None
    cancelling: bool = False


class EventHub:
    def __init__(self, client_factory: Callable[[], Client], history: int = HISTORY) -> None:
        self._client_factory = client_factory
        self._lock = threading.Lock()
        self._history: collections.deque[dict[str, Any]] = collections.deque(maxlen=history)
        self._readers: set[_Reader] = set()
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Future[dict[str, Any]]]]] = {}
        self._ended: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self._running: dict[str, Running] = {}
        self._stop = threading.Event()
        self._tried = threading.Event()
        self._thread = threading.Thread(target=self._run, name="event-hub", daemon=True)

    def start(self, timeout: float = 10.0) -> None:
        """Start reading; returns once the first try at subscribing has ended, live or not (a daemon
        that is not there yet is tried again every second)."""
        self._thread.start()
        self._tried.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            for reader in self._readers:
                reader.loop.call_soon_threadsafe(reader.queue.put_nowait, None)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self._client_factory() as client, \
                        client.subscribe([b"job.", b"preview.", b"model.", DAEMON_TOPIC]) as events:
                    self._tried.set()
                    while not self._stop.is_set():
                        event = events.next(0.25)
                        if event is not None:
                            self._publish(event)
            except ClientError:
                self._tried.set()
                self._stop.wait(1.0)

    # --- the thread's side -------------------------------------------------------------------------

    def _publish(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        job = event.get("job")
        with self._lock:
            if kind == Event.JOB_RESYNC:
                self._resync(event["state"])
            elif kind == Event.JOB_STARTED and job:
                self._running[job] = Running(job, event.get("ts", time.time()))
            elif kind == Event.JOB_PROGRESS and job:
                running = self._running.setdefault(job, Running(job, event.get("ts", time.time())))
                running.step, running.total, running.eta = event.get("step", 0), event.get("total", 0), event.get("eta", 0.0)
            elif kind == Event.JOB_PREVIEW and job and job in self._running:
                self._running[job].preview = event.get("jpeg")
            elif kind in (*_TERMINAL, Event.JOB_REQUEUED) and job:
                self._running.pop(job, None)
            if kind != Event.JOB_PREVIEW and "seq" in event:
                self._history.append(event)
            wire = wire_event(event)
            for reader in list(self._readers):
                reader.loop.call_soon_threadsafe(self._deliver, reader, wire)
            if job and (kind in _TERMINAL or (kind == Event.JOB_RESYNC and event["state"]["state"] in FINISHED)):
                self._ended[job] = event
                while len(self._ended) > ENDED:
                    self._ended.popitem(last=False)
                self._wake(job, event)
            elif job and kind in (Event.JOB_QUEUED, Event.JOB_REQUEUED):
                self._ended.pop(job, None)  # a retried job runs again

    def _resync(self, job: dict[str, Any]) -> None:
        if job["state"] == "running":
            self._running.setdefault(job["id"], Running(job["id"], job.get("started") or time.time()))
        else:
            self._running.pop(job["id"], None)

    def _deliver(self, reader: _Reader, event: dict[str, Any]) -> None:
        """On the reader's loop: queue it, or drop a reader that fell too far behind."""
        if reader.queue.qsize() >= SUBSCRIBER_BACKLOG:
            self.unsubscribe(reader)
            reader.queue.put_nowait(None)
            return
        reader.queue.put_nowait(event)

    def _wake(self, job: str, event: dict[str, Any]) -> None:
        for loop, future in self._waiters.pop(job, []):
            loop.call_soon_threadsafe(_settle, future, event)

    # --- the asyncio side --------------------------------------------------------------------------

    def subscribe(self, after: int | None) -> tuple[_Reader, list[dict[str, Any]]]:
        """A live reader and the held events with a sequence number above ``after`` (none when None).
        A number above every held one means the daemon restarted (its counter starts again): all of
        them are replayed."""
        reader = _Reader(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            self._readers.add(reader)
            held = list(self._history)
        if after is None:
            return reader, []
        if held and after > held[-1]["seq"]:
            after = -1
        return reader, [wire_event(event) for event in held if event["seq"] > after]

    def unsubscribe(self, reader: _Reader) -> None:
        with self._lock:
            self._readers.discard(reader)

    def reader_count(self) -> int:
        with self._lock:
            return len(self._readers)

    def finished(self, job: str) -> asyncio.Future[dict[str, Any]]:
        """A future set to the event that ends ``job`` (done, failed, cancelled, or a resync to one of
        these): at once where it has ended already. Events can be lost (PUB drops, a daemon away):
        the caller also asks the daemon now and then."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        with self._lock:
            if job in self._ended:
                future.set_result(self._ended[job])
            else:
                self._waiters.setdefault(job, []).append((asyncio.get_running_loop(), future))
        return future

    def forget(self, job: str, future: asyncio.Future[dict[str, Any]]) -> None:
        with self._lock:
            waiters = [w for w in self._waiters.get(job, []) if w[1] is not future]
            if waiters:
                self._waiters[job] = waiters
            else:
                self._waiters.pop(job, None)

    def running(self) -> Running | None:
        """The job started most recently among those running now."""
        with self._lock:
            return max(self._running.values(), key=lambda r: r.started, default=None)

    def running_ids(self) -> list[str]:
        with self._lock:
            return list(self._running)

    def mark_cancelling(self, job: str) -> None:
        with self._lock:
            if job in self._running:
                self._running[job].cancelling = True
