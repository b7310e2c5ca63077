"""`diffuse http` end to end: a real daemon on the tiny model, the HTTP server as a subprocess, driven
by webuiapi (a third-party AUTOMATIC1111 client from PyPI), plain HTTP and, for the page, Debian's
Chromium through Playwright. Response shapes are checked against A1111's, written out as JSON
Schema in tests/fixtures/a1111/schema.json (its sources are named there). The daemon's LoRA folder
holds a kohya LoRA made as tests/test_lora.py makes them, for /sdapi/v1/loras and <lora:…> tags."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import requests
import torch
import webuiapi
from PIL import Image
from safetensors.torch import load_file, save_file

from diffusiond.clients.client import Client
from diffusiond.clients.infotext import parse_infotext
from diffusiond.daemon.models import lora
from diffusiond.daemon.models.catalog import TINY

from .daemon_process import Daemon, free_port
from .test_lora import kohya_lora

SCHEMA = json.loads((Path(__file__).parent / "fixtures" / "a1111" / "schema.json").read_text())
FAST = {"steps": 4, "width": 64, "height": 64}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def conforms(value: Any, definition: str) -> None:
    jsonschema.validate(value, {"$ref": f"#/definitions/{definition}", **SCHEMA})


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    """ink: a kohya LoRA for the tiny model, with kohya's training metadata (ss_tag_frequency is JSON
    text); styles/ink: the same file in a subfolder; styles/loha: a LyCORIS file no job can apply."""
    folder = tmp_path_factory.mktemp("loras")
    made = kohya_lora(TINY, folder / "made.safetensors", sdxl=False)
    save_file(load_file(made), str(folder / "ink.safetensors"),
              metadata={"ss_output_name": "inky", "ss_tag_frequency": '{"ink": {"cat": 2}}', "ss_network_dim": "4"})
    made.unlink()
    (folder / "styles").mkdir()
    (folder / "styles" / "ink.safetensors").write_bytes((folder / "ink.safetensors").read_bytes())
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.zeros(2, 2)},
              str(folder / "styles" / "loha.safetensors"))
    return folder


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, lora_dir) -> Iterator[Daemon]:
    """The real daemon on the tiny model (conftest's, with the LoRA folder above)."""
    running = Daemon(tmp_path_factory.mktemp("daemon"), lora_dir=str(lora_dir)).start()
    yield running
    assert running.stop() == 0
    running.close()


class HttpServer:
    """`diffuse http` as a subprocess, answering once this returns."""

    def __init__(self, daemon: Daemon, *args: str, host: str = "127.0.0.1", refused: bool = False) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "diffusiond.clients.cli", "--runtime-dir", str(daemon.runtime_dir), "http",
             "--host", host, "--port", str(self.port), *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.first_line = self.process.stdout.readline()  # printed before it binds, or the refusal
        if not refused:
            self._wait_answering()

    def _wait_answering(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.stdout.read()
            try:
                requests.get(self.base + "/web/style.css", timeout=1)
                return
            except requests.ConnectionError:
                time.sleep(0.05)
        raise TimeoutError("diffuse http did not answer")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(daemon) -> Iterator[HttpServer]:
    running = HttpServer(daemon)
    yield running
    running.close()


@pytest.fixture(scope="module")
def api(server) -> Any:
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler a", steps=4)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _pixels(data: bytes) -> bytes:
    return Image.open(io.BytesIO(data)).convert("RGB").tobytes()


def test_txt2img_through_webuiapi_is_the_daemon_job_of_the_same_settings(api, daemon) -> None:
    """The A1111 request becomes a daemon job: its image is pixel for pixel the one a Client job with
    the mapped settings makes (A1111's "Euler a" is our euler_a), and the response has A1111's shape."""
    result = api.txt2img(prompt="a lighthouse at dusk", negative_prompt="fog", seed=7, cfg_scale=6.5, **FAST)
    conforms(result.json, "ImagesResponse")
    conforms(result.info, "Info")
    assert len(result.images) == 1 and result.images[0].size == (64, 64)
    assert result.info["seed"] == 7 and result.info["sampler_name"] == "Euler a" and result.info["steps"] == 4
    assert result.parameters["prompt"] == "a lighthouse at dusk" and result.parameters["seed"] == 7
    assert "Sampler: Euler a" in result.info["infotexts"][0] and "Negative prompt: fog" in result.info["infotexts"][0]
    with Client(daemon.runtime_dir) as client:
        job = client.submit("a lighthouse at dusk", negative_prompt="fog", seed=7, guidance_scale=6.5,
                            scheduler="euler_a", **FAST)
        done = client.wait(job["id"], timeout=120)
    assert _pixels(Path(done["outputs"][0]).read_bytes()) == result.images[0].convert("RGB").tobytes()


def test_img2img_and_png_info_through_webuiapi(api) -> None:
    start = api.txt2img(prompt="a red square", seed=3, **FAST).images[0]
    result = api.img2img(images=[start], prompt="a blue square", denoising_strength=0.5, seed=4, **FAST)
    conforms(result.json, "ImagesResponse")
    conforms(result.info, "Info")
    assert result.images[0].size == (64, 64)
    assert result.info["denoising_strength"] == 0.5
    assert result.parameters["init_images"] is None  # include_init_images is false
    assert "Denoising strength: 0.5" in result.info["infotexts"][0]

    png = base64.b64decode(result.json["images"][0])
    info = api.png_info(Image.open(io.BytesIO(png)))
    conforms(info.json, "PNGInfoResponse")
    assert info.info == result.info["infotexts"][0]
    parameters = info.parameters
    assert parameters["Prompt"] == "a blue square" and parameters["Steps"] == "4" and parameters["Seed"] == "4"
    assert (parameters["Size-1"], parameters["Size-2"]) == ("64", "64")


def test_progress_shows_the_running_job_and_interrupt_cancels_it(api, daemon) -> None:
    """/progress reports the running job's step and its preview; /interrupt cancels it and the waiting
    txt2img answers with no images, as A1111 answers an interrupted request."""
    results: list[Any] = []
    request = threading.Thread(target=lambda: results.append(
        api.txt2img(prompt="a long job", steps=150, width=256, height=256, seed=1)))
    request.start()
    deadline = time.monotonic() + 120
    progress: dict[str, Any] = {}
    while time.monotonic() < deadline:
        progress = api.get_progress()
        if progress["progress"] > 0 and progress["current_image"]:
            break
        time.sleep(0.05)
    conforms(progress, "ProgressResponse")
    assert 0 < progress["progress"] < 1 and progress["state"]["sampling_steps"] == 150
    assert Image.open(io.BytesIO(base64.b64decode(progress["current_image"]))).size[0] > 0
    job_id = progress["state"]["job"]
    assert api.interrupt() == {}
    request.join(timeout=120)
    assert results and results[0].images == [] and results[0].info["infotexts"] == []
    with Client(daemon.runtime_dir) as client:
        assert client.get(job_id)["state"] == "cancelled"
    idle = api.get_progress()
    conforms(idle, "ProgressResponse")
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0


def test_listings_and_options(api, server) -> None:
    samplers = api.get_samplers()
    for item in samplers:
        conforms(item, "SamplerItem")
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "PNDM", "LCM"} <= {s["name"] for s in samplers}
    schedulers = api.get_schedulers()
    for item in schedulers:
        conforms(item, "SchedulerItem")
    assert [s["name"] for s in schedulers] == ["automatic", "karras"]
    models = api.get_sd_models()
    for item in models:
        conforms(item, "SDModelItem")
    assert "tiny" in [m["title"] for m in models]
    assert api.refresh_checkpoints() is None  # A1111 answers null
    assert api.get_options()["sd_model_checkpoint"] == "tiny"
    assert requests.post(server.base + "/sdapi/v1/options", json={"sd_model_checkpoint": "tiny"}).status_code == 200
    missing = requests.post(server.base + "/sdapi/v1/options", json={"sd_model_checkpoint": "no-such-model"})
    assert missing.status_code == 500 and missing.json()["error"] == "RuntimeError"  # A1111's set_config
    conforms(missing.json(), "Error")
    other = requests.post(server.base + "/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2})
    assert other.status_code == 422 and "CLIP_stop_at_last_layers" in other.json()["detail"]


def test_loras_list_the_daemons_lora_folder_and_a_tagged_prompt_applies_one(api, server, lora_dir) -> None:
    """/sdapi/v1/loras in the Lora extension's shape: each file a job can apply, by the name a tag
    takes, its path inside the LoRA folder only, its metadata as A1111 reads it. A `<lora:ink:0.8>`
    prompt through txt2img changes the image, and `info` carries A1111's `Lora hashes`."""
    listed = api.get_loras()
    for item in listed:
        conforms(item, "LoraItem")
    by_name = {item["name"]: item for item in listed}
    assert sorted(by_name) == ["ink", "styles/ink"]  # styles/loha (LoHa) cannot be applied: left out
    assert by_name["ink"]["path"] == "ink.safetensors" and by_name["styles/ink"]["path"] == "styles/ink.safetensors"
    assert str(lora_dir) not in json.dumps(listed)
    assert by_name["ink"]["alias"] == "ink"  # what <lora:…> resolves here, not the file's ss_output_name
    metadata = by_name["ink"]["metadata"]
    assert metadata["ss_tag_frequency"] == {"ink": {"cat": 2}} and metadata["ss_network_dim"] == "4"
    refreshed = requests.post(server.base + "/sdapi/v1/refresh-loras")
    assert refreshed.status_code == 200 and refreshed.json() is None

    short = lora.inspect(lora_dir / "ink.safetensors").hash
    tagged = api.txt2img(prompt="a cat <lora:ink:0.8>", seed=5, **FAST)
    conforms(tagged.json, "ImagesResponse")
    conforms(tagged.info, "Info")
    assert parse_infotext(tagged.info["infotexts"][0]).params["Lora hashes"] == f"ink: {short}"
    assert tagged.info["extra_generation_params"]["Lora hashes"] == f"ink: {short}"
    assert tagged.info["prompt"] == "a cat <lora:ink:0.8>"
    plain = api.txt2img(prompt="a cat", seed=5, **FAST)
    assert "Lora hashes" not in plain.info["extra_generation_params"]
    assert plain.images[0].tobytes() != tagged.images[0].tobytes()


@pytest.mark.parametrize(("fields", "status", "says"), [
    ({"sampler_name": "Heun"}, 400, "Sampler not found"),
    ({"sampler_name": "Euler", "scheduler": "karras"}, 400, "Karras is, with DPM++ 2M"),
    ({"sampler_name": "DPM++ 2M", "scheduler": "exponential"}, 400, "Scheduler not found"),
    ({"enable_hr": True}, 422, "enable_hr"),
    ({"n_iter": 2}, 422, "n_iter"),
    ({"steps": 0}, 422, "steps"),  # the daemon's own refusal, in A1111's shape
    ({"override_settings": {"sd_model_checkpoint": "/etc"}}, 422, "path"),
    ({"prompt": "p <lora:/etc/ink:0.5>"}, 422, "is a path"),
    ({"prompt": "p <lora: ~/ink>"}, 422, "is a path"),
    ({"prompt": "p <lora:nope:0.5>"}, 422, "no LoRA 'nope'"),  # the daemon's refusal
])
def test_refusals_have_a1111s_error_shape(server, fields, status, says) -> None:
    reply = requests.post(server.base + "/sdapi/v1/txt2img", json={"prompt": "p", **FAST, **fields})
    assert reply.status_code == status, reply.text
    conforms(reply.json(), "Error")
    assert says in reply.json()["detail"]


def test_sampler_names_with_a_scheduler_map_onto_ours(api, daemon) -> None:
    """"DPM++ 2M" with scheduler "karras" (A1111 1.9+) and the older "DPM++ 2M Karras" are our dpmpp_2m_karras."""
    first = api.txt2img(prompt="p", sampler_name="DPM++ 2M", scheduler="karras", seed=2, **FAST)
    second = api.txt2img(prompt="p", sampler_name="DPM++ 2M Karras", seed=2, **FAST)
    assert "Sampler: DPM++ 2M Karras" in first.info["infotexts"][0]
    assert first.images[0].tobytes() == second.images[0].tobytes()


def test_native_jobs_submit_list_get_cancel_and_image(server, daemon) -> None:
    with Client(daemon.runtime_dir) as client:
        client.pause()
        try:
            queued = requests.post(server.base + "/api/jobs", json={"prompt": "held", **FAST}).json()["job"]
            listing = requests.get(server.base + "/api/jobs", params={"state": "queued"}).json()
            assert queued["id"] in [j["id"] for j in listing["jobs"]]
            cancelled = requests.post(f"{server.base}/api/jobs/{queued['id']}/cancel").json()
            assert cancelled["job"]["state"] == "cancelled" and cancelled["pending"] is False
        finally:
            client.resume()
        job = requests.post(server.base + "/api/jobs", json={"prompt": "kept", "seed": 5, **FAST}).json()["job"]
        done = client.wait(job["id"], timeout=120)
    got = requests.get(f"{server.base}/api/jobs/{job['id']}").json()
    assert got["state"] == "done" and got["outputs"] == done["outputs"]
    image = requests.get(f"{server.base}/api/jobs/{job['id']}/images/0")
    assert image.headers["content-type"] == "image/png" and image.content == Path(done["outputs"][0]).read_bytes()
    assert requests.get(f"{server.base}/api/jobs/{job['id']}/images/1").status_code == 404
    assert requests.get(f"{server.base}/api/jobs/nope").status_code == 404
    for fields in ({"output_dir": "/tmp"}, {"output_name": "x"}, {"model": "/etc"}, {"model": "~/x"},
                   {"loras": [{"name": "./ink", "weight": 1}]}):
        reply = requests.post(server.base + "/api/jobs", json={"prompt": "p", **fields})
        assert reply.status_code == 422, reply.text
        assert "path" in reply.json()["detail"] or "not taken over HTTP" in reply.json()["detail"]


def _sse(response: requests.Response) -> Iterator[dict[str, Any]]:
    """Server-Sent Events as {id, data} (comments skipped)."""
    message: dict[str, Any] = {}
    for line in response.iter_lines(decode_unicode=True):
        if line == "":
            if "data" in message:
                yield message
            message = {}
        elif line.startswith("id: "):
            message["id"] = int(line[4:])
        elif line.startswith("data: "):
            message["data"] = json.loads(line[6:])


def _until_done(stream: Iterator[dict[str, Any]], job_id: str) -> list[dict[str, Any]]:
    seen = []
    for message in stream:
        seen.append(message)
        if message["data"].get("job") == job_id and message["data"]["type"] == "job.done":
            return seen
    raise AssertionError("the stream ended before the job did")


def test_events_stream_with_sequence_ids_and_last_event_id_resumes(server) -> None:
    with requests.get(server.base + "/api/events", stream=True, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        stream = _sse(response)
        job = requests.post(server.base + "/api/jobs", json={"prompt": "watched", **FAST}).json()["job"]
        seen = _until_done(stream, job["id"])
    mine = [m for m in seen if m["data"].get("job") == job["id"]]
    assert [m["data"]["type"] for m in mine if m["data"]["type"] != "job.preview"] == \
        ["job.queued", "job.started", *["job.progress"] * 4, "job.done"]
    assert all(m["id"] == m["data"]["seq"] for m in seen)
    ids = [m["id"] for m in seen]
    assert ids == sorted(ids)
    previews = [m for m in mine if m["data"]["type"] == "job.preview"]
    assert previews and Image.open(io.BytesIO(base64.b64decode(previews[-1]["data"]["jpeg"]))).format == "JPEG"

    started = next(m for m in mine if m["data"]["type"] == "job.started")
    with requests.get(server.base + "/api/events", stream=True, timeout=60,
                      headers={"Last-Event-ID": str(started["id"])}) as response:
        replayed = _until_done(_sse(response), job["id"])
    expected = [m["id"] for m in seen if m["id"] > started["id"] and m["data"]["type"] != "job.preview"]
    assert [m["id"] for m in replayed] == expected


def test_security_refusals_each_with_its_status_while_serving_goes_on(server) -> None:
    ok = server.base + "/sdapi/v1/samplers"
    rebinding = requests.get(ok, headers={"Host": f"attacker.example:{server.port}"})
    assert rebinding.status_code == 421
    conforms(rebinding.json(), "Error")
    assert requests.get(ok, headers={"Host": f"localhost:{server.port}"}).status_code == 200
    assert requests.get(ok, headers={"Host": f"[::1]:{server.port}"}).status_code == 200

    cross = requests.post(server.base + "/sdapi/v1/interrupt", headers={"Origin": "https://evil.example"})
    assert cross.status_code == 403 and "evil.example" in cross.json()["detail"]
    assert requests.post(server.base + "/sdapi/v1/interrupt", headers={"Origin": server.base}).status_code == 200
    assert requests.get(ok, headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    followed_link = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
    assert requests.get(server.base + "/", headers=followed_link).status_code == 200

    too_large = requests.post(server.base + "/sdapi/v1/png-info", data=b"x" * (24 * 1024 * 1024 + 1),
                              headers={"Content-Type": "application/json"})
    assert too_large.status_code == 413
    chunked = requests.post(server.base + "/sdapi/v1/png-info", headers={"Content-Type": "application/json"},
                            data=(b"x" * (1024 * 1024) for _ in range(25)))
    assert chunked.status_code == 413
    assert requests.get(ok).status_code == 200
    assert "/sdapi/v1/txt2img" in requests.get(server.base + "/openapi.json").json()["paths"]


def test_a_non_loopback_bind_needs_credentials(daemon) -> None:
    refused = HttpServer(daemon, host="0.0.0.0", refused=True)
    assert refused.process.wait(timeout=60) == 2
    assert "--token" in refused.first_line + refused.process.stdout.read()

    guarded = HttpServer(daemon, "--token", "s3cret", host="0.0.0.0")
    try:
        assert "not loopback" in guarded.first_line and "token" in guarded.first_line
        url = guarded.base + "/sdapi/v1/samplers"
        missing = requests.get(url)
        assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Basic")
        assert requests.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert requests.get(url, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert requests.get(url, auth=("anyone", "s3cret")).status_code == 200
    finally:
        guarded.close()

    users = HttpServer(daemon, "--api-auth", "ann:pw1,bob:pw2", host="0.0.0.0")
    try:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=users.port, username="bob", password="pw2")
        assert api.get_options()["sd_model_checkpoint"] == "tiny"
        assert requests.get(users.base + "/sdapi/v1/options", auth=("bob", "pw1")).status_code == 401
    finally:
        users.close()


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_the_page_in_a_browser(server) -> None:
    """Submit a prompt, watch its progress and preview, see its image; cancel a queued job. The
    screenshot is kept (its path is printed)."""
    from playwright.sync_api import expect, sync_playwright

    shot = Path(tempfile.mkdtemp(prefix="diffusiond-page-")) / "page.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone's width
            page.goto(server.base + "/")
            expect(page.locator("#status")).to_have_text("live")
            expect(page.locator("#scheduler option")).to_have_count(7)

            def submit(prompt: str, steps: int, size: int) -> None:
                page.fill("#prompt", prompt)
                page.fill("input[name=steps]", str(steps))
                page.fill("input[name=width]", str(size))
                page.fill("input[name=height]", str(size))
                page.click("#generate")

            submit("a slow lighthouse", 150, 256)
            submit("a queued harbour", 150, 256)
            running = page.locator("#queue li[data-state=running]")
            expect(running).to_have_count(1, timeout=60_000)
            page.wait_for_function(
                "() => { const p = document.querySelector('#queue li[data-state=running] progress');"
                " return p && p.value > 0; }", timeout=60_000)
            expect(running.locator("img.preview")).to_be_visible(timeout=60_000)

            queued = page.locator("#queue li[data-state=queued]")
            expect(queued).to_have_count(1)
            queued_id = queued.get_attribute("data-job")
            queued.locator("button.cancel").click()
            expect(page.locator(f"#recent figure[data-job='{queued_id}']")).to_have_attribute("data-state", "cancelled")

            running_id = running.get_attribute("data-job")
            running.locator("button.cancel").click()
            expect(page.locator(f"#recent figure[data-job='{running_id}']")).to_have_attribute(
                "data-state", "cancelled", timeout=60_000)

            submit("a quick boat", 4, 64)
            # This job's figure (the daemon may hold other tests' images): its img's alt is the prompt.
            figure = page.locator("#recent figure[data-state=done]:has(img[alt='a quick boat'])")
            expect(figure.locator("img")).to_be_visible(timeout=60_000)
            page.wait_for_function(
                "() => { const i = document.querySelector(\"#recent figure[data-state=done] img[alt='a quick boat']\");"
                " return i && i.complete && i.naturalWidth === 64; }", timeout=60_000)
            figure.click()  # reuse: its settings back in the form
            expect(page.locator("#prompt")).to_have_value("a quick boat")
            expect(page.locator("input[name=steps]")).to_have_value("4")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    print(f"page screenshot: {shot}")
    assert shot.stat().st_size > 0


def test_without_a_daemon_requests_get_503_and_the_server_serves_on(fresh) -> None:
    """Started before the daemon (or after it stopped): each request says so; the page still loads."""
    alone = HttpServer(fresh)
    try:
        reply = requests.get(alone.base + "/sdapi/v1/options")
        assert reply.status_code == 503 and reply.json()["error"] == "DaemonUnreachable"
        conforms(reply.json(), "Error")
        assert requests.post(alone.base + "/sdapi/v1/txt2img", json={"prompt": "p"}).status_code == 503
        assert requests.get(alone.base + "/").status_code == 200
    finally:
        alone.close()
