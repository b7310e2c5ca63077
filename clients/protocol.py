"""The wire protocol shared by the daemon and its clients (docs/protocol.md is its full text).

Requests are single-frame msgpack maps over DEALER → ROUTER; every request gets exactly one reply.
Events are two frames over PUB: a topic, then a msgpack map. Standard library and msgpack only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgpack

VERSION = 1
# A request larger than this is answered with `message_too_large`; one larger than
# HARD_MESSAGE_BYTES is dropped by ZeroMQ itself, which disconnects the sender.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
HARD_MESSAGE_BYTES = 64 * 1024 * 1024

OPS = ("ping", "submit", "get", "list", "cancel", "pause", "resume", "retry", "prune", "shutdown", "models", "pull", "remove")
STATES = ("queued", "running", "done", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled")


class Code:
    """Stable error codes: clients branch on these, never on messages."""

    BAD_MESSAGE = "bad_message"  # not msgpack, not a map, or a field of the wrong type
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_OP = "unknown_op"
    MESSAGE_TOO_LARGE = "message_too_large"
    INVALID_PARAMETER = "invalid_parameter"  # a job parameter outside its limits
    NOT_FOUND = "not_found"  # no job with that id
    INVALID_STATE = "invalid_state"  # e.g. retry of a job that is done
    QUEUE_FULL = "queue_full"
    MODEL_NOT_FOUND = "model_not_found"
    MODEL_INVALID = "model_invalid"
    CANCELLED = "cancelled"
    OUTPUT_ERROR = "output_error"  # the output folder cannot be written
    DOWNLOAD_FAILED = "download_failed"  # a Hub model's download broke off, or its archive was unsafe
    INSUFFICIENT_DISK = "insufficient_disk"  # a Hub model does not fit in the Hugging Face cache's disk
    INTERNAL = "internal_error"


class Event:
    """Event types, by topic (docs/protocol.md, Events): subscribers branch on these."""

    # job.ID
    JOB_QUEUED = "job.queued"
    JOB_STARTED = "job.started"
    JOB_PROGRESS = "job.progress"
    JOB_DONE = "job.done"
    JOB_FAILED = "job.failed"
    JOB_CANCELLED = "job.cancelled"
    JOB_REQUEUED = "job.requeued"
    JOB_RESYNC = "job.resync"  # made by Client.events where events were lost, never published
    # preview.ID
    JOB_PREVIEW = "job.preview"
    # model.NAME
    MODEL_DOWNLOADING = "model.downloading"
    MODEL_DOWNLOAD = "model.download"
    MODEL_DOWNLOADED = "model.downloaded"
    MODEL_DOWNLOAD_FAILED = "model.download_failed"
    MODEL_CONVERTING = "model.converting"  # a Core ML model converted with a job's LoRAs merged in: a line per stage
    MODEL_CONVERTED = "model.converted"
    MODEL_LOADING = "model.loading"
    MODEL_COMPILING = "model.compiling"
    MODEL_COMPILED = "model.compiled"
    MODEL_LOADED = "model.loaded"
    MODEL_UNLOADED = "model.unloaded"
    # daemon
    DAEMON_READY = "daemon.ready"
    DAEMON_PAUSED = "daemon.paused"
    DAEMON_RESUMED = "daemon.resumed"
    DAEMON_PING = "daemon.ping"
    DAEMON_STOPPING = "daemon.stopping"
    DAEMON_WORKER_FAILED = "daemon.worker_failed"
    WORKER_JOINED = "worker.joined"
    WORKER_LOST = "worker.lost"


class ProtocolError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def pack(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(data: bytes) -> Any:
    """Decode one frame; anything that is not one msgpack value raises ProtocolError(bad_message)."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several types, ValueError and its own among them
        raise ProtocolError(Code.BAD_MESSAGE, f"not a msgpack message ({type(exc).__name__}: {exc})") from None


def ok(request_id: Any, **fields: Any) -> dict[str, Any]:
    return {"v": VERSION, "id": request_id, "ok": True, **fields}


def error(request_id: Any, code: str, message: str) -> dict[str, Any]:
    return {"v": VERSION, "id": request_id, "ok": False, "error": {"code": code, "message": message}}


# Where a Core ML model runs, as Apple's Swift CLI and Diffusers for Mac spell it: the config's
# compute_units, `pull`'s field and the command lines' --compute-units take one of these or AUTO.
COMPUTE_UNITS = ("cpuAndGPU", "cpuAndNeuralEngine", "all", "cpuOnly")
AUTO = "auto"  # the bench's winner on this machine, else Diffusers for Mac's rule
COMPUTE_UNIT_CHOICES = (AUTO, *COMPUTE_UNITS)


def job_topic(job_id: str) -> bytes:
    return f"job.{job_id}".encode()


def preview_topic(job_id: str) -> bytes:
    return f"preview.{job_id}".encode()


def model_topic(name: str) -> bytes:
    return f"model.{name}".encode()


DAEMON_TOPIC = b"daemon"


def default_runtime_dir() -> Path:
    """The per-user folder of the daemon's sockets: short, so ipc paths fit macOS's 104 bytes."""
    override = os.environ.get("DIFFUSIOND_RUNTIME_DIR")
    if override:
        return Path(override)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "diffusiond"
    return Path(f"/tmp/diffusiond-{os.getuid()}")


def endpoints(runtime_dir: Path) -> tuple[str, str]:
    """The request and event endpoints inside a runtime folder."""
    return f"ipc://{runtime_dir}/request", f"ipc://{runtime_dir}/events"
