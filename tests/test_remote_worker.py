"""Remote workers: another machine's capacity behind the daemon's queue, over CurveZMQ.

Both ends are real processes on loopback: the daemon (`local_worker = false`, so every job must
go through a remote worker) and `diffusiond worker` subprocesses; kill -9 is the crash.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import zmq.auth

from diffusiond.clients.protocol import Event
from diffusiond.daemon.engine.png import read_parameters
from diffusiond.daemon.service.queue import JobQueue

from .daemon_process import Daemon, free_port
from .test_remote import keys

SMALL = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 4, "seed": 7}
LONG = {"prompt": "a long one", "width": 128, "height": 128, "steps": 40, "seed": 8}  # ~1 s: time to kill it


class Worker:
    def __init__(self, daemon: Daemon, name: str) -> None:
        folder = daemon.home / "state" / "keys"
        self.log = daemon.home / f"worker-{name}.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "diffusiond.daemon.cli", "worker", "--connect", f"tcp://127.0.0.1:{daemon.port}",
             "--server-key", str(folder / "server.key"), "--worker-key", str(folder / f"{name}.key_secret"),
             "--name", name, "--config", str(daemon.home / "worker.toml")],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=30)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        return self.process.wait(timeout=60)


@pytest.fixture
def cluster(tmp_path):
    """A daemon that runs no job itself, with keys for two workers; workers start in the test."""
    port = free_port()
    daemon = Daemon(tmp_path / "d", tcp=f"127.0.0.1:{port}", local_worker=False, worker_timeout=5.0)
    daemon.port = port
    (daemon.home / "worker.toml").write_text(f'state_dir = "{daemon.home / "worker-state"}"\n')
    for name in ("gpu1", "gpu2"):
        made = keys(daemon, name, "worker")
        assert made.returncode == 0, made.stderr
    made = keys(daemon, "laptop")
    assert made.returncode == 0, made.stderr
    daemon.start()
    workers: list[Worker] = []
    daemon.worker = lambda name: workers.append(Worker(daemon, name)) or workers[-1]
    yield daemon
    for worker in workers:
        worker.stop()
    daemon.close()


def worker_link(daemon: Daemon, port: int, key: str) -> zmq.Socket:
    """A DEALER on the daemon's worker port, speaking CurveZMQ with the key pair `key`."""
    folder = daemon.home / "state" / "keys"
    server_public, _ = zmq.auth.load_certificate(str(folder / "server.key"))
    public, secret = zmq.auth.load_certificate(str(folder / f"{key}.key_secret"))
    link = daemon.context.socket(zmq.DEALER)
    link.curve_serverkey, link.curve_publickey, link.curve_secretkey = server_public, public, secret
    link.setsockopt(zmq.LINGER, 0)
    return link


def long_job_running(cluster: Daemon, events: zmq.Socket, *names: str) -> str:
    """Start the workers, submit a long job and return its id once one of them runs its steps."""
    for name in names:
        cluster.worker(name)
    wait_joined(cluster, events, *names)
    job_id = cluster.call("submit", **LONG)["job"]["id"]
    cluster.wait_for(events, lambda e: e.get("type") == Event.JOB_PROGRESS and e.get("job") == job_id, 120)
    return job_id


def wait_joined(daemon: Daemon, events: zmq.Socket, *names: str, timeout: float = 120) -> None:
    waiting = set(names)
    while waiting:
        joined = daemon.wait_for(events, lambda e: e.get("type") == Event.WORKER_JOINED, timeout)
        waiting.discard(joined["worker"])


