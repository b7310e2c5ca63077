"""`diffuse http`: the daemon over HTTP — AUTOMATIC1111's /sdapi/v1 API, native job endpoints with
Server-Sent Events, and a web page — a client of the daemon like `diffuse`, through `Client`.

Every A1111 txt2img/img2img request becomes a queued daemon job, so several HTTP clients queue
like any others; the request returns when its job ends. Needs the `http` extra (FastAPI, uvicorn).
The daemon must run on this machine: images are read from the paths its jobs record, never from
a path a request names (docs/http.md).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Header, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import HTTPException
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.middleware.cors import CORSMiddleware

from . import a1111
from .client import Client, DaemonUnreachable, JobFailed, RequestFailed
from .event_hub import EventHub
from .http_guard import Guard, GuardMiddleware, is_loopback
from .pngtext import text_chunks
from .protocol import FINISHED, STATES, Code, Event

WEB = Path(__file__).parent / "web"
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7860  # A1111's port: tools find it there
MAX_EVENT_STREAMS = 64  # concurrent /api/events readers
KEEPALIVE = 15.0  # seconds between SSE comments on a quiet stream (a proxy or a phone keeps it open)
RECHECK = 2.0  # seconds between `get`s while a job runs without an event (a lost final event)
_STATUS = {
    Code.INVALID_PARAMETER: 422, Code.BAD_MESSAGE: 422, Code.NOT_FOUND: 404, Code.MODEL_NOT_FOUND: 404,
    Code.INVALID_STATE: 409, Code.QUEUE_FULL: 503, Code.MESSAGE_TOO_LARGE: 413,
}
T = TypeVar("T")


# --- A1111's request and response models (modules/api/models.py): its field names and defaults ---------


class Txt2ImgRequest(BaseModel):
    """StableDiffusionTxt2ImgProcessingAPI, the fields diffusiond reads or refuses. A1111's models
    ignore fields they do not know, and take null for any field (its default then)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str | None = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = None
    seed: int | None = -1
    subseed: int | None = -1
    subseed_strength: float | None = 0
    seed_resize_from_h: int | None = -1
    seed_resize_from_w: int | None = -1
    sampler_name: str | None = None
    scheduler: str | None = None
    batch_size: int | None = 1
    n_iter: int | None = 1
    steps: int | None = 50
    cfg_scale: float | None = 7.0
    width: int | None = 512
    height: int | None = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    enable_hr: bool | None = False
    override_settings: dict[str, Any] | None = None
    sampler_index: str | None = "Euler"
    script_name: str | None = None
    script_args: list[Any] | None = Field(default_factory=list)
    alwayson_scripts: dict[str, Any] | None = Field(default_factory=dict)
    send_images: bool | None = True
    save_images: bool | None = False

    def filled(self) -> dict[str, Any]:
        """The fields with A1111's default wherever the request sent null."""
        defaults = type(self)()
        return {name: getattr(defaults, name) if value is None else value for name, value in self.model_dump().items()}


class Img2ImgRequest(Txt2ImgRequest):
    """StableDiffusionImg2ImgProcessingAPI: the txt2img fields and the init image's."""

    init_images: list[str] | None = None
    denoising_strength: float | None = 0.75
    resize_mode: int | None = 0
    mask: str | None = None
    include_init_images: bool | None = False


class ImagesResponse(BaseModel):
    """TextToImageResponse and ImageToImageResponse."""

    images: list[str] | None = None
    parameters: dict[str, Any]
    info: str


class PNGInfoRequest(BaseModel):
    image: str


class PNGInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: dict[str, Any]
    current_image: str | None = None
    textinfo: str | None = None


class SDModelItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None


class LoraItem(BaseModel):
    """The Lora extension's create_lora_json (extensions-builtin/Lora/scripts/lora_script.py)."""

    name: str
    alias: str
    path: str
    metadata: dict[str, Any]


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float | None = None
    need_inner_model: bool | None = None


# --- the daemon, one Client per thread (a ZeroMQ socket belongs to one thread) -----------------------


class DaemonClients:
    def __init__(self, factory: Callable[[], Client]) -> None:
        self.factory = factory
        self._local = threading.local()

    def _client(self) -> Client:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self.factory()
        return client

    async def run(self, call: Callable[[Client], T]) -> T:
        """``call`` with this worker thread's Client, off the event loop."""
        return await run_in_threadpool(lambda: call(self._client()))


