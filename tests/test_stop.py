"""Stopping: while the worker is inside one long model call (the real daemon, a real slow step), and what clients see after.

One denoising step of the tiny model at 2048×2048 takes minutes on a CPU (its attention runs over
65,536 latent pixels), so a job of that size holds the worker inside a single UNet call that
nothing can interrupt: the case where `diffusiond stop` used to end the job `failed`
(`internal_error: ContextTerminated`) and leave a daemon that held its lock but answered nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from diffusiond.clients.protocol import Event
from diffusiond.daemon.service.sockets import lock_held

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the daemon's CPU time from /proc")

HUGE_STEP = {"prompt": "one step that takes minutes", "steps": 2, "width": 2048, "height": 2048, "guidance_scale": 1.0}


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_a_huge_step(daemon) -> str:
    """A job whose worker is inside its first UNet call: after `job.started`, only that call can
    burn seconds of CPU (the text encoder and the noise take milliseconds)."""
    events = daemon.subscribe(b"job.")
    job_id = daemon.call("submit", **HUGE_STEP)["job"]["id"]
    daemon.wait_for(events, lambda e: e["job"] == job_id and e["type"] == Event.JOB_STARTED)
    started = cpu_seconds(daemon.process.pid)
    deadline = time.monotonic() + 120
    while cpu_seconds(daemon.process.pid) - started < 2.0:
        assert time.monotonic() < deadline, "the worker never got busy"
        time.sleep(0.1)
    return job_id


def diffusiond_stop(daemon) -> tuple[subprocess.CompletedProcess, float]:
    began = time.monotonic()
    stop = subprocess.run([sys.executable, "-m", "diffusiond.daemon.cli", "stop", "--config", str(daemon.config)],
                          capture_output=True, text=True, timeout=120)
    return stop, time.monotonic() - began


def job_record(daemon, job_id: str) -> dict:
    """The job as the next daemon reports it (the queue is the record); that daemon is paused so it
    does not start the huge job again."""
    import sqlite3

    with sqlite3.connect(daemon.home / "state" / "queue.sqlite3") as db:
        db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('paused', '1')")
    daemon.start()
    return daemon.call("get", job=job_id)["job"]


@linux_only
def test_stop_during_a_model_call_requeues_the_job_and_exits_promptly(fresh) -> None:
    fresh.start()
    job_id = start_a_huge_step(fresh)
    stop, took = diffusiond_stop(fresh)
    assert stop.returncode == 0, stop.stderr
    assert "cannot be interrupted" in stop.stderr and "stopped" in stop.stderr
    assert took < 30, f"stop took {took:.0f}s"
    assert fresh.process.wait(timeout=30) == 0
    assert not lock_held(fresh.runtime_dir)
    assert sorted(p.name for p in fresh.runtime_dir.iterdir()) == ["daemon.lock"], "no stale socket files"
    assert "is abandoned" in fresh.log.read_text()
    job = job_record(fresh, job_id)
    assert job["state"] == "queued" and job["error"] is None, job
    assert fresh.outputs() == []


@linux_only
def test_a_cancel_during_a_model_call_says_when_and_a_stop_then_keeps_it_cancelled(fresh) -> None:
    fresh.start()
    job_id = start_a_huge_step(fresh)
    reply = fresh.call("cancel", job=job_id)
    assert reply["pending"] is True and reply["job"]["state"] == "running"
    assert "before its next model call" in reply["message"] and "not interrupted" in reply["message"]
    stop, _ = diffusiond_stop(fresh)
    assert stop.returncode == 0, stop.stderr
    assert fresh.process.wait(timeout=30) == 0
    job = job_record(fresh, job_id)
    assert job["state"] == "cancelled" and job["error"]["code"] == "cancelled", job


def test_a_queued_job_is_cancelled_at_once(daemon) -> None:
    daemon.call("pause")
    try:
        job_id = daemon.call("submit", prompt="never runs")["job"]["id"]
        reply = daemon.call("cancel", job=job_id)
    finally:
        daemon.call("resume")
    assert reply["pending"] is False and reply["job"]["state"] == "cancelled"


def diffuse_status(daemon) -> tuple[subprocess.CompletedProcess, float]:
    began = time.monotonic()
    status = subprocess.run([sys.executable, "-m", "diffusiond.clients.cli", "--runtime-dir", str(daemon.runtime_dir),
                             "status"], capture_output=True, text=True, timeout=60)
    return status, time.monotonic() - began


def test_clients_say_the_daemon_is_not_running_at_once_after_a_stop_or_a_crash(fresh) -> None:
    fresh.start()
    assert fresh.stop() == 0
    assert sorted(p.name for p in fresh.runtime_dir.iterdir()) == ["daemon.lock"], "stop removes its socket files"
    status, took = diffuse_status(fresh)
    assert status.returncode == 4 and "its socket does not exist" in status.stderr
    assert took < 5, f"{took:.1f}s: it waited for a reply"
    fresh.start()
    fresh.kill()  # SIGKILL: the socket files stay behind, nobody listens on them
    assert (fresh.runtime_dir / "request").exists()
    status, took = diffuse_status(fresh)
    assert status.returncode == 4 and "nothing listens on its socket" in status.stderr
    assert took < 5, f"{took:.1f}s: it waited for a reply"
