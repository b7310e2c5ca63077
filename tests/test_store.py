"""Hub models through the real huggingface_hub client, against a fake Hub on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffusiond.clients.protocol import Event
from diffusiond.daemon.errors import ModelNotDownloaded
from diffusiond.daemon.models import store
from diffusiond.daemon.models.catalog import TINY
from diffusiond.daemon.models.diffusers_folder import ModelFolder
from diffusiond.daemon.models.ref import parse

from .fake_hub import FakeHub

REPO = "test/tiny-sd"


def test_only_what_the_runtime_loads_is_fetched() -> None:
    files = [
        "model_index.json", "README.md", "unet/config.json", "unet/diffusion_pytorch_model.bin",
        "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.bin", "text_encoder/config.json",
        "text_encoder/model.safetensors", "tokenizer/vocab.json", "scheduler/scheduler_config.json",
        "v1-5-pruned.ckpt", "safety_checker/config.json", "safety_checker/model.fp16.safetensors",
    ]
    cpu = store.runtime_files(files, gpu=False)
    assert "unet/diffusion_pytorch_model.safetensors" in cpu and "unet/diffusion_pytorch_model.bin" not in cpu
    assert "vae/diffusion_pytorch_model.bin" in cpu  # no safetensors: the .bin it is
    assert "v1-5-pruned.ckpt" not in cpu and "README.md" not in cpu
    assert "safety_checker/model.fp16.safetensors" not in cpu  # float32 on the CPU: no fp16-only weights
    gpu = store.runtime_files(files, gpu=True)
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in gpu
    assert "unet/diffusion_pytorch_model.safetensors" not in gpu
    assert "safety_checker/model.fp16.safetensors" in gpu


def test_hub_ids_are_told_from_folders_and_aliases_by_the_name_alone(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)  # a folder here does not change what the name means
    assert parse("org/name").repo == "org/name" and parse("org/name").path is None and parse("org/name").portable
    assert parse("org/name@v2").canonical == "org/name@v2" and parse("org/name@v2").revision == "v2"
    assert parse("sd15").canonical == "stable-diffusion-v1-5/stable-diffusion-v1-5" and parse("sd15").portable
    assert parse("tiny").path == TINY and parse("tiny").portable
    for folder in (str(tmp_path), "/abs/path", "~/models/mine", "./org/name", "../name", "a/b/c", "mine"):
        ref = parse(folder)
        assert ref.repo is None and ref.path == Path(folder).expanduser() and not ref.portable, folder
    assert store.split("org/name@v2") == ("org/name", "v2") and store.split("org/name") == ("org/name", None)


def test_a_model_not_downloaded_says_so(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelNotDownloaded, match="not downloaded yet"):
        ModelFolder.open("nobody/nothing-here")


@pytest.fixture
def hub():
    with FakeHub({REPO: TINY}) as running:
        yield running


def hub_env(monkeypatch, hub, tmp_path) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")


def test_a_job_for_a_hub_model_downloads_it_with_progress_then_runs(fresh, hub, tmp_path, monkeypatch) -> None:
    hub_env(monkeypatch, hub, tmp_path)
    fresh.start()
    events = fresh.subscribe(f"model.{REPO}".encode(), b"job.")
    job_id = fresh.call("submit", prompt="from the hub", model=REPO, steps=2)["job"]["id"]
    seen = []
    while not seen or seen[-1]["type"] not in (Event.JOB_DONE, Event.JOB_FAILED):
        seen.append(fresh.next_event(events, 120)[1])
    assert seen[-1]["type"] == Event.JOB_DONE, seen[-1]
    kinds = [e["type"] for e in seen if e["type"].startswith("model.")]
    assert kinds[0] == Event.MODEL_DOWNLOADING and kinds[-2:] == [Event.MODEL_LOADING, Event.MODEL_LOADED]
    assert Event.MODEL_DOWNLOADED in kinds and Event.MODEL_DOWNLOAD in kinds
    progress = [e for e in seen if e["type"] == Event.MODEL_DOWNLOAD]
    assert [e["bytes"] for e in progress] == sorted(e["bytes"] for e in progress)
    wanted = store.runtime_files(sorted(p.relative_to(TINY).as_posix() for p in TINY.rglob("*") if p.is_file()), gpu=False)
    assert progress[-1]["bytes"] == progress[-1]["total"] == sum((TINY / f).stat().st_size for f in wanted)
    snapshot = next((tmp_path / "hf" / "hub" / "models--test--tiny-sd" / "snapshots").iterdir())
    assert sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()) == wanted
    job = fresh.call("get", job=job_id)["job"]
    assert job["result"]["width"] == ModelFolder.open("tiny").default_size  # resolved once the model was there
    assert fresh.stop() == 0


def test_a_cached_model_is_found_offline_without_a_request(fresh, hub, tmp_path, monkeypatch) -> None:
    hub_env(monkeypatch, hub, tmp_path)
    fresh.start()
    first = fresh.call("submit", prompt="fetch", model=REPO, steps=1)["job"]["id"]
    assert fresh.wait_job(first, 120)["state"] == "done"
    assert fresh.stop() == 0
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.requests.clear()
    fresh.start()
    second = fresh.call("submit", prompt="offline", model=REPO, steps=1, width=64, height=64)["job"]["id"]
    assert fresh.wait_job(second, 120)["state"] == "done"
    assert hub.requests == []


def test_offline_and_not_cached_fails_the_job_clearly(fresh, hub, tmp_path, monkeypatch) -> None:
    hub_env(monkeypatch, hub, tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fresh.start()
    job = fresh.wait_job(fresh.call("submit", prompt="x", model=REPO, steps=1)["job"]["id"], 60)
    assert job["state"] == "failed" and job["error"]["code"] == "model_not_found"
    assert "HF_HUB_OFFLINE" in job["error"]["message"]
    assert hub.requests == []


def test_an_unknown_repo_fails_the_job_with_model_not_found(fresh, hub, tmp_path, monkeypatch) -> None:
    hub_env(monkeypatch, hub, tmp_path)
    fresh.start()
    job = fresh.wait_job(fresh.call("submit", prompt="x", model="test/absent", steps=1)["job"]["id"], 60)
    assert job["state"] == "failed" and job["error"]["code"] == "model_not_found"
    assert fresh.call("ping")["ready"]


def test_a_pull_cancelled_mid_file_keeps_the_whole_files_and_a_second_pull_fetches_the_rest(
    fresh, hub, tmp_path, monkeypatch
) -> None:
    hub_env(monkeypatch, hub, tmp_path)
    held = "vae/diffusion_pytorch_model.safetensors"
    hold = hub.hold(REPO, held)
    fresh.start()
    events = fresh.subscribe(f"model.{REPO}".encode())
    fresh.call("pull", model=REPO)
    assert hold.reached.wait(60), "the pull never reached the held file"
    assert fresh.call("cancel", model=REPO)["ok"]
    hold.release.set()
    failed = fresh.wait_for(events, lambda e: e["type"] in (Event.MODEL_DOWNLOAD_FAILED, Event.MODEL_DOWNLOADED), 60)
    assert failed["type"] == Event.MODEL_DOWNLOAD_FAILED and failed["code"] == "cancelled", failed
    snapshots = tmp_path / "hf" / "hub" / "models--test--tiny-sd" / "snapshots"
    kept = {p.relative_to(next(snapshots.iterdir())).as_posix() for p in snapshots.rglob("*") if p.is_file()}
    assert "unet/diffusion_pytorch_model.safetensors" in kept and held not in kept  # whole files only

    hub.requests.clear()
    fresh.call("pull", model=REPO)
    done = fresh.wait_for(events, lambda e: e["type"] in (Event.MODEL_DOWNLOAD_FAILED, Event.MODEL_DOWNLOADED), 60)
    assert done["type"] == Event.MODEL_DOWNLOADED, done
    fetched = {r.path.split("/resolve/main/", 1)[1] for r in hub.requests if r.method == "GET" and "/resolve/" in r.path}
    assert fetched == {held}  # the rest was kept from the cancelled pull
    assert fresh.stop() == 0
