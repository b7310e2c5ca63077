"""The worker: one thread that keeps the model warm and runs jobs one at a time.

It takes jobs from its own connection to the queue and reports through an inproc socket; the
server's thread owns the public sockets and stamps every event with the daemon-wide sequence.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq
from diffusiond.clients.protocol import DAEMON_TOPIC, Event, job_topic, pack, preview_topic
from PIL import Image

from ..config import Config
from ..engine.pipeline import Request, Result
from ..engine.png import encode_result
from ..engine.preview import preview_jpeg
from .jobs import Jobs, outcome
from .notify import notify
from .queue import Job, JobQueue
from .warm import Emit, WarmModels

log = logging.getLogger("diffusiond.worker")
WORKER_EVENTS = "inproc://worker-events"
PREVIEW_INTERVAL = 0.25  # seconds: at most four previews a second per job


def job_request(params: dict[str, Any], init_image: bytes | None) -> Request:
    """A queued job's Request: its LoRAs kept as {name, weight} maps (the wire's form) become pairs."""
    loras = tuple((lora["name"], lora["weight"]) for lora in params.get("loras", ()))
    fields = {**params, "loras": loras}
    return Request(**fields, init_image=Image.open(io.BytesIO(init_image)) if init_image else None)


def summary(result: Result) -> dict[str, Any]:
    """What `job.done` and the queue record of a finished job, beside its outputs."""
    return {
        "seed": result.request.seed, "width": result.request.width, "height": result.request.height,
        "flagged": result.flagged, "prompt_dropped": result.dropped_prompt, "timings": result.timings,
    }


def progress_reporter(job_id: str, emit: Emit, wants_preview: Callable[[bytes], bool]) -> Callable[..., None]:
    """The pipeline's step callback: `job.progress` every step, a JPEG preview while someone watches."""
    topic, preview = job_topic(job_id), preview_topic(job_id)
    started = time.monotonic()
    last_preview = 0.0

    def on_step(step: int, total: int, latents) -> None:
        nonlocal last_preview
        now = time.monotonic()
        eta = (now - started) / step * (total - step)
        emit(topic, {"type": Event.JOB_PROGRESS, "job": job_id, "step": step, "total": total, "eta": eta})
        if wants_preview(preview) and (now - last_preview >= PREVIEW_INTERVAL or step == total):
            jpeg = preview_jpeg(latents)
            if jpeg is not None:
                last_preview = now
                emit(preview, {"type": Event.JOB_PREVIEW, "job": job_id, "step": step, "total": total, "jpeg": jpeg})

    return on_step


class Worker(threading.Thread):
    def __init__(self, config: Config, context: zmq.Context) -> None:
        super().__init__(name="worker", daemon=True)
        self.config = config
        self.context = context
        self.wake = threading.Event()
        self.ready = threading.Event()
        self.stopping = threading.Event()
        self.cancels: set[str] = set()  # ids of running jobs asked to stop; only ever their own
        self.preview_prefixes: frozenset[bytes] = frozenset()
        self.models = WarmModels(config, self._emit)

    @property
    def loaded(self) -> list[str]:
        return self.models.loaded

    @property
    def loading(self) -> str | None:
        return self.models.loading

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    def cancel(self, job_id: str) -> None:
        self.cancels.add(job_id)

    def wants_preview(self, topic: bytes) -> bool:
        return any(p.startswith(b"preview") and topic.startswith(p) for p in self.preview_prefixes)

    def _emit(self, topic: bytes, body: dict[str, Any]) -> None:
        body["ts"] = time.time()
        self.events.send_multipart([topic, pack(body)])

    def run(self) -> None:
        self.events = self.context.socket(zmq.PUSH)
        self.events.setsockopt(zmq.LINGER, 1000)
        self.events.connect(WORKER_EVENTS)
        queue = JobQueue(self.config.database)
        jobs = Jobs(queue, self._emit)
        try:
            if not self.config.local_worker:
                self._serve_remote_workers_only()
                return
            self.models.load(self.config.model)
            self.ready.set()
            notify(f"READY=1\nSTATUS=ready, {self.config.model} loaded")
            self._emit(DAEMON_TOPIC, {"type": Event.DAEMON_READY, "model": self.config.model})
            while not self.stopping.is_set():
                self.wake.clear()
                job = None if queue.paused() else jobs.claim_next()
                if job is None:
                    self.models.unload_idle()
                    self.wake.wait(1.0)
                    continue
                self._run(jobs, job)
        except Exception:
            log.exception("worker stopped by an unexpected error")
            self._emit(DAEMON_TOPIC, {"type": Event.DAEMON_WORKER_FAILED})
        finally:
            queue.close()
            self.events.close()

    def _serve_remote_workers_only(self) -> None:
        """`local_worker = false`: this machine keeps the queue; remote workers run every job."""
        self.ready.set()
        notify("READY=1\nSTATUS=ready, jobs run on remote workers")
        self._emit(DAEMON_TOPIC, {"type": Event.DAEMON_READY, "model": None})
        self.stopping.wait()

    def _run(self, jobs: Jobs, job: Job) -> None:
        try:
            def cancelled() -> bool:
                return job.id in self.cancels or self.stopping.is_set()

            request = job_request(job.params, jobs.queue.init_image(job.id))
            on_step = progress_reporter(job.id, self._emit, self.wants_preview)
            result = self.models.generate(job.model, request, on_step, cancelled)
            pngs = encode_result(result, job.model)
        except Exception as exc:
            # A stop that found this worker inside a model call may have settled the job already
            # (Jobs.settle_running): jobs records and announces only the first outcome.
            jobs.ended(job.id, outcome(job.id, exc, cancel_asked=job.id in self.cancels))
            return
        finally:
            self.cancels.discard(job.id)
        jobs.done(job.id, pngs, summary(result))
