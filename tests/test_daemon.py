"""The real daemon, as a subprocess on the tiny model, over its real sockets and SQLite file."""

from __future__ import annotations

import io
import os
import signal
import sqlite3
import stat
import threading

import msgpack
import pytest
import zmq
from PIL import Image

from diffusiond.clients.infotext import parse_infotext
from diffusiond.clients.protocol import MAX_MESSAGE_BYTES, Event
from diffusiond.daemon.engine.png import read_parameters

from .daemon_process import Daemon

FAST = {"steps": 1, "width": 64, "height": 64, "guidance_scale": 1.0}
SLOW = {"steps": 150, "width": 256, "height": 256}  # seconds on the CPU: time to act mid-job


def test_submit_to_done_with_a_readable_png(daemon) -> None:
    events = daemon.subscribe(b"job.")
    reply = daemon.call("submit", prompt="a lighthouse at dusk", steps=4, width=64, height=96, seed=11)
    assert reply["ok"] and reply["created"]
    job_id = reply["job"]["id"]
    done = daemon.wait_for(events, lambda e: e["job"] == job_id and e["type"] == Event.JOB_DONE)
    job = daemon.call("get", job=job_id)["job"]
    assert job["state"] == "done" and job["outputs"] == done["outputs"]
    assert done["outputs"] == [str(daemon.output_dir / f"{job_id}.png")]
    with Image.open(done["outputs"][0]) as image:
        assert image.size == (64, 96)
    params = parse_infotext(read_parameters(done["outputs"][0])).params
    assert params["Seed"] == "11" and params["Steps"] == "4" and params["Model"] == "tiny"


def test_events_carry_a_daemon_wide_sequence_and_progress(daemon) -> None:
    events = daemon.subscribe(b"")
    job_id = daemon.call("submit", prompt="p", steps=3, width=64, height=64)["job"]["id"]
    seen = []
    while not seen or seen[-1][1]["type"] != Event.JOB_DONE:
        topic, event = daemon.next_event(events)
        if event.get("job") == job_id:
            seen.append((topic, event))
    assert all(topic == f"job.{job_id}".encode() for topic, _ in seen)
    assert [e["type"] for _, e in seen] == [Event.JOB_QUEUED, Event.JOB_STARTED] + [Event.JOB_PROGRESS] * 3 + [Event.JOB_DONE]
    assert [e["step"] for _, e in seen if e["type"] == Event.JOB_PROGRESS] == [1, 2, 3]
    sequence = [e["seq"] for _, e in seen]
    assert sequence == sorted(sequence) and len(set(sequence)) == len(sequence)
    assert [e["topic_seq"] for _, e in seen] == list(range(1, len(seen) + 1))
    assert all(isinstance(e["ts"], float) for _, e in seen)


def test_previews_go_only_to_preview_subscribers(daemon) -> None:
    previews = daemon.subscribe(b"preview.")
    jobs_only = daemon.subscribe(b"job.")
    job_id = daemon.call("submit", prompt="p", steps=6, width=128, height=128)["job"]["id"]
    preview = daemon.wait_for(previews, lambda e: e["type"] == Event.JOB_PREVIEW and e["job"] == job_id)
    with Image.open(io.BytesIO(preview["jpeg"])) as image:
        assert image.format == "JPEG" and image.size == (16, 16)
    daemon.wait_for(jobs_only, lambda e: e["type"] == Event.JOB_DONE and e["job"] == job_id)
    while jobs_only.poll(0):
        assert daemon.next_event(jobs_only)[1]["type"] != Event.JOB_PREVIEW


def test_two_hundred_jobs_from_four_clients_run_by_priority_then_fifo(daemon) -> None:
    assert daemon.call("pause")["paused"]
    submitted: list[tuple[int, int, str]] = []  # (priority, order of acceptance, id)
    lock = threading.Lock()

    def client(n: int) -> None:
        socket = daemon.client()
        for i in range(50):
            priority = (n + i) % 3
            reply = daemon.call("submit", socket=socket, prompt=f"job {n}-{i}", priority=priority, **FAST)
            with lock:
                submitted.append((priority, reply["job"]["id"]))
        socket.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(submitted) == 200
    daemon.call("resume")
    jobs = [daemon.wait_job(job_id, timeout=300) for _, job_id in submitted]
    assert all(job["state"] == "done" for job in jobs)
    # The queue's own order of acceptance (position) is FIFO; started times give the run order.
    by_start = sorted(jobs, key=lambda job: job["started"])
    expected = sorted(jobs, key=lambda job: (-job["priority"], daemon_position(daemon, job["id"])))
    assert [job["id"] for job in by_start] == [job["id"] for job in expected]
    assert all(len(job["outputs"]) == 1 for job in jobs)


