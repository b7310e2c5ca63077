"""`Client.subscribe`'s events against the real daemon: deadlines kept, lost events resynced."""

from __future__ import annotations

import time

import msgpack

from diffusiond.clients import Client
from diffusiond.clients.protocol import DAEMON_TOPIC, Event

# More events than the daemon queues for one subscriber that does not read (10,000), plus what the
# socket buffers between them hold (measured: a subscriber that read nothing got 9,998 of 30,000):
# past this many, the daemon drops events for that subscriber.
FLOOD = 15_000
PIPELINED = 500  # requests in flight at once: fewer than a socket's 1,000 before replies are dropped


def flood_with_pause_events(daemon, count: int) -> None:
    """``count`` `daemon.paused` events, as fast as the daemon answers: pauses, pipelined."""
    socket = daemon.client()
    try:
        for start in range(0, count, PIPELINED):
            batch = range(start, min(count, start + PIPELINED))
            for request_id in batch:
                socket.send(msgpack.packb({"v": 1, "op": "pause", "id": request_id}))
            for _ in batch:
                assert daemon.receive(socket)["ok"]
    finally:
        socket.close()


def test_a_deadline_yields_what_comes_before_it_and_returns_when_it_passes(daemon) -> None:
    with Client(daemon.runtime_dir) as client:
        client.pause()
        try:
            with client.subscribe([b"job."]) as events:
                job = client.submit("held", steps=1, width=64, height=64)
                started = time.monotonic()
                seen = list(events.until(started + 1.0))
                waited = time.monotonic() - started
                assert [(e["type"], e["job"]) for e in seen] == [(Event.JOB_QUEUED, job["id"])]
                assert 1.0 <= waited < 1.5, f"returned after {waited:.2f}s for a 1 s deadline"

                started = time.monotonic()
                assert list(events.until(started)) == [] and events.next(0) is None
                assert time.monotonic() - started < 0.1, "a deadline already past still waited"
            client.cancel(job["id"])
        finally:
            client.resume()


def test_events_the_daemon_dropped_come_back_as_one_resync_with_the_job_as_it_is(daemon) -> None:
    with Client(daemon.runtime_dir, timeout=30) as client:
        client.pause()
        try:
            with client.subscribe([b"job.", DAEMON_TOPIC]) as events:
                job_id = client.submit("held while its events are lost", steps=1, width=64, height=64)["id"]
                first = events.next(10)
                assert first is not None and (first["type"], first["job"]) == (Event.JOB_QUEUED, job_id)

                flood_with_pause_events(daemon, FLOOD)  # unread: the daemon drops what does not fit
                client.cancel(job_id)  # its job.cancelled is dropped too
                drained = list(events.until(time.monotonic() + 2))
                paused = sum(e["type"] == Event.DAEMON_PAUSED for e in drained)
                assert paused < FLOOD, "nothing was dropped: the flood is too small to test a resync"
                assert [e for e in drained if e["type"] != Event.DAEMON_PAUSED] == []

                client.retry(job_id)  # its topic counts from 1 again: the client saw 1, then missed 2
                resync, queued = events.next(10), events.next(10)
                assert resync is not None and queued is not None
                assert (resync["type"], resync["job"], resync["missed"]) == (Event.JOB_RESYNC, job_id, True)
                assert resync["state"] == client.get(job_id) and resync["state"]["state"] == "queued"
                assert (queued["type"], queued["job"], queued["topic_seq"]) == (Event.JOB_QUEUED, job_id, 1)
                assert list(events.until(time.monotonic() + 0.5)) == []  # one resync, nothing more
            client.cancel(job_id)
        finally:
            client.resume()
