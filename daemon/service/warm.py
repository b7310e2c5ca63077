"""Warm models: pipelines kept loaded between jobs, downloaded and loaded on demand.

The daemon's worker thread and a remote worker (`diffusiond worker`) both run jobs through one.
Loading is the slow part, so every phase is an event on `model.NAME`.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from diffusiond.clients.protocol import Event, model_topic

from ..config import Config
from ..engine.pipeline import Pipeline, Request, Result
from ..engine.runtimes import StepCallback
from ..errors import Cancelled, ModelNotDownloaded
from ..models.coreml_folder import CoreMLFolder
from ..models import catalog, lora, store
from ..models.diffusers_folder import ModelFolder
from ..models.ref import parse

log = logging.getLogger("diffusiond.warm")
Emit = Callable[[bytes, dict[str, Any]], None]


class WarmModels:
    """At most `max_loaded` pipelines, least recently used first; idle ones unloaded after `idle_unload`."""

    def __init__(self, config: Config, emit: Emit) -> None:
        self.config = config
        self.emit = emit
        self.loading: str | None = None
        self.pipelines: OrderedDict[str, Pipeline] = OrderedDict()
        self.last_used: dict[str, float] = {}

    @property
    def loaded(self) -> list[str]:
        return list(self.pipelines)

    def get(self, name: str, cancelled: Callable[[], bool] = lambda: False, keep: str | None = None) -> Pipeline:
        """The model's warm pipeline, loaded (and downloaded) first when it is not; loading it
        unloads any model but ``keep`` to make room."""
        if name not in self.pipelines:
            self.load(name, cancelled, keep)
        self.pipelines.move_to_end(name)
        self.last_used[name] = time.monotonic()
        return self.pipelines[name]

    def generate(self, model: str, request: Request, on_step: StepCallback | None,
                 cancelled: Callable[[], bool]) -> Result:
        """Run a job on its model, and on its refiner (request.refiner) after it: both stay warm
        together, the pair may hold one model more than max_loaded while it runs."""
        pipeline = self.get(model, cancelled)
        self.pull_loras(request, cancelled)
        if isinstance(pipeline.model, CoreMLFolder):
            pipeline = self.with_merged_loras(pipeline, request, cancelled)
        refiner = None if request.refiner is None else self.get(request.refiner, cancelled, keep=model)
        result = pipeline.generate(request, on_step=on_step, cancelled=cancelled, refiner=refiner)
        for name in (model, request.refiner):
            if name is not None:
                self.touch(name)
        return result

    def pull_loras(self, request: Request, cancelled: Callable[[], bool]) -> None:
        """Download the job's Hub LoRAs (ORG/REPO/FILE.safetensors) not in the cache yet, with the
        model download events on `model.NAME`."""
        for name in lora.job_names(request.prompt, request.loras):
            try:
                lora.find(name, self.config.lora_dir)
            except lora.LoraNotDownloaded as missing:
                topic = model_topic(name)
                self.emit(topic, {"type": Event.MODEL_DOWNLOADING, "model": name})
                path = store.pull_file(name, missing.repo, missing.file,
                                       lambda progress: self.emit(topic, {"type": Event.MODEL_DOWNLOAD, **progress}), cancelled)
                self.emit(topic, {"type": Event.MODEL_DOWNLOADED, "model": name, "path": str(path)})

    def with_merged_loras(self, pipeline: Pipeline, request: Request, cancelled: Callable[[], bool]) -> Pipeline:
        """A Core ML model's pipeline for a job's LoRAs: itself when it has none (or these merged in), else
        the model converted with them merged (coreml/merged_models.py: once per set, cached), with
        `model.converting` events on the base's topic while it converts."""
        from ..coreml.merged_models import merged_model
        from ..engine.pipeline import lora_key

        base = pipeline.model
        assert isinstance(base, CoreMLFolder)
        uses = lora.job_loras(request.prompt, request.loras, self.config.lora_dir)
        if not uses or lora_key(uses) == base.merged_loras:
            return pipeline
        topic, started = model_topic(base.name), time.monotonic()
        folder = merged_model(base, uses, self.config.state_dir,
                              lambda line: self.emit(topic, {"type": Event.MODEL_CONVERTING, "model": base.name, "line": line}))
        if cancelled():
            raise Cancelled("cancelled after converting the model with its LoRAs (the conversion is kept)")
        self.emit(topic, {"type": Event.MODEL_CONVERTED, "model": base.name, "path": str(folder),
                          "seconds": time.monotonic() - started})
        return self.get(str(folder), cancelled, keep=base.name)

    def touch(self, name: str) -> None:
        self.last_used[name] = time.monotonic()

    def load(self, name: str, cancelled: Callable[[], bool] = lambda: False, keep: str | None = None) -> None:
        """Load a model, downloading it first when it is a Hub model not yet in the cache."""
        self.loading = name
        try:
            self._load(name, cancelled, keep)
        finally:
            self.loading = None

    def _load(self, name: str, cancelled: Callable[[], bool], keep: str | None) -> None:
        from ..coreml.compute_units import choose
        from ..coreml.hardware import has_gpu, this_machine
        from ..engine.runtimes import open_runtime, refuse_palettized

        topic = model_topic(name)
        try:
            model = ModelFolder.open(name)
        except ModelNotDownloaded:
            machine = this_machine()
            refuse_palettized(name, catalog.is_palettized(name), machine)
            self.emit(topic, {"type": Event.MODEL_DOWNLOADING, "model": name})
            units = choose(self.config.compute_units, self.config.state_dir, machine, name)
            store.pull(
                parse(name).canonical, has_gpu(self.config.device),
                lambda progress: self.emit(topic, {"type": Event.MODEL_DOWNLOAD, **progress}), cancelled, units,
                self.config.keep_archives,
            )
            model = ModelFolder.open(name)
            self.emit(topic, {"type": Event.MODEL_DOWNLOADED, "model": name, "path": str(model.path)})
        # Room first: two big models may not fit. A job's base stays while its refiner loads.
        while len(self.pipelines) >= self.config.max_loaded and any(n != keep for n in self.pipelines):
            self.unload(next(n for n in self.pipelines if n != keep), "least recently used")
        self.emit(topic, {"type": Event.MODEL_LOADING, "model": name})
        started = time.monotonic()
        runtime = open_runtime(model, self.config, model.has_safety_checker)
        if runtime.has_warm_up:
            # Compiling and capturing graphs for the model's own size: paid once, here, not by a job.
            self.emit(topic, {"type": Event.MODEL_COMPILING, "model": name})
            seconds = runtime.warm_up(*model.default_shape)
            self.emit(topic, {"type": Event.MODEL_COMPILED, "model": name, "seconds": seconds})
        self.pipelines[name] = Pipeline(model, runtime, self.config.limits, self.config.lora_dir)
        self.last_used[name] = time.monotonic()
        seconds = time.monotonic() - started
        log.info("model %s loaded in %.1fs", name, seconds)
        self.emit(topic, {"type": Event.MODEL_LOADED, "model": name, "seconds": seconds})

    def unload(self, name: str, reason: str) -> None:
        del self.pipelines[name], self.last_used[name]
        log.info("model %s unloaded (%s)", name, reason)
        self.emit(model_topic(name), {"type": Event.MODEL_UNLOADED, "model": name, "reason": reason})

    def unload_idle(self) -> None:
        if self.config.idle_unload > 0:
            now = time.monotonic()
            for name in [n for n, used in self.last_used.items() if now - used >= self.config.idle_unload]:
                self.unload(name, f"idle for {self.config.idle_unload:g}s")