def daemon_position(daemon: Daemon, job_id: str) -> int:
    with sqlite3.connect(daemon.home / "state" / "queue.sqlite3") as db:
        return db.execute("SELECT position FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]


def test_cancel_a_queued_job_and_all_queued(daemon) -> None:
    daemon.call("pause")
    try:
        first = daemon.call("submit", prompt="a", **FAST)["job"]["id"]
        others = [daemon.call("submit", prompt="b", **FAST)["job"]["id"] for _ in range(3)]
        assert daemon.call("cancel", job=first)["job"]["state"] == "cancelled"
        assert sorted(daemon.call("cancel", all_queued=True)["cancelled"]) == sorted(others)
        again = daemon.call("cancel", job=first)
        assert again["error"]["code"] == "invalid_state"
    finally:
        daemon.call("resume")
    assert daemon.call("retry", job=first)["job"]["state"] == "queued"
    assert daemon.wait_job(first)["state"] == "done"


def test_cancel_a_running_job_stops_it_and_only_it(daemon) -> None:
    events = daemon.subscribe(b"job.")
    running = daemon.call("submit", prompt="long", **SLOW)["job"]["id"]
    waiting = daemon.call("submit", prompt="next", **FAST)["job"]["id"]
    daemon.wait_for(events, lambda e: e["job"] == running and e["type"] == Event.JOB_PROGRESS and e["step"] >= 2)
    assert daemon.call("cancel", job=running)["job"]["state"] == "running"
    cancelled = daemon.wait_for(events, lambda e: e["job"] == running and e["type"] in (Event.JOB_CANCELLED, Event.JOB_DONE))
    assert cancelled["type"] == Event.JOB_CANCELLED
    job = daemon.call("get", job=running)["job"]
    assert job["state"] == "cancelled" and job["outputs"] == []
    assert daemon.wait_job(waiting)["state"] == "done"


def test_idempotency_key_returns_the_same_job(daemon) -> None:
    first = daemon.call("submit", prompt="once", idempotency_key="file-abc", **FAST)
    second = daemon.call("submit", prompt="once", idempotency_key="file-abc", **FAST)
    assert first["created"] and not second["created"]
    assert first["job"]["id"] == second["job"]["id"]


def test_list_filters_by_state_and_pages(daemon) -> None:
    ids = [daemon.call("submit", prompt=f"l{i}", **FAST)["job"]["id"] for i in range(3)]
    for job_id in ids:
        daemon.wait_job(job_id)
    page = daemon.call("list", states=["done"], limit=2)
    assert [job["id"] for job in page["jobs"]] == ids[::-1][:2]
    assert daemon.call("list", states=["done"], limit=2, offset=2)["jobs"][0]["id"] == ids[0]
    assert page["counts"]["done"] >= 3
    assert daemon.call("prune", before=0)["pruned"] == 0


BAD_REQUESTS = [
    ("not msgpack", [b"\xc1\xc1"], "bad_message"),
    ("not a map", [msgpack.packb([1, 2])], "bad_message"),
    ("two frames", [msgpack.packb({"v": 1, "op": "ping"}), b"x"], "bad_message"),
    ("no version", [msgpack.packb({"op": "ping", "id": 1})], "unsupported_version"),
    ("future version", [msgpack.packb({"v": 99, "op": "ping", "id": 1})], "unsupported_version"),
    ("unknown op", [msgpack.packb({"v": 1, "op": "explode", "id": 1})], "unknown_op"),
    ("unknown field", [msgpack.packb({"v": 1, "op": "submit", "prompt": "p", "evil": 1})], "invalid_parameter"),
    ("steps as text", [msgpack.packb({"v": 1, "op": "submit", "prompt": "p", "steps": "9"})], "bad_message"),
    ("size not /8", [msgpack.packb({"v": 1, "op": "submit", "prompt": "p", "width": 65})], "invalid_parameter"),
    ("huge count", [msgpack.packb({"v": 1, "op": "submit", "prompt": "p", "count": 10**9})], "invalid_parameter"),
    ("long prompt", [msgpack.packb({"v": 1, "op": "submit", "prompt": "p" * 5000})], "invalid_parameter"),
    ("bad image", [msgpack.packb({"v": 1, "op": "submit", "prompt": "p", "init_image": b"nope"})], "invalid_parameter"),
    ("unknown model", [msgpack.packb({"v": 1, "op": "submit", "prompt": "p", "model": "/no/such"})], "model_not_found"),
    ("priority type", [msgpack.packb({"v": 1, "op": "submit", "prompt": "p", "priority": "high"})], "bad_message"),
    ("relative output", [msgpack.packb({"v": 1, "op": "submit", "prompt": "p", "output_dir": "x"})], "invalid_parameter"),
    ("no such job", [msgpack.packb({"v": 1, "op": "get", "job": "nope"})], "not_found"),
    ("job id type", [msgpack.packb({"v": 1, "op": "get", "job": 5})], "bad_message"),
    ("retry queued", [msgpack.packb({"v": 1, "op": "retry", "job": "nope"})], "not_found"),
    ("bad states", [msgpack.packb({"v": 1, "op": "list", "states": ["x"]})], "invalid_parameter"),
    ("deep nesting", [b"\x91" * 100_000 + b"\x00"], "bad_message"),
    ("too large", [b"\xc6" + (MAX_MESSAGE_BYTES + 1).to_bytes(4, "big") + b"\0" * (MAX_MESSAGE_BYTES + 1)],
     "message_too_large"),
]


def test_malformed_requests_get_their_documented_code_and_the_daemon_keeps_serving(daemon) -> None:
    before = daemon.call("submit", prompt="queued before the abuse", **SLOW, priority=-1)["job"]["id"]
    socket = daemon.client()
    for name, frames, code in BAD_REQUESTS:
        socket.send_multipart(frames)
        reply = daemon.receive(socket)
        assert reply["ok"] is False, name
        assert reply["error"]["code"] == code, (name, reply)
        assert reply["error"]["message"], name
    socket.close()
    assert daemon.call("ping")["ready"]
    assert daemon.call("cancel", job=before)["ok"]


def test_req_sockets_are_answered_too(daemon) -> None:
    socket = daemon.context.socket(zmq.REQ)
    socket.connect(daemon.request_endpoint)
    socket.send(msgpack.packb({"v": 1, "op": "ping", "id": "req"}))
    assert daemon.receive(socket)["id"] == "req"
    socket.close(linger=0)


def test_kill_9_mid_job_then_restart_completes_it_once(fresh) -> None:
    fresh.start()
    events = fresh.subscribe(b"job.")
    job_id = fresh.call("submit", prompt="survive", seed=5, **SLOW)["job"]["id"]
    fresh.wait_for(events, lambda e: e["type"] == Event.JOB_PROGRESS and e["step"] >= 3)
    assert fresh.kill(signal.SIGKILL) == -signal.SIGKILL
    fresh.start()
    job = fresh.wait_job(job_id, timeout=300)
    assert job["state"] == "done" and job["attempts"] == 2
    assert fresh.outputs() == [f"{job_id}.png"]
    assert parse_infotext(read_parameters(fresh.output_dir / f"{job_id}.png")).params["Seed"] == "5"
    with sqlite3.connect(fresh.home / "state" / "queue.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert fresh.stop() == 0


def test_sigterm_requeues_the_running_job_and_exits_cleanly(fresh) -> None:
    fresh.start()
    events = fresh.subscribe(b"job.")
    job_id = fresh.call("submit", prompt="interrupted", **SLOW)["job"]["id"]
    fresh.wait_for(events, lambda e: e["type"] == Event.JOB_PROGRESS)
    assert fresh.kill(signal.SIGTERM) == 0
    with sqlite3.connect(fresh.home / "state" / "queue.sqlite3") as db:
        assert db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone() == ("queued",)
    assert fresh.outputs() == []


def test_runtime_folder_is_private(fresh) -> None:
    fresh.start()
    mode = stat.S_IMODE(fresh.runtime_dir.stat().st_mode)
    assert mode == 0o700 and fresh.runtime_dir.stat().st_uid == os.getuid()
    second = Daemon(fresh.home)
    second.start(wait=False)
    assert second.process.wait(timeout=120) == 2
    assert "another diffusiond is serving" in second.log.read_text()
    assert fresh.call("ping")["ready"]


@pytest.mark.parametrize("mode", [0o755, 0o770])
def test_a_runtime_folder_open_to_others_is_refused(fresh, mode) -> None:
    fresh.runtime_dir.mkdir(mode=mode)
    fresh.runtime_dir.chmod(mode)
    fresh.start(wait=False)
    assert fresh.process.wait(timeout=120) == 2
    assert f"is open to others (mode {mode:o})" in fresh.log.read_text()


@pytest.mark.skipif(os.getuid() != 0, reason="giving the folder to another user needs root")
def test_a_runtime_folder_of_another_user_is_refused(fresh) -> None:
    fresh.runtime_dir.mkdir(mode=0o700)
    os.chown(fresh.runtime_dir, 65534, 65534)
    fresh.start(wait=False)
    assert fresh.process.wait(timeout=120) == 2
    assert "belongs to uid 65534" in fresh.log.read_text()
