"""The crash loop: kill -9 the daemon at random moments over a stream of jobs, again and again.

A client keeps submitting (each job with an idempotency key, resent until acknowledged, as a
client that cannot tell a lost request from a lost reply must); the daemon is killed 20 times —
some while it starts, most while it runs jobs, after a random number of them and at a random
moment within the next. Then it
runs once more to the end, and nothing may be lost, doubled or half-written.
"""

from __future__ import annotations

import os
import random
import sqlite3
import threading
import time
from pathlib import Path

from PIL import Image

from diffusiond.clients.protocol import Event
from diffusiond.daemon.engine.png import read_parameters

from .daemon_process import Daemon

KILLS = 20
JOBS = 60
PARAMS = {"width": 64, "height": 64, "steps": 6}


def snapshot(database: Path) -> dict[str, tuple[str, str | None]]:
    """Job id → (state, outputs), read from the real SQLite file while the daemon is dead (a kill
    early in the first start may come before the file or its table exists: then nothing is in it)."""
    if not database.exists():
        return {}
    with sqlite3.connect(database) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'jobs'").fetchone() is None:
            return {}
        return {job_id: (state, outputs) for job_id, state, outputs in db.execute("SELECT id, state, outputs FROM jobs")}


def test_twenty_kill_9s_over_a_stream_of_jobs_lose_nothing(tmp_path) -> None:
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    daemon = Daemon(tmp_path / "d")
    database = daemon.home / "state" / "queue.sqlite3"
    accepted: dict[str, str] = {}  # idempotency key → job id, once the daemon acknowledged it
    stop = threading.Event()

    def submit_stream() -> None:
        for n in range(JOBS):
            key = f"job-{n}"
            while not stop.is_set():
                try:
                    reply = daemon.call("submit", timeout=1, prompt=f"crash loop {key}", idempotency_key=key,
                                        seed=n, **PARAMS)
                except TimeoutError:
                    continue  # the daemon is down or starting: the same key again
                assert reply["ok"], reply
                if key in accepted:
                    assert accepted[key] == reply["job"]["id"]
                accepted[key] = reply["job"]["id"]
                break
            stop.wait(rng.uniform(0, 0.15))

    submitter = threading.Thread(target=submit_stream, daemon=True)
    submitter.start()
    finished_before: dict[str, int] = {}  # job id → its PNG's st_mtime_ns when first seen done
    mid_job = 0  # kills that caught a job running
    try:
        for kill in range(KILLS):
            daemon.start(wait=False)
            if kill % 4 == 0:
                time.sleep(rng.uniform(0, 3))  # the kill's moment, somewhere in the start
            else:
                daemon.wait_ready()
                events = daemon.subscribe(b"job.")
                try:
                    for _ in range(rng.randint(0, 3)):  # let a few jobs finish, when there are any
                        daemon.wait_for(events, lambda e: e["type"] == Event.JOB_DONE, timeout=10)
                except TimeoutError:
                    pass
                events.close()
                time.sleep(rng.uniform(0, 0.1))  # the kill's moment, somewhere in the next job
            daemon.kill()
            states = snapshot(database)
            mid_job += any(state == "running" for state, _ in states.values())
            for job_id, (state, _) in states.items():
                if state == "done" and job_id not in finished_before:
                    finished_before[job_id] = (daemon.output_dir / f"{job_id}.png").stat().st_mtime_ns
        daemon.start()
        submitter.join(timeout=120)
        assert not submitter.is_alive()
        deadline = time.monotonic() + 120
        while any(state != "done" for state, _ in snapshot(database).values()):
            assert time.monotonic() < deadline, "jobs left unfinished"
            time.sleep(0.1)
    finally:
        stop.set()
        daemon.close()

    jobs = snapshot(database)
    assert len(accepted) == JOBS, f"seed {seed}"
    assert sorted(jobs) == sorted(accepted.values()), f"a job lost or doubled (seed {seed})"
    assert {state for state, _ in jobs.values()} == {"done"}
    assert sorted(daemon.outputs()) == sorted(f"{job_id}.png" for job_id in jobs), "a partial, stray or missing file"
    for key, job_id in accepted.items():
        path = daemon.output_dir / f"{job_id}.png"
        with Image.open(path) as image:
            image.load()  # the whole PNG is there
        assert read_parameters(path).startswith(f"crash loop {key}\n")
    for job_id, mtime in finished_before.items():
        assert (daemon.output_dir / f"{job_id}.png").stat().st_mtime_ns == mtime, "a done job ran again"
    print(f"seed {seed}: {KILLS} kills, {mid_job} of them mid-job; {len(finished_before)} of {JOBS} jobs "
          "done before the last start")
