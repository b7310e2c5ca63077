"""The daemon's main loop: requests in over ROUTER, events out over XPUB, the queue in SQLite.

One thread owns the sockets and the queue connection that answers requests; the worker thread
runs jobs. Requests that arrive together are handled in one transaction — one commit, then the
replies — so a burst of submits costs one fsync, and nothing is acknowledged before it is durable.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import zmq
from diffusiond.clients.protocol import (
    COMPUTE_UNIT_CHOICES,
    DAEMON_TOPIC,
    HARD_MESSAGE_BYTES,
    MAX_MESSAGE_BYTES,
    OPS,
    STATES,
    VERSION,
    Code,
    Event,
    ProtocolError,
    endpoints,
    error,
    model_topic,
    ok,
    pack,
    unpack,
)
from PIL import Image

from ..config import STOP_GRACE, Config
from ..coreml.compute_units import choose
from ..coreml.hardware import this_machine
from ..engine import schedulers
from ..engine.pipeline import Request, resolve
from ..errors import EngineError, ModelNotDownloaded
from ..models import catalog, lora, store
from ..models.catalog import ALIASES
from ..models.coreml_folder import CoreMLFolder
from ..models.diffusers_folder import ModelFolder
from ..models.ref import parse
from .downloader import Downloader
from .jobs import Jobs
from .notify import notify
from .queue import JobQueue
from .remote import bind_tcp
from .remote_dispatch import MAX_RESULT_BYTES, RemoteWorkers
from .sockets import bind, hold_lock, secure_runtime_dir
from .worker import WORKER_EVENTS, Worker

log = logging.getLogger("diffusiond.server")
DAEMON_VERSION = "0.1.0"
BATCH = 512  # requests handled per commit at most
MAX_INIT_IMAGE_SIDE = 4096
MAX_PRIORITY = 1000
MAX_LIST = 1000
CANCEL_PENDING = ("job {job} stops before its next model call (each denoising step is one, the VAE decode "
                  "another); a call under way is not interrupted, so on a slow machine that can take a while")
# Each job field's wire type: a value of another type is `bad_message`, one outside its limits
# `invalid_parameter` (resolve()).
_JOB_TYPES: dict[str, type | tuple[type, ...]] = {
    "prompt": str, "negative_prompt": str, "steps": int, "guidance_scale": (int, float), "width": int, "height": int,
    "aspect": str, "count": int, "seed": int, "scheduler": str, "rng": str, "strength": (int, float), "safety_checker": bool,
    "refiner": str, "refiner_switch": (int, float), "loras": list,
}
_JOB_FIELDS = set(_JOB_TYPES)
_TYPE_NAMES: dict[Any, str] = {
    str: "a string", int: "an integer", float: "a number", (int, float): "a number", bool: "true or false",
    bytes: "binary (msgpack bin)", list: "a list", dict: "a map", type(None): "nil",
}
_LAST_OF_A_RUN = {Event.JOB_DONE, Event.JOB_FAILED, Event.JOB_CANCELLED, Event.JOB_REQUEUED}
_SUBMIT_FIELDS = _JOB_FIELDS | {
    "v", "op", "id", "model", "priority", "output_dir", "output_name", "idempotency_key", "init_image",
}
MAX_OUTPUT_NAME = 240  # bytes: room for "-16.png" in a 255-byte file name


def _field(message: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    """A request field of the given type (bool is not a number here), or the default when absent."""
    if name not in message:
        return default
    value = message[name]
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        names = _TYPE_NAMES.get(kind) or " or ".join(_TYPE_NAMES[k] for k in kind)  # type: ignore[union-attr]
        raise ProtocolError(Code.BAD_MESSAGE, f"{name}: must be {names}, got {_TYPE_NAMES.get(type(value), type(value).__name__)}")
    return value


def _loras(value: list[Any], remote: bool) -> tuple[tuple[str, float], ...]:
    """The `loras` field: a list of {name, weight} maps (weight 1 when left out). From another
    machine only names in the LoRA folder: a path means a file on this one."""
    pairs = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or set(item) - {"name", "weight"}:
            raise ProtocolError(Code.INVALID_PARAMETER, "loras: each a map {name: string, weight: number}")
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ProtocolError(Code.INVALID_PARAMETER, f"loras: {item['name']}: weight must be a number")
        pairs.append((item["name"], float(weight)))
    if remote and any(lora.names_a_path(name) for name, _ in pairs):
        raise ProtocolError(Code.INVALID_PARAMETER, "loras: from another machine, names in the daemon's LoRA folder")
    return tuple(pairs)


def _required(message: dict[str, Any], name: str, kind: type) -> Any:
    """A field the op cannot do without: missing, it is `invalid_parameter` naming it."""
    if name not in message:
        raise ProtocolError(Code.INVALID_PARAMETER, f"{name}: required")
    return _field(message, name, kind)


def _readable_id(frame: bytes) -> Any:
    """The id of a request refused for its size, so its sender can match the reply (None if unreadable)."""
    try:
        message = unpack(frame)
    except ProtocolError:
        return None
    request_id = message.get("id") if isinstance(message, dict) else None
    return request_id if isinstance(request_id, (str, int)) else None


class Server:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.seq = 0
        self.topic_seqs: dict[bytes, int] = {}
        self.remote_request = False  # whether the batch in hand came over TCP
        self.stop_requested = False
        self.models: dict[str, ModelFolder | CoreMLFolder] = {}
        self.outbox: list[tuple[bytes, dict[str, Any]]] = []  # events of the batch in hand, sent after commit

    # -- lifecycle ---------------------------------------------------------------------------

    def serve(self) -> int:
        """Run until shutdown or SIGTERM; 0 for a requested stop."""
        runtime_dir = secure_runtime_dir(self.config.runtime_dir)
        lock = hold_lock(runtime_dir)
        if parse(self.config.model).repo is None:
            self._model(self.config.model)  # a missing default model stops the start, with the reason
        self.context = zmq.Context()
        router, events = bind(self.context, runtime_dir)
        self.routers, self.publishers, authenticator, worker_socket = [router], [events], None, None
        if self.config.tcp:
            tcp_router, tcp_events, worker_socket, authenticator = bind_tcp(
                self.context, self.config.tcp, self.config.keys_dir
            )
            tcp_router.setsockopt(zmq.MAXMSGSIZE, HARD_MESSAGE_BYTES)
            worker_socket.setsockopt(zmq.MAXMSGSIZE, MAX_RESULT_BYTES)
            self.routers.append(tcp_router)
            self.publishers.append(tcp_events)
        pull = self.context.socket(zmq.PULL)
        pull.bind(WORKER_EVENTS)
        self.queue = JobQueue(self.config.database)
        # Outcomes of requests go out after the batch's commit and replies; others at once.
        self.jobs = Jobs(self.queue, self._publish)
        self.batch_jobs = Jobs(self.queue, lambda topic, body: self.outbox.append((topic, body)))
        requeued, cancelled = self.queue.recover()
        if requeued or cancelled:
            log.info("recovered after a crash: %d jobs queued again, %d cancelled", len(requeued), len(cancelled))
        self.worker = Worker(self.config, self.context)
        self.remote_workers = None
        if worker_socket is not None:
            self.remote_workers = RemoteWorkers(
                worker_socket, self.jobs, self._publish, self.config.worker_timeout,
                lambda: any(p.startswith(b"preview") for p in self.worker.preview_prefixes),
            )
        self.worker.start()
        self.downloader = Downloader(self.context, self.config.device, self.config.keep_archives)
        self.downloader.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        log.info("listening in %s (pid %d); loading %s", runtime_dir, os.getpid(), self.config.model)

        sockets = [*self.routers, pull, *self.publishers, *([worker_socket] if worker_socket else [])]
        poller = zmq.Poller()
        for socket in sockets:
            poller.register(socket, zmq.POLLIN)
        exit_code = 0
        try:
            while not self.stop_requested:
                ready = dict(poller.poll(200))
                for publisher in self.publishers:
                    if publisher in ready:
                        self._subscriptions(publisher)
                if pull in ready:
                    self._forward(pull)
                for router in self.routers:
                    if router in ready:
                        self._requests(router)
                if self.remote_workers is not None:
                    if worker_socket in ready:
                        self.remote_workers.receive()
                    self.remote_workers.tick()
                if not self.worker.is_alive():
                    log.error("the worker stopped; exiting so the service manager restarts the daemon")
                    exit_code = 1
                    break
        finally:
            notify("STOPPING=1")
            self._publish(DAEMON_TOPIC, {"type": Event.DAEMON_STOPPING})
            if self.downloader.active:
                self.downloader.cancel(self.downloader.active)  # files that arrived whole stay cached
            self.downloader.stop()
            if self.remote_workers is not None:
                self.remote_workers.stop()
            self.worker.stop()
            self.worker.join(timeout=STOP_GRACE)
            self.downloader.join(timeout=STOP_GRACE)
            while pull.poll(0):
                self._forward(pull)
            # Only a worker stuck in a model call (or one that died) leaves a job running here; its
            # late result is then ignored, as the queue takes an outcome only for a running job.
            self.jobs.settle_running("daemon stopping")
            self.queue.close()
            if authenticator is not None:
                authenticator.stop()
            for socket in sockets:
                socket.close(linger=0)
            for endpoint in endpoints(runtime_dir):
                Path(endpoint.removeprefix("ipc://")).unlink(missing_ok=True)  # clients see "not running" at once
            stuck = [thread.name for thread in (self.worker, self.downloader) if thread.is_alive()]
            if stuck:
                # A model call (or a download's read) cannot be interrupted, and the context cannot
                # end while its thread holds a socket: leave now. The queue holds every outcome, and
                # the lock goes with the process.
                log.warning("stopped; the %s was still inside a call after %gs and is abandoned",
                            " and the ".join(stuck), STOP_GRACE)
                logging.shutdown()
                os._exit(exit_code)
            self.context.term()
            os.close(lock)
            log.info("stopped")
        return exit_code

    def _on_signal(self, signum: int, _frame: Any) -> None:
        log.info("%s: finishing up", signal.Signals(signum).name)
        self.stop_requested = True

    # -- events ------------------------------------------------------------------------------

    def _publish(self, topic: bytes, body: dict[str, Any]) -> None:
        """Stamp and send: ``seq`` counts every event, ``topic_seq`` this topic's, so a subscriber
        of some topics tells a lost event (a jump in topic_seq) from other topics' traffic."""
        self.seq += 1
        self.topic_seqs[topic] = self.topic_seqs.get(topic, 0) + 1
        body["seq"] = self.seq
        body["topic_seq"] = self.topic_seqs[topic]
        body.setdefault("ts", time.time())
        if body.get("type") in _LAST_OF_A_RUN:
            del self.topic_seqs[topic]  # a retried job's topic starts again at 1
        frames = [topic, pack(body)]
        for publisher in self.publishers:
            publisher.send_multipart(frames)

    def _forward(self, pull: zmq.Socket) -> None:
        while True:
            try:
                topic, body = pull.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._publish(topic, unpack(body))

    def _subscriptions(self, publisher: zmq.Socket) -> None:
        prefixes = set(self.worker.preview_prefixes)
        while True:
            try:
                frame = publisher.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            if frame[:1] == b"\x01":
                prefixes.add(frame[1:])
            elif frame[:1] == b"\x00":
                prefixes.discard(frame[1:])
        self.worker.preview_prefixes = frozenset(prefixes)

    # -- requests ----------------------------------------------------------------------------

    def _requests(self, router: zmq.Socket) -> None:
        # Requests from another machine (TCP) may not name paths on this one: see _op_submit.
        self.remote_request = router is not self.routers[0]
        batch: list[list[bytes]] = []
        while len(batch) < BATCH:
            try:
                batch.append(router.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
        try:
            with self.queue.transaction():
                replies = [self._answer(frames) for frames in batch]
        except sqlite3.Error:
            # Rolled back whole: answer each on its own, so each gets its own verdict and id.
            log.exception("a batch of %d requests could not be committed; answering one by one", len(batch))
            self.outbox.clear()
            replies = [self._answer(frames) for frames in batch]
        for reply in replies:
            router.send_multipart(reply)
        work = bool(self.outbox)  # jobs were queued or the queue resumed: a worker may have work
        for topic, body in self.outbox:
            self._publish(topic, body)
        self.outbox.clear()
        if work:
            self.worker.wake.set()
            if self.remote_workers is not None:
                self.remote_workers.dispatch()

    def _answer(self, frames: list[bytes]) -> list[bytes]:
        """Frames of the reply to one request: [identity, reply] (REQ peers: [identity, b"", reply])."""
        identity, rest = frames[0], frames[1:]
        envelope = [identity]
        if len(rest) == 2 and rest[0] == b"":
            envelope, rest = [identity, b""], rest[1:]
        request_id = None
        try:
            if len(rest) != 1:
                raise ProtocolError(Code.BAD_MESSAGE, f"a request is one frame, got {len(rest)}")
            if len(rest[0]) > MAX_MESSAGE_BYTES:
                request_id = _readable_id(rest[0])
                raise ProtocolError(Code.MESSAGE_TOO_LARGE, f"requests are at most {MAX_MESSAGE_BYTES} bytes")
            message = unpack(rest[0])
            if not isinstance(message, dict):
                raise ProtocolError(Code.BAD_MESSAGE, "a request is a msgpack map")
            request_id = message.get("id")
            if isinstance(request_id, (dict, list)):
                request_id = None
                raise ProtocolError(Code.BAD_MESSAGE, "id must be a string or a number")
            if type(message.get("v")) is not int or message["v"] != VERSION:  # true == 1 in Python
                raise ProtocolError(Code.UNSUPPORTED_VERSION, f"this daemon speaks protocol version {VERSION}")
            op = message.get("op")
            if op not in OPS:
                raise ProtocolError(Code.UNKNOWN_OP, f"unknown op {op!r}; ops: {', '.join(OPS)}")
            reply = ok(request_id, **getattr(self, f"_op_{op}")(message))
        except ProtocolError as exc:
            reply = error(request_id, exc.code, exc.message)
        except EngineError as exc:
            reply = error(request_id, exc.code, str(exc))
        except Exception as exc:
            log.exception("request failed")
            reply = error(request_id, Code.INTERNAL, f"{type(exc).__name__}: {exc}")
        return [*envelope, pack(reply)]

    def _model(self, name: str) -> ModelFolder | CoreMLFolder | None:
        """The model's facts for validation; None for a Hub model that its job will download."""
        if name not in self.models:
            try:
                self.models[name] = ModelFolder.open(name)
            except ModelNotDownloaded:
                return None
        return self.models[name]

    def _op_ping(self, message: dict[str, Any]) -> dict[str, Any]:
        if _field(message, "announce", bool, False):
            # A subscriber's way to know its subscription is live: it sees this event.
            self.outbox.append((DAEMON_TOPIC, {"type": Event.DAEMON_PING, "token": message.get("id")}))
        return {
            "version": DAEMON_VERSION, "protocol": VERSION, "ready": self.worker.ready.is_set(),
            "models": {"loaded": self.worker.loaded, "loading": self.worker.loading},
            "queue": self.queue.counts(), "paused": self.queue.paused(), "pid": os.getpid(),
            "workers": self.remote_workers.connected() if self.remote_workers is not None else [],
        }

    def _op_submit(self, message: dict[str, Any]) -> dict[str, Any]:
        unknown = set(message) - _SUBMIT_FIELDS
        if unknown:
            raise ProtocolError(Code.INVALID_PARAMETER, f"unknown fields {sorted(unknown)}")
        model_name = _field(message, "model", str, self.config.model)
        priority = _field(message, "priority", int, 0)
        if not -MAX_PRIORITY <= priority <= MAX_PRIORITY:
            raise ProtocolError(Code.INVALID_PARAMETER, f"priority: must be from {-MAX_PRIORITY} to {MAX_PRIORITY}")
        output_dir = self._output_dir(_field(message, "output_dir", str))
        output_name = _field(message, "output_name", str)
        if output_name is not None and (
            not 0 < len(output_name.encode("utf-8", "surrogatepass")) <= MAX_OUTPUT_NAME or output_name.startswith(".")
            or any(c in output_name for c in "/\\\0")
        ):
            raise ProtocolError(Code.INVALID_PARAMETER, f"output_name: a file name of 1 to {MAX_OUTPUT_NAME} bytes "
                                "of UTF-8, without / or \\, not starting with a dot")
        if self.remote_request and not parse(model_name).portable:
            raise ProtocolError(Code.INVALID_PARAMETER, "model: from another machine, a catalog name or a Hub id")
        refiner_name = _field(message, "refiner", str)
        if self.remote_request and refiner_name is not None and not parse(refiner_name).portable:
            raise ProtocolError(Code.INVALID_PARAMETER, "refiner: from another machine, a catalog name or a Hub id")
        key = _field(message, "idempotency_key", str)
        if key is not None and not 0 < len(key) <= 256:
            raise ProtocolError(Code.INVALID_PARAMETER, "idempotency_key: must be 1 to 256 characters")
        if key is not None:
            existing = self.queue.find_by_key(key)
            if existing is not None:
                return {"job": existing.to_wire(), "created": False}
        _required(message, "prompt", str)
        fields = {name: _field(message, name, kind) for name, kind in _JOB_TYPES.items() if name in message}
        if isinstance(fields.get("scheduler"), str) and fields["scheduler"] not in schedulers.NAMES:
            try:
                fields["scheduler"] = schedulers.from_sampler_name(fields["scheduler"])
            except ValueError:
                pass  # resolve() names the choices
        if "loras" in fields:
            fields["loras"] = _loras(fields["loras"], self.remote_request)
        if self.remote_request and any(lora.names_a_path(name) for name, _ in lora.prompt_tags(fields["prompt"])):
            raise ProtocolError(Code.INVALID_PARAMETER, "prompt: from another machine, <lora:NAME> names a LoRA in the "
                                "daemon's LoRA folder, not a path")
        image_bytes = _field(message, "init_image", bytes)
        refiner = self._model(refiner_name) if refiner_name else None
        request = resolve(Request(**fields, init_image=self._image(image_bytes)), self._model(model_name), self.config.limits,
                          refiner, self.config.lora_dir, downloads_pending=True)
        # A request resolved against its model records the size its aspect chose, not the aspect (a retry,
        # a requeue after a crash and --reuse make that size again); one whose model is still to come keeps it.
        params = {name: getattr(request, name) for name in _JOB_FIELDS if hasattr(request, name)}
        # The job's list as given (the prompt's tags stay in the prompt), in the wire's form.
        params["loras"] = [{"name": name, "weight": weight} for name, weight in fields.get("loras", ())]
        job, created = self.batch_jobs.submit(params, model_name, output_dir, priority, key, image_bytes,
                                              self.config.max_queued, output_name)
        return {"job": job.to_wire(), "created": created}

    def _output_dir(self, asked: str | None) -> str:
        """Where a job's images go: any absolute folder for a local client; for a client on another
        machine only a folder inside the daemon's output folder, named relative to it."""
        if asked is None:
            return str(self.config.output_dir)
        if not self.remote_request:
            if not Path(asked).is_absolute():
                raise ProtocolError(Code.INVALID_PARAMETER, "output_dir: must be an absolute path")
            return asked
        root = self.config.output_dir.resolve()
        folder = (root / asked).resolve()
        if Path(asked).is_absolute() or not folder.is_relative_to(root):
            raise ProtocolError(
                Code.INVALID_PARAMETER, "output_dir: from another machine, a folder inside the daemon's output folder"
            )
        return str(folder)

    @staticmethod
    def _image(data: bytes | None) -> Image.Image | None:
        if data is None:
            return None
        try:
            image = Image.open(io.BytesIO(data))
            if max(image.size) > MAX_INIT_IMAGE_SIDE:
                raise ProtocolError(Code.INVALID_PARAMETER, f"init_image: at most {MAX_INIT_IMAGE_SIDE} pixels a side")
            image.load()
        except ProtocolError:
            raise
        except Exception as exc:
            # PIL's own message names an io.BytesIO object, not the user's file.
            raise ProtocolError(
                Code.INVALID_PARAMETER, f"init_image: not an image PIL can read ({type(exc).__name__}); give a PNG, JPEG or WebP file"
            ) from None
        return image

    def _op_get(self, message: dict[str, Any]) -> dict[str, Any]:
        return {"job": self.queue.get(_required(message, "job", str)).to_wire()}

    def _op_list(self, message: dict[str, Any]) -> dict[str, Any]:
        states = _field(message, "states", list)
        if states is not None and any(s not in STATES for s in states):
            raise ProtocolError(Code.INVALID_PARAMETER, f"states: each one of {', '.join(STATES)}")
        limit = _field(message, "limit", int, 50)
        offset = _field(message, "offset", int, 0)
        if not (1 <= limit <= MAX_LIST and offset >= 0):
            raise ProtocolError(Code.INVALID_PARAMETER, f"limit: 1 to {MAX_LIST}; offset: 0 or more")
        jobs = self.queue.list(states, limit, offset)
        return {"jobs": [job.to_wire() for job in jobs], "counts": self.queue.counts()}

    def _op_cancel(self, message: dict[str, Any]) -> dict[str, Any]:
        if "model" in message:
            model = _field(message, "model", str)
            self.downloader.cancel(parse(model).canonical)
            return {"model": model}
        if _field(message, "all_queued", bool, False):
            return {"cancelled": self.batch_jobs.cancel_queued()}
        job = self.batch_jobs.cancel(_required(message, "job", str))
        if job.state != "running":
            return {"job": job.to_wire(), "pending": False}
        if self.remote_workers is None or not self.remote_workers.cancel(job.id):
            self.worker.cancel(job.id)
        return {"job": job.to_wire(), "pending": True, "message": CANCEL_PENDING.format(job=job.id)}

    def _op_pause(self, message: dict[str, Any]) -> dict[str, Any]:
        self.queue.set_paused(True)
        self.outbox.append((DAEMON_TOPIC, {"type": Event.DAEMON_PAUSED}))
        return {"paused": True}

    def _op_resume(self, message: dict[str, Any]) -> dict[str, Any]:
        self.queue.set_paused(False)
        self.outbox.append((DAEMON_TOPIC, {"type": Event.DAEMON_RESUMED}))
        return {"paused": False}

    def _op_retry(self, message: dict[str, Any]) -> dict[str, Any]:
        job = self.batch_jobs.retry(_required(message, "job", str))
        return {"job": job.to_wire()}

    def _op_prune(self, message: dict[str, Any]) -> dict[str, Any]:
        before = _field(message, "before", (int, float), time.time())
        return {"pruned": self.queue.prune(float(before))}

    def _op_models(self, message: dict[str, Any]) -> dict[str, Any]:
        loaded = self.worker.loaded
        cached = {m["name"]: m for m in store.cached_models()}
        models = [{"name": alias, "source": "shipped", "runtime": "torch", "path": str(path),
                   "size": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()), "loaded": alias in loaded}
                  for alias, path in ALIASES.items()]
        for entry in catalog.CATALOG:
            local = cached.pop(entry.repo, None)
            models.append({"name": entry.alias, "repo": entry.repo, "source": "catalog", "runtime": entry.runtime,
                           "variant": entry.variant, "description": entry.description, "downloaded": local is not None,
                           "size": local["size"] if local else None, "path": local["path"] if local else None,
                           "loaded": entry.alias in loaded or entry.repo in loaded})
        for name, local in cached.items():
            models.append({**local, "source": "hub", "downloaded": True, "loaded": name in loaded})
        return {"models": models, "loaded": loaded, "loras": lora.listing(self.config.lora_dir),
                "lora_dir": str(self.config.lora_dir)}

    def _op_pull(self, message: dict[str, Any]) -> dict[str, Any]:
        name = parse(_required(message, "model", str)).canonical
        units = _field(message, "compute_units", str, self.config.compute_units)
        if units not in COMPUTE_UNIT_CHOICES:
            raise ProtocolError(Code.INVALID_PARAMETER, f"compute_units: one of {', '.join(COMPUTE_UNIT_CHOICES)}")
        if parse(name).repo is None:
            raise ProtocolError(Code.INVALID_PARAMETER, f"model: {name!r} is not a Hub id (org/name) or a catalog alias")
        self.downloader.pull(name, choose(units, self.config.state_dir, this_machine(), name))
        return {"pulling": name, "topic": model_topic(name).decode()}

    def _op_remove(self, message: dict[str, Any]) -> dict[str, Any]:
        name = parse(_required(message, "model", str)).canonical
        if name in self.worker.loaded:
            raise ProtocolError(Code.INVALID_STATE, f"{name} is loaded; load another model first")
        self.models.pop(name, None)
        return {"removed": name, "freed": store.remove(name)}

    def _op_shutdown(self, message: dict[str, Any]) -> dict[str, Any]:
        self.stop_requested = True
        return {"stopping": True}
