"""A fake Hugging Face Hub on loopback, so tests can run the real huggingface_hub client's downloads offline.

It answers what huggingface_hub 2.4 asks for when it downloads a model repo:

    GET  /api/models/{repo}[/revision/{rev}]      model_info / repo_info: the commit `sha`, `siblings`
    GET  /api/models/{repo}/tree/{rev}[/{dir}]    list_repo_tree(recursive=True): snapshot_download, list_repo_files
    HEAD /{repo}/resolve/{rev}/{path}             get_hf_file_metadata: X-Repo-Commit, ETag, Content-Length
    GET  /{repo}/resolve/{rev}/{path}             http_get: the bytes; a resumed download sends `Range: bytes=N-`

Every file is served as a plain git blob: no X-Xet-* headers (which would send the client to Xet storage) and no
redirect to a CDN (so no X-Linked-Etag/X-Linked-Size either). The client then downloads over plain HTTP and names
each cache blob after the ETag, here the git blob sha1, as the Hub does for a non-LFS file. Errors carry the Hub's
X-Error-Code header, which is what the client turns into RepositoryNotFoundError, RemoteEntryNotFoundError, ...
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

INFO = re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?")
TREE = re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<dir>.+))?")
RESOLVE = re.compile(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)")
RANGE = re.compile(r"bytes=(\d*)-(\d*)")
CHUNK = 1 << 20


@dataclass(frozen=True)
class Request:
    """One request as the hub received it, so tests can assert on what the client asked for."""

    method: str
    path: str  # unquoted, without the query string
    range: str | None


def git_blob_sha1(path: Path) -> str:
    """Git's id for the file: the Hub's ETag and tree `oid` for a non-LFS file, streamed so big files stay cheap."""
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class Repo:
    """A folder served as a repo whose only commit is "main"; the commit sha is derived from the files' ids."""

    def __init__(self, folder: Path) -> None:
        self.files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
        self.oids = {name: git_blob_sha1(path) for name, path in self.files.items()}
        self.sha = hashlib.sha1(json.dumps(self.oids, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Hold:
    reached: threading.Event  # set when the held GET has sent its headers
    release: threading.Event


class FakeHub:
    """Serves `repos` ({"org/name": folder}) on 127.0.0.1 from a background thread, while used as a context manager.

    `gated` maps a repo id to the token its files require (`Authorization: Bearer <token>`); its listings stay public,
    as on the Hub. `requests` logs every request (appended from the server's threads: read it between client calls);
    `interrupt` makes file downloads break off; `hold` keeps one waiting.
    """

    def __init__(self, repos: Mapping[str, Path], gated: Mapping[str, str] | None = None) -> None:
        self.repos = {repo_id: Repo(Path(folder)) for repo_id, folder in repos.items()}
        self.gated = dict(gated or {})
        self.requests: list[Request] = []
        self._cuts: dict[tuple[str, str], list[int]] = {}
        self._cuts_lock = threading.Lock()
        self._holds: dict[tuple[str, str], Hold] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (_Handler,), {"hub": self}))
        self.endpoint = f"http://127.0.0.1:{self._server.server_port}"
        # A short poll interval: shutdown() waits up to one interval for the serving loop to notice.
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def interrupt(self, repo_id: str, path: str, after: int, times: int = 1) -> None:
        """Break off the next `times` GETs of this file after `after` bytes of their body: the headers promise the
        whole length (or range), then the connection closes, which is how a dropped connection looks to the client."""
        with self._cuts_lock:
            self._cuts.setdefault((repo_id, path), []).extend([after] * times)

    def hold(self, repo_id: str, path: str) -> Hold:
        """The next GET of this file sends its headers, then waits for `release` before the body."""
        hold = self._holds[(repo_id, path)] = Hold(threading.Event(), threading.Event())
        return hold

    def _next_cut(self, repo_id: str, path: str) -> int | None:
        with self._cuts_lock:
            cuts = self._cuts.get((repo_id, path))
            return cuts.pop(0) if cuts else None


