"""Models by name: the shipped alias, a local folder, or a Hub repo (`org/name[@revision]`).

Hub models live in the standard Hugging Face cache through huggingface_hub itself, so a model
that diffusers already downloaded is found, not fetched again; HF_HOME, HF_HUB_OFFLINE and
HF_TOKEN mean what they always mean. Only the files the torch runtime needs are fetched: the
configs and tokenizer, and one weight file per network — safetensors over .bin, the fp16 variant
on a GPU when the repo has one.
"""

from __future__ import annotations

import shutil
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffusiond.clients.protocol import Code

from ..errors import Cancelled, EngineError, ModelNotFound
from . import coreml_layout
from .ref import parse
_SMALL = ("model_index.json", "scheduler/*", "tokenizer/*", "tokenizer_2/*", "feature_extractor/*", "*/config.json")
_WEIGHTS = {
    "unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
    "text_encoder": "model", "text_encoder_2": "model", "safety_checker": "model",
}
PROGRESS_INTERVAL = 0.25  # seconds between download progress reports


class InsufficientDisk(EngineError):
    code = Code.INSUFFICIENT_DISK


class DownloadFailed(EngineError):
    code = Code.DOWNLOAD_FAILED


def split(name: str) -> tuple[str, str | None]:
    """A Hub id's repo and revision."""
    ref = parse(name)
    if ref.repo is None:
        raise ModelNotFound(f"{name!r} is not a Hub id (org/name[@revision]) or a catalog name")
    return ref.repo, ref.revision


def runtime_files(files: list[str], gpu: bool) -> list[str]:
    """The files of a diffusers repo that the torch runtime loads."""
    from fnmatch import fnmatch

    chosen = [f for f in files if any(fnmatch(f, pattern) for pattern in _SMALL)]
    for component, stem in _WEIGHTS.items():
        preference = [f"{component}/{stem}.safetensors", f"{component}/{stem}.bin"]
        if gpu:
            preference = [f"{component}/{stem}.fp16.safetensors", *preference[:1], f"{component}/{stem}.fp16.bin", *preference[1:]]
        found = next((f for f in preference if f in files), None)
        if found:
            chosen.append(found)
    return sorted(set(chosen))


class _Meter:
    """Bytes of one pull across its files, reported at most every PROGRESS_INTERVAL."""

    def __init__(self, name: str, total: int, report: Callable[[dict[str, Any]], None], cancelled: Callable[[], bool]):
        self.name, self.total, self.report, self.cancelled = name, total, report, cancelled
        self.done = 0
        self.started = self.last = time.monotonic()
        self.file = ""

    def add(self, n: int) -> None:
        if self.cancelled():
            raise Cancelled(f"download of {self.name} cancelled; files that arrived whole are kept")
        self.done = min(self.done + n, self.total)  # a retried chunk is not counted twice
        now = time.monotonic()
        if now - self.last >= PROGRESS_INTERVAL or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.started, 1e-6)
            self.report({"model": self.name, "file": self.file, "bytes": self.done, "total": self.total, "rate": rate})

    def tqdm_class(self) -> type:
        """What huggingface_hub draws its bars with, turned into our reports."""
        from tqdm.auto import tqdm

        meter = self

        class Reporter(tqdm):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                meter.done += int(kwargs.get("initial") or 0)  # bytes an earlier try of this call kept
                kwargs["disable"] = True
                super().__init__(*args, **kwargs)

            def update(self, n: float | None = 1) -> bool | None:
                meter.add(int(n or 0))
                return None

        return Reporter


def local_path(name: str) -> Path | None:
    """A Hub model's snapshot folder when every file it needs is cached; None otherwise."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo, revision = split(name)
    try:
        folder = Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, OSError):
        return None
    needed = [component for component in _WEIGHTS if (folder / component / "config.json").exists()]
    complete = (folder / "model_index.json").exists() and all(
        any((folder / component).glob(f"{_WEIGHTS[component]}*")) for component in needed
    )
    return folder if complete else None


def _unpacked_repo(repo: str) -> Path:
    """Where a Core ML repo's archives are unpacked: beside the HF cache, a folder per commit in it."""
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "diffusiond" / "coreml" / repo.replace("/", "--")


def _unpacked_root(repo: str, revision: str) -> Path:
    return _unpacked_repo(repo) / revision


