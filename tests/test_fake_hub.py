"""The fake Hub against the real huggingface_hub client: the downloads the daemon will make, with no network.

Settings: huggingface_hub reads HF_ENDPOINT, HF_HOME (-> HF_HUB_CACHE) and HF_HUB_OFFLINE into
`huggingface_hub.constants` once, when it is first imported, which is before any fixture runs (this module imports it).
So monkeypatch.setenv on them reaches only a fresh interpreter: test_environment_in_a_fresh_interpreter, which is how
the daemon gets them from its service environment. In-process calls pass the public `endpoint=` and `cache_dir=`
parameters instead, and offline mode, which has no parameter, is switched by patching `constants.HF_HUB_OFFLINE`, the
value the client checks before every request. HF_TOKEN is read on every call, so setenv works for it in-process.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import GatedRepoError, RemoteEntryNotFoundError, RepositoryNotFoundError

from .fake_hub import FakeHub, Request

REPO, GATED, TOKEN = "org/tiny", "org/gated", "hf_fake_token"
BIG = "unet/diffusion_pytorch_model.safetensors"
# The client writes what it receives in DOWNLOAD_CHUNK_SIZE (10 MiB) pieces and resumes from the last whole piece,
# so the big file must be larger than one piece for a resume to show.
BIG_SIZE = constants.DOWNLOAD_CHUNK_SIZE + (1 << 20)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    folder = tmp_path / "repo"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (folder / "unet" / "config.json").write_text(json.dumps({"sample_size": 8}))
    (folder / BIG).write_bytes(random.Random(0).randbytes(BIG_SIZE))
    (folder / "README.md").write_text("# tiny\n")
    return folder


@pytest.fixture
def hub(repo: Path) -> Iterator[FakeHub]:
    with FakeHub({REPO: repo, GATED: repo}, gated={GATED: TOKEN}) as hub:
        yield hub


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hub: FakeHub) -> Path:
    """The hub cache under a fresh HF_HOME, with the environment pointing at the fake hub and online, even where the
    developer's shell sets HF_HUB_OFFLINE.

    Telemetry off: otherwise the first request of a process makes the client fetch an AI-agent registry from
    `constants.ENDPOINT` (the real Hub, in this process) into the import-time HF_HOME, at most once a day."""
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    for name in ("HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    return tmp_path / "hf" / "hub"


@pytest.fixture
def pauses(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The client waits 1 s before each retry of a broken download; record the waits instead of waiting."""
    waits: list[float] = []
    monkeypatch.setattr(time, "sleep", waits.append)
    return waits


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def resolved(hub: FakeHub) -> list[tuple[str, str]]:
    """(method, file) of each /resolve request, in order."""
    return [(r.method, r.path.split("/", 5)[5]) for r in hub.requests if "/resolve/" in r.path]


def test_snapshot_download_fills_the_cache_layout(hub: FakeHub, repo: Path, cache: Path) -> None:
    snapshot = Path(snapshot_download(REPO, revision="main", endpoint=hub.endpoint, cache_dir=cache))

    sha = hub.repos[REPO].sha
    storage = cache / "models--org--tiny"
    assert snapshot == storage / "snapshots" / sha
    assert (storage / "refs" / "main").read_text() == sha
    assert files(snapshot) == files(repo)
    for name, oid in hub.repos[REPO].oids.items():
        assert (snapshot / name).resolve() == storage / "blobs" / oid  # blobs are named after the ETag
    assert hub.requests[:2] == [
        Request("GET", f"/api/models/{REPO}/revision/main", None),  # repo_info: main -> sha
        Request("GET", f"/api/models/{REPO}/tree/{sha}", None),  # the file list, at that sha
    ]
    assert sorted(resolved(hub)) == sorted((m, name) for name in files(repo) for m in ("GET", "HEAD"))


def test_allow_patterns_fetch_only_matching_files(hub: FakeHub, cache: Path) -> None:
    snapshot = Path(snapshot_download(REPO, allow_patterns="*.json", endpoint=hub.endpoint, cache_dir=cache))

    assert sorted(files(snapshot)) == ["model_index.json", "unet/config.json"]
    assert {name for _, name in resolved(hub)} == {"model_index.json", "unet/config.json"}


