"""The worker: one thread that keeps the model warm and runs jobs one at a time.

It takes jobs from its own connection to the queue and reports through an inproc socket; the
server's thread owns the public sockets and stamps every event with the daemon-wide sequence.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq
from diffusiond.clients.protocol import Code, pack
from PIL import Image

from . import catalog, store
from .config import Config
from .errors import Cancelled, EngineError, ModelNotDownloaded
from .model import ModelFolder
from .notify import notify
from .pipeline import Pipeline, Request
from .png import infotext, write_png
from .preview import preview_jpeg
from .queue import Job, JobQueue

log = logging.getLogger("diffusiond.worker")
WORKER_EVENTS = "inproc://worker-events"
PREVIEW_INTERVAL = 0.25  # seconds: at most four previews a second per job


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
        self.loading: str | None = None
        self.pipelines: OrderedDict[str, Pipeline] = OrderedDict()  # least recently used first
        self.last_used: dict[str, float] = {}

    @property
    def loaded(self) -> list[str]:
        return list(self.pipelines)

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    def cancel(self, job_id: str) -> None:
        self.cancels.add(job_id)

    def _emit(self, topic: bytes, body: dict[str, Any]) -> None:
        body["ts"] = time.time()
        self.events.send_multipart([topic, pack(body)])

    def run(self) -> None:
        self.events = self.context.socket(zmq.PUSH)
        self.events.setsockopt(zmq.LINGER, 1000)
        self.events.connect(WORKER_EVENTS)
        queue = JobQueue(self.config.database)
        try:
            self._load(self.config.model)
            self.ready.set()
            notify(f"READY=1\nSTATUS=ready, {self.config.model} loaded")
            self._emit(b"daemon", {"type": "daemon.ready", "model": self.config.model})
            while not self.stopping.is_set():
                self.wake.clear()
                job = None if queue.paused() else queue.claim_next()
                if job is None:
                    self._unload_idle()
                    self.wake.wait(1.0)
                    continue
                self._run(queue, job)
        except Exception:
            log.exception("worker stopped by an unexpected error")
            self._emit(b"daemon", {"type": "daemon.worker_failed"})
        finally:
            queue.close()
            self.events.close()

    def _load(self, name: str, cancelled: Callable[[], bool] = lambda: False) -> None:
        """Load a model, downloading it first when it is a Hub model not yet in the cache."""
        from .runtimes.torch_runtime import TorchRuntime, pick_device

        topic = f"model.{name}".encode()
        self.loading = name
        try:
            model = ModelFolder.open(name)
        except ModelNotDownloaded:
            gpu = pick_device(self.config.device).type != "cpu"
            self._emit(topic, {"type": "model.downloading", "model": name})
            store.pull(
                catalog.repo_for(name), gpu, lambda progress: self._emit(topic, {"type": "model.download", **progress}),
                cancelled,
            )
            model = ModelFolder.open(name)
            self._emit(topic, {"type": "model.downloaded", "model": name, "path": str(model.path)})
        while len(self.pipelines) >= self.config.max_loaded:  # room first: two big models may not fit
            self._unload(next(iter(self.pipelines)), "least recently used")
        self._emit(topic, {"type": "model.loading", "model": name})
        started = time.monotonic()
        runtime = TorchRuntime(model.path, self.config.device, with_safety_checker=model.has_safety_checker)
        self.pipelines[name] = Pipeline(model, runtime, self.config.limits)
        self.last_used[name] = time.monotonic()
        self.loading = None
        seconds = time.monotonic() - started
        log.info("model %s loaded in %.1fs", name, seconds)
        self._emit(topic, {"type": "model.loaded", "model": name, "seconds": seconds})

    def _unload(self, name: str, reason: str) -> None:
        del self.pipelines[name], self.last_used[name]
        log.info("model %s unloaded (%s)", name, reason)
        self._emit(f"model.{name}".encode(), {"type": "model.unloaded", "model": name, "reason": reason})

    def _unload_idle(self) -> None:
        if self.config.idle_unload > 0:
            now = time.monotonic()
            for name in [n for n, used in self.last_used.items() if now - used >= self.config.idle_unload]:
                self._unload(name, f"idle for {self.config.idle_unload:g}s")

    def _pipeline(self, name: str, cancelled: Callable[[], bool]) -> Pipeline:
        """The model's warm pipeline, loaded (and downloaded) first when it is not."""
        if name not in self.pipelines:
            self._load(name, cancelled)
        self.pipelines.move_to_end(name)
        self.last_used[name] = time.monotonic()
        return self.pipelines[name]

    def _run(self, queue: JobQueue, job: Job) -> None:
        topic = f"job.{job.id}".encode()
        self._emit(topic, {"type": "job.started", "job": job.id, "attempt": job.attempts})
        try:
            def cancelled() -> bool:
                return job.id in self.cancels or self.stopping.is_set()

            pipeline = self._pipeline(job.model, cancelled)
            request = self._request(queue, job)
            result = pipeline.generate(request, on_step=self._progress(job), cancelled=cancelled)
            self.last_used[job.model] = time.monotonic()
            outputs = self._write(job, request, result)
        except Cancelled:
            if job.id in self.cancels:
                queue.cancelled(job.id)
                self._emit(topic, {"type": "job.cancelled", "job": job.id})
            else:
                queue.requeue(job.id)
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
        summary = {
            "seed": result.request.seed, "width": result.request.width, "height": result.request.height,
            "flagged": result.flagged, "prompt_dropped": result.dropped_prompt, "timings": result.timings,
        }
        queue.done(job.id, outputs, summary)
        self._emit(topic, {"type": "job.done", "job": job.id, "outputs": outputs, **summary})

    def _failed(self, queue: JobQueue, job: Job, code: str, message: str) -> None:
        queue.fail(job.id, code, message)
        self._emit(f"job.{job.id}".encode(), {"type": "job.failed", "job": job.id, "code": code, "message": message})

    def _request(self, queue: JobQueue, job: Job) -> Request:
        data = queue.init_image(job.id)
        init_image = Image.open(io.BytesIO(data)) if data else None
        return Request(**job.params, init_image=init_image)

    def _progress(self, job: Job):
        topic, preview = f"job.{job.id}".encode(), f"preview.{job.id}".encode()
        started = time.monotonic()
        last_preview = 0.0

        def on_step(step: int, total: int, latents) -> None:
            nonlocal last_preview
            now = time.monotonic()
            eta = (now - started) / step * (total - step)
            self._emit(topic, {"type": "job.progress", "job": job.id, "step": step, "total": total, "eta": eta})
            wanted = any(p.startswith(b"preview") and preview.startswith(p) for p in self.preview_prefixes)
            if wanted and (now - last_preview >= PREVIEW_INTERVAL or step == total):
                jpeg = preview_jpeg(latents)
                if jpeg is not None:
                    last_preview = now
                    self._emit(preview, {"type": "job.preview", "job": job.id, "step": step, "total": total, "jpeg": jpeg})

        return on_step

    def _write(self, job: Job, request: Request, result) -> list[str]:
        """Outputs named by job id: a rerun after a crash replaces them instead of adding more."""
        folder = Path(job.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, image in enumerate(result.images):
            path = folder / (f"{job.id}.png" if i == 0 else f"{job.id}-{i + 1}.png")
            for stale in folder.glob(f".{path.name}.*.tmp"):
                stale.unlink(missing_ok=True)  # a crash's half-written file of this very output
            text = infotext(result.request, job.model, i, result.flagged[i], result.dropped_prompt)
            paths.append(str(write_png(path, image, text)))
        return paths