def coreml_local_path(name: str) -> Path | None:
    """A Core ML repo's folder of models in Apple's naming (archives unpacked by `pull`); None
    when none is cached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo, revision = split(name)
    try:
        snapshot = Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, OSError):
        return None
    unpacked = _unpacked_root(repo, snapshot.name)
    try:
        return coreml_layout.model_dir(unpacked if unpacked.exists() else snapshot)
    except FileNotFoundError:
        return None


def pull(
    name: str,
    gpu: bool,
    report: Callable[[dict[str, Any]], None],
    cancelled: Callable[[], bool] = lambda: False,
    compute_units: str = "cpuAndGPU",
    keep_archives: bool = False,
) -> Path:
    """Download what a runtime needs of a Hub model (files already cached are not fetched again):
    for a diffusers-format repo the torch runtime's files (`gpu`: fetch the fp16 weights); for a Core ML repo the variant the compute units
    need, its archives unpacked and then removed from the cache unless `keep_archives`. The folder
    to load from."""
    from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo, revision = split(name)
    if constants.HF_HUB_OFFLINE:
        raise ModelNotFound(f"{name} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; pull it while online")
    try:
        try:
            info = HfApi().model_info(repo, revision=revision, files_metadata=True)
        except Exception as exc:
            if not _network_error(exc):
                raise
            raise ModelNotFound(
                f"{name} is not in the Hugging Face cache and the Hub cannot be reached ({type(exc).__name__}: {exc}). "
                f"Pull it while online (`diffuse models pull {name}`); a local folder is given as a path, e.g. ./{name}"
            ) from None
        sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
        coreml = coreml_layout.is_coreml_repo(list(sizes))
        unpacked = _unpacked_root(repo, str(info.sha))
        if coreml:
            _variant, files = coreml_layout.coreml_files(list(sizes), compute_units)
            # An archive already unpacked is not needed again (its blob may be gone).
            files = [f for f in files if not (f.endswith(".zip") and (unpacked / Path(f).stem).is_dir())]
        else:
            files = runtime_files(list(sizes), gpu)
            if "model_index.json" not in files:
                raise ModelNotFound(f"{name} is neither a diffusers-format model (no model_index.json) nor a Core ML repo")
        cache = Path(constants.HF_HUB_CACHE)
        cached = {f for f in files if _cached(repo, f, str(info.sha))}
        missing = sum(sizes[f] for f in files if f not in cached)
        # An archive's models are unpacked beside it: about as many bytes again (compiled weights hardly compress).
        unpacking = sum(sizes[f] for f in files if f.endswith(".zip"))
        _require_disk(name, missing + unpacking, cache, f" ({unpacking / 1e9:.1f} GB of it to unpack the archives)" if unpacking else "")
        meter = _Meter(name, sum(sizes[f] for f in files), report, cancelled)
        meter.done = sum(sizes[f] for f in cached)
        for file in files:
            if file not in cached:
                meter.file = file
                # By the revision's name, not its sha, so the cache records the name (refs/) and an
                # offline start finds the model under it.
                hf_hub_download(repo, file, revision=revision, tqdm_class=meter.tqdm_class())
        meter.report({"model": name, "file": "", "bytes": meter.total, "total": meter.total, "rate": 0.0})
        snapshot = Path(snapshot_download(repo, revision=revision, local_files_only=True, allow_patterns=files))
        if not coreml:
            return snapshot
        for archive in (f for f in files if f.endswith(".zip")):
            _unpack(name, snapshot / archive, unpacked / Path(archive).stem, keep_archives)
        return coreml_layout.model_dir(unpacked if unpacked.exists() else snapshot)
    except (coreml_layout.UnsafeArchive, zipfile.BadZipFile) as exc:
        raise DownloadFailed(f"{name}: refused to unpack: {exc}") from None
    except RepositoryNotFoundError:
        raise ModelNotFound(f"no model {repo!r} on the Hub (or it is private: set HF_TOKEN)") from None
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        raise DownloadFailed(f"downloading {name} failed: {exc}; run it again: files that arrived whole are kept") from None


def cached_file(repo: str, file: str) -> Path | None:
    """One file of a Hub repo (a LoRA) in the Hugging Face cache, at the revision it was fetched at; None when it is not there."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, file)
    return Path(found) if isinstance(found, str) else None


def pull_file(name: str, repo: str, file: str, report: Callable[[dict[str, Any]], None],
              cancelled: Callable[[], bool] = lambda: False) -> Path:
    """Download one file of a Hub repo (a LoRA) into the Hugging Face cache, reporting as `pull` does under ``name``."""
    from huggingface_hub import HfApi, constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE:
        raise ModelNotFound(f"{name} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; fetch it while online")
    try:
        try:
            info = HfApi().model_info(repo, files_metadata=True)
        except Exception as exc:
            if not _network_error(exc):
                raise
            raise ModelNotFound(f"{name} is not in the Hugging Face cache and the Hub cannot be reached "
                                f"({type(exc).__name__}); download it into the LoRA folder instead") from None
        sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
        if file not in sizes:
            raise ModelNotFound(f"{repo} on the Hub has no file {file!r}")
        _require_disk(name, sizes[file], Path(constants.HF_HUB_CACHE))
        meter = _Meter(name, sizes[file], report, cancelled)
        meter.file = file
        path = Path(hf_hub_download(repo, file, tqdm_class=meter.tqdm_class()))
        meter.report({"model": name, "file": "", "bytes": meter.total, "total": meter.total, "rate": 0.0})
        return path
    except RepositoryNotFoundError:
        raise ModelNotFound(f"no repo {repo!r} on the Hub (or it is private: set HF_TOKEN)") from None
    except EntryNotFoundError:
        raise ModelNotFound(f"{repo} on the Hub has no file {file!r}") from None
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        raise DownloadFailed(f"downloading {name} failed: {exc}; run it again: files that arrived whole are kept") from None