class _Handler(BaseHTTPRequestHandler):
    """One connection per request (HTTP/1.0), so no keep-alive thread outlives the hub."""

    hub: FakeHub

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: tests read `hub.requests` instead."""

    def do_GET(self) -> None:
        """GET and HEAD alike; a HEAD gets the same status and headers, without the body."""
        url = urlsplit(self.path)
        self.hub.requests.append(Request(self.command, unquote(url.path), self.headers.get("Range")))
        if match := RESOLVE.fullmatch(url.path):
            self._resolve(match)
        elif self.command == "GET" and (match := TREE.fullmatch(url.path)):
            self._tree(match, parse_qs(url.query).get("recursive") == ["true"])
        elif self.command == "GET" and (match := INFO.fullmatch(url.path)):
            self._info(match)
        else:
            self._error(404, "Repository not found", {"X-Error-Code": "RepoNotFound"})

    do_HEAD = do_GET

    def _repo(self, match: re.Match[str]) -> Repo | None:
        """The matched repo, if it exists at the matched revision ("main" or its sha); else answer the Hub's 404."""
        repo = self.hub.repos.get(match["repo"])
        rev = unquote(match["rev"] or "main")
        if repo is None:
            return self._error(404, "Repository not found", {"X-Error-Code": "RepoNotFound"})
        if rev not in ("main", repo.sha):
            return self._error(404, f"Invalid rev id: {rev}", {"X-Error-Code": "RevisionNotFound"})
        return repo

    def _info(self, match: re.Match[str]) -> None:
        if repo := self._repo(match):
            siblings = [
                {"rfilename": name, "size": path.stat().st_size, "blobId": repo.oids[name]}
                for name, path in repo.files.items()
            ]
            gated = "manual" if match["repo"] in self.hub.gated else False
            self._json({"id": match["repo"], "sha": repo.sha, "private": False, "gated": gated, "siblings": siblings})

    def _tree(self, match: re.Match[str], recursive: bool) -> None:
        if not recursive:  # the client's downloads only list recursively; a flat listing would also need folders
            self._error(400, "The fake hub only lists trees recursively", {})
        elif repo := self._repo(match):
            prefix = f"{unquote(match['dir'])}/" if match["dir"] else ""
            self._json([
                {"type": "file", "oid": repo.oids[name], "size": path.stat().st_size, "path": name}
                for name, path in repo.files.items() if name.startswith(prefix)
            ])

    def _resolve(self, match: re.Match[str]) -> None:
        repo = self._repo(match)
        if repo is None:
            return
        token = self.hub.gated.get(match["repo"])
        if token is not None and self.headers.get("Authorization") != f"Bearer {token}":
            message = f"Access to model {match['repo']} is restricted. You must be authenticated to access it."
            return self._error(401, message, {"X-Error-Code": "GatedRepo"})
        name = unquote(match["path"])
        if name not in repo.files:
            # The commit lets the client cache the file's absence as `.no_exist/<commit>/<path>`.
            headers = {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.sha}
            return self._error(404, f"{name} does not exist", headers)
        path = repo.files[name]
        size = path.stat().st_size
        ranged = "Range" in self.headers
        span = byte_range(self.headers["Range"], size) if ranged else (0, size)
        if span is None:
            return self._error(416, "Range not satisfiable", {"Content-Range": f"bytes */{size}"})
        start, stop = span
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(stop - start),
                   "Accept-Ranges": "bytes", "ETag": f'"{repo.oids[name]}"', "X-Repo-Commit": repo.sha}
        if ranged:
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
        self._start(206 if ranged else 200, headers)
        if self.command == "GET":
            hold = self.hub._holds.pop((match["repo"], name), None)
            if hold is not None:
                self.wfile.flush()
                hold.reached.set()
                hold.release.wait(60)
            cut = self.hub._next_cut(match["repo"], name)
            self._send_file(path, start, stop if cut is None else min(stop, start + cut))

    def _send_file(self, path: Path, start: int, stop: int) -> None:
        with path.open("rb") as f:
            f.seek(start)
            while start < stop and (chunk := f.read(min(CHUNK, stop - start))):
                self.wfile.write(chunk)
                start += len(chunk)

    def _start(self, status: int, headers: Mapping[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()

    def _json(self, payload: object, status: int = 200, headers: Mapping[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self._start(status, {"Content-Type": "application/json", "Content-Length": str(len(body)), **(headers or {})})
        if self.command == "GET":
            self.wfile.write(body)

    def _error(self, status: int, message: str, headers: Mapping[str, str]) -> None:
        """The Hub's error shape: a JSON body and X-Error-Message; the client picks its exception by X-Error-Code."""
        self._json({"error": message}, status, {"X-Error-Message": message, **headers})


def byte_range(header: str, size: int) -> tuple[int, int] | None:
    """[start, stop) of a single-range `Range: bytes=...` header (first-last, first-, or -suffix); None if it can't
    be satisfied."""
    match = RANGE.fullmatch(header.strip())
    if match is None or match[1] == match[2] == "":
        return None
    first, last = match.groups()
    if first:
        start, stop = int(first), min(int(last) + 1, size) if last else size
    else:  # "-N": the last N bytes
        start, stop = max(size - int(last), 0), size
    return (start, stop) if start < stop else None


# The published trees of the catalog's Core ML repos (tests/fixtures/coreml_hub/README.md says where each
# listing comes from): each file by its path, what it holds given by a mark. Compiled models and packages
# expand to the files Core ML writes into them; only their metadata.json is data, the rest are stand-ins.
COREML_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "coreml_hub"
COMPILED_MODEL_FILES = ("metadata.json", "model.mil", "coremldata.bin", "analytics/coremldata.bin", "weights/weight.bin")
PACKAGE_FILES = ("Manifest.json", "Data/com.apple.CoreML/model.mlmodel", "Data/com.apple.CoreML/weights/weight.bin")


def coreml_listing(repo_id: str) -> dict[str, Any]:
    return json.loads((COREML_FIXTURES / "repos.json").read_text())[repo_id]


def _published_files(path: str, mark: str) -> list[tuple[str, bytes]]:
    """A listed path's files: a tokenizer file (the tiny model's stands in for CLIP's), a compiled
    model (its reconstructed metadata.json, stand-in weights), a package or any other file (stand-ins)."""
    from diffusiond.daemon.models.catalog import TINY

    if mark in ("vocab.json", "merges.txt"):
        return [(path, (TINY / "tokenizer" / mark).read_bytes())]
    if mark == "package":
        return [(f"{path}/{name}", f"stand-in for {path}/{name}\n".encode()) for name in PACKAGE_FILES]
    if mark == "text":
        return [(path, f"stand-in for {path}\n".encode())]
    metadata = (COREML_FIXTURES / "metadata" / f"{mark}.json").read_bytes()
    return [(f"{path}/{name}", metadata if name == "metadata.json" else f"stand-in for {path}/{name}\n".encode())
            for name in COMPILED_MODEL_FILES]


def published_coreml_repo(repo_id: str, folder: Path) -> Path:
    """Write a catalog Core ML repo's published tree into `folder` for a FakeHub to serve; its zip
    archives are built here, stored (compiled weights hardly compress), one top folder each as published."""
    import zipfile

    for path, mark in coreml_listing(repo_id).items():
        target = folder / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(mark, dict):
            with zipfile.ZipFile(target, "w") as archive:
                for entry, entry_mark in mark["archive"].items():
                    for name, data in _published_files(entry, entry_mark):
                        archive.writestr(name, data)
            continue
        for name, data in _published_files(path, mark):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
    return folder
