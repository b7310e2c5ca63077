"""Model pulls, Apple's Core ML layouts and the catalog, with the real daemon, the real
huggingface_hub client and a fake Hub on loopback."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from diffusiond.clients.protocol import Event
from diffusiond.daemon.errors import ModelNotDownloaded
from diffusiond.daemon.models import coreml_layout
from diffusiond.daemon.models.catalog import TINY
from diffusiond.daemon.models.diffusers_folder import ModelFolder

from .fake_hub import FakeHub

TORCH_REPO = "test/tiny-sd"


def coreml_models(folder: Path, packages: bool = False) -> None:
    """Stand-ins for Apple's model folders: the layout is what is under test, not the weights."""
    names = (["Stable_Diffusion_text_encoder.mlpackage", "Stable_Diffusion_unet.mlpackage"] if packages
             else ["TextEncoder.mlmodelc", "Unet.mlmodelc", "VAEDecoder.mlmodelc"])
    for name in names:
        (folder / name).mkdir(parents=True)
        (folder / name / "weights.bin").write_bytes(name.encode() * 100)


def zip_folder(source: Path, archive: Path, prefix: str) -> None:
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(source.rglob("*")):
            if path.is_file():
                zf.write(path, f"{prefix}/{path.relative_to(source)}")


@pytest.fixture(scope="module")
def repos(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("repos")
    folders = root / "folders"  # apple/coreml-…: original/ and split_einsum/ folders
    for variant in ("original", "split_einsum"):
        coreml_models(folders / variant / "compiled")
        coreml_models(folders / variant / "packages", packages=True)
    for name in ("vocab.json", "merges.txt"):
        (folders / name).write_text("{}")
    zips = root / "zips"  # pcuenq/…: one archive per variant
    zips.mkdir()
    for variant in ("original", "split_einsum", "split_einsum_v2"):
        staging = root / f"staging-{variant}"
        coreml_models(staging)
        zip_folder(staging, zips / f"coreml-x_{variant}_compiled.zip", f"coreml-x_{variant}_compiled")
    nested = root / "nested"  # palettized: compiled/ and packages/ inside one archive
    nested.mkdir()
    staging = root / "staging-nested"
    coreml_models(staging / "compiled")
    coreml_models(staging / "packages", packages=True)
    zip_folder(staging, nested / "coreml-p_original_compiled.zip", "coreml-p_original_compiled")
    escape = root / "escape"
    escape.mkdir()
    with zipfile.ZipFile(escape / "bad_original_compiled.zip", "w") as zf:
        zf.writestr("bad_original_compiled/TextEncoder.mlmodelc/x", "x")
        zf.writestr("../../escaped.txt", "gotcha")
    link = root / "link"
    link.mkdir()
    with zipfile.ZipFile(link / "bad_original_compiled.zip", "w") as zf:
        info = zipfile.ZipInfo("bad_original_compiled/Unet.mlmodelc")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc")
    large = root / "large"  # a unet weight file larger than huggingface_hub's 10 MiB chunk
    shutil.copytree(TINY, large)
    (large / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(os.urandom((12 << 20) + 123))
    return {TORCH_REPO: TINY, "test/large": large, "apple/folders": folders, "pcuenq/zips": zips, "apple/nested": nested,
            "evil/escape": escape, "evil/link": link}


@pytest.fixture
def hub(repos):
    with FakeHub(repos) as running:
        yield running


@pytest.fixture
def daemon_on_hub(fresh, hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    return fresh.start()


def pull(daemon, name: str, compute_units: str = "auto") -> list[dict]:
    """The pull's model events up to its end."""
    events = daemon.subscribe(b"model.")
    topic = daemon.call("pull", model=name, compute_units=compute_units)["topic"]
    seen = []
    while not seen or seen[-1]["type"] not in (Event.MODEL_DOWNLOADED, Event.MODEL_DOWNLOAD_FAILED):
        got, event = daemon.next_event(events, 120)
        if got.decode() == topic:
            seen.append(event)
    return seen


def fetched(hub: FakeHub) -> set[str]:
    return {r.path.split("/resolve/main/", 1)[1] for r in hub.requests if r.method == "GET" and "/resolve/" in r.path}


@pytest.mark.parametrize(
    ("repo", "units", "variant_path", "not_fetched"),
    [
        ("apple/folders", "cpuAndGPU", "original/compiled", "split_einsum/"),
        ("apple/folders", "cpuAndNeuralEngine", "split_einsum/compiled", "original/"),
        ("pcuenq/zips", "cpuAndNeuralEngine", "coreml-x_split_einsum_v2_compiled", "_original_"),
        ("pcuenq/zips", "cpuAndGPU", "coreml-x_original_compiled", "split_einsum"),
        ("apple/nested", "cpuAndGPU", "coreml-p_original_compiled/compiled", "packages/"),
    ],
)
def test_core_ml_repos_resolve_to_the_variant_the_compute_units_need(daemon_on_hub, hub, repo, units, variant_path, not_fetched) -> None:
    events = pull(daemon_on_hub, repo, units)
    assert events[-1]["type"] == Event.MODEL_DOWNLOADED, events[-1]
    path = Path(events[-1]["path"])
    assert path.as_posix().endswith(variant_path)
    assert (path / "TextEncoder.mlmodelc").is_dir() and (path / "Unet.mlmodelc").is_dir()
    assert not any(not_fetched in name for name in fetched(hub)), fetched(hub)


@pytest.mark.parametrize("repo", ["evil/escape", "evil/link"])
def test_unsafe_archives_are_refused(daemon_on_hub, tmp_path, repo) -> None:
    events = pull(daemon_on_hub, repo, "cpuAndGPU")
    assert events[-1]["type"] == Event.MODEL_DOWNLOAD_FAILED
    assert events[-1]["code"] == "download_failed" and "refused to unpack" in events[-1]["message"]
    assert not list(tmp_path.rglob("escaped.txt"))
    assert daemon_on_hub.call("ping")["ready"]


def test_pull_list_and_remove_from_the_cli(daemon_on_hub, hub) -> None:
    def diffuse(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "diffusiond.clients.cli", "--runtime-dir",
                               str(daemon_on_hub.runtime_dir), *args], capture_output=True, text=True, timeout=120)

    pulled = diffuse("models", "pull", TORCH_REPO)
    assert pulled.returncode == 0, pulled.stderr
    assert (Path(pulled.stdout.strip()) / "model_index.json").exists()
    listing = {m["name"]: m for m in json.loads(diffuse("--json", "models").stdout)["models"]}
    assert listing[TORCH_REPO]["downloaded"] and listing[TORCH_REPO]["runtime"] == "torch"
    assert listing[TORCH_REPO]["size"] > 0
    assert listing["tiny"]["loaded"] and listing["sd15"]["repo"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert listing["sd15-coreml-6bit"]["runtime"] == "coreml" and not listing["sd15"]["downloaded"]
    removed = diffuse("models", "remove", TORCH_REPO)
    assert removed.returncode == 0 and "removed" in removed.stdout
    assert TORCH_REPO not in {m["name"] for m in json.loads(diffuse("--json", "models").stdout)["models"]}


def test_a_broken_connection_resumes_from_the_last_whole_chunk(daemon_on_hub, hub, repos, tmp_path) -> None:
    """huggingface_hub keeps what arrived in whole 10 MiB chunks and asks for the rest with a Range
    request; so a weight file larger than a chunk, cut off past its first chunk, still arrives whole."""
    big = "unet/diffusion_pytorch_model.safetensors"
    large = repos["test/large"]
    hub.interrupt("test/large", big, after=(10 << 20) + 1000)
    events = pull(daemon_on_hub, "test/large")
    assert events[-1]["type"] == Event.MODEL_DOWNLOADED, events[-1]
    ranges = [r.range for r in hub.requests if r.path.endswith(big) and r.method == "GET"]
    assert ranges == [None, f"bytes={10 << 20}-"]
    assert (Path(events[-1]["path"]) / big).read_bytes() == (large / big).read_bytes()
    progress = [e["bytes"] for e in events if e["type"] == Event.MODEL_DOWNLOAD]
    assert progress == sorted(progress) and progress[-1] == events[-2]["total"]


def test_compute_units_auto_follows_the_diffusers_for_mac_rule() -> None:
    assert coreml_layout.auto_compute_units(has_neural_engine=False, performance_cores=4) == "cpuAndGPU"
    assert coreml_layout.auto_compute_units(has_neural_engine=True, performance_cores=8) == "cpuAndGPU"
    assert coreml_layout.auto_compute_units(has_neural_engine=True, performance_cores=4) == "cpuAndNeuralEngine"


def test_a_core_ml_catalog_model_not_downloaded_says_so() -> None:
    # Once downloaded it opens as a Core ML model (tests/test_coreml.py); the torch runtime refuses it there.
    with pytest.raises(ModelNotDownloaded, match="not downloaded yet"):
        ModelFolder.open("sd15-coreml")


def test_a_gated_repo_needs_hf_token(fresh, repos, tmp_path, monkeypatch) -> None:
    with FakeHub({"gated/tiny": TINY}, gated={"gated/tiny": "hf_secret"}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        monkeypatch.delenv("HF_TOKEN", raising=False)
        fresh.start()
        refused = pull(fresh, "gated/tiny")[-1]
        assert refused["type"] == Event.MODEL_DOWNLOAD_FAILED and "HF_TOKEN" in refused["message"]
        assert fresh.stop() == 0
        monkeypatch.setenv("HF_TOKEN", "hf_secret")
        fresh.start()
        assert pull(fresh, "gated/tiny")[-1]["type"] == Event.MODEL_DOWNLOADED


def test_a_model_that_does_not_fit_is_refused_before_downloading(hub, tmp_path, monkeypatch) -> None:
    """In-process, so the disk can be made small: huggingface_hub reads its endpoint at import,
    so the constants it reads are pointed at the fake Hub here."""
    from huggingface_hub import constants

    from diffusiond.daemon.models import store
    from diffusiond.daemon.models.store import InsufficientDisk

    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(store.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(InsufficientDisk, match=r"needs 0\.0 GB more and 0\.0 GB are free"):
        store.pull(TORCH_REPO, gpu=False, report=lambda progress: None)
    assert not [r for r in hub.requests if "/resolve/" in r.path]


def test_a_zip_bomb_and_an_archive_of_too_many_entries_are_refused_before_anything_is_written(
    tmp_path, monkeypatch
) -> None:
    """The bounds, lowered so the test stays small: a real bomb (64 MiB of zeros in ~64 KiB)
    against 32 MiB, and 50 entries against 20."""
    monkeypatch.setattr(coreml_layout, "MAX_UNPACKED_BYTES", 32 * 1024**2)
    monkeypatch.setattr(coreml_layout, "MAX_ENTRIES", 20)
    bomb, many = tmp_path / "bomb.zip", tmp_path / "many.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("Unet.mlmodelc/weights/weight.bin", "w") as entry:
            for _ in range(64):
                entry.write(bytes(1024**2))
    assert bomb.stat().st_size < 1024**2
    with zipfile.ZipFile(many, "w") as zf:
        for i in range(50):
            zf.writestr(f"TextEncoder.mlmodelc/{i}.bin", b"x")
    for archive, reason in ((bomb, "unpacks to more than"), (many, "50 entries")):
        target = tmp_path / archive.stem
        with pytest.raises(coreml_layout.UnsafeArchive, match=reason):
            coreml_layout.unpack(archive, target)
        assert not target.exists()


def test_a_hub_model_that_cannot_be_reached_is_model_not_found_saying_what_to_do(fresh, tmp_path, monkeypatch) -> None:
    from .daemon_process import free_port

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there: offline
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    fresh.start()
    job = fresh.call("submit", prompt="a cat", model="nobody/nothing", steps=1)["job"]
    failed = fresh.wait_job(job["id"])
    assert failed["state"] == "failed" and failed["error"]["code"] == "model_not_found", failed["error"]
    assert "cannot be reached" in failed["error"]["message"]
    assert "diffuse models pull nobody/nothing" in failed["error"]["message"]


def test_a_truncated_weights_file_is_model_invalid_naming_it(daemon, tmp_path) -> None:
    model = tmp_path / "truncated"
    shutil.copytree(TINY, model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    with open(weights, "r+b") as file:
        file.truncate(weights.stat().st_size // 2)  # a copy or download that broke off
    job = daemon.call("submit", prompt="a cat", model=str(model), steps=1, width=64, height=64)["job"]
    failed = daemon.wait_job(job["id"])
    assert failed["state"] == "failed" and failed["error"]["code"] == "model_invalid", failed["error"]
    assert str(weights) in failed["error"]["message"] and "download or copy the model again" in failed["error"]["message"]
    assert daemon.call("submit", prompt="a cat", steps=1, width=64, height=64)["ok"]  # the daemon goes on
