"""The durable job queue: SQLite in WAL mode, priority then FIFO.

States: queued → running → done | failed | cancelled. Every state change is committed before the
daemon acknowledges or announces it, so the queue — not the event stream — is the record. A job
found running when the daemon starts was interrupted by a crash and is queued again
(at-least-once; its outputs are named by job id, so a rerun replaces rather than duplicates).
"""

from __future__ import annotations

import itertools
import json
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusiond.clients.protocol import FINISHED, STATES, Code, ProtocolError

from ..models.ref import parse
from ..outputs import numbered

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    priority INTEGER NOT NULL,
    position INTEGER NOT NULL,
    model TEXT NOT NULL,
    params TEXT NOT NULL,
    init_image BLOB,
    output_dir TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    outputs TEXT,
    result TEXT,
    error_code TEXT,
    error_message TEXT,
    output_name TEXT,
    planned_outputs TEXT,
    portable INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_next ON jobs (state, priority DESC, position);
CREATE INDEX IF NOT EXISTS jobs_position ON jobs (position);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass
class Job:
    id: str
    state: str
    priority: int
    position: int
    model: str
    params: dict[str, Any]
    output_dir: str
    idempotency_key: str | None
    created: float
    started: float | None
    finished: float | None
    attempts: int
    cancel_requested: bool
    outputs: list[str]
    result: dict[str, Any] | None
    error: dict[str, str] | None

    def to_wire(self) -> dict[str, Any]:
        """The job as `get`, `list` and events show it."""
        return {
            "id": self.id, "state": self.state, "priority": self.priority, "model": self.model,
            "params": self.params, "output_dir": self.output_dir, "idempotency_key": self.idempotency_key,
            "created": self.created, "started": self.started, "finished": self.finished,
            "attempts": self.attempts, "outputs": self.outputs, "result": self.result, "error": self.error,
        }


_COLUMNS = (
    "id, state, priority, position, model, params, output_dir, idempotency_key, created, started, "
    "finished, attempts, cancel_requested, outputs, result, error_code, error_message"
)


def _job(row: tuple) -> Job:
    (id_, state, priority, position, model, params, output_dir, key, created, started, finished,
     attempts, cancel_requested, outputs, result, error_code, error_message) = row
    return Job(
        id_, state, priority, position, model, json.loads(params), output_dir, key, created, started,
        finished, attempts, bool(cancel_requested), json.loads(outputs) if outputs else [],
        json.loads(result) if result else None,
        {"code": error_code, "message": error_message} if error_code else None,
    )


