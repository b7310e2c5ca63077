"""The hot folder: a prompt file dropped into a folder becomes images, exactly once.

A `.txt` file in the folder is read — only once its writer is done with it — as infotext (prompt,
optional `Negative prompt:`, optional parameters line), submitted with an idempotency key
derived from the file, and followed to its end. Its images land in the output folder named after
the file (`stem.png`, `stem-2.png`, …); the file moves to `done/`, or to `failed/` beside a
`stem.error.txt` saying why. Across restarts of the hot folder or the daemon no file is lost and
none makes images twice: the key makes a resubmission return the job the file already has, and
each step below is a rename, safe to repeat.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .client import Client, DaemonUnreachable, RequestFailed
from .infotext import job_settings, parse_infotext
from .protocol import FINISHED, unpack

# Linux reports when a writer closes a file; elsewhere (macOS FSEvents) a file is ready once its
# size and modification time have held still for `settle` seconds.
CLOSE_EVENTS = sys.platform.startswith("linux")
MAX_PROMPT_FILE_BYTES = 64 * 1024
_TEMPORARY_SUFFIXES = ("~", ".swp", ".swx", ".tmp", ".part", ".crdownload", ".download")


def is_prompt_file(path: Path) -> bool:
    """A visible `.txt` file: editors' and downloaders' temporary files are not prompts."""
    name = path.name
    return (
        name.endswith(".txt")
        and not name.startswith((".", "#", "~$"))
        and not name.endswith(_TEMPORARY_SUFFIXES)
        and not name.endswith(".error.txt")
    )


def free_name(folder: Path, stem: str, suffix: str) -> Path:
    """`stem.suffix`, else `stem-2.suffix`, `stem-3.suffix`, …: nothing is overwritten."""
    candidate, n = folder / f"{stem}{suffix}", 1
    while candidate.exists():
        n += 1
        candidate = folder / f"{stem}-{n}{suffix}"
    return candidate


def prompt_text(data: bytes) -> str:
    """A prompt file's text: UTF-8 (a byte-order mark dropped), or UTF-16 with its byte-order mark,
    as Windows editors save "Unicode" text. ValueError in plain words otherwise."""
    try:
        if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            return data.decode("utf-16")
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"prompt files are UTF-8 text (or UTF-16 with a byte-order mark); this one is not "
            f"(byte 0x{data[exc.start]:02x} at {exc.start}): save it as UTF-8"
        ) from None


@dataclass
class Pending:
    path: Path
    job_id: str | None = None


class HotFolder:
    def __init__(
        self,
        folder: Path,
        client: Client,
        output_dir: Path | None = None,
        settle: float = 1.0,
        report: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.folder = folder.resolve()
        self.output_dir = (output_dir or self.folder / "out").resolve()
        self.done_dir, self.failed_dir = self.folder / "done", self.folder / "failed"
        self.client = client
        self.settle = settle
        self.report = report or (lambda line: None)
        self.arrivals: queue.SimpleQueue[Path] = queue.SimpleQueue()
        self.waiting: dict[Path, tuple[int, int, float]] = {}  # not yet ready: (size, mtime, since)
        self.pending: dict[Path, Pending] = {}  # submitted or about to be, until moved away
        self.daemon_down = False  # said "waiting" once; says "daemon back" when it answers again
        self.events: Any = None  # a live job-event subscription, once the daemon has answered
        self.last_line: dict[str, float] = {}  # job id → when its last progress line went out

    # -- arrival ----------------------------------------------------------------------------

    def _watch(self) -> Any:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        arrivals, folder = self.arrivals, self.folder

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                path = Path(getattr(event, "dest_path", "") or event.src_path)
                if event.is_directory or path.parent != folder or not is_prompt_file(path):
                    return
                if event.event_type in ("closed", "moved") or not CLOSE_EVENTS and event.event_type in ("created", "modified"):
                    arrivals.put(path)

        observer = Observer()
        observer.schedule(Handler(), str(self.folder), recursive=False)
        observer.start()
        return observer

    def _scan(self) -> None:
        """What arrived while nothing ran: ready once settled, since its writer may still be busy."""
        for path in sorted(self.folder.iterdir()):
            if path.is_file() and is_prompt_file(path) and path not in self.pending:
                self.waiting.setdefault(path, (-1, -1, time.monotonic()))

    def _settled(self) -> list[Path]:
        ready, now = [], time.monotonic()
        for path, (size, mtime, since) in list(self.waiting.items()):
            try:
                info = path.stat()
            except FileNotFoundError:
                del self.waiting[path]
                continue
            if (info.st_size, info.st_mtime_ns) != (size, mtime):
                self.waiting[path] = (info.st_size, info.st_mtime_ns, now)
            elif now - since >= self.settle:
                del self.waiting[path]
                ready.append(path)
        return ready

    # -- the loop ---------------------------------------------------------------------------

    def run(self, stop: threading.Event, poll_every: float = 0.5) -> None:
        for folder in (self.output_dir, self.done_dir, self.failed_dir):
            folder.mkdir(parents=True, exist_ok=True)
        observer = self._watch()  # before the scan: a file arriving in between is seen by one of them
        self._scan()
        self.report({"event": "watching", "folder": str(self.folder), "output_dir": str(self.output_dir)})
        try:
            while not stop.is_set():
                ready = self._settled()
                deadline = time.monotonic() + poll_every
                while (remaining := deadline - time.monotonic()) > 0:
                    try:
                        path = self.arrivals.get(timeout=remaining)
                    except queue.Empty:
                        break
                    if CLOSE_EVENTS:
                        self.waiting.pop(path, None)
                        ready.append(path)
                    else:
                        self.waiting.setdefault(path, (-1, -1, time.monotonic()))
                for path in dict.fromkeys(ready):
                    if path not in self.pending and path.exists():
                        self.pending[path] = Pending(path)
                self._advance()
                self._progress()
        finally:
            observer.stop()
            observer.join(timeout=5)

    def _progress(self, until_done: str | None = None) -> None:
        """A line per step of each file's job, from the daemon's events (the queue stays the record).

        With ``until_done``, a job followed so far and now finished: its last step line is due, and
        its events may still be on their way, so wait (a second at most) for its final event."""
        if self.events is None:
            if self.daemon_down or not self.pending:
                return
            try:
                self.events = self.client.subscribe([b"job."], timeout=2)
            except DaemonUnreachable:
                return
        files = {item.job_id: item.path.name for item in self.pending.values() if item.job_id}
        now = time.monotonic()
        deadline = now + (1.0 if until_done in self.last_line else 0.0)
        while self.events.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            _, body = self.events.recv_multipart()
            event = unpack(body)
            job = event.get("job")
            if job == until_done and event.get("type") in ("job.done", "job.failed", "job.cancelled"):
                break
            if event.get("type") != "job.progress" or job not in files:
                continue
            # At most a line a second per file, and the last step always.
            if event["step"] == event["total"] or now - self.last_line.get(job, 0.0) >= 1.0:
                self.last_line[job] = now
                self.report({"event": "progress", "file": files[job], "job": job, "step": event["step"],
                             "total": event["total"]})
        for job in set(self.last_line) - set(files):
            del self.last_line[job]

    def _advance(self) -> None:
        """Move every pending file one step on; while the daemon is away, wait and retry."""
        try:
            for item in list(self.pending.values()):
                if item.job_id is None:
                    self._submit(item)
                else:
                    job = self.client.get(item.job_id)
                    if job["state"] in FINISHED:
                        self._finish(item, job)
        except DaemonUnreachable as exc:
            if not self.daemon_down:
                self.daemon_down = True
                self.report({"event": "waiting", "reason": str(exc)})
            return
        if self.daemon_down:
            self.daemon_down = False
            self.report({"event": "daemon back"})

    def _submit(self, item: Pending) -> None:
        try:
            data = item.path.read_bytes()
            info = item.path.stat()
        except FileNotFoundError:
            del self.pending[item.path]  # taken away before we got to it
            return
        try:
            if len(data) > MAX_PROMPT_FILE_BYTES:
                raise ValueError(f"prompt files are at most {MAX_PROMPT_FILE_BYTES} bytes")
            fields, unknown = job_settings(parse_infotext(prompt_text(data)))
            if unknown:
                raise ValueError(f"unknown settings: {', '.join(unknown)}")
            if not fields["prompt"]:
                raise ValueError("the file holds no prompt")
        except ValueError as exc:
            self._fail(item, str(exc))
            return
        # The file's identity and content: the same drop gets the same job, a new drop a new one.
        identity = f"{self.folder}\0{item.path.name}\0{info.st_ino}\0{info.st_mtime_ns}\0".encode() + data
        key = "hotfolder:" + hashlib.sha256(identity).hexdigest()[:40]
        try:
            job = self.client.submit(**fields, output_dir=str(self.output_dir), idempotency_key=key)
        except RequestFailed as exc:
            self._fail(item, f"{exc.message} ({exc.code})")
            return
        item.job_id = job["id"]
        self.report({"event": "queued", "file": item.path.name, "job": job["id"]})
        if job["state"] in FINISHED:
            self._finish(item, job)

    def _finish(self, item: Pending, job: dict[str, Any]) -> None:
        self._progress(until_done=job["id"])
        if job["state"] != "done":
            error = job.get("error") or {}
            self._fail(item, f"{error.get('message', job['state'])} ({error.get('code', job['state'])})")
            return
        images = []
        for output in job["outputs"]:
            source = Path(output)
            if source.exists():  # not moved yet (a restart may find some already moved)
                target = free_name(self.output_dir, item.path.stem, ".png")
                source.rename(target)
                images.append(str(target))
        item.path.rename(free_name(self.done_dir, item.path.stem, item.path.suffix))
        del self.pending[item.path]
        self.report({"event": "done", "file": item.path.name, "job": job["id"], "images": images})

    def _fail(self, item: Pending, reason: str) -> None:
        target = free_name(self.failed_dir, item.path.stem, item.path.suffix)
        target.with_name(f"{target.stem}.error.txt").write_text(reason + "\n")
        item.path.rename(target)
        del self.pending[item.path]
        self.report({"event": "failed", "file": item.path.name, "reason": reason})


def text_line(report: dict[str, Any]) -> str:
    kind = report["event"]
    if kind == "done":
        return f"{report['file']}: done → {', '.join(report['images']) or '(images moved earlier)'}"
    if kind == "failed":
        return f"{report['file']}: failed: {report['reason']}"
    if kind == "queued":
        return f"{report['file']}: queued as job {report['job']}"
    if kind == "progress":
        return f"{report['file']}: step {report['step']}/{report['total']}"
    if kind == "waiting":
        return f"waiting for the daemon: {report['reason']}"
    if kind == "watching":
        return f"watching {report['folder']} (images to {report['output_dir']})"
    return kind


def json_line(report: dict[str, Any]) -> str:
    return json.dumps(report)