def test_a_remote_worker_runs_jobs_and_reports_through_the_daemon(cluster) -> None:
    events = cluster.subscribe(b"daemon", b"job.")
    cluster.worker("gpu1")
    wait_joined(cluster, events, "gpu1")
    assert [w["name"] for w in cluster.call("ping")["workers"]] == ["gpu1"]

    job_id = cluster.call("submit", **SMALL)["job"]["id"]
    seen = []
    while not seen or seen[-1]["type"] not in (Event.JOB_DONE, Event.JOB_FAILED):
        seen.append(cluster.wait_for(events, lambda e: e.get("job") == job_id))
    kinds = [e["type"] for e in seen]
    assert kinds[:2] == [Event.JOB_QUEUED, Event.JOB_STARTED] and kinds[-1] == Event.JOB_DONE, kinds
    assert [e["step"] for e in seen if e["type"] == Event.JOB_PROGRESS] == [1, 2, 3, 4]
    assert all(e["worker"] == "gpu1" for e in seen[1:])

    job = cluster.call("get", job=job_id)["job"]
    assert job["state"] == "done" and job["result"]["worker"] == "gpu1"
    assert job["outputs"] == [str(cluster.output_dir / f"{job_id}.png")]
    text = read_parameters(Path(job["outputs"][0]))
    assert text.startswith("a lighthouse at dusk") and "Seed: 7" in text and "Size: 64x64" in text

    shown = subprocess.run(  # what a user of `diffuse` sees of it: the bar says where the job runs
        [sys.executable, "-m", "diffusiond.clients.cli", "--runtime-dir", str(cluster.runtime_dir),
         "a second one", "--size", "128x128", "--steps", "40"],  # long enough to see its steps
        capture_output=True, text=True, timeout=120, env={**os.environ, "DIFFUSE_PROGRESS": "1"},
    )
    assert shown.returncode == 0, shown.stderr
    drawn = shown.stderr.replace("\x1b[K", "").split("\n")
    assert any(line.startswith("step  40/40 [") and line.endswith("on gpu1") for line in drawn), drawn
    assert Path(shown.stdout.strip()).parent == cluster.output_dir


def test_a_worker_killed_mid_job_has_its_job_requeued_and_done_once(cluster) -> None:
    events = cluster.subscribe(b"daemon", b"job.")
    workers = {name: cluster.worker(name) for name in ("gpu1", "gpu2")}
    wait_joined(cluster, events, *workers)
    job_id = cluster.call("submit", **LONG)["job"]["id"]
    started = cluster.wait_for(events, lambda e: e.get("type") == Event.JOB_STARTED and e.get("job") == job_id, 60)
    victim, survivor = started["worker"], ({"gpu1", "gpu2"} - {started["worker"]}).pop()
    cluster.wait_for(events, lambda e: e.get("type") == Event.JOB_PROGRESS and e.get("job") == job_id, 120)
    workers[victim].kill()

    lost = time.monotonic()
    requeued = cluster.wait_for(events, lambda e: e.get("type") == Event.JOB_REQUEUED and e.get("job") == job_id, 30)
    assert requeued["reason"] == f"worker {victim} lost"
    assert time.monotonic() - lost < 20  # worker_timeout is 5 s: found by the heartbeat, not by chance

    done = cluster.wait_for(events, lambda e: e.get("type") in (Event.JOB_DONE, Event.JOB_FAILED) and e.get("job") == job_id, 180)
    assert done["type"] == Event.JOB_DONE and done["worker"] == survivor
    job = cluster.call("get", job=job_id)["job"]
    assert job["state"] == "done" and job["attempts"] == 2
    assert cluster.outputs() == [f"{job_id}.png"]  # no second file, no half-written one


def test_the_worker_rejoins_a_daemon_that_was_killed_and_restarted(cluster) -> None:
    events = cluster.subscribe(b"daemon", b"job.")
    job_id = long_job_running(cluster, events, "gpu1")
    cluster.kill()  # the worker's job is `running` in SQLite: the restart queues it again

    cluster.start()
    job = cluster.wait_job(job_id, timeout=180)
    assert job["state"] == "done" and job["result"]["worker"] == "gpu1" and job["attempts"] == 2
    assert cluster.outputs() == [f"{job_id}.png"]
    second = cluster.call("submit", **SMALL)["job"]["id"]
    assert cluster.wait_job(second, timeout=60)["state"] == "done"