def decode_base64(text: str, what: str) -> bytes:
    """A base64 image as A1111 takes it, with or without a data: URL prefix (never a URL to fetch)."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(422, f"{what}: not base64 (a data: URL or plain base64 of the image's bytes)") from None


_PATH_PREFIXES = ("/", "~", ".")
_LORA_TAG_NAME = re.compile(r"<lora:([^:>]*)")  # the name in A1111's <lora:NAME> / <lora:NAME:WEIGHT>


def refuse_paths(fields: dict[str, Any]) -> None:
    """A model, refiner or LoRA named by a path would have the daemon read a file the request names:
    over HTTP a model is an alias, catalog name or Hub id, a LoRA a name in the daemon's LoRA folder
    or a Hub file (as the daemon takes them from another machine)."""
    for name in ("model", "refiner"):
        value = fields.get(name)
        if isinstance(value, str) and value.startswith(_PATH_PREFIXES):
            raise HTTPException(422, f"{name}: {value!r} is a path; over HTTP name a model (an alias, catalog name or Hub id)")
    prompt = fields.get("prompt")
    named = [("prompt", tag.strip()) for tag in _LORA_TAG_NAME.findall(prompt if isinstance(prompt, str) else "")]
    loras = fields.get("loras")
    named += [("loras", str(item.get("name", "")).strip()) for item in (loras if isinstance(loras, list) else [])
              if isinstance(item, dict)]
    for field, lora in named:
        if lora.startswith(_PATH_PREFIXES):
            raise HTTPException(422, f"{field}: LoRA {lora!r} is a path; over HTTP name a LoRA in the daemon's LoRA "
                                     "folder (GET /sdapi/v1/loras lists them) or a Hub file ORG/REPO/FILE.safetensors")


def ended(job: dict[str, Any], event: dict[str, Any]) -> dict[str, Any]:
    """A submitted job as its final event leaves it (docs/protocol.md, Events: job.done carries the
    outputs and the result's fields, job.failed the error)."""
    if event["type"] == Event.JOB_RESYNC:
        return dict(event["state"])
    if event["type"] == Event.JOB_DONE:
        result = {key: event[key] for key in ("seed", "width", "height", "flagged", "prompt_dropped", "timings")
                  if key in event}
        return {**job, "state": "done", "outputs": event.get("outputs", []), "result": result}
    if event["type"] == Event.JOB_FAILED:
        return {**job, "state": "failed", "error": {"code": event.get("code"), "message": event.get("message")}}
    return {**job, "state": "cancelled"}


def _a1111_error(status: int, error: str, detail: str) -> JSONResponse:
    """A1111's api_middleware shape: {error, detail, body, errors}."""
    return JSONResponse(status_code=status, content={"error": error, "detail": detail, "body": "",
                                                     "errors": f"{status}: {detail}"})


def create_app(runtime_dir: Path | None = None, guard: Guard | None = None, timeout: float = 10.0) -> FastAPI:
    """The HTTP server's app for the daemon whose sockets are in ``runtime_dir``."""
    hub = EventHub(lambda: Client(runtime_dir, timeout=timeout))
    daemon = DaemonClients(lambda: Client(runtime_dir, timeout=timeout))
    chosen: dict[str, str] = {}  # /options' sd_model_checkpoint, for jobs that name no model

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(hub.start)
        yield
        await run_in_threadpool(hub.stop)

    # FastAPI's /docs and /redoc pages load their scripts from a CDN: a local server's pages load
    # nothing from elsewhere, so only the OpenAPI description itself is served.
    app = FastAPI(title="diffusiond", summary="AUTOMATIC1111's API and native job endpoints over the diffusiond daemon",
                  lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> JSONResponse:
        return _a1111_error(500, type(exc).__name__, str(exc))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return _a1111_error(exc.status_code, "HTTPException", str(exc.detail))

    @app.exception_handler(RequestFailed)
    async def daemon_refused(_: Request, exc: RequestFailed) -> JSONResponse:
        return _a1111_error(_STATUS.get(exc.code, 500), "RequestFailed", f"{exc.code}: {exc.message}")

    @app.exception_handler(DaemonUnreachable)
    async def daemon_gone(_: Request, exc: DaemonUnreachable) -> JSONResponse:
        return _a1111_error(503, "DaemonUnreachable", str(exc))

    @app.exception_handler(JobFailed)
    async def job_failed(_: Request, exc: JobFailed) -> JSONResponse:
        error = exc.job.get("error") or {}
        return _a1111_error(500, "JobFailed", f"{error.get('code')}: {error.get('message')}")

    @app.exception_handler(a1111.Refusal)
    async def refused(_: Request, exc: a1111.Refusal) -> JSONResponse:
        return _a1111_error(exc.status, "HTTPException", exc.detail)

    async def finished_job(job: dict[str, Any]) -> dict[str, Any]:
        """The job as it ended: from its final event (no round trip), or from `get` where no event
        came for a while (a lost event)."""
        future = hub.finished(job["id"])
        try:
            while True:
                await asyncio.wait([future], timeout=RECHECK)
                if future.done():
                    return ended(job, future.result())
                current = await daemon.run(lambda c: c.get(job["id"]))
                if current["state"] in FINISHED:
                    return current
        finally:
            hub.forget(job["id"], future)

    def read_outputs(job: dict[str, Any]) -> list[bytes]:
        return [Path(path).read_bytes() for path in job.get("outputs") or []]

    async def generate(request: dict[str, Any], init_image: bytes | None) -> dict[str, Any]:
        fields = a1111.job_fields(request, chosen.get("checkpoint"))
        refuse_paths(fields)
        if init_image is not None:
            fields.update(init_image=init_image, strength=request["denoising_strength"])
        job = await finished_job(await daemon.run(lambda c: c.submit(**fields)))
        if job["state"] == "failed":
            raise JobFailed(job)
        pngs = await run_in_threadpool(read_outputs, job) if job["state"] == "done" else []
        infotexts = [text_chunks(png).get("parameters", "") for png in pngs]
        parameters = dict(request)
        if init_image is not None and not request.get("include_init_images"):
            parameters.update(init_images=None, mask=None)
        return {
            "images": [base64.b64encode(png).decode() for png in pngs] if request["send_images"] else [],
            "parameters": parameters,
            "info": a1111.info_json(job, infotexts, img2img=init_image is not None),
        }

    # --- A1111: /sdapi/v1 -----------------------------------------------------------------------------

    @app.post("/sdapi/v1/txt2img", response_model=ImagesResponse, tags=["A1111"])
    async def txt2img(request: Txt2ImgRequest) -> Any:
        return await generate(request.filled(), None)

    @app.post("/sdapi/v1/img2img", response_model=ImagesResponse, tags=["A1111"])
    async def img2img(request: Img2ImgRequest) -> Any:
        fields = request.filled()
        if not fields["init_images"]:
            raise HTTPException(404, "Init image not found")  # A1111's answer, word for word
        if len(fields["init_images"]) > 1:
            raise HTTPException(422, f"init_images: diffusiond takes one init image, got {len(fields['init_images'])}")
        if fields["resize_mode"] != 0:
            raise HTTPException(422, f"resize_mode: only 0 (just resize) is supported, got {fields['resize_mode']}")
        return await generate(fields, decode_base64(fields["init_images"][0], "init_images[0]"))

    @app.get("/sdapi/v1/progress", response_model=ProgressResponse, tags=["A1111"])
    async def progress(skip_current_image: bool = False) -> dict[str, Any]:
        running = hub.running()
        if running is None:
            return {"progress": 0, "eta_relative": 0, "state": a1111.progress_state(None), "current_image": None,
                    "textinfo": None}
        share = running.step / running.total if running.total else 0.0
        image = None if skip_current_image or running.preview is None else base64.b64encode(running.preview).decode()
        return {"progress": min(share, 1.0), "eta_relative": running.eta, "state": a1111.progress_state(vars(running)),
                "current_image": image, "textinfo": f"step {running.step} of {running.total}" if running.total else None}

    async def cancel_running() -> None:
        for job_id in hub.running_ids():
            hub.mark_cancelling(job_id)
            try:
                await daemon.run(partial(Client.cancel, job_id=job_id))
            except RequestFailed as exc:
                if exc.code != Code.INVALID_STATE:  # it ended in the meantime
                    raise

    @app.post("/sdapi/v1/interrupt", tags=["A1111"])
    async def interrupt() -> dict[str, Any]:
        """Cancel the running job (queued ones go on); its request answers with no images."""
        await cancel_running()
        return {}

    @app.post("/sdapi/v1/skip", tags=["A1111"])
    async def skip() -> None:
        """A1111 skips the current image of a batch; a diffusiond job's images come from one
        generator, so this cancels the running job, as interrupt does."""
        await cancel_running()

    async def local_models() -> list[dict[str, Any]]:
        listing = await daemon.run(lambda c: c.call("models"))
        return [m for m in listing["models"] if m.get("source") in ("shipped", "hub") or m.get("downloaded")]

    @app.get("/sdapi/v1/sd-models", response_model=list[SDModelItem], tags=["A1111"])
    async def sd_models() -> list[dict[str, Any]]:
        return [{"title": m["name"], "model_name": m["name"], "hash": None, "sha256": None,
                 "filename": m.get("path") or m.get("repo") or m["name"], "config": None} for m in await local_models()]

    @app.post("/sdapi/v1/refresh-checkpoints", tags=["A1111"])
    async def refresh_checkpoints() -> None:
        """The daemon lists what is on disk at every call: asking it is the refresh."""
        await local_models()

    @app.get("/sdapi/v1/loras", response_model=list[LoraItem], tags=["A1111"])
    async def loras() -> list[dict[str, Any]]:
        """The LoRAs in the daemon's LoRA folder that a job can apply (docs/http.md: what `path` holds)."""
        listing = await daemon.run(lambda c: c.call("models"))
        return a1111.lora_list(listing["loras"])

    @app.post("/sdapi/v1/refresh-loras", tags=["A1111"])
    async def refresh_loras() -> None:
        """The daemon reads its LoRA folder at every listing: asking it is the refresh."""
        await daemon.run(lambda c: c.call("models"))

    @app.get("/sdapi/v1/samplers", response_model=list[SamplerItem], tags=["A1111"])
    async def samplers() -> list[dict[str, Any]]:
        return a1111.sampler_list()

    @app.get("/sdapi/v1/schedulers", response_model=list[SchedulerItem], tags=["A1111"])
    async def schedulers() -> list[dict[str, Any]]:
        return a1111.scheduler_list()

    async def checkpoint() -> str:
        if "checkpoint" in chosen:
            return chosen["checkpoint"]
        loaded = (await daemon.run(lambda c: c.ping()))["models"]["loaded"]
        return loaded[0] if loaded else ""

    @app.get("/sdapi/v1/options", tags=["A1111"])
    async def get_options() -> dict[str, Any]:
        """The one option diffusiond has: the checkpoint for requests that name none (at start,
        the model the daemon has loaded)."""
        return {"sd_model_checkpoint": await checkpoint()}

    @app.post("/sdapi/v1/options", tags=["A1111"])
    async def set_options(options: dict[str, Any]) -> Any:
        unknown = sorted(set(options) - {"sd_model_checkpoint"})
        if unknown:
            raise HTTPException(422, f"options {unknown} are not diffusiond's; the one option is sd_model_checkpoint")
        name = options.get("sd_model_checkpoint")
        if name is not None:
            names = [m["name"] for m in await local_models()]
            if name not in names:  # A1111's set_config raises RuntimeError: a 500 in its shape
                return _a1111_error(500, "RuntimeError", f"model {name!r} not found; models here: {', '.join(names)}")
            chosen["checkpoint"] = name
        return None

    @app.post("/sdapi/v1/png-info", response_model=PNGInfoResponse, tags=["A1111"])
    async def png_info(request: PNGInfoRequest) -> dict[str, Any]:
        data = decode_base64(request.image.strip(), "image")
        if not data.startswith(b"\x89PNG\r\n\x1a\n"):
            raise HTTPException(500, "Invalid encoded image")  # A1111's answer to bytes it cannot open
        items = text_chunks(data)
        info = items.pop("parameters", "")
        return {"info": info, "items": items, "parameters": a1111.png_parameters(info)}

    # --- native: jobs and events ------------------------------------------------------------------------

    @app.post("/api/jobs", tags=["jobs"])
    async def submit(fields: dict[str, Any]) -> dict[str, Any]:
        """Submit a job: the daemon's submit fields (docs/protocol.md), ``init_image`` as base64.
        ``output_dir`` and ``output_name`` are not taken over HTTP: no request names a path."""
        for name in ("output_dir", "output_name"):
            if name in fields:
                raise HTTPException(422, f"{name}: not taken over HTTP; images go where the daemon puts them")
        if isinstance(fields.get("init_image"), str):
            fields["init_image"] = decode_base64(fields["init_image"], "init_image")
        if "prompt" not in fields:
            raise HTTPException(422, "prompt: required")
        refuse_paths(fields)
        return await daemon.run(lambda c: c.call("submit", **fields))

    @app.get("/api/jobs", tags=["jobs"])
    async def list_jobs(state: list[str] | None = Query(None), limit: int = 50, offset: int = 0) -> dict[str, Any]:
        for name in state or []:
            if name not in STATES:
                raise HTTPException(422, f"state: {name!r} is not one of {', '.join(STATES)}")
        return await daemon.run(lambda c: c.jobs(state, limit, offset))

    @app.get("/api/jobs/{job_id}", tags=["jobs"])
    async def get_job(job_id: str) -> dict[str, Any]:
        return await daemon.run(lambda c: c.get(job_id))

    @app.post("/api/jobs/{job_id}/cancel", tags=["jobs"])
    async def cancel_job(job_id: str) -> dict[str, Any]:
        reply = await daemon.run(lambda c: c.call("cancel", job=job_id))
        return {key: value for key, value in reply.items() if key not in ("v", "id", "ok")}

    @app.get("/api/jobs/{job_id}/images/{index}", tags=["jobs"], response_class=FileResponse)
    async def job_image(job_id: str, index: int) -> Response:
        """Image ``index`` of a done job: the file the daemon wrote, as its job records it."""
        outputs = (await daemon.run(lambda c: c.get(job_id))).get("outputs") or []
        if not 0 <= index < len(outputs):
            raise HTTPException(404, f"job {job_id} has {len(outputs)} images")
        if not Path(outputs[index]).is_file():
            raise HTTPException(404, f"image {index} of job {job_id} is no longer at {outputs[index]}")
        return FileResponse(outputs[index], media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/api/status", tags=["jobs"])
    async def status() -> dict[str, Any]:
        reply = await daemon.run(lambda c: c.ping())
        return {key: value for key, value in reply.items() if key not in ("v", "id", "ok")}

    @app.get("/api/events", tags=["jobs"])
    async def events(last_event_id: str | None = Header(None)) -> StreamingResponse:
        """The daemon's events as Server-Sent Events: ``id`` is the daemon's ``seq``, ``data`` the
        event as JSON (a preview's JPEG as base64). Reconnecting with Last-Event-ID replays the held
        events after it (the last 1000; previews are live only)."""
        if hub.reader_count() >= MAX_EVENT_STREAMS:
            raise HTTPException(503, f"{MAX_EVENT_STREAMS} event streams are open; close one")
        after = int(last_event_id) if last_event_id is not None and last_event_id.isdigit() else None
        reader, replay = hub.subscribe(after)

        def frame(event: dict[str, Any]) -> str:
            head = f"id: {event['seq']}\n" if "seq" in event else ""
            return f"{head}data: {json.dumps(jsonable_encoder(event))}\n\n"

        async def stream() -> AsyncIterator[str]:
            try:
                yield "retry: 2000\n\n"
                for held in replay:
                    yield frame(held)
                while True:
                    try:
                        event: dict[str, Any] | None = await asyncio.wait_for(reader.queue.get(), KEEPALIVE)
                    except asyncio.TimeoutError:
                        yield ": keep-alive\n\n"
                        continue
                    if event is None:
                        return
                    yield frame(event)
            finally:
                hub.unsubscribe(reader)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    # --- the page -------------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(WEB / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/web", StaticFiles(directory=WEB), name="web")

    if guard is not None:
        if guard.cors_origins:
            app.add_middleware(CORSMiddleware, allow_origins=list(guard.cors_origins), allow_methods=["*"],
                               allow_headers=["*"], allow_credentials=True)
        app.add_middleware(GuardMiddleware, guard=guard)
    return app


def parse_api_auth(text: str) -> dict[str, str]:
    """A1111's --api-auth: "user:password[,user:password…]"."""
    users: dict[str, str] = {}
    for pair in text.split(","):
        user, colon, password = pair.strip().partition(":")
        if not (user and colon and password):
            raise ValueError(f"--api-auth: {pair.strip()!r} is not user:password")
        users[user] = password
    return users


def serve(runtime_dir: Path | None, host: str, port: int, token: str | None, api_auth: str | None,
          cors_origins: list[str], allow_hosts: list[str]) -> int:
    """Run the server until interrupted; 2 when the settings are refused."""
    import uvicorn

    users = parse_api_auth(api_auth) if api_auth else {}
    guard = Guard(host, tuple(h.lower() for h in allow_hosts), tuple(o.rstrip("/") for o in cors_origins), token or None, users)
    where = f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"
    if not is_loopback(host):
        if not guard.needs_credentials:
            print(f"diffuse http: {host} is not a loopback address: anyone who can reach it could use the daemon. "
                  "Give --token (or DIFFUSIOND_HTTP_TOKEN) or --api-auth user:pass", file=sys.stderr)
            return 2
        print(f"diffuse http: listening on {where} — not loopback: every request needs the "
              f"{'token' if token else 'user and password'}", flush=True)
    else:
        print(f"diffuse http: listening on {where}{' (credentials required)' if guard.needs_credentials else ''}",
              flush=True)
    uvicorn.run(create_app(runtime_dir, guard), host=host, port=port, log_level="warning",
                timeout_graceful_shutdown=3)
    return 0
