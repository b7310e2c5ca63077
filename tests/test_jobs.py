"""The job lifecycle's guarantees, held by daemon/service/jobs.py for every caller (the local
worker, remote workers, requests, a stop): the row is committed before its event is published,
and a run ends with exactly one ending event. A real SQLite queue; the events are collected by
the publish callable the server and the worker hand in."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from diffusiond.clients.protocol import Code, Event, job_topic
from diffusiond.daemon.errors import Cancelled, InvalidParameter
from diffusiond.daemon.service.jobs import Jobs, outcome
from diffusiond.daemon.service.queue import JobQueue

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 16


@pytest.fixture
def lifecycle(tmp_path: Path):
    """Jobs over a real queue file; each event is recorded with the job's state as another
    connection (another thread's, or after a crash) reads it at the moment of publishing."""
    database = tmp_path / "queue.sqlite3"
    queue = JobQueue(database)
    reader = sqlite3.connect(database)
    events: list[tuple[bytes, dict[str, Any], str]] = []

    def publish(topic: bytes, body: dict[str, Any]) -> None:
        state = reader.execute("SELECT state FROM jobs WHERE id = ?", (body["job"],)).fetchone()[0]
        events.append((topic, body, state))

    yield Jobs(queue, publish), events, tmp_path
    reader.close()
    queue.close()


def submit(jobs: Jobs, folder: Path) -> str:
    job, _ = jobs.submit({"prompt": "a"}, "tiny", str(folder), 0, None, None, 100, None)
    return job.id


def types(events: list) -> list[str]:
    return [body["type"] for _, body, _ in events]


def test_every_event_is_published_after_its_row_is_committed(lifecycle) -> None:
    jobs, events, folder = lifecycle
    first, second = submit(jobs, folder), submit(jobs, folder)
    jobs.claim_next()
    jobs.done(first, [PNG], {"seed": 1})
    jobs.claim_next(worker="gpu1")
    jobs.failed(second, "model_invalid", "broken", worker="gpu1")
    jobs.retry(second)
    jobs.claim_next()
    jobs.requeued(second, "daemon stopping")
    jobs.cancel(second)
    assert [(topic, body["type"], state) for topic, body, state in events] == [
        (job_topic(first), Event.JOB_QUEUED, "queued"), (job_topic(second), Event.JOB_QUEUED, "queued"),
        (job_topic(first), Event.JOB_STARTED, "running"), (job_topic(first), Event.JOB_DONE, "done"),
        (job_topic(second), Event.JOB_STARTED, "running"), (job_topic(second), Event.JOB_FAILED, "failed"),
        (job_topic(second), Event.JOB_QUEUED, "queued"), (job_topic(second), Event.JOB_STARTED, "running"),
        (job_topic(second), Event.JOB_REQUEUED, "queued"), (job_topic(second), Event.JOB_CANCELLED, "cancelled"),
    ]
    assert (folder / f"{first}.png").read_bytes() == PNG
    assert events[5][1]["worker"] == "gpu1"


def test_a_cancelled_job_is_announced_once_whoever_reports_it(lifecycle) -> None:
    jobs, events, folder = lifecycle
    job_id = submit(jobs, folder)
    jobs.claim_next(worker="gpu1")
    assert jobs.cancel(job_id).state == "running"  # marked only: its worker stops it
    assert jobs.cancelled(job_id, worker="gpu1")
    # The worker's connection drops as it reports, and the daemon stops: each lets go of the job.
    assert not jobs.cancelled(job_id)
    assert not jobs.let_go(job_id, "worker gpu1 lost")
    jobs.settle_running("daemon stopping")
    assert types(events).count(Event.JOB_CANCELLED) == 1


def test_a_late_result_after_a_stop_settled_the_job_announces_nothing(lifecycle) -> None:
    jobs, events, folder = lifecycle
    job_id = submit(jobs, folder)
    jobs.claim_next()
    jobs.settle_running("daemon stopping")  # the worker was stuck in a model call
    assert not jobs.done(job_id, [PNG], {"seed": 1})
    assert not jobs.failed(job_id, Code.INTERNAL, "late")
    assert not jobs.ended(job_id, outcome(job_id, Cancelled("stopped"), cancel_asked=False))
    assert types(events) == [Event.JOB_QUEUED, Event.JOB_STARTED, Event.JOB_REQUEUED]
    assert jobs.queue.get(job_id).state == "queued"


def test_an_image_that_cannot_be_written_fails_the_job_with_output_error(lifecycle) -> None:
    jobs, events, folder = lifecycle
    job_id = submit(jobs, folder)
    jobs.claim_next()
    (folder / f"{job_id}.png").mkdir()  # a folder in the way of the image
    assert jobs.done(job_id, [PNG], {"seed": 1})
    _, body, state = events[-1]
    assert body["type"] == Event.JOB_FAILED and body["code"] == Code.OUTPUT_ERROR and state == "failed"


def test_one_ladder_maps_a_runs_exception_to_its_ending() -> None:
    assert outcome("j", Cancelled("stopped"), cancel_asked=True) == (Code.CANCELLED, "cancelled", False)
    assert outcome("j", Cancelled("stopped"), cancel_asked=False).requeue
    assert outcome("j", InvalidParameter("steps", "1 to 150"), cancel_asked=False) == (
        Code.INVALID_PARAMETER, "steps: 1 to 150", False)
    assert outcome("j", KeyError("x"), cancel_asked=True) == (Code.INTERNAL, "KeyError: 'x'", False)