def _require_disk(name: str, needed: int, folder: Path, detail: str = "") -> None:
    free = shutil.disk_usage(_existing_parent(folder)).free
    if needed > free:
        raise InsufficientDisk(f"{name} needs {needed / 1e9:.1f} GB more{detail} and {free / 1e9:.1f} GB are free in "
                               f"{_existing_parent(folder)}: free some space (diffuse models remove NAME) and pull again")


def _unpack(name: str, archive: Path, target: Path, keep_archive: bool) -> None:
    """Unpack into `target` (through a .partial folder, so a half-unpacked copy is never used); once
    every entry is there at its size (zipfile checked each CRC), the archive leaves the cache."""
    with zipfile.ZipFile(archive) as zf:
        entries = [e for e in zf.infolist() if not e.is_dir()]
    _require_disk(name, sum(e.file_size for e in entries), target, f" to unpack {archive.name}")
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    coreml_layout.unpack(archive, partial)
    short = [e.filename for e in entries if not (partial / e.filename).is_file()
             or (partial / e.filename).stat().st_size != e.file_size]
    if short:
        raise DownloadFailed(f"{name}: unpacking {archive.name} left {', '.join(short[:3])} incomplete; pull it again")
    partial.rename(target)
    if not keep_archive:
        blob = archive.resolve()
        archive.unlink()  # the snapshot's link first, so the cache never holds a broken one
        snapshots = blob.parent.parent / "snapshots"
        if not any(link.resolve() == blob for link in snapshots.rglob(archive.name)):  # another revision's
            blob.unlink(missing_ok=True)


def _network_error(exc: Exception) -> bool:
    """Whether the first contact with the Hub failed for want of a network: huggingface_hub raises
    its HTTP library's own errors for that (requests, httpx or httpx2, by version), not HfHubHTTPError."""
    root = type(exc).__module__.split(".")[0]
    return root in ("requests", "urllib3", "httpx", "httpx2")


def _cached(repo: str, file: str, revision: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, file, revision=revision), str)


def _existing_parent(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def remove(name: str) -> int:
    """Delete a Hub model from the cache; the bytes freed."""
    from huggingface_hub import constants, scan_cache_dir

    repo, _ = split(name)
    cache = scan_cache_dir(constants.HF_HUB_CACHE)
    revisions = [rev.commit_hash for entry in cache.repos if entry.repo_id == repo for rev in entry.revisions]
    if not revisions:
        raise ModelNotFound(f"{name} is not in the Hugging Face cache")
    strategy = cache.delete_revisions(*revisions)
    strategy.execute()
    return strategy.expected_freed_size + _remove_unpacked(repo)


def _remove_unpacked(repo: str) -> int:
    """Delete the unpacked copies of a Core ML repo's archives; the bytes freed."""
    root = _unpacked_repo(repo)
    if not root.is_dir():
        return 0
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    shutil.rmtree(root)
    return size


def cached_models() -> list[dict[str, Any]]:
    """Hub models in the Hugging Face cache that a runtime can load, with their size and folder."""
    from huggingface_hub import constants, scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir(constants.HF_HUB_CACHE)  # as it is now, not at huggingface_hub's import
    except (CacheNotFound, OSError):  # no cache yet: nothing downloaded
        return []
    found = []
    for repo in cache.repos:
        if repo.repo_type != "model":
            continue
        for revision in repo.revisions:
            files = [f.file_name for f in revision.files] + [str(f.file_path.relative_to(revision.snapshot_path)) for f in revision.files]
            unpacked = _unpacked_root(repo.repo_id, revision.commit_hash)
            coreml = coreml_layout.is_coreml_repo(files) or unpacked.is_dir()
            kind = "torch" if "model_index.json" in files else "coreml" if coreml else None
            if kind:
                size = revision.size_on_disk + sum(f.stat().st_size for f in unpacked.rglob("*") if f.is_file())
                found.append({"name": repo.repo_id, "runtime": kind, "size": size,
                              "path": str(revision.snapshot_path), "revision": revision.commit_hash})
    return found
