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
from diffusiond.clients.protocol import Code, pack
from PIL import Image

from ..config import Config
from ..engine.pipeline import Request, Result
from ..engine.png import encode_result, write_job_outputs
from ..engine.preview import preview_jpeg
from ..errors import Cancelled, EngineError
from .notify import notify
from .queue import Job, JobQueue
from .warm import Emit, WarmModels

log = logging.getLogger("diffusiond.worker")
WORKER_EVENTS = "inproc://worker-events"
PREVIEW_INTERVAL = 0.25  # seconds: at most four previews a second per job


def job_request(params: dict[str, Any], init_image: bytes | None) -> Request:
    return Request(**params, init_image=Image.open(io.BytesIO(init_image)) if init_image else None)


def summary(result: Result) -> dict[str, Any]:
    """What `job.done` and the queue record of a finished job, beside its outputs."""
    return {
        "seed": result.request.seed, "width": result.request.width, "height": result.request.height,
        "flagged": result.flagged, "prompt_dropped": result.dropped_prompt, "timings": result.timings,
    }


def progress_reporter(job_id: str, emit: Emit, wants_preview: Callable[[bytes], bool]) -> Callable[..., None]:
    """The pipeline's step callback: `job.progress` every step, a JPEG preview while someone watches."""
    topic, preview = f"job.{job_id}".encode(), f"preview.{job_id}".encode()
    started = time.monotonic()
    last_preview = 0.0

    def on_step(step: int, total: int, latents) -> None:
        nonlocal last_preview
        now = time.monotonic()
        eta = (now - started) / step * (total - step)
        emit(topic, {"type": "job.progress", "job": job_id, "step": step, "total": total, "eta": eta})
        if wants_preview(preview) and (now - last_preview >= PREVIEW_INTERVAL or step == total):
            jpeg = preview_jpeg(latents)
            if jpeg is not None:
                last_preview = now
                emit(preview, {"type": "job.preview", "job": job_id, "step": step, "total": total, "jpeg": jpeg})

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
        try:
            if not self.config.local_worker:
                self._serve_remote_workers_only()
                return
            self.models.load(self.config.model)
            self.ready.set()
            notify(f"READY=1\nSTATUS=ready, {self.config.model} loaded")
            self._emit(b"daemon", {"type": "daemon.ready", "model": self.config.model})
            while not self.stopping.is_set():
                self.wake.clear()
                job = None if queue.paused() else queue.claim_next()
                if job is None:
                    self.models.unload_idle()
                    self.wake.wait(1.0)
                    continue
                self._run(queue, job)
        except Exception:
            log.exception("worker stopped by an unexpected error")
            self._emit(b"daemon", {"type": "daemon.worker_failed"})
        finally:
            queue.close()
            self.events.close()

    def _serve_remote_workers_only(self) -> None:
        """`local_worker = false`: this machine keeps the queue; remote workers run every job."""
        self.ready.set()
        notify("READY=1\nSTATUS=ready, jobs run on remote workers")
        self._emit(b"daemon", {"type": "daemon.ready", "model": None})
        self.stopping.wait()

    def _run(self, queue: JobQueue, job: Job) -> None:
        topic = f"job.{job.id}".encode()
        self._emit(topic, {"type": "job.started", "job": job.id, "attempt": job.attempts})
        try:
            def cancelled() -> bool:
                return job.id in self.cancels or self.stopping.is_set()

            pipeline = self.models.get(job.model, cancelled)
            request = job_request(job.params, queue.init_image(job.id))
            on_step = progress_reporter(job.id, self._emit, self.wants_preview)
            result = pipeline.generate(request, on_step=on_step, cancelled=cancelled)
            self.models.touch(job.model)
            pngs = encode_result(result, job.model)
            outputs = write_job_outputs(queue.output_paths(job.id, len(pngs)), pngs)
        except Cancelled:
            # Either outcome may have been recorded already: a daemon that stopped while this
            # worker was inside a model call settled the job itself (Server._settle_running).
            if job.id in self.cancels:
                if queue.cancelled(job.id) is not None:
                    self._emit(topic, {"type": "job.cancelled", "job": job.id})
            elif queue.requeue(job.id) is not None:
                self._emit(topic, {"type": "job.requeued", "job": job.id, "reason": "daemon stopping"})
            return
        except EngineError as exc:
            self._failed(queue, job, exc.code, str(exc))
            return
        except OSError as exc:
            self._failed(queue, job, Code.OUTPUT_ERROR, f"cannot write the image: {exc}")
            return
        except Exception as exc:
            log.exception("job %s failed", job.id)
            self._failed(queue, job, Code.INTERNAL, f"{type(exc).__name__}: {exc}")
            return
        finally:
            self.cancels.discard(job.id)
        done = summary(result)
        if queue.done(job.id, outputs, done) is not None:
            self._emit(topic, {"type": "job.done", "job": job.id, "outputs": outputs, **done})

    def _failed(self, queue: JobQueue, job: Job, code: str, message: str) -> None:
        if queue.fail(job.id, code, message) is not None:
            self._emit(f"job.{job.id}".encode(), {"type": "job.failed", "job": job.id, "code": code, "message": message})