class JobQueue:
    """One connection, for one thread: the server and the worker each open their own."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        # FULL: a job acknowledged is on disk even after a power cut; the server commits in batches.
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(jobs)")}
        for column in ("output_name", "planned_outputs"):  # a queue made before they existed
            if column not in columns:
                self.db.execute(f"ALTER TABLE jobs ADD COLUMN {column} TEXT")
        self._depth = 0
        if "portable" not in columns:
            self._record_portable()

    def _record_portable(self) -> None:
        """A queue made before jobs recorded whether a remote worker may run them: each job's model
        says (once, by whichever connection opens the queue first)."""
        with self.transaction():
            if "portable" in {row[1] for row in self.db.execute("PRAGMA table_info(jobs)")}:
                return
            self.db.execute("ALTER TABLE jobs ADD COLUMN portable INTEGER")
            for job_id, model in self.db.execute("SELECT id, model FROM jobs").fetchall():
                self.db.execute("UPDATE jobs SET portable = ? WHERE id = ?", (parse(model).portable, job_id))

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One commit for everything inside, however deeply nested."""
        if self._depth == 0:
            self.db.execute("BEGIN IMMEDIATE")
        self._depth += 1
        try:
            yield
        except BaseException:
            self._depth -= 1
            if self._depth == 0:
                self.db.execute("ROLLBACK")
            raise
        self._depth -= 1
        if self._depth == 0:
            self.db.execute("COMMIT")

    def _one(self, where: str, *args: Any) -> Job | None:
        row = self.db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE {where}", args).fetchone()
        return _job(row) if row else None

    def get(self, job_id: str) -> Job:
        job = self._one("id = ?", job_id)
        if job is None:
            raise ProtocolError(Code.NOT_FOUND, f"no job {job_id!r}")
        return job

    def submit(
        self,
        params: dict[str, Any],
        model: str,
        output_dir: str,
        priority: int = 0,
        idempotency_key: str | None = None,
        init_image: bytes | None = None,
        max_queued: int | None = None,
        output_name: str | None = None,
    ) -> tuple[Job, bool]:
        """Queue a job; with a key already used, the job that key made, and False. The row records
        whether a remote worker may run it (its model, and refiner, mean the same on another machine)."""
        with self.transaction():
            existing = self.find_by_key(idempotency_key) if idempotency_key is not None else None
            if existing is not None:
                return existing, False
            if max_queued is not None and self.count("queued") >= max_queued:
                raise ProtocolError(Code.QUEUE_FULL, f"{max_queued} jobs are queued already; try again later")
            job_id = secrets.token_hex(6)
            self.db.execute(
                "INSERT INTO jobs (id, state, priority, position, model, params, init_image, output_dir,"
                " idempotency_key, created, output_name, portable) VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, priority, self._next_position(), model, json.dumps(params), init_image, output_dir,
                 idempotency_key, time.time(), output_name,
                 parse(model).portable and (params.get("refiner") is None or parse(params["refiner"]).portable)),
            )
            return self.get(job_id), True

    def find_by_key(self, idempotency_key: str) -> Job | None:
        return self._one("idempotency_key = ?", idempotency_key)

    def _next_position(self) -> int:
        return self.db.execute("SELECT COALESCE(MAX(position), 0) + 1 FROM jobs").fetchone()[0]

    def init_image(self, job_id: str) -> bytes | None:
        row = self.db.execute("SELECT init_image FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row[0] if row else None

    def output_paths(self, job_id: str, count: int) -> list[Path]:
        """Where a job's images go: ID.png, ID-2.png … by default; with an output name the first
        free NAME.png, NAME-2.png … (nothing overwritten), chosen once and recorded before anything
        is written, so that a rerun after a crash or a retry writes onto the same names."""
        with self.transaction():
            output_dir, name, planned = self.db.execute(
                "SELECT output_dir, output_name, planned_outputs FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
            if name is None:
                return [numbered(Path(output_dir) / f"{job_id}.png", i) for i in range(count)]
            if planned is not None and len(json.loads(planned)) == count:
                return [Path(path) for path in json.loads(planned)]
            claimed = {
                path for (others,) in self.db.execute(
                    "SELECT planned_outputs FROM jobs WHERE id != ? AND state != 'done' AND output_dir = ?"
                    " AND planned_outputs IS NOT NULL", (job_id, output_dir))
                for path in json.loads(others)
            }
            paths: list[Path] = []
            for n in itertools.count():
                candidate = numbered(Path(output_dir) / f"{name}.png", n)
                if str(candidate) not in claimed and not candidate.exists():
                    paths.append(candidate)
                    if len(paths) == count:
                        break
            self.db.execute("UPDATE jobs SET planned_outputs = ? WHERE id = ?",
                            (json.dumps([str(path) for path in paths]), job_id))
            return paths

    def claim_next(self, named_models_only: bool = False) -> Job | None:
        """The next job by priority, then FIFO, now running; None when nothing is queued.
        `named_models_only` is for remote workers: jobs whose model is a folder on this machine
        (models/ref.py) are left for the local worker."""
        portable = " AND portable" if named_models_only else ""
        with self.transaction():
            job = self._one(f"state = 'queued'{portable} ORDER BY priority DESC, position LIMIT 1")
            if job is None:
                return None
            self.db.execute(
                "UPDATE jobs SET state = 'running', started = ?, attempts = attempts + 1 WHERE id = ?",
                (time.time(), job.id),
            )
            return self.get(job.id)

    def _finish(self, job_id: str, state: str, was: tuple[str, ...], **columns: Any) -> Job | None:
        """The job, now ``state``; None when it was no longer in one of the states ``was`` (at stop,
        the server requeues a job whose worker is stuck in a model call: the worker's late outcome
        must not overwrite that)."""
        sets = ", ".join(f"{name} = ?" for name in columns)
        marks = ", ".join("?" * len(was))
        with self.transaction():
            changed = self.db.execute(
                f"UPDATE jobs SET state = ?, finished = ?{', ' + sets if sets else ''} WHERE id = ? AND state IN ({marks})",
                (state, time.time(), *columns.values(), job_id, *was),
            ).rowcount
            return self.get(job_id) if changed else None

    def done(self, job_id: str, outputs: list[str], result: dict[str, Any]) -> Job | None:
        return self._finish(job_id, "done", ("running",), outputs=json.dumps(outputs), result=json.dumps(result))

    def fail(self, job_id: str, code: str, message: str) -> Job | None:
        return self._finish(job_id, "failed", ("running",), error_code=code, error_message=message)

    def cancelled(self, job_id: str) -> Job | None:
        return self._finish(job_id, "cancelled", ("queued", "running"), error_code=Code.CANCELLED, error_message="cancelled")

    def cancel(self, job_id: str) -> Job:
        """A queued job is cancelled now; a running one is marked, and its worker stops it."""
        with self.transaction():
            job = self.get(job_id)
            if job.state in FINISHED:
                raise ProtocolError(Code.INVALID_STATE, f"job {job_id} is {job.state} already")
            if job.state == "queued":
                self.cancelled(job_id)
                return self.get(job_id)
            self.db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            return self.get(job_id)

    def cancel_queued(self) -> list[str]:
        with self.transaction():
            ids = [row[0] for row in self.db.execute("SELECT id FROM jobs WHERE state = 'queued'")]
            for job_id in ids:
                self.cancelled(job_id)
            return ids

    def requeue(self, job_id: str) -> Job | None:
        """A running job back to the queue, at its old place (the daemon is stopping); None when
        it was not running any more."""
        with self.transaction():
            changed = self.db.execute(
                "UPDATE jobs SET state = 'queued', started = NULL WHERE id = ? AND state = 'running'", (job_id,)
            ).rowcount
            return self.get(job_id) if changed else None

    def recover(self) -> tuple[list[str], list[str]]:
        """Jobs left running with nobody to run them — by a crash (at start), or by a worker still
        inside a model call when the daemon stops — are queued again, or cancelled if that was asked."""
        with self.transaction():
            rows = self.db.execute("SELECT id, cancel_requested FROM jobs WHERE state = 'running'").fetchall()
            requeued = [job_id for job_id, cancel in rows if not cancel]
            for job_id, cancel in rows:
                if cancel:
                    self.cancelled(job_id)
                else:
                    self.requeue(job_id)
            return requeued, [job_id for job_id, cancel in rows if cancel]

    def retry(self, job_id: str) -> Job:
        """A failed or cancelled job queued again, at the end of the queue."""
        with self.transaction():
            job = self.get(job_id)
            if job.state not in ("failed", "cancelled"):
                raise ProtocolError(Code.INVALID_STATE, f"only failed or cancelled jobs can be retried; {job_id} is {job.state}")
            self.db.execute(
                "UPDATE jobs SET state = 'queued', position = ?, started = NULL, finished = NULL,"
                " cancel_requested = 0, error_code = NULL, error_message = NULL WHERE id = ?",
                (self._next_position(), job_id),
            )
            return self.get(job_id)

    def list(self, states: list[str] | None = None, limit: int = 50, offset: int = 0) -> list[Job]:
        """Newest first."""
        states = states or list(STATES)
        marks = ", ".join("?" * len(states))
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM jobs WHERE state IN ({marks}) ORDER BY position DESC LIMIT ? OFFSET ?",
            (*states, limit, offset),
        ).fetchall()
        return [_job(row) for row in rows]

    def count(self, state: str) -> int:
        return self.db.execute("SELECT COUNT(*) FROM jobs WHERE state = ?", (state,)).fetchone()[0]

    def counts(self) -> dict[str, int]:
        found = dict(self.db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
        return {state: found.get(state, 0) for state in STATES}

    def prune(self, older_than: float) -> int:
        """Forget finished jobs that finished before ``older_than`` (their files stay)."""
        with self.transaction():
            marks = ", ".join("?" * len(FINISHED))
            return self.db.execute(
                f"DELETE FROM jobs WHERE state IN ({marks}) AND finished < ?", (*FINISHED, older_than)
            ).rowcount

    def paused(self) -> bool:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'paused'").fetchone()
        return bool(row and row[0] == "1")

    def set_paused(self, paused: bool) -> None:
        with self.transaction():
            self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('paused', ?)", ("1" if paused else "0",))