def test_a_client_key_cannot_take_jobs(cluster) -> None:
    link = worker_link(cluster, cluster.port, "laptop")
    link.setsockopt(zmq.SNDTIMEO, 2000)
    link.connect(f"tcp://127.0.0.1:{cluster.port + 2}")
    cluster.call("submit", **SMALL)
    try:
        link.send(msgpack.packb({"op": "hello", "v": 1, "name": "intruder"}))
    except zmq.Again:
        pass  # the handshake never completes: nothing can even be sent
    assert not link.poll(2000), "a client key was welcomed as a worker"
    deadline = time.monotonic() + 10
    public = zmq.auth.load_certificate(str(cluster.home / "state" / "keys" / "laptop.key"))[0].decode()
    while "refused a TCP worker whose key is not allowed: " + public not in cluster.log.read_text():
        assert time.monotonic() < deadline, cluster.log.read_text()
        time.sleep(0.05)
    assert cluster.call("ping")["workers"] == []
    link.close()


def test_cancel_reaches_the_worker_and_it_takes_the_next_job(cluster) -> None:
    events = cluster.subscribe(b"daemon", b"job.")
    long_id = long_job_running(cluster, events, "gpu1")
    next_id = cluster.call("submit", **SMALL)["job"]["id"]
    cluster.call("cancel", job=long_id)
    cancelled = cluster.wait_for(events, lambda e: e.get("job") == long_id and e["type"] in (Event.JOB_CANCELLED, Event.JOB_DONE))
    assert cancelled["type"] == Event.JOB_CANCELLED and cancelled["worker"] == "gpu1"
    assert cluster.wait_job(next_id)["state"] == "done"
    assert cluster.call("get", job=long_id)["job"]["state"] == "cancelled"
    assert cluster.outputs() == [f"{next_id}.png"]


def test_jobs_for_a_folder_on_the_daemon_machine_stay_with_its_own_worker(tmp_path) -> None:
    queue = JobQueue(tmp_path / "queue.sqlite3")
    folder_job, _ = queue.submit({"prompt": "a"}, "/models/mine", str(tmp_path), 5, None, None, 100)
    home_job, _ = queue.submit({"prompt": "b"}, "~/models/mine", str(tmp_path), 5, None, None, 100)
    named_job, _ = queue.submit({"prompt": "c"}, "sd15", str(tmp_path), 0, None, None, 100)
    assert queue.claim_next(named_models_only=True).id == named_job.id  # despite its lower priority
    assert queue.claim_next(named_models_only=True) is None
    assert [queue.claim_next().id for _ in range(2)] == [folder_job.id, home_job.id]
    queue.close()


def test_a_relative_folder_stays_with_the_daemon_machine_and_shipped_and_hub_models_travel(tmp_path) -> None:
    """A folder named without a leading / ~ or . (as a script or `diffusiond generate` may give it) is
    still a folder on this machine: no remote worker can open it."""
    queue = JobQueue(tmp_path / "queue.sqlite3")
    relative, _ = queue.submit({"prompt": "a"}, "models/sd15/fine-tuned", str(tmp_path), 9, None, None, 100)
    bare, _ = queue.submit({"prompt": "b"}, "my-model", str(tmp_path), 9, None, None, 100)
    travelling = [queue.submit({"prompt": name}, name, str(tmp_path), 0, None, None, 100)[0].id
                  for name in ("tiny", "sd15", "org/name@v2")]
    assert [queue.claim_next(named_models_only=True).id for _ in range(3)] == travelling
    assert queue.claim_next(named_models_only=True) is None
    assert [queue.claim_next().id for _ in range(2)] == [relative.id, bare.id]
    queue.close()