def test_broken_download_resumes_with_a_range_request(
    hub: FakeHub, repo: Path, cache: Path, pauses: list[float]
) -> None:
    chunk = constants.DOWNLOAD_CHUNK_SIZE
    hub.interrupt(REPO, BIG, after=300_000)  # less than a chunk: nothing kept, the retry starts over
    hub.interrupt(REPO, BIG, after=chunk + 1000)  # one whole chunk kept: the retry asks for the rest

    path = hf_hub_download(REPO, BIG, endpoint=hub.endpoint, cache_dir=cache)

    assert Path(path).read_bytes() == (repo / BIG).read_bytes()
    assert [r.range for r in hub.requests if r.method == "GET"] == [None, None, f"bytes={chunk}-"]
    assert pauses == [1, 1]
    assert not list(cache.rglob("*.incomplete"))


def test_failed_download_leaves_nothing_to_resume(
    hub: FakeHub, repo: Path, cache: Path, pauses: list[float]
) -> None:
    """Once the client gives up (5 retries that receive nothing), the call raises and deletes its partial file, so
    the next call downloads the whole file again: downloads never resume across calls or processes."""
    chunk = constants.DOWNLOAD_CHUNK_SIZE
    hub.interrupt(REPO, BIG, after=chunk + 1000)
    hub.interrupt(REPO, BIG, after=0, times=5)

    with pytest.raises(httpx2.RemoteProtocolError):
        hf_hub_download(REPO, BIG, endpoint=hub.endpoint, cache_dir=cache)
    assert [r.range for r in hub.requests if r.method == "GET"] == [None] + [f"bytes={chunk}-"] * 5
    assert pauses == [1] * 5
    assert not list(cache.rglob("*.incomplete"))

    hub.requests.clear()
    path = hf_hub_download(REPO, BIG, endpoint=hub.endpoint, cache_dir=cache)
    assert Path(path).read_bytes() == (repo / BIG).read_bytes()
    assert [(r.method, r.range) for r in hub.requests] == [("HEAD", None), ("GET", None)]


def test_offline_mode_uses_the_cached_snapshot_without_a_request(
    hub: FakeHub, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    online = snapshot_download(REPO, endpoint=hub.endpoint, cache_dir=cache)
    hub.requests.clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    assert snapshot_download(REPO, endpoint=hub.endpoint, cache_dir=cache) == online
    assert hub.requests == []


def test_environment_in_a_fresh_interpreter(hub: FakeHub, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE work as variables when set before huggingface_hub is imported."""
    script = "from huggingface_hub import snapshot_download; print(snapshot_download('org/tiny'))"

    def download() -> Path:
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
        assert run.returncode == 0, run.stderr
        return Path(run.stdout.strip())

    online = download()
    assert online == cache / "models--org--tiny" / "snapshots" / hub.repos[REPO].sha
    assert len(hub.requests) == 2 + 2 * len(files(online))  # info, tree, then a HEAD and a GET per file
    hub.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert download() == online
    assert hub.requests == []


def test_gated_repo_needs_the_token(hub: FakeHub, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(GatedRepoError):
        snapshot_download(GATED, endpoint=hub.endpoint, cache_dir=cache / "anonymous")

    snapshot = snapshot_download(GATED, token=TOKEN, endpoint=hub.endpoint, cache_dir=cache / "argument")
    assert (Path(snapshot) / BIG).stat().st_size == BIG_SIZE

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert hf_hub_download(GATED, "model_index.json", endpoint=hub.endpoint, cache_dir=cache / "environment")


def test_missing_repo_and_file(hub: FakeHub, cache: Path) -> None:
    with pytest.raises(RepositoryNotFoundError) as error:
        snapshot_download("org/missing", endpoint=hub.endpoint, cache_dir=cache)
    assert type(error.value) is RepositoryNotFoundError  # not its subclass GatedRepoError
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(REPO, "missing.bin", endpoint=hub.endpoint, cache_dir=cache)
    # The 404 carries X-Repo-Commit, so the client remembers the absence at that commit.
    assert (cache / "models--org--tiny" / ".no_exist" / hub.repos[REPO].sha / "missing.bin").exists()
