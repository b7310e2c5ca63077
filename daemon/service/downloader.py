"""Model pulls asked for on their own (`pull`), one at a time, beside the worker.

A job for a model that is not downloaded pulls it in the worker, as the job's first phase; this
thread serves `diffuse models pull`, so a download need not wait for the queue, nor hold it up.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import zmq

from diffusiond.clients.protocol import Code, Event, model_topic, pack

from ..coreml.hardware import has_gpu, this_machine
from ..engine.runtimes import refuse_palettized
from ..errors import Cancelled, EngineError
from ..models import catalog, store
from .worker import WORKER_EVENTS

log = logging.getLogger("diffusiond.downloader")


class Downloader(threading.Thread):
    def __init__(self, context: zmq.Context, device: str, keep_archives: bool = False) -> None:
        super().__init__(name="downloader", daemon=True)
        self.context = context
        self.device = device
        self.keep_archives = keep_archives
        self.requests: queue.SimpleQueue[tuple[str, str] | None] = queue.SimpleQueue()
        self.cancelled: set[str] = set()
        self.active: str | None = None

    def pull(self, name: str, compute_units: str) -> None:
        self.cancelled.discard(name)
        self.requests.put((name, compute_units))

    def cancel(self, name: str) -> None:
        self.cancelled.add(name)

    def stop(self) -> None:
        self.requests.put(None)

    def _emit(self, name: str, body: dict[str, Any]) -> None:
        self.events.send_multipart([model_topic(name), pack({"ts": time.time(), "model": name, **body})])

    def run(self) -> None:
        self.events = self.context.socket(zmq.PUSH)
        self.events.setsockopt(zmq.LINGER, 1000)
        self.events.connect(WORKER_EVENTS)
        try:
            while (item := self.requests.get()) is not None:
                name, compute_units = item
                self.active = name
                self._emit(name, {"type": Event.MODEL_DOWNLOADING})
                try:
                    refuse_palettized(name, catalog.is_palettized(name), this_machine())
                    path = store.pull(
                        name, has_gpu(self.device),
                        lambda progress: self._emit(name, {"type": Event.MODEL_DOWNLOAD, **progress}),
                        lambda: name in self.cancelled, compute_units, self.keep_archives,
                    )
                except (Cancelled, EngineError) as exc:
                    self._emit(name, {"type": Event.MODEL_DOWNLOAD_FAILED, "code": exc.code, "message": str(exc)})
                except Exception as exc:
                    log.exception("pull of %s failed", name)
                    self._emit(name, {"type": Event.MODEL_DOWNLOAD_FAILED, "code": Code.INTERNAL, "message": str(exc)})
                else:
                    self._emit(name, {"type": Event.MODEL_DOWNLOADED, "path": str(path)})
                finally:
                    self.active = None
        finally:
            self.events.close()