def test_a_queue_made_before_jobs_recorded_where_they_may_run_learns_it_on_open(tmp_path) -> None:
    """Jobs queued by an older daemon (no `portable` column) are told apart by their model name."""
    import sqlite3

    path = tmp_path / "queue.sqlite3"
    old = JobQueue(path)
    local, _ = old.submit({"prompt": "a"}, "/models/mine", str(tmp_path), 5, None, None, 100)
    hub, _ = old.submit({"prompt": "b"}, "org/name", str(tmp_path), 0, None, None, 100)
    old.close()
    with sqlite3.connect(path) as db:  # the queue as an older daemon left it
        db.execute("ALTER TABLE jobs DROP COLUMN portable")
    queue = JobQueue(path)
    assert queue.claim_next(named_models_only=True).id == hub.id
    assert queue.claim_next(named_models_only=True) is None
    assert queue.claim_next().id == local.id
    queue.close()


HELD: dict[str, str] = {}  # the job the fuzzing worker holds, once the daemon gave it one
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=20),
                    st.binary(max_size=20))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                           max_size=3), max_leaves=8)
PNG_LIKE = st.binary(max_size=40).map(lambda tail: b"\x89PNG\r\n\x1a\n" + tail)
worker_messages = st.fixed_dictionaries(
    {"op": st.one_of(st.sampled_from(["hello", "ready", "heartbeat", "event", "done", "failed", "cancelled",
                                      "requeue", "nonsense"]), values)},
    optional={
        "v": st.one_of(st.just(1), values), "name": values, "job": st.one_of(st.deferred(lambda: st.just(HELD["job"])), values),
        "topic": st.one_of(st.sampled_from([b"job.x", b"model.tiny", b"daemon"]), values),
        "body": st.one_of(st.fixed_dictionaries({"type": st.sampled_from([Event.JOB_PROGRESS, Event.MODEL_LOADED, Event.JOB_DONE])},
                                                optional={"step": values}), values),
        "pngs": st.one_of(st.lists(st.one_of(PNG_LIKE, values), max_size=3), values),
        "summary": st.one_of(st.dictionaries(st.sampled_from(["seed", "width", "flagged", "timings", "x"]), values), values),
        "code": values, "message": values, "reason": values,
    },
)


@pytest.fixture(scope="module")
def fuzz_link(tmp_path_factory):
    """A daemon for remote workers only, and a DEALER holding an allowed worker key that has joined
    and holds a job: the fuzzer speaks as a worker that was let in."""
    port = free_port()
    daemon = Daemon(tmp_path_factory.mktemp("fuzz") / "d", tcp=f"127.0.0.1:{port}", local_worker=False)
    assert keys(daemon, "fuzzer", "worker").returncode == 0
    daemon.start()
    link = worker_link(daemon, port, "fuzzer")
    link.connect(f"tcp://127.0.0.1:{port + 2}")
    for _ in range(3):
        daemon.call("submit", **SMALL)
    link.send(msgpack.packb({"op": "hello", "v": 1, "name": "fuzzer"}))
    expect(link, "welcome")
    link.send(msgpack.packb({"op": "ready"}))
    HELD["job"] = expect(link, "job")["job"]
    yield daemon, link
    link.close()
    daemon.close()


def expect(link: zmq.Socket, op: str) -> dict:
    """The next message of this op on the worker link (heartbeats and the rest skipped)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if link.poll(1000):
            message = msgpack.unpackb(link.recv(), raw=False)
            if message.get("op") == op:
                return message
    raise TimeoutError(f"no {op} from the daemon")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(message=worker_messages)
def test_fuzzed_worker_messages_are_handled(fuzz_link, message) -> None:
    _, link = fuzz_link
    link.send(msgpack.packb(message, use_bin_type=True))


def test_the_daemon_survived_the_worker_fuzzing_without_its_safety_net(fuzz_link) -> None:
    daemon, link = fuzz_link
    link.send(msgpack.packb({"op": "hello", "v": 1, "name": "fuzzer"}))
    expect(link, "welcome")  # in order after every fuzzed message: all of them were handled
    assert daemon.process.poll() is None and daemon.call("ping")["ok"]
    assert "could not be handled" not in daemon.log.read_text()  # each bad message met a check of its own
    states = {job["state"] for job in daemon.call("list", limit=100)["jobs"]}
    assert states <= {"queued", "running", "done", "failed", "cancelled"}
