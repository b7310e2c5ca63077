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
import stat
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .client import Client, DaemonUnreachable, RequestFailed, Subscription
from .infotext import job_settings, parse_infotext
from .protocol import FINISHED, Event

# A file is ready once its size and modification time have held still for `settle` seconds, and,
# where the OS reports closes (Linux), after its writer closed it: a writer that appends in several
# goes (`>>`) closes it each time, and a close alone would have it read at its first write.
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


Stat = tuple[int, int, int]  # (inode, size, mtime in ns): a file as it was read


def stat_of(path: Path) -> Stat:
    info = path.stat()
    return info.st_ino, info.st_size, info.st_mtime_ns


@dataclass
class Pending:
    path: Path
    job_id: str | None = None
    read_as: Stat | None = None  # the file when its job was made: a change after that is a new drop
    gone: bool = False  # said once that the file vanished while its job went on


@dataclass
class Waiting:
    size: int
    mtime: int
    since: float  # when size and mtime last changed
    closed: bool  # its writer closed it (or no close events here): ready once it holds still


class HotFolder:
    def __init__(
        self,
        folder: Path,
        client: Client,
        output_dir: Path | None = None,
        settle: float = 1.0,
        report: Callable[[dict[str, Any]], None] | None = None,
        loras: list[dict[str, object]] | None = None,
    ) -> None:
        self.folder = folder.resolve()
        self.loras = loras or []  # --lora: on every file's job, beside the file's own <lora:…> tags
        self.output_dir = (output_dir or self.folder / "out").resolve()
        self.done_dir, self.failed_dir = self.folder / "done", self.folder / "failed"
        self.client = client
        self.settle = settle
        self.report = report or (lambda line: None)
        self.arrivals: queue.SimpleQueue[tuple[Path, str]] = queue.SimpleQueue()
        self.waiting: dict[Path, Waiting] = {}  # not yet ready
        self.pending: dict[Path, Pending] = {}  # submitted or about to be, until moved away
        self.daemon_down = False  # said "waiting" once; says "daemon back" when it answers again
        self.events: Subscription | None = None  # live job events, once the daemon has answered
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
                if event.event_type in ("closed", "moved", "created", "modified"):
                    arrivals.put((path, event.event_type))

        observer = Observer()
        observer.schedule(Handler(), str(self.folder), recursive=False)
        observer.start()
        return observer

    def _identity(self) -> tuple[int, int] | None:
        """The watched folder's (device, inode); None while it is gone."""
        try:
            info = self.folder.stat()
        except OSError:
            return None
        return (info.st_dev, info.st_ino) if stat.S_ISDIR(info.st_mode) else None

    def _arm(self) -> Any:
        """Watch the folder and take in what is there: at start, and when the folder comes back."""
        for folder in (self.output_dir, self.done_dir, self.failed_dir):
            folder.mkdir(parents=True, exist_ok=True)
        observer = self._watch()  # before the scan: a file arriving in between is seen by one of them
        self._scan()
        return observer

    def _scan(self) -> None:
        """What arrived while nothing watched: ready once settled, since its writer may still be busy."""
        for path in sorted(self.folder.iterdir()):
            if path.is_file() and is_prompt_file(path) and path not in self.pending:
                self._touched(path, closed=True)

    def _touched(self, path: Path, closed: bool) -> None:
        """A file written to (or closed): it is ready once closed and unchanged for `settle` seconds."""
        self.waiting[path] = Waiting(-1, -1, time.monotonic(), closed)

    def _settled(self) -> list[Path]:
        ready, now = [], time.monotonic()
        for path, waiting in list(self.waiting.items()):
            try:
                info = path.stat()
            except FileNotFoundError:
                del self.waiting[path]
                continue
            if (info.st_size, info.st_mtime_ns) != (waiting.size, waiting.mtime):
                waiting.size, waiting.mtime, waiting.since = info.st_size, info.st_mtime_ns, now
            elif waiting.closed and now - waiting.since >= self.settle:
                del self.waiting[path]
                ready.append(path)
        return ready

    # -- the loop ---------------------------------------------------------------------------

    def run(self, stop: threading.Event, poll_every: float = 0.5) -> None:
        """Until ``stop``. A folder that goes away (removed, moved, its volume unmounted) is waited
        for: jobs already made go on, and when a folder is there again it is watched afresh."""
        identity = self._identity()
        observer = self._arm()
        self.report({"event": "watching", "folder": str(self.folder), "output_dir": str(self.output_dir)})
        try:
            while not stop.is_set():
                now = self._identity()
                if now != identity:
                    if observer is not None:
                        observer.stop()
                        observer.join(timeout=5)
                    observer, identity = None, now
                    self.waiting.clear()
                    if now is None:
                        self.report({"event": "folder gone", "folder": str(self.folder)})
                    else:
                        try:
                            observer = self._arm()
                        except OSError:
                            identity = None  # gone again already: the next turn looks again
                            continue
                        self.report({"event": "watching", "folder": str(self.folder),
                                     "output_dir": str(self.output_dir)})
                ready = self._settled()
                deadline = time.monotonic() + poll_every
                while (remaining := deadline - time.monotonic()) > 0:
                    try:
                        path, kind = self.arrivals.get(timeout=remaining)
                    except queue.Empty:
                        break
                    if kind == "moved":  # renamed into the folder: written whole elsewhere
                        self.waiting.pop(path, None)
                        ready.append(path)
                    elif path not in self.pending:
                        self._touched(path, closed=kind == "closed" or not CLOSE_EVENTS)
                for path in dict.fromkeys(ready):
                    if path not in self.pending and path.exists():
                        self.pending[path] = Pending(path)
                self._subscribe()  # before submitting: a fast job's events must not pass unheard
                self._advance()
                self._progress()
        finally:
            if observer is not None:
                observer.stop()
                observer.join(timeout=5)

    def _subscribe(self) -> None:
        """Job events, from when there are files to follow (the subscription is confirmed on return)."""
        if self.events is not None or self.daemon_down or not self.pending:
            return
        try:
            # No resync: the queue, read by _advance, is this loop's record; events only add lines.
            self.events = self.client.subscribe([b"job."], timeout=2, resync=False)
        except DaemonUnreachable:
            return

    def _progress(self, until_done: str | None = None) -> None:
        """A line per step of each file's job, from the daemon's events (the queue stays the record).

        With ``until_done``, a job followed so far and now finished: its last step line is due, and
        its events may still be on their way, so wait (a second at most) for its final event."""
        self._subscribe()
        if self.events is None:
            return
        files = {item.job_id: item.path.name for item in self.pending.values() if item.job_id}
        now = time.monotonic()
        for event in self.events.until(now + (1.0 if until_done in self.last_line else 0.0)):
            job = event.get("job")
            if job == until_done and event.get("type") in (Event.JOB_DONE, Event.JOB_FAILED, Event.JOB_CANCELLED):
                break
            if event.get("type") != Event.JOB_PROGRESS or job not in files:
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
                elif not self._changed(item, item.job_id):
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

    def _changed(self, item: Pending, job_id: str) -> bool:
        """Whether the file changed after its job was made from it: then it is a new drop (its
        whole new text is read once it settles) and the job for the old text is cancelled if it
        has not finished. A file that vanished is not a change: its job goes on."""
        try:
            now = stat_of(item.path)
        except FileNotFoundError:
            if not item.gone:
                item.gone = True
                self.report({"event": "file gone", "file": item.path.name, "job": job_id})
            return False
        if now == item.read_as:
            return False
        try:
            self.client.cancel(job_id)
        except RequestFailed:
            pass  # finished already: its images stay, named after the file
        del self.pending[item.path]
        self._touched(item.path, closed=True)  # its close may have passed while it was pending
        self.report({"event": "changed", "file": item.path.name, "job": job_id})
        return True

    def _submit(self, item: Pending) -> None:
        try:
            before = stat_of(item.path)
            data = item.path.read_bytes()
            after = stat_of(item.path)
        except FileNotFoundError:
            del self.pending[item.path]  # taken away before we got to it
            return
        if after != before:  # written to while we read it: not settled after all
            del self.pending[item.path]
            self._touched(item.path, closed=True)
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
        inode, _, mtime = after
        identity = f"{self.folder}\0{item.path.name}\0{inode}\0{mtime}\0".encode() + data
        key = "hotfolder:" + hashlib.sha256(identity).hexdigest()[:40]
        try:
            extra: dict[str, Any] = {"loras": self.loras} if self.loras else {}
            job = self.client.submit(**fields, **extra, output_dir=str(self.output_dir), output_name=item.path.stem,
                                     idempotency_key=key)
        except RequestFailed as exc:
            self._fail(item, f"{exc.message} ({exc.code})")
            return
        item.job_id, item.read_as = job["id"], after
        self.report({"event": "queued", "file": item.path.name, "job": job["id"]})
        if job["state"] in FINISHED:
            self._finish(item, job)

    def _finish(self, item: Pending, job: dict[str, Any]) -> None:
        self._progress(until_done=job["id"])
        if job["state"] != "done":
            error = job.get("error") or {}
            self._fail(item, f"{error.get('message', job['state'])} ({error.get('code', job['state'])})")
            return
        # The daemon wrote the images under the file's name (output_name): its record names them.
        moved = self._move(item, free_name(self.done_dir, item.path.stem, item.path.suffix))
        del self.pending[item.path]
        self.report({"event": "done", "file": item.path.name, "job": job["id"], "images": job["outputs"],
                     **({} if moved else {"gone": True})})

    def _fail(self, item: Pending, reason: str) -> None:
        target = free_name(self.failed_dir, item.path.stem, item.path.suffix)
        # The reason first: a crash before the move leaves the file here, and the next run writes
        # the same reason file again (the move below has not taken `target`).
        reason_file = target.with_name(f"{target.stem}.error.txt")
        try:
            self.failed_dir.mkdir(exist_ok=True)
            reason_file.write_text(reason + "\n")
        except FileNotFoundError:
            pass  # the folder is gone, and the file with it
        else:
            if not self._move(item, target):
                reason_file.unlink()  # no file to give a reason for
        del self.pending[item.path]
        self.report({"event": "failed", "file": item.path.name, "reason": reason})

    def _move(self, item: Pending, target: Path) -> bool:
        """The prompt file to done/ or failed/; False when it is gone (removed, or its folder moved)."""
        try:
            target.parent.mkdir(exist_ok=True)  # done/ or failed/ removed by hand
            item.path.rename(target)
        except FileNotFoundError:
            return False
        return True


_LINES = {
    "failed": "{file}: failed: {reason}",
    "queued": "{file}: queued as job {job}",
    "progress": "{file}: step {step}/{total}",
    "waiting": "waiting for the daemon: {reason}",
    "watching": "watching {folder} (images to {output_dir})",
    "folder gone": "{folder} is gone (removed or moved): waiting for a folder there again",
    "file gone": "{file}: removed while its job {job} runs; its images still come",
    "changed": "{file}: changed after it was read: read again, whole (job {job}, of the old text, is cancelled "
               "unless it finished)",
}


def text_line(report: dict[str, Any]) -> str:
    kind = report["event"]
    if kind == "done":
        gone = " (the prompt file was gone: nothing moved to done/)" if report.get("gone") else ""
        return f"{report['file']}: done → {', '.join(report['images'])}{gone}"
    return _LINES[kind].format(**report) if kind in _LINES else kind


def json_line(report: dict[str, Any]) -> str:
    return json.dumps(report)
