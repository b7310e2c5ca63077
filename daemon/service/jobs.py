"""Every change of a job's state: the queue row written, then its event published, in one place.

The queue (SQLite) is the record; the `job.ID` events tell subscribers what the record now says.
So each transition commits the row first and publishes only after, and only when the row really
changed: a job whose outcome is already recorded (a late result after a stop settled it, a
second cancel) publishes nothing, so each run of a job ends with exactly one of `job.done`,
`job.failed`, `job.cancelled` or `job.requeued` (docs/reliability.md, "A job ends once").

Three owners call in, each with its own publish: the worker thread (its own queue connection,
events over the inproc socket), the server's remote workers (published at once), and the
server's requests (inside the batch's transaction: published after its commit and replies).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NamedTuple

from diffusiond.clients.protocol import Code, Event, job_topic

from ..engine.png import write_job_outputs
from ..errors import Cancelled, EngineError
from .queue import Job, JobQueue

log = logging.getLogger("diffusiond.jobs")
Publish = Callable[[bytes, dict[str, Any]], None]


class Outcome(NamedTuple):
    """How a job that raised ends: failed with `code`, or cancelled (`code` is `cancelled`), or
    given back to the queue (`requeue`: its runner was told to let go, nobody cancelled it)."""

    code: str
    message: str
    requeue: bool = False


def outcome(job_id: str, exc: Exception, cancel_asked: bool) -> Outcome:
    """The one exception ladder of a job run, local or remote. `cancel_asked`: whether a user's
    cancel (not a stop or a lost daemon) is what stopped the run."""
    if isinstance(exc, Cancelled):
        return Outcome(Code.CANCELLED, "cancelled", requeue=not cancel_asked)
    if isinstance(exc, EngineError):
        return Outcome(exc.code, str(exc))
    log.error("job %s failed", job_id, exc_info=exc)
    return Outcome(Code.INTERNAL, f"{type(exc).__name__}: {exc}")


def _by(worker: str | None) -> dict[str, str]:
    """The `worker` field of a remote worker's job events; local jobs have none."""
    return {"worker": worker} if worker is not None else {}


class Jobs:
    def __init__(self, queue: JobQueue, publish: Publish) -> None:
        self.queue = queue
        self.publish = publish

    def _event(self, job_id: str, kind: str, **fields: Any) -> None:
        self.publish(job_topic(job_id), {"type": kind, "job": job_id, **fields})

    # -- queued ------------------------------------------------------------------------------

    def submit(self, params: dict[str, Any], model: str, output_dir: str, priority: int, key: str | None,
               init_image: bytes | None, max_queued: int, output_name: str | None) -> tuple[Job, bool]:
        job, created = self.queue.submit(params, model, output_dir, priority, key, init_image, max_queued, output_name)
        if created:
            self._event(job.id, Event.JOB_QUEUED, priority=priority)
        return job, created

    def retry(self, job_id: str) -> Job:
        job = self.queue.retry(job_id)
        self._event(job.id, Event.JOB_QUEUED, priority=job.priority)
        return job

    # -- running -----------------------------------------------------------------------------

    def claim_next(self, worker: str | None = None) -> Job | None:
        """The next job, now running and announced; a remote worker (named) gets only jobs whose
        model is not a folder on this machine."""
        job = self.queue.claim_next(named_models_only=worker is not None)
        if job is not None:
            self._event(job.id, Event.JOB_STARTED, attempt=job.attempts, **_by(worker))
        return job

    # -- endings -----------------------------------------------------------------------------

    def done(self, job_id: str, pngs: list[bytes], summary: dict[str, Any], worker: str | None = None) -> bool:
        """Write the job's images (all or none), then record it done; a write that fails fails
        the job with `output_error`. False when the job had an outcome already."""
        try:
            outputs = write_job_outputs(self.queue.output_paths(job_id, len(pngs)), pngs)
        except OSError as exc:
            return self.failed(job_id, Code.OUTPUT_ERROR, f"cannot write the image: {exc}")
        if self.queue.done(job_id, outputs, {**summary, **_by(worker)}) is None:
            return False
        self._event(job_id, Event.JOB_DONE, outputs=outputs, **summary, **_by(worker))
        return True

    def failed(self, job_id: str, code: str, message: str, worker: str | None = None) -> bool:
        recorded = f"{message} (on worker {worker})" if worker is not None else message
        if self.queue.fail(job_id, code, recorded) is None:
            return False
        self._event(job_id, Event.JOB_FAILED, code=code, message=message, **_by(worker))
        return True

    def cancelled(self, job_id: str, worker: str | None = None) -> bool:
        if self.queue.cancelled(job_id) is None:
            return False
        self._event(job_id, Event.JOB_CANCELLED, **_by(worker))
        return True

    def requeued(self, job_id: str, reason: str) -> bool:
        """A running job back at its old place in the queue."""
        if self.queue.requeue(job_id) is None:
            return False
        log.info("job %s queued again: %s", job_id, reason)
        self._event(job_id, Event.JOB_REQUEUED, reason=reason)
        return True

    def ended(self, job_id: str, end: Outcome, worker: str | None = None, reason: str = "daemon stopping") -> bool:
        """Record the outcome of a run that raised."""
        if end.requeue:
            return self.requeued(job_id, reason)
        if end.code == Code.CANCELLED:
            return self.cancelled(job_id, worker)
        return self.failed(job_id, end.code, end.message, worker)

    def let_go(self, job_id: str, reason: str) -> bool:
        """A running job whose runner let it go: cancelled if a cancel was asked, else queued again."""
        if self.queue.get(job_id).cancel_requested:
            return self.cancelled(job_id)
        return self.requeued(job_id, reason)

    # -- asked by clients --------------------------------------------------------------------

    def cancel(self, job_id: str) -> Job:
        """A queued job is cancelled now; a running one only marked: its runner stops it."""
        job = self.queue.cancel(job_id)
        if job.state == "cancelled":
            self._event(job.id, Event.JOB_CANCELLED)
        return job

    def cancel_queued(self) -> list[str]:
        ids = self.queue.cancel_queued()
        for job_id in ids:
            self._event(job_id, Event.JOB_CANCELLED)
        return ids

    def settle_running(self, reason: str) -> None:
        """Every job still running, with nobody left to run it, given the outcome a stop promises:
        queued again, or cancelled if that was asked (one transaction, then the events)."""
        requeued, cancelled = self.queue.recover()
        for job_id in requeued:
            log.info("job %s queued again: %s", job_id, reason)
            self._event(job_id, Event.JOB_REQUEUED, reason=reason)
        for job_id in cancelled:
            self._event(job_id, Event.JOB_CANCELLED)
