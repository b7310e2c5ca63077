"""Trying to break the daemon: fuzzed requests, and a user who is not the daemon's."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffusiond.clients.protocol import OPS, Code, Event

DOCUMENTED = {value for name, value in vars(Code).items() if name.isupper()}
FIELDS = ["v", "op", "id", "job", "prompt", "steps", "width", "height", "count", "seed", "scheduler", "states",
          "limit", "offset", "all_queued", "model", "priority", "output_dir", "init_image", "announce", "before",
          "guidance_scale", "strength", "rng", "negative_prompt", "safety_checker", "idempotency_key"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1), st.floats(allow_nan=True),
    st.text(max_size=50), st.binary(max_size=50),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
requests = st.fixed_dictionaries(
    {"v": st.one_of(st.just(1), values), "op": st.one_of(st.sampled_from(OPS), values)},
    optional={name: values for name in FIELDS if name not in ("v", "op")},
)
# Destructive or slow ops are fuzzed in their arguments only where that cannot stop the daemon or the queue.
SPARED = {"shutdown", "pause", "pull", "remove"}


@pytest.fixture(scope="module")
def target(daemon):
    """The shared daemon, with a job queued before the fuzzing that must still make its image
    (its image, not its record: a fuzzed `prune` may forget finished jobs, as prune should)."""
    before = daemon.call("submit", prompt="queued before the fuzzing", steps=3, width=64, height=64, priority=-1000)
    yield daemon
    image = daemon.output_dir / f"{before['job']['id']}.png"
    deadline = time.monotonic() + 120
    while not image.exists():
        assert time.monotonic() < deadline, "the job queued before the fuzzing made no image"
        time.sleep(0.05)


def answer(daemon, frames: list[bytes]) -> dict:
    socket = daemon.client()
    try:
        socket.send_multipart(frames)
        return daemon.receive(socket, timeout=10)
    finally:
        socket.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=requests)
def test_fuzzed_requests_get_a_documented_answer(target, request) -> None:
    if isinstance(request.get("op"), str) and request["op"] in SPARED:
        request["op"] = "ping"
    if request.get("op") == "cancel" and request.get("all_queued") is True:
        request["all_queued"] = False  # would cancel the job that proves nothing queued is lost
    reply = answer(target, [msgpack.packb(request, use_bin_type=True)])
    assert isinstance(reply, dict) and "ok" in reply
    if not reply["ok"]:
        assert reply["error"]["code"] in DOCUMENTED and reply["error"]["code"] != Code.INTERNAL, reply


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frame=st.binary(max_size=300))
def test_arbitrary_bytes_get_bad_message_or_a_documented_answer(target, frame) -> None:
    reply = answer(target, [frame])
    assert reply["ok"] or reply["error"]["code"] in DOCUMENTED - {Code.INTERNAL}


def test_the_daemon_survived_the_fuzzing(target) -> None:
    assert target.call("ping")["ready"]


def test_no_request_makes_the_daemon_read_a_file(daemon, tmp_path) -> None:
    """Init images travel as bytes: a path, even to a valid image the daemon could read, is refused,
    so there is no list of allowed folders to get wrong."""
    import io

    from PIL import Image

    readable = tmp_path / "private.png"
    Image.new("RGB", (64, 64)).save(readable)
    reply = daemon.call("submit", prompt="img2img", init_image=str(readable), steps=2)
    assert not reply["ok"] and reply["error"]["code"] == Code.BAD_MESSAGE
    assert "init_image: must be binary" in reply["error"]["message"]
    reply = daemon.call("submit", prompt="img2img", init_image=str(readable).encode(), steps=2)
    assert not reply["ok"] and reply["error"]["code"] == Code.INVALID_PARAMETER  # bytes of a path: not an image
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="PNG")
    reply = daemon.call("submit", prompt="img2img", init_image=buffer.getvalue(), steps=2)
    assert reply["ok"], reply


@pytest.mark.skipif(os.getuid() != 0, reason="running a client as another user needs root")
def test_another_user_cannot_reach_the_ipc_endpoint(daemon) -> None:
    code = (
        "import os, sys, zmq, msgpack\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s = zmq.Context().socket(zmq.DEALER); s.setsockopt(zmq.LINGER, 0)\n"
        f"s.connect('ipc://{daemon.runtime_dir}/request')\n"
        "s.send(msgpack.packb({'v': 1, 'op': 'ping', 'id': 1}))\n"
        "print('answered' if s.poll(3000) else 'no answer')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "no answer", done.stderr
    assert daemon.call("ping")["ready"]  # while its own user still gets one


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the daemon's memory from /proc")
def test_fifty_clients_and_twenty_subscribers(fresh) -> None:
    """Bounded: 50 clients × 40 submits with the queue paused, 20 subscribers watching; every request
    answered, every subscriber sees every job queued, and the daemon's memory stays bounded."""
    import threading

    daemon = fresh.start()
    daemon.call("pause")
    before = rss_mb(daemon.process.pid)
    subscribers = [daemon.subscribe(b"job.") for _ in range(20)]
    answered, failures = [], []

    def client() -> None:
        socket = daemon.client()
        try:
            for i in range(40):
                reply = daemon.call("submit", socket=socket, prompt=f"load {i}", steps=1, width=64, height=64)
                (answered if reply.get("ok") else failures).append(reply)
        except TimeoutError as exc:
            failures.append(exc)
        finally:
            socket.close()

    threads = [threading.Thread(target=client) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert failures == [] and len(answered) == 2000
    ids = {reply["job"]["id"] for reply in answered}
    for socket in subscribers:
        queued = set()
        while len(queued) < len(ids):
            _, event = daemon.next_event(socket, 30)
            if event["type"] == Event.JOB_QUEUED:
                queued.add(event["job"])
        assert queued == ids
    assert rss_mb(daemon.process.pid) - before < 100
    assert len(daemon.call("cancel", all_queued=True)["cancelled"]) == 2000
